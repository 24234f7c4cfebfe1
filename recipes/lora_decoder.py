"""LoRA on SAM 2's mask decoder (or any preset), box/point prompts.

accelerate launch recipes/lora_decoder.py --model facebook/sam2.1-hiera-small --data path/to/data
"""

from sam2_peft.training.arguments import recipe_parser, run_from_command_line, run_recipe
from sam2_peft.tuners.lora import LORA_PRESETS
from sam2_peft.tuners.methods import LoraMethod


def main(argv: list[str] | None = None) -> dict:
    parser = recipe_parser(__doc__.splitlines()[0])
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora-r", type=int, default=16, help="LoRA rank.")
    lora.add_argument("--lora-alpha", type=int, default=32)
    lora.add_argument("--lora-dropout", type=float, default=0.1)
    lora.add_argument("--targets", default="decoder", help=f"Preset(s) joined by '+': {', '.join(LORA_PRESETS)}.")
    lora.add_argument("--target-regex", default=None, help="Full-match regex over module names (overrides --targets).")
    args = parser.parse_args(argv)
    method = LoraMethod(args.targets, args.lora_r, args.lora_alpha, args.lora_dropout, args.target_regex)
    return run_recipe(args, method)


if __name__ == "__main__":
    run_from_command_line(main)
