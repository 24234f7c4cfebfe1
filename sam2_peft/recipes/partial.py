"""Partial fine-tuning of SAM 2: unfreeze whole components, each with its own learning rate (a baseline).

    sam2-peft train partial --model facebook/sam2.1-hiera-small --data path/to/data \
        --component-lr mask_decoder=1e-4 prompt_encoder=1e-4 vision_encoder=1e-6
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..commandline import run_from_command_line
from ..models.names import COMPONENTS
from ..training.config import ConfigError
from .arguments import image_rules, parse_recipe_arguments

DEFAULT_COMPONENT_LRS = ["mask_decoder=1e-4", "prompt_encoder=1e-4"]
"""The components and rates measured best on real data (benchmarks/method_defaults.py)."""


@dataclass
class PartialArguments:
    """What unfreezes."""

    _argument_group_name = "partial fine-tuning"

    component_lr: list[str] = field(
        default_factory=lambda: list(DEFAULT_COMPONENT_LRS),
        metadata={
            "help": "Components to unfreeze with their learning rates, as NAME=LR (vision_encoder, prompt_encoder, "
            "mask_decoder; video models also memory_attention, memory_encoder, object_pointer_proj)."
        },
    )

    def learning_rates(self) -> dict[str, float]:
        """`["mask_decoder=1e-4", ...]` -> `{"mask_decoder": 1e-4, ...}`; `ValueError` naming a malformed pair."""
        rates = {}
        for pair in self.component_lr:
            name, _, value = pair.partition("=")
            try:
                rates[name] = float(value)
            except ValueError:
                raise ValueError(
                    f"--component-lr expects NAME=LR pairs such as mask_decoder=1e-4, got '{pair}'."
                ) from None
        return rates

    def __post_init__(self) -> None:
        unknown = sorted(set(self.learning_rates()) - set(COMPONENTS))
        if unknown:
            raise ValueError(f"--component-lr: unknown component(s) {unknown}; choose from {', '.join(COMPONENTS)}.")


def main(argv: Sequence[str] | None = None, **defaults) -> dict:
    # No --lr default: each component has its own rate (--component-lr), and a given --lr is refused, not ignored.
    rules = image_rules(
        lambda a: "vision_encoder" not in PartialArguments(a.component_lr).learning_rates(),
        "--component-lr unfreezes vision_encoder",
    )
    args = parse_recipe_arguments(
        __doc__.splitlines()[0], PartialArguments, argv=argv, rules=rules, **{"lr": None, **defaults}
    )
    if args.training.lr is not None:
        raise ConfigError(
            f"--lr {args.training.lr:g}: partial fine-tuning gives each component its own learning rate; set them "
            "with --component-lr NAME=LR (e.g. --component-lr mask_decoder=1e-4 prompt_encoder=1e-4) instead."
        )
    from ..adapters.methods import PartialFinetuneMethod
    from .runner import run_recipe

    method = PartialFinetuneMethod(args.method.learning_rates(), weight_decay=args.training.weight_decay)
    return run_recipe(args, method)


if __name__ == "__main__":
    run_from_command_line(main)
