"""`accelerate launch recipes/video_lora.py ...`: the `video` recipe (sam2_peft/recipes/video.py; `--help` lists its flags)."""

from sam2_peft.cli import run_from_command_line
from sam2_peft.recipes.video import main as main

if __name__ == "__main__":
    run_from_command_line(main)
