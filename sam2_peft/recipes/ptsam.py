"""PTSAM: train only learned prompt tokens (decoder tokens, optionally prompts in every Hiera block), prompt-free by
default (targets: the union of all objects).

    sam2-peft train ptsam --model facebook/sam2.1-hiera-small --data path/to/data --train-images 16
    sam2-peft train ptsam --encoder-prompts 8 ...       # deep encoder prompts too
    sam2-peft train ptsam --data DIR --mask-type semantic   # one adapter, a token set per class of DIR/classes.json
    accelerate launch -m sam2_peft.recipes.ptsam ...
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, fields, replace

from ..commandline import run_from_command_line
from ..tuners.options import PtsamOptions
from .arguments import RecipeArguments, image_rules, parse_recipe_arguments

DEFAULT_LR = 1e-2
"""PTSAM's learning rate, with the padding token init: the rate of benchmarks/method_defaults.py's grid (nuclei,
polyps, a synthetic shift set; 3 seeds; 40 steps) with no run below the base and then the best mean Dice gain (+0.197,
worst +0.010); 3e-3 ended below it in 3 runs of 9 and 1e-3 in 6 (benchmarks/results/method_defaults.md)."""

MULTICLASS_DEFAULTS = {"tune_upscaling": True, "lr": 2e-3, "class_weights": "auto", "mask_loss": "bce"}
"""A prompt-free multi-class adapter's settings unless the command line gives them, chosen on a development set of
synthetic class maps (generator seed 1, never the scenes the guide reports; docs/guides/multiclass.md has the runs).
Tokens alone (the one-class default) left every class but the most common one below the prompt-free base: the
frozen upscaling layers keep no trace of the classes. Tuning them (shared by all classes) at 2e-3 (1e-2 swung
between evaluations) with classes weighed by inverse pixel frequency (without, the rarest class stayed below its
base) improved every class. The class-balanced BCE, not the focal loss: see `MULTICLASS_MASK_LOSS`."""

MULTICLASS_MASK_LOSS = MULTICLASS_DEFAULTS["mask_loss"]
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
        args = multiclass_arguments(args)
        classes = semantic_classes(args.data)  # one token set per class, all in one adapter
    method = PtsamMethod(
        **asdict(args.method), init_seed=args.training.seed, id2label=classes.id2label if classes else None
    )
    prompt_free = target_mode == "semantic"  # with prompts: the shared per-object path, each object in its class
    return run_recipe(
        args,
        method,
        build_task=(lambda a, processor: image_task(a, processor, target_mode, classes)) if prompt_free else None,
        run_info={"classes": classes.id2label, "class_weights": classes.weights} if classes else None,
    )


def multiclass_arguments(args: RecipeArguments) -> RecipeArguments:
    """A prompt-free multi-class run's arguments: `MULTICLASS_DEFAULTS` where the command line gave no value."""
    chosen = {name: value for name, value in MULTICLASS_DEFAULTS.items() if name not in args.given}
    if not chosen:
        return args
    logger.info("Multi-class defaults: %s.", ", ".join(f"{name}={value}" for name, value in chosen.items()))
    for section in ("method", "training", "data", "loss"):  # each default goes to the settings that declare it
        settings = getattr(args, section)
        own = {name: value for name, value in chosen.items() if name in {f.name for f in fields(settings)}}
        args = replace(args, **{section: replace(settings, **own)})
    return args


def encoder_main(argv: Sequence[str] | None = None) -> dict:
    """PTSAM with deep encoder prompts (8 per Hiera block unless --encoder-prompts says otherwise)."""
    return main(argv, encoder_prompts=8)


if __name__ == "__main__":
    run_from_command_line(main)
