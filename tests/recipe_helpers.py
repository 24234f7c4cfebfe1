"""Running recipes in tests: the arguments of a short tiny-model LoRA run, its one-line user-error exit, and the
datasets a recipe builds from its flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from sam2_peft.commandline import run_from_command_line
from sam2_peft.recipes.arguments import RecipeArguments, parse_recipe_arguments
from sam2_peft.recipes.lora import main as lora_recipe
from sam2_peft.recipes.runner import build_datasets, dataset_config


def lora_args(base: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """Flags of a short decoder-LoRA run of the tiny model: rank 4, batch 2, a third of the images for validation."""
    return [
        "--model", str(base), "--data", str(data), "--output-dir", str(out), "--val-fraction", "0.34",
        "--report-to", "none", "--batch-size", "2", "--lora-r", "4", "--lr", "1e-3", "--num-panels", "1", *extra,
    ]  # fmt: skip


def error_line(capsys, argv: list[str]) -> str:
    """Run the LoRA recipe as the command line does; return its one-line exit message (status 1, no traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        run_from_command_line(lambda: lora_recipe(argv))
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    assert "Traceback" not in capsys.readouterr().err
    return message


def parse_args(*argv: str, **defaults) -> RecipeArguments:
    """The shared recipe flags of `argv` (no method flags), as a recipe parses them."""
    return parse_recipe_arguments("test", argv=list(argv), **defaults)


def datasets(args: RecipeArguments, processor, target_mode: str = "instances"):
    """(train, validation) datasets of parsed recipe arguments, as a recipe builds them."""
    return build_datasets(args.data, processor, dataset_config(args, target_mode), args.training.seed)
