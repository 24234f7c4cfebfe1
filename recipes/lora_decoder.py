"""`accelerate launch recipes/lora_decoder.py ...`: the `lora` recipe (sam2_peft/recipes/lora.py; `--help` lists its flags)."""

from sam2_peft.cli import run_from_command_line
from sam2_peft.recipes.lora import main as main

if __name__ == "__main__":
    run_from_command_line(main)
