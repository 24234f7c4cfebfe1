"""How parsed recipe arguments become a run: checks before the model loads, the base model, the datasets, the task
and the trainer, then the optional upload. Imported by the recipes after parsing (it loads torch)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ..adapters.methods import TuningMethod
from ..data.classes import ClassList, check_classes, coco_classes, named_classes, objects_by_class, with_class_weights
from ..data.config import DatasetConfig
from ..data.dataset import SegmentationDataset
from ..data.sources import (
    DataError,
    check_data_source,
    check_disjoint,
    open_records,
    printable,
    read_split_file,
    set_max_image_pixels,
    split_records,
)
from ..data.streaming import ListedStream, StreamingSegmentationDataset, open_datasets_stream
from ..data.validation import ValidationReport, validate_records
from ..models.loading import load_base_model
from ..models.quantization import quantize_image_encoder
from ..training.checkpoints import check_output_dir_before_run
from ..training.config import check_half_base, check_report_to
from ..training.tasks import ImageSegmentationTask, Task
from ..training.trainer import Trainer
from .arguments import DataArguments, ModelArguments, RecipeArguments

logger = logging.getLogger(__name__)


def check_data_arguments(data: DataArguments) -> None:
    """Check `--data`, `--val-data` and `--train-images` without reading any file, so that a mistake is reported
    before a model loads."""
    check_data_source(data.data, "--data")
    if data.val_data:
        check_data_source(data.val_data, "--val-data")
    for flag, value in (("--class-names", data.class_names), ("--class-weights", data.class_weights)):
        if value is not None and data.mask_type != "semantic":
            raise DataError(
                f"{flag} applies to the classes of semantic masks: add --mask-type semantic, or leave it out."
            )
    if data.train_images is not None and data.train_images < 1:
        raise DataError(f"--train-images must be at least 1, got {data.train_images}; leave it out to use every image.")
    if data.streaming and data.train_images is not None:
        raise DataError(
            "--train-images counts images checked up front, which --streaming does not do: leave out one of them."
        )


def check_streaming(data: DataArguments, training) -> None:
    """A stream has no length: `--streaming` needs `--max-steps` (checked before the model loads)."""
    if data.streaming and training.max_steps is None:
        raise DataError(
            "--streaming reads the data as a stream, which has no length to count epochs in: give the run's length "
            "with --max-steps."
        )


def load_model(args: ModelArguments, video: bool = False):
    """The base model and processor the model flags name, quantized as asked."""
    model, processor = load_base_model(
        args.model, video=video, revision=args.revision, meta_config=args.meta_config, dtype=args.base_dtype
    )
    if args.quantize_encoder:
        quantize_image_encoder(model, args.quantize_encoder)
    return model, processor


def configure_logging() -> None:
    """Log the run's INFO lines with their time and source (once; later calls change nothing)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)


def semantic_classes(data: DataArguments) -> ClassList:
    """The classes of `--mask-type semantic` data, checked against every mask of `--data` (before the model loads),
    with pixel and image counts per class logged, and weighed by `--class-weights`."""
    return with_class_weights(data_classes(data), data.class_weights)


def data_classes(data: DataArguments) -> ClassList | None:
    """The classes `--data` names: those of semantic masks (checked as `semantic_classes` says) or a COCO file's
    categories; None for data without classes."""
    configure_logging()
    check_data_arguments(data)
    if data.mask_type != "semantic":
        return coco_classes(data.data)
    if data.streaming:
        raise DataError("--mask-type semantic checks every mask's classes up front, which --streaming does not do.")
    set_max_image_pixels(data.max_image_pixels)
    source = dict(image_column=data.image_column, mask_column=data.mask_column, mask_type=data.mask_type)
    records = open_records(data.data, split=data.split, **source)
    ignore = None if data.ignore_index < 0 else data.ignore_index
    return check_classes(
        records, named_classes(data.data, data.class_names, data.split, data.mask_column), ignore, printable(data.data)
    )


def dataset_config(
    args: RecipeArguments, target_mode: str = "instances", classes: ClassList | None = None
) -> DatasetConfig:
    """The dataset settings of a recipe's arguments (`semantic` targets are prompt-free; with `classes`, one target
    per class)."""
    prompts = args.prompts
    if target_mode == "semantic" and prompts.prompt != "none":
        prompts = replace(prompts, prompt="none")
    return DatasetConfig(
        target_mode=target_mode,
        max_objects_per_image=args.data.max_objects,
        prompts=prompts,
        augmentation=args.augmentation,
        validation=args.validation,
        class_ids=None if classes is None else classes.ids,
        ignore_index=None if classes is None else classes.ignore_index,
    )


def build_datasets(data: DataArguments, processor, config: DatasetConfig, seed: int = 0):
    """Open, validate and split the data; returns (train, validation) `SegmentationDataset`s (validation None when
    there is none).

    The sources are checked before anything is read. With `--train-images N`, training samples are checked in order
    only until N usable ones are found. A validation set that shares samples with the training set is refused.
    """
    check_data_arguments(data)
    if data.streaming:
        return _streaming_datasets(data, processor, config, seed)
    val_source = data.val_data or (data.data if data.val_split else None)
    val_flag = "--val-data" if data.val_data else "--data"
    set_max_image_pixels(data.max_image_pixels)
    source = dict(image_column=data.image_column, mask_column=data.mask_column, mask_type=data.mask_type)
    records = objects_by_class(open_records(data.data, split=data.split, **source), config)
    if val_source:
        val_records = open_records(val_source, split=data.val_split, flag=val_flag, **source)
        train_records, val_records = records, objects_by_class(val_records, config)
    else:
        val_ids = read_split_file(data.val_split_file) if data.val_split_file else None
        train_records, val_records = split_records(records, data.val_fraction, seed, val_ids)
    check_disjoint(train_records, val_records)
    available = len(train_records)
    train_records, report = validate_records(
        train_records, config.validation, limit=data.train_images, description="Checking training images"
    )
    _log_training_images(report, available, data.train_images)
    val_dataset = None
    if val_records:
        val_records, val_report = validate_records(
            val_records, config.validation, description="Checking validation images"
        )
        logger.info("Validation data: %s", val_report.summary())
        val_dataset = SegmentationDataset(val_records, processor, config, train=False, seed=seed)
    return SegmentationDataset(train_records, processor, config, train=True, seed=seed), val_dataset


def _streaming_datasets(data: DataArguments, processor, config: DatasetConfig, seed: int):
    """(streamed training set, validation `SegmentationDataset` or None) for `--streaming`: the training samples are
    not listed (datasets) or not read (folder, COCO, synthetic) up front; the validation set is, as without it."""
    set_max_image_pixels(data.max_image_pixels)
    source = dict(image_column=data.image_column, mask_column=data.mask_column, mask_type=data.mask_type)
    kind = check_data_source(data.data, "--data")
    train_records = None
    if kind in ("saved datasets", "hub"):
        stream = open_datasets_stream(data.data, data.split, seed=seed, buffer_size=data.shuffle_buffer, **source)
    else:
        train_records = open_records(data.data, split=data.split, **source)
        stream = ListedStream(train_records, seed, printable(data.data))
    train = StreamingSegmentationDataset(stream, processor, config, seed=seed)
    val_source = data.val_data or (data.data if data.val_split else None)
    if not val_source:
        logger.info(
            "Streaming %s with no validation set: a stream is not split (--val-fraction); give --val-data or "
            "--val-split to validate.",
            stream.description,
        )
        return train, None
    if val_source == data.data and data.val_split == data.split:
        raise DataError(f"--val-split '{data.val_split}' is the training split of --data: name another split.")
    val_flag = "--val-data" if data.val_data else "--data"
    val_records = open_records(val_source, split=data.val_split, flag=val_flag, **source)
    if train_records is not None:
        check_disjoint(train_records, val_records)
    val_records, val_report = validate_records(val_records, config.validation, description="Checking validation images")
    logger.info("Validation data: %s", val_report.summary())
    return train, SegmentationDataset(val_records, processor, config, train=False, seed=seed)


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


def run_recipe(
    args: RecipeArguments,
    method: TuningMethod,
    build_task: Callable[[RecipeArguments, object], Task] | None = None,
    video: bool = False,
    run_info: dict | None = None,
) -> dict:
    """Check, load, build the task (default: image segmentation with per-object prompts), train, save, and push
    when asked. Returns the final metrics."""
    configure_logging()
    # Mistakes in paths and settings are reported before the (slow) model load, not after it.
    check_report_to(args.training.report_to)
    check_half_base(args.model.base_dtype, args.training.mixed_precision)
    if not video:  # the video recipe's data options are its own (no class names, image checks or streaming)
        check_data_arguments(args.data)
        check_streaming(args.data, training=args.training)
        multiclass = "classes" in (run_info or {})
        prompted = build_task is None  # per-object prompts: each object keeps the class the data names
        if args.data.class_weights is not None and not multiclass:
            raise DataError(
                "--class-weights applies to the classes of a multi-class PTSAM adapter (sam2-peft train ptsam "
                "--mask-type semantic, no --prompt): leave it out for this method."
            )
        if args.data.class_names is not None and not (multiclass or prompted):
            raise DataError(
                "--class-names names the classes of a multi-class PTSAM adapter or of LoRA, partial and full runs: "
                "leave it out for this method."
            )
        if prompted:
            classes = data_classes(args.data)  # semantic masks are checked before the model loads
            build_task = lambda a, processor: image_task(a, processor, "instances", classes)  # noqa: E731
    training = args.training
    check_output_dir_before_run(Path(training.output_dir), training.resume is not None, training.overwrite)
    model, processor = load_model(args.model, video=video)
    task = (build_task or image_task)(args, processor)
    info = {"method": method.name, "base_model": args.model.model, "data": args.data.data, **(run_info or {})}
    trainer = Trainer(model, method, task, training, base_name=args.model.model, run_info=info)
    metrics = trainer.train()
    sharing = args.sharing
    if sharing.push_to_hub and trainer.accelerator.is_main_process:
        from ..hub.push import push_adapter

        commit = push_adapter(
            training.output_dir, sharing.push_to_hub, private=sharing.hub_private, revision=sharing.hub_revision
        )
        logger.info("Pushed the adapter to %s", commit.commit_url)
    return metrics


def image_task(
    args: RecipeArguments, processor, target_mode: str = "instances", classes: ClassList | None = None
) -> ImageSegmentationTask:
    """Image segmentation on the recipe's data: per-object prompts (`instances`, with `classes` each object scored in
    its class too), prompt-free unions (`semantic`), or prompt-free class maps (`semantic` with `classes`)."""
    config = dataset_config(args, target_mode, classes)
    train, val = build_datasets(args.data, processor, config, args.training.seed)
    return ImageSegmentationTask(train, val, args.loss, classes=classes)
