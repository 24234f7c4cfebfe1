"""`sam2-peft`: one command with subcommands for training, conversion and (with the inference extras) prediction."""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def _recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.py")) if RECIPES_DIR.is_dir() else []


def train(argv: list[str]) -> None:
    """Forward to `recipes/<RECIPE>.py` (same flags; `sam2-peft train RECIPE --help` lists them)."""
    recipes = _recipes()
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: sam2-peft train RECIPE [recipe flags]\n\nrecipes: " + (", ".join(recipes) or "none found"))
        print("For several GPUs or processes: accelerate launch recipes/RECIPE.py [flags]")
        return
    name, rest = argv[0], argv[1:]
    if name not in recipes:
        sys.exit(
            f"error: unknown recipe '{name}'. Known: {', '.join(recipes) or 'none'} (looked in {RECIPES_DIR}; recipes "
            "ship with the source checkout, not the wheel)."
        )
    sys.argv = [str(RECIPES_DIR / f"{name}.py"), *rest]
    runpy.run_path(sys.argv[0], run_name="__main__")


def convert_meta(argv: list[str]) -> None:
    from .models.meta_checkpoint import main as convert_main

    sys.exit(convert_main(argv))


COMMANDS = {
    "train": (train, "fine-tune with a recipe (lora_decoder, partial_finetune, ...)"),
    "convert-meta": (convert_meta, "convert a Meta SAM 2 .pt checkpoint into a transformers folder"),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="sam2-peft",
        description="Fine-tune SAM 2 with small adapters, and use them.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {name:<14}{help_}" for name, (_, help_) in COMMANDS.items()),
    )
    parser.add_argument("command", choices=COMMANDS, metavar="COMMAND", help="one of the commands below")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return
    args = parser.parse_args(argv[:1])
    COMMANDS[args.command][0](argv[1:])


if __name__ == "__main__":
    main()
