"""PTSAM with deep encoder prompts: decoder tokens plus learned prompts in every Hiera block, prompt-free by default.

accelerate launch recipes/ptsam_encoder.py --model facebook/sam2.1-hiera-small --data path/to/data --encoder-prompts 8
"""

from sam2_peft.training.arguments import run_from_command_line
from sam2_peft.tuners.ptsam.recipe import ptsam_parser, run_ptsam


def main(argv: list[str] | None = None) -> dict:
    args = ptsam_parser(__doc__.splitlines()[0], encoder_prompts=8).parse_args(argv)
    if args.encoder_prompts < 1:
        raise SystemExit("ptsam_encoder trains encoder prompts: --encoder-prompts must be at least 1.")
    return run_ptsam(args)


if __name__ == "__main__":
    run_from_command_line(main)
