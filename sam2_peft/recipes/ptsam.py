"""PTSAM: train only learned prompt tokens (decoder tokens, optionally prompts in every Hiera block), prompt-free by
default (targets: the union of all objects).

    sam2-peft train ptsam --model facebook/sam2.1-hiera-small --data path/to/data --train-images 16
    sam2-peft train ptsam --encoder-prompts 8 ...       # deep encoder prompts too
    accelerate launch -m sam2_peft.recipes.ptsam ...
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

from ..commandline import run_from_command_line
from ..tuners.options import PtsamOptions
from .arguments import parse_recipe_arguments

DEFAULT_LR = 1e-3
"""PTSAM's learning rate. Measured (benchmarks/method_defaults.py, one seed): with `--token-init padding` 1e-2 moved
nuclei prompt-free Dice 0.113 -> 0.532 in 40 steps, but that init fell below the base on polyps at 2e-2, so the
defaults stay until the full grid decides."""


def main(argv: Sequence[str] | None = None, **defaults) -> dict:
    """Prompt-free (`--prompt none`, the default) trains on semantic targets; with boxes or points the tokens are
    appended to the sampled prompts and train on per-object targets."""
    defaults = {"lr": DEFAULT_LR, "prompt": "none", **defaults}
    args = parse_recipe_arguments(__doc__.splitlines()[0], PtsamOptions, argv=argv, **defaults)
    from ..adapters.methods import PtsamMethod
    from .runner import image_task, run_recipe

    target_mode = "semantic" if args.prompts.prompt == "none" else "instances"
    method = PtsamMethod(**asdict(args.method), init_seed=args.training.seed)
    return run_recipe(args, method, build_task=lambda a, processor: image_task(a, processor, target_mode))


def encoder_main(argv: Sequence[str] | None = None) -> dict:
    """PTSAM with deep encoder prompts (8 per Hiera block unless --encoder-prompts says otherwise)."""
    return main(argv, encoder_prompts=8)


if __name__ == "__main__":
    run_from_command_line(main)
