"""PTSAM: train only learned prompt tokens (decoder tokens, optionally prompts in every Hiera block), prompt-free by
default (targets: the union of all objects).

    sam2-peft train ptsam --model facebook/sam2.1-hiera-small --data path/to/data --train-images 16
    sam2-peft train ptsam --encoder-prompts 8 ...       # deep encoder prompts too
    sam2-peft train ptsam --data DIR --mask-type semantic   # one adapter, a token set per class of DIR/classes.json
    accelerate launch -m sam2_peft.recipes.ptsam ...
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import asdict, replace

from ..commandline import run_from_command_line
from ..training.config import LossConfig
from ..tuners.options import PtsamOptions
from .arguments import image_rules, parse_recipe_arguments

DEFAULT_LR = 1e-2
"""PTSAM's learning rate, with the padding token init: the rate of benchmarks/method_defaults.py's grid (nuclei,
polyps, a synthetic shift set; 3 seeds; 40 steps) with no run below the base and then the best mean Dice gain (+0.197,
worst +0.010); 3e-3 ended below it in 3 runs of 9 and 1e-3 in 6 (benchmarks/results/method_defaults.md)."""

MULTICLASS_MASK_LOSS = "bce"
"""A multi-class adapter's mask loss unless `--mask-loss` says otherwise: the class-balanced BCE. With the focal
loss (alpha 0.25, weighing negatives 3:1) every class but the largest shrank to nearly empty masks on synthetic class
maps, since each class's pixels are a few percent of its mask and other classes' objects count against it
(docs/guides/multiclass.md has the runs)."""

logger = logging.getLogger(__name__)

RULES = image_rules(lambda a: a.encoder_prompts == 0, "--encoder-prompts trains prompts inside the image encoder")
"""The PTSAM recipe's flags that act only with others' values."""


def main(argv: Sequence[str] | None = None, **defaults) -> dict:
    """Prompt-free (`--prompt none`, the default) trains on semantic targets; with boxes or points the tokens are
    appended to the sampled prompts and train on per-object targets."""
    defaults = {"lr": DEFAULT_LR, "prompt": "none", **defaults}
    args = parse_recipe_arguments(__doc__.splitlines()[0], PtsamOptions, argv=argv, rules=RULES, **defaults)
    from ..adapters.methods import PtsamMethod
    from .runner import image_task, run_recipe, semantic_classes

    target_mode = "semantic" if args.prompts.prompt == "none" else "instances"
    classes = None
    if target_mode == "semantic" and args.data.mask_type == "semantic":
        classes = semantic_classes(args.data)  # one token set per class, all in one adapter
        args.loss = multiclass_loss(args.loss, args.given)
    method = PtsamMethod(
        **asdict(args.method), init_seed=args.training.seed, id2label=classes.id2label if classes else None
    )
    return run_recipe(
        args,
        method,
        build_task=lambda a, processor: image_task(a, processor, target_mode, classes),
        run_info={"classes": classes.id2label, "class_weights": classes.weights} if classes else None,
    )


def multiclass_loss(loss: LossConfig, given: Collection[str]) -> LossConfig:
    """A multi-class adapter's loss: `MULTICLASS_MASK_LOSS` unless the command line gave `--mask-loss`."""
    if "mask_loss" in given:
        return loss
    logger.info("Multi-class: mask loss %s (--mask-loss focal for the focal loss).", MULTICLASS_MASK_LOSS)
    return replace(loss, mask_loss=MULTICLASS_MASK_LOSS)


def encoder_main(argv: Sequence[str] | None = None) -> dict:
    """PTSAM with deep encoder prompts (8 per Hiera block unless --encoder-prompts says otherwise)."""
    return main(argv, encoder_prompts=8)


if __name__ == "__main__":
    run_from_command_line(main)
