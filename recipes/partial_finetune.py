"""Partial fine-tuning of SAM 2: unfreeze whole components, each with its own learning rate (a baseline).

    accelerate launch recipes/partial_finetune.py --model facebook/sam2.1-hiera-small --data path/to/data \
        --component-lr mask_decoder=5e-6 prompt_encoder=5e-6 vision_encoder=1e-6
"""

from sam2_peft.training.arguments import recipe_parser, run_from_command_line, run_recipe
from sam2_peft.tuners.methods import PartialFinetuneMethod


def parse_component_lrs(pairs: list[str]) -> dict[str, float]:
    """`["mask_decoder=5e-6", ...]` -> `{"mask_decoder": 5e-6, ...}`."""
    rates = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if not value:
            raise SystemExit(f"--component-lr expects NAME=LR pairs, got '{pair}'.")
        rates[name] = float(value)
    return rates


def main(argv: list[str] | None = None) -> dict:
    parser = recipe_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--component-lr",
        nargs="+",
        default=["mask_decoder=5e-6", "prompt_encoder=5e-6"],
        help="Components to unfreeze with their learning rates (vision_encoder, prompt_encoder, mask_decoder).",
    )
    args = parser.parse_args(argv)
    method = PartialFinetuneMethod(
        learning_rates=parse_component_lrs(args.component_lr), weight_decay=args.weight_decay
    )
    return run_recipe(args, method)


if __name__ == "__main__":
    run_from_command_line(main)
