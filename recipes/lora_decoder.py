"""LoRA on SAM 2's mask decoder (or any preset), box/point prompts.

accelerate launch recipes/lora_decoder.py --model facebook/sam2.1-hiera-small --data path/to/data
"""

from sam2_peft.training.arguments import recipe_parser, run_from_command_line, run_recipe
from sam2_peft.tuners.lora import LORA_PRESETS
from sam2_peft.tuners.methods import LoraMethod

DEFAULT_LR = 2e-3
"""Decoder LoRA on the bundled sample (compact-synthetic, 100 steps, seeds 0-2): Dice +0.06 to +0.09 at 2e-3 against
+0.02 to +0.04 at 1e-4; the real-data tests (nuclei, polyps) train at this rate too."""


def main(argv: list[str] | None = None) -> dict:
    parser = recipe_parser(__doc__.splitlines()[0], default_lr=DEFAULT_LR)
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
