"""LoRA on SAM 2 video: mask decoder and memory (attention, encoder, object pointers), trained on clips.

    sam2-peft train video --model facebook/sam2.1-hiera-small --data path/to/davis \
        --clip-len 8 --annotated-every 5 --loss-frames last --targets decoder+memory
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields

from ..commandline import run_from_command_line
from ..flags import Applies
from ..training.config import LOSS_FRAMES, TrainingConfig
from ..tuners.options import LoraOptions
from ..volume_commands import is_volume_input
from .arguments import (
    LORA_RULES,
    PROMPT_RULES,
    SHARED_ARGUMENTS,
    SHARING_RULES,
    RecipeArguments,
    parse_recipe_arguments,
)

logger = logging.getLogger(__name__)


@dataclass
class VideoDataArguments:
    """The clips' data: the image recipes' source, split and image-checking flags do not apply to a video folder."""

    _argument_group_name = "data"

    data: str | None = field(
        default=None,
        metadata={
            "help": "A DAVIS-style folder (JPEGImages/SEQ/*.jpg, Annotations/SEQ/*.png), a folder of video files "
            "SEQ.mp4 (.mov, .avi, .webm, .mkv) with PNG annotations SEQ/00000.png named by frame index, or a volume "
            "folder (images/ + labels/, or imagesTr/ + labelsTr/: NIfTI or TIFF volumes, slices as frames)."
        },
    )
    val_data: str | None = field(
        default=None,
        metadata={"help": "A separate validation folder (its --val-sequences, or all of it); else --val-sequences."},
    )
    max_objects: int = field(default=16, metadata={"help": "Objects (prompts) per training clip."})


VIDEO_ARGUMENTS = {
    **{role: cls for role, cls in SHARED_ARGUMENTS.items() if role not in ("validation", "augmentation")},
    "data": VideoDataArguments,
}
"""The shared flags the video recipe uses: no image checks (`ValidationConfig`) and no augmentation."""

UNUSED_SETTINGS = ("correction_rounds", "prompt_chunk", *(f.name for f in fields(TrainingConfig) if "cache" in f.name))
"""Shared settings the clip task has no use for (no correction rounds, no embedding cache): not offered."""


@dataclass
class VideoArguments:
    """Clips and sequences (`--data`: a DAVIS-style folder, JPEGImages/SEQ/*.jpg + Annotations/SEQ/*.png, or video
    files SEQ.mp4 + SEQ/00000.png)."""

    _argument_group_name = "video"

    clip_len: int = field(default=8, metadata={"help": "Frames per training clip (1 to 8)."})
    clip_stride: int = field(default=1, metadata={"help": "Frame step inside a clip."})
    annotated_every: int = field(
        default=1, metadata={"help": "Keep every K-th training annotation (simulates sparse labels)."}
    )
    loss_frames: str = field(default="last", metadata={"help": "Annotated frames in the loss.", "choices": LOSS_FRAMES})
    train_sequences: str | None = field(
        default=None, metadata={"help": "Comma-separated training sequences (default: all)."}
    )
    val_sequences: str | None = field(
        default=None, metadata={"help": "Comma-separated validation sequences, taken out of the training ones."}
    )


@dataclass
class VolumeArguments:
    """How volumes become slices (with --data a volume folder)."""

    _argument_group_name = "volumes"

    window: str | None = field(
        default=None,
        metadata={
            "help": "CT window: a preset name (soft-tissue, lung, bone, brain, ...) or LEVEL,WIDTH in HU "
            "(default: each volume's 0.5-99.5 percentiles span black to white)."
        },
    )
    slice_axis: int | None = field(
        default=None,
        metadata={"help": "Array axis to slice along (default: the coarsest voxel spacing).", "choices": (0, 1, 2)},
    )


VOLUME_RULES = (
    Applies(("--window", "--slice-axis"), lambda a: is_volume_input(a.data), "applies to a volume folder --data only"),
)


def _names(value: str | None) -> list[str] | None:
    return [n.strip() for n in value.split(",") if n.strip()] if value else None


def video_task(args: RecipeArguments, video: VideoArguments, processor, volume: VolumeArguments | None = None):
    """Training clips (sparse annotation applied) and whole validation sequences (every annotation kept); the
    sequences are videos, or the slices of volumes (clips: runs of adjacent slices from an annotated one)."""
    from ..data.sources import DataError
    from ..data.video import VideoClipDataset, VideoDatasetConfig, VideoSequenceDataset, open_video_folder
    from ..data.volumes import open_volume_folder, parse_window
    from ..training.video import VideoClipTask

    data = args.data
    if not data.data:
        raise DataError(
            "--data is required: a folder with JPEGImages/SEQ/*.jpg and Annotations/SEQ/*.png, or with video files "
            "SEQ.mp4 and annotations SEQ/00000.png."
        )
    open_sequences = open_video_folder
    if is_volume_input(data.data):
        volume = volume or VolumeArguments()
        window = parse_window(volume.window)

        def open_sequences(root, annotated_every=1, names=None):
            return open_volume_folder(
                root, slice_axis=volume.slice_axis, window=window, annotated_every=annotated_every, names=names
            )

    val_names = _names(video.val_sequences)
    train_names = _names(video.train_sequences)
    if train_names is None:
        train_names = [s.name for s in open_sequences(data.data) if s.name not in (val_names or [])]
    train = open_sequences(data.data, video.annotated_every, train_names)
    val = open_sequences(data.val_data or data.data, 1, val_names) if data.val_data or val_names else None
    config = VideoDatasetConfig(
        clip_len=video.clip_len, stride=video.clip_stride, max_objects=data.max_objects, prompts=args.prompts
    )
    logger.info(
        "Video data: %d training sequences (%d annotated frames), %d validation sequences.",
        len(train),
        sum(len(s.annotations) for s in train),
        len(val or []),
    )
    return VideoClipTask(
        VideoClipDataset(train, processor, config, seed=args.training.seed),
        VideoSequenceDataset(val) if val else None,
        processor,
        loss_frames=video.loss_frames,
        eval_prompt="point" if args.prompts.prompt == "point" else "box",
        loss=args.loss,
        strip_frames=args.training.num_panels,
    )


def main(argv: Sequence[str] | None = None, **defaults) -> dict:
    defaults = {"data": None, "targets": "decoder+memory", **defaults}
    args = parse_recipe_arguments(
        __doc__.splitlines()[0],
        LoraOptions,
        extra=[VideoArguments, VolumeArguments],
        argv=argv,
        shared=VIDEO_ARGUMENTS,
        without=UNUSED_SETTINGS,
        rules=(*PROMPT_RULES, *SHARING_RULES, *LORA_RULES, *VOLUME_RULES),
        **defaults,
    )
    from ..adapters.methods import LoraMethod
    from .runner import run_recipe

    video, volume = args.extra
    return run_recipe(
        args,
        LoraMethod(**asdict(args.method)),
        build_task=lambda a, processor: video_task(a, video, processor, volume),
        video=True,
        run_info={"loss_frames": video.loss_frames},
    )


if __name__ == "__main__":
    run_from_command_line(main)
