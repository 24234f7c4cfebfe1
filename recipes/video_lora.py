"""LoRA on SAM 2 video: mask decoder and memory (attention, encoder, object pointers), trained on clips.

accelerate launch recipes/video_lora.py --model facebook/sam2.1-hiera-small --data path/to/davis \
    --clip-len 8 --annotated-every 5 --loss-frames last --targets decoder,memory
"""

from sam2_peft.training.arguments import recipe_parser, run_from_command_line
from sam2_peft.training.video_arguments import add_video_arguments, run_video_recipe
from sam2_peft.tuners.lora import LORA_PRESETS
from sam2_peft.tuners.methods import LoraMethod


def main(argv: list[str] | None = None) -> dict:
    parser = add_video_arguments(recipe_parser(__doc__.splitlines()[0]))
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora-r", type=int, default=16, help="LoRA rank.")
    lora.add_argument("--lora-alpha", type=int, default=32)
    lora.add_argument("--lora-dropout", type=float, default=0.1)
    lora.add_argument(
        "--targets", default="decoder,memory", help=f"Presets joined by ',' or '+': {', '.join(LORA_PRESETS)}."
    )
    lora.add_argument("--target-regex", default=None, help="Full-match regex over module names (overrides --targets).")
    args = parser.parse_args(argv)
    preset = args.targets.replace(",", "+")
    method = LoraMethod(preset, args.lora_r, args.lora_alpha, args.lora_dropout, args.target_regex)
    return run_video_recipe(args, method)


if __name__ == "__main__":
    run_from_command_line(main)
