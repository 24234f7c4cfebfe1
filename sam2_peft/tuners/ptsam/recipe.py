"""Command-line flags of the PTSAM recipes (on top of the shared recipe flags) and how they become a training run."""

from __future__ import annotations

import argparse

from ...training.arguments import recipe_parser, run_recipe
from .config import OUTPUT_MASKS, TOKEN_INITS
from .method import PtsamMethod

DEFAULT_LR = 1e-3
"""Prompt tokens start at the scale of SAM's prompt embeddings (~1) and need larger steps than LoRA weights."""


def ptsam_parser(description: str, encoder_prompts: int) -> argparse.ArgumentParser:
    """The shared recipe parser plus PTSAM's flags; `--prompt` defaults to `none` (prompt-free, the PTSAM setting)."""
    parser = recipe_parser(description, default_lr=DEFAULT_LR)
    parser.set_defaults(prompt="none")
    group = parser.add_argument_group("PTSAM")
    group.add_argument("--num-tokens", type=int, default=8, help="Learned decoder prompt tokens.")
    group.add_argument(
        "--encoder-prompts", type=int, default=encoder_prompts, help="Learned prompts per Hiera block (0 = none)."
    )
    group.add_argument(
        "--encoder-stages", type=int, nargs="+", default=None, help="Hiera stages with prompts (default: all)."
    )
    group.add_argument("--token-init", choices=TOKEN_INITS, default="normal", help="Decoder token initialisation.")
    group.add_argument("--token-init-std", type=float, default=1.0, help="Std of the normal token initialisation.")
    group.add_argument("--output-mask", choices=OUTPUT_MASKS, default="single", help="Decoder output used as the mask.")
    return parser


def run_ptsam(args: argparse.Namespace) -> dict:
    """Train PTSAM: prompt-free on semantic targets (the union of all objects) with `--prompt none`, else prompted
    (tokens appended to the sampled boxes/points) on per-object targets."""
    method = PtsamMethod(
        num_tokens=args.num_tokens,
        encoder_prompts=args.encoder_prompts,
        encoder_stages=args.encoder_stages,
        token_init=args.token_init,
        token_init_std=args.token_init_std,
        output_mask=args.output_mask,
        init_seed=args.seed,
    )
    return run_recipe(args, method, target_mode="semantic" if args.prompt == "none" else "instances")
