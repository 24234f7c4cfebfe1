"""Command-line arguments of the video recipes, and how they become a video model, clip datasets and a trainer."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..data.prompts import PromptConfig
from ..data.video import VideoClipDataset, VideoDatasetConfig, VideoSequenceDataset, open_video_folder
from ..models.loading import load_base_model
from ..tuners.methods import TuningMethod
from .arguments import training_config_from_args
from .checkpoints import check_output_dir_before_run
from .config import check_report_to
from .video import LOSS_FRAMES, VideoTrainer

logger = logging.getLogger(__name__)


def add_video_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the video flags to a `recipe_parser()`; `--data` becomes a DAVIS-style folder (JPEGImages/, Annotations/)."""
    parser.set_defaults(data=None, keep_best=3)
    video = parser.add_argument_group("video")
    video.add_argument("--clip-len", type=int, default=8, help="Frames per training clip (1 to 8).")
    video.add_argument("--clip-stride", type=int, default=1, help="Frame step inside a clip.")
    video.add_argument(
        "--annotated-every", type=int, default=1, help="Keep every K-th training annotation (simulates sparse labels)."
    )
    video.add_argument("--loss-frames", choices=LOSS_FRAMES, default="last", help="Annotated frames in the loss.")
    video.add_argument("--train-sequences", default=None, help="Comma-separated training sequences (default: all).")
    video.add_argument(
        "--val-sequences", default=None, help="Comma-separated validation sequences, taken out of the training ones."
    )
    return parser


def _names(value: str | None) -> list[str] | None:
    return [n.strip() for n in value.split(",") if n.strip()] if value else None


def build_video_datasets(args: argparse.Namespace, processor) -> tuple[VideoClipDataset, VideoSequenceDataset | None]:
    """Training clips (sparse annotation applied) and whole validation sequences (every annotation kept)."""
    if not args.data:
        raise SystemExit("--data is required: a folder with JPEGImages/SEQ/*.jpg and Annotations/SEQ/*.png.")
    val_names = _names(args.val_sequences)
    train_names = _names(args.train_sequences)
    if train_names is None:
        train_names = [s.name for s in open_video_folder(args.data)]
        train_names = [n for n in train_names if n not in (val_names or [])]
    train = open_video_folder(args.data, args.annotated_every, train_names)
    val = None
    if args.val_data or val_names:
        val = open_video_folder(args.val_data or args.data, 1, val_names)
    prompts = PromptConfig(
        prompt=args.prompt,
        num_positive_points=args.num_points,
        num_negative_points=args.num_negative_points,
        mask_prompt_probability=args.mask_prompt_prob,
    )
    config = VideoDatasetConfig(
        clip_len=args.clip_len, stride=args.clip_stride, max_objects=args.max_objects, prompts=prompts
    )
    logger.info(
        "Video data: %d training sequences (%d annotated frames), %d validation sequences.",
        len(train),
        sum(len(s.annotations) for s in train),
        len(val or []),
    )
    train_dataset = VideoClipDataset(train, processor, config, seed=args.seed)
    return train_dataset, VideoSequenceDataset(val) if val else None


def run_video_recipe(args: argparse.Namespace, method: TuningMethod) -> dict:
    """Load the video model, build clips and validation sequences, train, save. Returns the final metrics."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    check_report_to(args.report_to)  # mistakes before the (slow) model load
    check_output_dir_before_run(Path(args.output_dir), args.resume is not None, args.overwrite)
    model, processor = load_base_model(args.model, video=True, revision=args.revision, meta_config=args.meta_config)
    train_dataset, val_dataset = build_video_datasets(args, processor)
    config = training_config_from_args(args)
    config.metric_for_best = "J&F"
    run_info = {"method": method.name, "base_model": args.model, "data": args.data, "loss_frames": args.loss_frames}
    trainer = VideoTrainer(
        model,
        processor,
        method,
        train_dataset,
        val_dataset,
        config,
        base_name=args.model,
        run_info=run_info,
        loss_frames=args.loss_frames,
        eval_prompt="point" if args.prompt == "point" else "box",
    )
    return trainer.train()
