"""`accelerate launch recipes/pretrain.py ...`: the `pretrain` recipe (sam2_peft/recipes/pretrain.py; `--help` lists its flags)."""

from sam2_peft.cli import run_from_command_line
from sam2_peft.recipes.pretrain import main as main

if __name__ == "__main__":
    run_from_command_line(main)
