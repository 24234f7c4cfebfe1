"""PTSAM: train only learned decoder prompt tokens (8 x 256 = 2,048 parameters), prompt-free by default.

accelerate launch recipes/ptsam_decoder.py --model facebook/sam2.1-hiera-small --data path/to/data --train-images 16
"""

from sam2_peft.training.arguments import run_from_command_line
from sam2_peft.tuners.ptsam.recipe import ptsam_parser, run_ptsam


def main(argv: list[str] | None = None) -> dict:
    args = ptsam_parser(__doc__.splitlines()[0], encoder_prompts=0).parse_args(argv)
    return run_ptsam(args)


if __name__ == "__main__":
    run_from_command_line(main)
