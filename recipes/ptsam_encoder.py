"""`accelerate launch recipes/ptsam_encoder.py ...`: the `ptsam` recipe (sam2_peft/recipes/ptsam.py; `--help` lists its flags)."""

from sam2_peft.cli import run_from_command_line
from sam2_peft.recipes.ptsam import encoder_main as main

if __name__ == "__main__":
    run_from_command_line(main)
