"""Command-line arguments shared by every recipe, and how they become a model, datasets and a trainer."""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ..data.augment import AugmentationConfig
from ..data.dataset import DatasetConfig, SegmentationDataset
from ..data.prompts import PROMPT_TYPES, PromptConfig
from ..data.sources import (
    DATA_SOURCES,
    DEFAULT_MAX_IMAGE_PIXELS,
    MASK_TYPES,
    DataError,
    check_data_source,
    check_disjoint,
    open_records,
    read_split_file,
    set_max_image_pixels,
    split_records,
)
from ..data.validation import ValidationConfig, ValidationReport, validate_records
from ..hub.resolve import AdapterLoadError
from ..models.loading import BUILTIN_ARCHITECTURES, BUILTIN_PRETRAINED, DEFAULT_MODEL, Sam2LoadError, load_base_model
from ..models.quantization import QUANTIZATION_MODES, quantize_image_encoder
from ..tuners.methods import AdapterMismatchError, TuningMethod
from .checkpoints import check_output_dir_before_run
from .config import MIXED_PRECISION, TRACKERS, TrainingConfig, check_half_base, check_report_to
from .losses import LossConfig
from .trainer import NonFiniteLossError, Trainer

SAMPLE_DATA = Path(__file__).resolve().parent.parent / "data" / "sample"
"""The small synthetic dataset bundled with the package (the recipes' default `--data`)."""

logger = logging.getLogger(__name__)

BASE_DTYPES = ("float32", "bfloat16", "float16")

OTHER_TOOLS_FLAGS = {
    "--learning-rate": "--lr",
    "--num-train-epochs": "--epochs",
    "--num-epochs": "--epochs",
    "--train-batch-size": "--batch-size",
    "--per-device-train-batch-size": "--batch-size",
    "--gradient-accumulation-steps": "--grad-accum",
    "--lora-rank": "--lora-r",
    "--rank": "--lora-r",
}
"""Flags of other trainers (transformers' Trainer, peft examples) that spelling distance alone would not match."""


class RecipeParser(argparse.ArgumentParser):
    """argparse with "did you mean ...?" for unknown flags (Python 3.11's argparse suggests nothing)."""

    def error(self, message: str) -> None:
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            hints = [self._suggestion(word) for word in message.removeprefix(prefix).split()]
            hints = [hint for hint in hints if hint]
            if hints:
                message = f"{message} ({'; '.join(hints)})"
        super().error(message)

    def _suggestion(self, word: str) -> str | None:
        """'did you mean --lr?' for an unknown flag `word` (also `--flag=value`, `--snake_case`), else None."""
        if not word.startswith("--"):
            return None
        flag = word.split("=", 1)[0]
        known = [option for option in self._option_string_actions if option.startswith("--")]
        hyphenated = flag.replace("_", "-")
        other = OTHER_TOOLS_FLAGS.get(hyphenated)
        if hyphenated in known:
            match = hyphenated
        elif other in known:
            match = other
        else:
            found = difflib.get_close_matches(hyphenated, known, n=1)
            match = found[0] if found else None
        return f"{flag}: did you mean {match}?" if match else None


def recipe_parser(description: str, default_lr: float = 1e-4) -> argparse.ArgumentParser:
    """An argument parser with the flags every recipe shares; recipes add their method's own."""
    parser = RecipeParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"Hub id, local folder, Meta .pt checkpoint, a built-in random architecture "
        f"({', '.join(BUILTIN_ARCHITECTURES)}; offline smoke tests only), or the built-in test base pre-trained "
        f"on synthetic scenes ({', '.join(BUILTIN_PRETRAINED)}).",
    )
    model.add_argument("--revision", default=None, help="Hub revision of --model.")
    model.add_argument("--meta-config", default=None, help="Meta config name for a .pt checkpoint (sam2.1_hiera_s).")
    model.add_argument(
        "--base-dtype",
        choices=BASE_DTYPES,
        default="float32",
        help="Dtype of the frozen base weights (trainable ones stay float32; half needs --mixed-precision).",
    )
    model.add_argument(
        "--quantize-encoder",
        choices=QUANTIZATION_MODES,
        default=None,
        help="QLoRA: load the image encoder's Linear layers in 4/8-bit with bitsandbytes (extra 'quant').",
    )
    data = parser.add_argument_group("data")
    add_data_selection_arguments(data, default_data=str(SAMPLE_DATA))
    data.add_argument("--val-data", default=None, help="Separate validation source (else a split of --data).")
    data.add_argument(
        "--val-split",
        default=None,
        help="Split of a datasets validation source (default: its 'validation', 'valid', 'val' or 'dev' split, or its "
        "only one); without --val-data, validate on this split of --data.",
    )
    data.add_argument("--val-fraction", type=float, default=0.2, help="Validation share when splitting --data.")
    data.add_argument("--val-split-file", default=None, help="File listing validation ids, one per line.")
    data.add_argument(
        "--train-images",
        type=int,
        default=None,
        help="Train on the first N usable training images only (checked in order until N pass the checks).",
    )
    data.add_argument("--max-objects", type=int, default=16, help="Objects (prompts) per training image per step.")
    data.add_argument("--no-augment", action="store_true", help="Turn off training augmentation.")
    data.add_argument(
        "--color-jitter-strength", type=float, default=0.2, help="Brightness/contrast/saturation jitter range (±)."
    )
    data.add_argument("--prompt", choices=PROMPT_TYPES, default="box", help="Training prompt type.")
    data.add_argument("--num-points", type=int, default=1, help="Positive points per object for point prompts.")
    data.add_argument("--num-negative-points", type=int, default=0, help="Negative points per object.")
    data.add_argument("--mask-prompt-prob", type=float, default=0.0, help="Chance a step adds GT mask prompts.")
    train = parser.add_argument_group("training")
    train.add_argument("--output-dir", default="outputs/run")
    train.add_argument("--max-steps", type=int, default=None, help="Optimizer steps (overrides --epochs).")
    train.add_argument("--epochs", type=int, default=10)
    train.add_argument("--batch-size", type=int, default=2, help="Images per process per micro-step.")
    train.add_argument("--grad-accum", type=int, default=1)
    train.add_argument("--lr", type=float, default=default_lr)
    train.add_argument("--weight-decay", type=float, default=1e-4)
    train.add_argument("--warmup-ratio", type=float, default=0.1)
    train.add_argument(
        "--mixed-precision",
        choices=MIXED_PRECISION,
        default=None,
        help="Default: Accelerate's choice (accelerate launch --mixed_precision, accelerate config), else no.",
    )
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--eval-every", type=int, default=0, help="Evaluate every N steps (0 = each epoch).")
    train.add_argument("--keep-best", type=int, default=3, help="Checkpoints kept by validation Dice.")
    train.add_argument("--resume", nargs="?", const="latest", default=None, help="Resume: 'latest' or a checkpoint.")
    train.add_argument(
        "--overwrite", action="store_true", help="Replace a previous run in --output-dir (deletes its checkpoints)."
    )
    train.add_argument("--mask-loss", choices=("focal", "bce"), default="focal")
    train.add_argument("--correction-rounds", type=int, default=0, help="Interactive correction rounds per step.")
    train.add_argument("--log-every", type=int, default=10, help="Log training losses every N steps.")
    train.add_argument(
        "--report-to", choices=TRACKERS, default="tensorboard", help="Tracker (wandb needs the 'trackers' extra)."
    )
    train.add_argument("--num-workers", type=int, default=0)
    train.add_argument("--num-panels", type=int, default=4, help="Side-by-side pictures per evaluation.")
    hub = parser.add_argument_group("sharing")
    hub.add_argument("--push-to-hub", metavar="ID", default=None, help="Upload the adapter and a model card to ID.")
    hub.add_argument("--hub-private", action="store_true", help="Create the Hub repo as private.")
    hub.add_argument("--hub-revision", default=None, help="Branch to push to (created if missing).")
    cache = parser.add_argument_group("embedding cache (frozen image encoder)")
    cache.add_argument(
        "--no-cache-embeddings", action="store_true", help="Re-encode every image on every step (no feature cache)."
    )
    cache.add_argument("--cache-dir", default=None, help="Keep cached features on disk here (reused by later runs).")
    cache.add_argument("--cache-memory-gb", type=float, default=8.0, help="Memory budget of cached features.")
    cache.add_argument(
        "--cache-views", type=int, default=4, help="With augmentation: fixed augmented views encoded per image."
    )
    return parser


def add_data_selection_arguments(group: argparse._ActionsContainer, default_data: str | None = None) -> None:
    """The flags that say which samples a source gives and how they are read and checked, shared by training and
    `sam2-peft eval` so that both see the same data; `default_data` None makes `--data` required."""
    group.add_argument("--data", default=default_data, required=default_data is None, help=f"The data: {DATA_SOURCES}.")
    group.add_argument("--split", default="train", help="Split of a datasets source.")
    group.add_argument("--image-column", default="image", help="Image column of a datasets source.")
    group.add_argument("--mask-column", default="mask", help="Mask column of a datasets source.")
    group.add_argument(
        "--mask-type",
        choices=MASK_TYPES,
        default="auto",
        help="binary: threshold at half the mask's maximum (one object); instance: each non-zero value is an object; "
        "auto: two levels or values near 0 and the maximum (JPEG, anti-aliasing) are binary, labels 1, 2, 3... "
        "are instances, anything else stops with an error.",
    )
    group.add_argument(
        "--max-image-pixels",
        type=int,
        default=DEFAULT_MAX_IMAGE_PIXELS,
        help="Refuse larger images (decompression-bomb guard; default PIL's); 0 = no limit.",
    )
    defaults = ValidationConfig()
    group.add_argument(
        "--min-object-area", type=int, default=defaults.min_object_area, help="Drop objects smaller than this (pixels)."
    )
    group.add_argument(
        "--closing-radius", type=int, default=defaults.closing_radius, help="Morphological closing of masks (0 = off)."
    )
    group.add_argument("--skip-bad-files", action="store_true", help="Skip unreadable/mis-sized samples (else error).")


def validation_config_from_args(args: argparse.Namespace) -> ValidationConfig:
    """The sample checks asked for by the flags of `add_data_selection_arguments`."""
    return ValidationConfig(
        min_object_area=args.min_object_area, closing_radius=args.closing_radius, skip_bad_files=args.skip_bad_files
    )


def dataset_config_from_args(args: argparse.Namespace, target_mode: str = "instances") -> DatasetConfig:
    return DatasetConfig(
        target_mode=target_mode,
        max_objects_per_image=args.max_objects,
        prompts=PromptConfig(
            prompt="none" if target_mode == "semantic" else args.prompt,
            num_positive_points=args.num_points,
            num_negative_points=args.num_negative_points,
            mask_prompt_probability=args.mask_prompt_prob,
        ),
        augmentation=AugmentationConfig(enabled=not args.no_augment, color_jitter_strength=args.color_jitter_strength),
        validation=validation_config_from_args(args),
    )


def training_config_from_args(args: argparse.Namespace) -> TrainingConfig:
    return TrainingConfig(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio,
        mixed_precision=args.mixed_precision,
        seed=args.seed,
        eval_every=args.eval_every,
        keep_best=args.keep_best,
        resume=args.resume,
        overwrite=args.overwrite,
        log_every=args.log_every,
        report_to=args.report_to,
        num_workers=args.num_workers,
        num_panels=args.num_panels,
        correction_rounds=args.correction_rounds,
        loss=LossConfig(mask_loss=args.mask_loss),
        cache_embeddings=not args.no_cache_embeddings,
        cache_dir=args.cache_dir,
        cache_memory_gb=args.cache_memory_gb,
        cache_views=args.cache_views,
    )


def check_data_arguments(args: argparse.Namespace) -> None:
    """Check `--data`, `--val-data` and `--train-images` without reading any file (`check_data_source`), so that a
    mistake is reported before a model loads."""
    check_data_source(args.data, "--data")
    if args.val_data:
        check_data_source(args.val_data, "--val-data")
    if args.train_images is not None and args.train_images < 1:
        raise DataError(f"--train-images must be at least 1, got {args.train_images}; leave it out to use every image.")


def build_datasets(args: argparse.Namespace, processor, config: DatasetConfig):
    """Open, validate and split the data named by the arguments; returns (train, validation) datasets.

    The sources are checked before anything is read. With `--train-images N`, training samples are checked in order
    only until N usable ones are found. A validation set that shares samples with the training set is refused.
    """
    check_data_arguments(args)
    val_source = args.val_data or (args.data if args.val_split else None)
    val_flag = "--val-data" if args.val_data else "--data"
    set_max_image_pixels(args.max_image_pixels)
    source = dict(image_column=args.image_column, mask_column=args.mask_column, mask_type=args.mask_type)
    records = open_records(args.data, split=args.split, **source)
    if val_source:
        train_records, val_records = records, open_records(val_source, split=args.val_split, flag=val_flag, **source)
    else:
        val_ids = read_split_file(args.val_split_file) if args.val_split_file else None
        train_records, val_records = split_records(records, args.val_fraction, args.seed, val_ids)
    check_disjoint(train_records, val_records)
    available = len(train_records)
    train_records, report = validate_records(
        train_records, config.validation, limit=args.train_images, description="Checking training images"
    )
    _log_training_images(report, available, args.train_images)
    val_dataset = None
    if val_records:
        val_records, val_report = validate_records(
            val_records, config.validation, description="Checking validation images"
        )
        logger.info("Validation data: %s", val_report.summary())
        val_dataset = SegmentationDataset(val_records, processor, config, train=False, seed=args.seed)
    return SegmentationDataset(train_records, processor, config, train=True, seed=args.seed), val_dataset


def _log_training_images(report: ValidationReport, available: int, asked: int | None) -> None:
    """Say how many training images the run uses, out of how many, and why others were left out."""
    used = f"Training on {report.kept} of {available} training images"
    if asked is None:
        logger.info("%s (%s)", used, report.skips())
    elif report.kept < asked:
        logger.warning(
            "%s: --train-images %d asked for more than the %d usable (%s)", used, asked, report.kept, report.skips()
        )
    else:
        logger.info("%s (--train-images %d; %d checked, %s)", used, asked, report.checked, report.skips())


USER_ERRORS = (
    Sam2LoadError,
    DataError,
    AdapterMismatchError,
    AdapterLoadError,
    FileNotFoundError,
    NonFiniteLossError,
)
"""Errors caused by the user's input: a recipe run from the command line prints them without a traceback."""


OTHER_RANKS_EXIT_AFTER_S = 20.0
"""How long a non-main process waits, after a user error, for the launcher to stop it (the main process has failed
too and printed the error) before it prints the error itself."""


def run_from_command_line(main: Callable[[], object]) -> None:
    """Run a recipe or command: bad input (missing files, repos, mismatched adapters, Hub refusals, a diverging run)
    exits with its message and status 1, without a traceback. In a multi-process run only the main process prints
    it (every process meets the same error); the others wait for the launcher to stop them once the main process
    has printed and exited, so that its line is not cut off by their exit. One still running after that wait (its
    error was its own) prints it with its rank and exits with status 1."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        main()
    except (*USER_ERRORS, HfHubHTTPError) as error:
        for stream in (*logging.getLogger().handlers, sys.stdout):  # the error line comes last
            stream.flush()
        rank = os.environ.get("RANK", "0")
        if rank != "0":
            time.sleep(OTHER_RANKS_EXIT_AFTER_S)
            sys.exit(f"error (process {rank}): {error}")
        sys.exit(f"error: {error}")


def run_recipe(args: argparse.Namespace, method: TuningMethod, target_mode: str = "instances") -> dict:
    """Everything a recipe does after parsing: load, build data, train, save. Returns the final metrics."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    # Mistakes in paths and settings are reported before the (slow) model load, not after it.
    check_report_to(args.report_to)
    check_half_base(args.base_dtype, args.mixed_precision)
    check_data_arguments(args)
    check_output_dir_before_run(Path(args.output_dir), args.resume is not None, args.overwrite)
    model, processor = load_base_model(
        args.model, revision=args.revision, meta_config=args.meta_config, dtype=args.base_dtype
    )
    if args.quantize_encoder:
        quantize_image_encoder(model, args.quantize_encoder)
    data_config = dataset_config_from_args(args, target_mode)
    train_dataset, val_dataset = build_datasets(args, processor, data_config)
    run_info = {"method": method.name, "base_model": args.model, "data": args.data}
    trainer = Trainer(
        model,
        processor,
        method,
        train_dataset,
        val_dataset,
        training_config_from_args(args),
        base_name=args.model,
        run_info=run_info,
    )
    metrics = trainer.train()
    if args.push_to_hub and trainer.accelerator.is_main_process:
        from ..hub.push import push_adapter

        commit = push_adapter(args.output_dir, args.push_to_hub, private=args.hub_private, revision=args.hub_revision)
        logger.info("Pushed the adapter to %s", commit.commit_url)
    return metrics
