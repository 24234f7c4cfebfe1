"""Running a LoRA recipe in tests: the arguments of a short tiny-model run, and its one-line user-error exit."""

from __future__ import annotations

from pathlib import Path

import pytest

from recipes.lora_decoder import main as lora_recipe
from sam2_peft.training.arguments import run_from_command_line


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
