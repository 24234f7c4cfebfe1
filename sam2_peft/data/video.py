"""Video data: DAVIS-style frame folders, sparse annotations, clip sampling with lazy frame decoding.

Layout: `ROOT/JPEGImages/SEQ/*.jpg` and `ROOT/Annotations/SEQ/*.png`, an annotation named like its frame (stem);
or video files `ROOT/SEQ.mp4` with annotations `ROOT/SEQ/00000.png` named by frame index (`video_files`).
Annotations are binary (0/255 or 0/1) or palette/instance PNGs, one label value per object, the same value for the
same object in every frame. Frames without an annotation file are unannotated; `annotated_every=K` keeps only every
K-th annotation of fully annotated data, to simulate sparse labelling.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import Sam2Processor

from .epoch import SharedEpoch
from .prompts import PromptConfig, sample_prompts, to_model_coordinates
from .sources import IMAGE_SUFFIXES, DataError, natural_key, printable, read_image, read_label_image, viewed_size

FRAMES_DIR = "JPEGImages"
ANNOTATIONS_DIR = "Annotations"


@dataclass
class VideoSequence:
    """One video: its frame files in order and, for annotated frames, the annotation file (by frame index)."""

    name: str
    frames: list[Path]
    annotations: dict[int, Path]

    @property
    def annotated_frames(self) -> list[int]:
        return sorted(self.annotations)

    def load_frame(self, index: int) -> np.ndarray:
        """Frame `index` as `(H, W, 3)` uint8 RGB, as a viewer shows it (EXIF orientation)."""
        return read_image(self.frames[index])

    def load_labels(self, index: int) -> np.ndarray:
        """The label map `(H, W)` int64 of an annotated frame (0 = background, k = object k)."""
        return read_label_map(self.annotations[index])


def read_label_map(path: str | os.PathLike) -> np.ndarray:
    """Read a binary or palette/instance annotation as `(H, W)` int64 labels; binary 0/255 becomes 0/1."""
    labels = read_label_image(path, "annotation")
    if labels.ndim != 2:
        raise DataError(
            f"Annotation '{printable(path)}' has shape {labels.shape}: save it as a single-channel (H, W) label map "
            "(grey or palette PNG)."
        )
    labels = labels.astype(np.int64)
    if set(np.unique(labels).tolist()) <= {0, 255}:
        labels = (labels > 0).astype(np.int64)
    return labels


def open_video_folder(
    root: str | os.PathLike, annotated_every: int = 1, sequences: list[str] | None = None
) -> list[VideoSequence]:
    """The sequences under `root` (all, or those named), checked up front; `root` may also be one video file
    (`NAME.mp4` with its annotations in `NAME/` beside it).

    Raises `DataError` naming the folder or file when: a folder is missing, a sequence has no frames or no
    annotated frame, an annotation has no frame of the same name, or a frame and its annotation differ in size.
    """
    if annotated_every < 1:
        raise ValueError(f"annotated_every must be at least 1, got {annotated_every}.")
    root = Path(root)
    from .video_files import is_video_file, open_video_files

    if is_video_file(root):
        if sequences is not None and sequences != [root.stem]:
            raise DataError(
                f"'{printable(root)}' is one video, '{printable(root.stem)}': name no other sequence, or give the "
                "folder of videos as --data."
            )
        return open_video_files(root.parent, annotated_every, [root.stem])
    frames_root, annotations_root = root / FRAMES_DIR, root / ANNOTATIONS_DIR
    if not frames_root.is_dir():
        from .video_files import video_files_in

        if video_files_in(root):
            return open_video_files(root, annotated_every, sequences)
    for folder in (frames_root, annotations_root):
        if not folder.is_dir():
            raise DataError(
                f"Video folder '{root}' needs '{FRAMES_DIR}/SEQ/' and '{ANNOTATIONS_DIR}/SEQ/', or video files SEQ.mp4 "
                f"with annotations SEQ/00000.png; '{folder}' is missing."
            )
    names = (
        sequences
        if sequences is not None
        else sorted((p.name for p in frames_root.iterdir() if p.is_dir()), key=natural_key)
    )
    if not names:
        raise DataError(
            f"No sequence folders in '{printable(frames_root)}': put each video's frames in a folder SEQ/ there."
        )
    return [_open_sequence(frames_root / name, annotations_root / name, annotated_every) for name in names]


def _open_sequence(frame_dir: Path, annotation_dir: Path, annotated_every: int) -> VideoSequence:
    if not frame_dir.is_dir():
        raise DataError(f"Sequence folder '{printable(frame_dir)}' is missing: check the sequence names given.")
    if not annotation_dir.is_dir():
        raise DataError(
            f"Sequence '{printable(frame_dir.name)}' has no annotation folder '{printable(annotation_dir)}': add its "
            "annotations there or leave the sequence out."
        )
    frames = sorted((p for p in frame_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=_frame_order)
    for before, after in zip(frames, frames[1:]):
        if _frame_order(before)[0] == _frame_order(after)[0]:
            raise DataError(
                f"Frames '{printable(before.name)}' and '{printable(after.name)}' of sequence "
                f"'{printable(frame_dir.name)}' have the same number (frames are ordered by the numbers in their "
                "names): rename or remove one."
            )
    if not frames:
        raise DataError(
            f"Sequence folder '{printable(frame_dir)}' holds no frames ({', '.join(IMAGE_SUFFIXES)}): add them or "
            "remove the folder."
        )
    index_by_stem = {p.stem: i for i, p in enumerate(frames)}
    annotations: dict[int, Path] = {}
    for path in sorted(annotation_dir.glob("*.png")):
        if path.stem not in index_by_stem:
            raise DataError(
                f"Annotation '{printable(path)}' has no frame named '{printable(path.stem)}.*' in "
                f"'{printable(frame_dir)}': rename it after its frame or remove it."
            )
        annotations[index_by_stem[path.stem]] = path
    if not annotations:
        raise DataError(
            f"Sequence '{printable(frame_dir.name)}' has no annotated frame: no PNG in '{printable(annotation_dir)}'; "
            "annotate at least one frame or leave the sequence out."
        )
    kept = sorted(annotations)[::annotated_every]
    annotations = {i: annotations[i] for i in kept}
    frame_size = viewed_size(frames[0])
    for index, path in annotations.items():
        for file in (frames[index], path):
            size = viewed_size(file)
            if size != frame_size:
                raise DataError(
                    f"'{file}' is {size[0]}x{size[1]} but the frames of sequence '{frame_dir.name}' "
                    f"are {frame_size[0]}x{frame_size[1]} ('{frames[0]}'): frames and masks must have one size."
                )
    return VideoSequence(frame_dir.name, frames, annotations)


def _frame_order(path: Path) -> tuple:
    """Frames in the order of the numbers in their stems (`2.jpg` before `10.jpg`), then by name."""
    return natural_key(path.stem), path.name


@dataclass
class VideoDatasetConfig:
    """How clips are cut from sequences and prompted."""

    clip_len: int = 8
    """Frames per clip (1 to 8); clips near a sequence's end are shorter."""
    stride: int = 1
    """Frame step inside a clip."""
    max_objects: int = 4
    """Objects tracked per clip (those present on the clip's first frame; a random subset when more)."""
    prompts: PromptConfig = field(default_factory=PromptConfig)

    def __post_init__(self) -> None:
        if not 1 <= self.clip_len <= 8:
            raise ValueError(f"clip_len must be between 1 and 8, got {self.clip_len}.")
        if self.stride < 1:
            raise ValueError(f"stride must be at least 1, got {self.stride}.")
        if self.prompts.prompt == "none":
            raise ValueError("Video clips need a prompt on their first frame: prompt 'none' is not supported.")


class VideoClipDataset(SharedEpoch, Dataset):
    """Training clips: one per annotated frame with an object on it, starting there (where the prompt goes).

    Clips whose only annotated frame is the prompted one are skipped (they cannot train tracking through memory).

    Each item is a dict:
        `pixel_values` `(T, 3, S, S)` preprocessed frames; `points` `(N, P, 2)` in model-input pixels and
        `point_labels` `(N, P)` for frame 0 (or, with chance `prompts.mask_prompt_probability`, the ground truth
        as `prompt_masks` `(N, S, S)` bool instead);
        `target_masks` `(T, N, S, S)` bool (all-zero where an object is absent or the frame is unannotated);
        `annotated` `(T,)` bool; `object_ids` `(N,)` label values; `sample_id` `SEQ@start`.
    """

    def __init__(
        self,
        sequences: list[VideoSequence],
        processor: Sam2Processor,
        config: VideoDatasetConfig | None = None,
        *,
        seed: int = 0,
    ) -> None:
        self.sequences = sequences
        self.processor = processor
        self.config = config or VideoDatasetConfig()
        self.seed = seed
        self._init_epoch()
        self.image_size = int(processor.image_processor.size["height"])
        self.starts = [
            (s, frame)
            for s, sequence in enumerate(sequences)
            for frame in sequence.annotated_frames
            if self._annotated_in_clip(sequence, frame) >= min(2, self.config.clip_len)
            and sequence.load_labels(frame).any()
        ]
        if not self.starts:
            raise DataError(
                "No clip to train on: a clip must start on an annotated frame with an object and (unless clip_len is "
                f"1) hold a second annotated frame; with clip_len {self.config.clip_len} and stride "
                f"{self.config.stride} none does (raise clip_len above the annotation spacing)."
            )

    def __len__(self) -> int:
        return len(self.starts)

    def _clip_frames(self, sequence: VideoSequence, start: int) -> list[int]:
        return list(range(start, len(sequence.frames), self.config.stride))[: self.config.clip_len]

    def _annotated_in_clip(self, sequence: VideoSequence, start: int) -> int:
        return sum(t in sequence.annotations for t in self._clip_frames(sequence, start))

    def __getitem__(self, index: int) -> dict:
        seq_index, start = self.starts[index]
        sequence = self.sequences[seq_index]
        seed = int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0])
        generator = torch.Generator().manual_seed(seed)
        config = self.config
        frame_ids = self._clip_frames(sequence, start)
        first = sequence.load_labels(start)
        object_ids = np.unique(first[first > 0])
        if len(object_ids) > config.max_objects:
            keep = torch.randperm(len(object_ids), generator=generator)[: config.max_objects].sort().values
            object_ids = object_ids[keep.numpy()]
        ids = torch.from_numpy(object_ids)
        images = [sequence.load_frame(t) for t in frame_ids]
        original_size = images[0].shape[:2]
        pixel_values = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        targets = torch.zeros(len(frame_ids), len(ids), *original_size, dtype=torch.bool)
        annotated = torch.tensor([t in sequence.annotations for t in frame_ids])
        for i, t in enumerate(frame_ids):
            if annotated[i]:
                labels = torch.from_numpy(first if t == start else sequence.load_labels(t))
                targets[i] = labels[None] == ids[:, None, None]
        item = {
            "sample_id": f"{sequence.name}@{start}",
            "pixel_values": pixel_values,
            "target_masks": resize_masks(targets, self.image_size),
            "annotated": annotated,
            "object_ids": ids,
        }
        if torch.rand((), generator=generator) < config.prompts.mask_prompt_probability:
            item["prompt_masks"] = item["target_masks"][0]
        else:
            points, labels = sample_prompts(targets[0], config.prompts, generator)
            item["points"] = to_model_coordinates(points, original_size, self.image_size)
            item["point_labels"] = labels
        return item


def resize_masks(masks: torch.Tensor, size: int) -> torch.Tensor:
    """`(..., H, W)` bool -> `(..., size, size)` bool, nearest neighbour."""
    flat = masks.reshape(-1, 1, *masks.shape[-2:]).float()
    resized = torch.nn.functional.interpolate(flat, size=(size, size), mode="nearest")
    return resized.reshape(*masks.shape[:-2], size, size).bool()


def collate_clips(items: list[dict]) -> list[dict]:
    """Clips differ in length and object count, so a batch is simply the list of clips."""
    return items


class VideoSequenceDataset(Dataset):
    """Whole sequences for evaluation: each item is a `VideoSequence` (its frames are decoded by the evaluator)."""

    def __init__(self, sequences: list[VideoSequence]) -> None:
        self.sequences = sequences

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> VideoSequence:
        return self.sequences[index]
