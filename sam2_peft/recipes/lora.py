"""LoRA on SAM 2's mask decoder (or any preset), box/point prompts.

sam2-peft train lora --model facebook/sam2.1-hiera-small --data path/to/data
accelerate launch -m sam2_peft.recipes.lora --model facebook/sam2.1-hiera-small --data path/to/data
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

from ..commandline import run_from_command_line
from ..tuners.options import LoraOptions, preset_regex
from .arguments import LORA_RULES, image_rules, parse_recipe_arguments

DEFAULT_LR = 2e-3
"""Decoder LoRA's learning rate: best of the rates measured on real data (benchmarks/method_defaults.py)."""


RULES = (
    *image_rules(
        lambda a: "vision_encoder" not in (a.target_regex or preset_regex(a.targets)),
        "LoRA targets the image encoder (--targets encoder or a --target-regex naming vision_encoder)",
    ),
    *LORA_RULES,
)
"""The LoRA recipe's flags that act only with others' values."""


def main(argv: Sequence[str] | None = None, **defaults) -> dict:
    args = parse_recipe_arguments(
        __doc__.splitlines()[0], LoraOptions, argv=argv, rules=RULES, lr=DEFAULT_LR, **defaults
    )
    from ..adapters.methods import LoraMethod
    from .runner import run_recipe

    return run_recipe(args, LoraMethod(**asdict(args.method)))


if __name__ == "__main__":
    run_from_command_line(main)
