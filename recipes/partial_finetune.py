"""`accelerate launch recipes/partial_finetune.py ...`: the `partial` recipe (sam2_peft/recipes/partial.py; `--help` lists its flags)."""

from sam2_peft.cli import run_from_command_line
from sam2_peft.recipes.partial import main as main

if __name__ == "__main__":
    run_from_command_line(main)
