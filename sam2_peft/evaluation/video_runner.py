"""Evaluate a video tracker on whole sequences: prompt on the first annotated frame only, J&F on the rest."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
from PIL import Image
from transformers import Sam2Processor

from ..data.prompts import PromptConfig, sample_prompts, to_model_coordinates
from ..data.video import VideoSequence
from ..models.video_forward import ClipPrompt, Sam2VideoTracker
from .panels import comparison_panel
from .runner import EvaluationResult
from .video_metrics import VideoMetricAccumulator


def first_frame_prompt(
    sequence: VideoSequence, image_size: int, prompt: str = "box"
) -> tuple[int, np.ndarray, ClipPrompt]:
    """The first annotated frame with an object, its object ids, and a deterministic prompt for them there
    (tight boxes, or one point per object drawn with a fixed seed)."""
    for frame in sequence.annotated_frames:
        labels = sequence.load_labels(frame)
        ids = np.unique(labels[labels > 0])
        if len(ids):
            break
    else:
        raise ValueError(f"Sequence '{sequence.name}' has no annotated frame with an object to prompt.")
    masks = torch.from_numpy(labels[None] == ids[:, None, None])
    config = PromptConfig(prompt=prompt, box_jitter=0.0)
    points, point_labels = sample_prompts(masks, config, torch.Generator().manual_seed(0))
    points = to_model_coordinates(points, tuple(masks.shape[1:]), image_size)
    return frame, ids, ClipPrompt(points=points, point_labels=point_labels)


def strip_frames(sequence: VideoSequence, count: int) -> list[int]:
    """`count` annotated frames spread evenly over the sequence (for pictures)."""
    annotated = sequence.annotated_frames
    picks = np.linspace(0, len(annotated) - 1, min(count, len(annotated))).round().astype(int)
    return [annotated[i] for i in sorted(set(picks.tolist()))]


@torch.no_grad()
def evaluate_video(
    tracker: Sam2VideoTracker,
    sequences: Iterable[VideoSequence],
    processor: Sam2Processor,
    device: torch.device | str = "cpu",
    keep_ids: set[str] | frozenset[str] = frozenset(),
    prompt: str = "box",
    num_strip_frames: int = 4,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> EvaluationResult:
    """Track every sequence from its first annotated frame and score J, F and J&F as DAVIS does.

    Frames are decoded and tracked one at a time, so memory does not grow with the video's length. Scored frames: the
    annotated ones except the prompted frame and the sequence's last frame (the DAVIS toolkit's convention).
    `per_image` holds per-sequence scores; `kept_predictions[name]` the masks `(K, N, H, W)` bool on the
    `strip_frames` of the sequences in `keep_ids`. `autocast` makes a fresh mixed-precision context.
    """
    was_training = tracker.training
    tracker.eval()
    image_size = int(processor.image_processor.size["height"])
    accumulator = VideoMetricAccumulator()
    kept: dict[str, np.ndarray] = {}
    for sequence in sequences:
        start, ids, clip_prompt = first_frame_prompt(sequence, image_size, prompt)
        clip_prompt = ClipPrompt(points=clip_prompt.points.to(device), point_labels=clip_prompt.point_labels.to(device))
        frame_ids = range(start, len(sequence.frames))
        scored = {t for t in sequence.annotated_frames if start < t < len(sequence.frames) - 1}
        pictured = strip_frames(sequence, num_strip_frames) if sequence.name in keep_ids else []
        frames = (_pixel_values(processor, sequence.load_frame(t)).to(device) for t in frame_ids)
        pictures = []
        with autocast():
            for t, output in zip(frame_ids, tracker.track(frames, clip_prompt, num_frames=len(frame_ids))):
                if t not in scored and t not in pictured:
                    continue
                labels = sequence.load_labels(t)
                size = labels.shape
                masks = processor.post_process_masks([output.pred_masks.float().cpu()], [size])[0][:, 0].numpy()
                if t in scored:
                    accumulator.update(sequence.name, ids.tolist(), masks, labels[None] == ids[:, None, None])
                if t in pictured:
                    pictures.append(masks)
        if pictures:
            kept[sequence.name] = np.stack(pictures)
    tracker.train(was_training)
    return EvaluationResult(metrics=accumulator.compute(), per_image=accumulator.per_sequence(), kept_predictions=kept)


def _pixel_values(processor: Sam2Processor, image: np.ndarray) -> torch.Tensor:
    return processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0]


def frame_strip(sequence: VideoSequence, tiles: dict[str, np.ndarray], num_frames: int = 4) -> Image.Image:
    """One row per strip frame (image | ground truth | each named prediction `(K, N, H, W)`), stacked vertically."""
    frames = strip_frames(sequence, num_frames)
    rows = []
    for k, t in enumerate(frames):
        labels = sequence.load_labels(t)
        ids = np.unique(labels[labels > 0])
        row_tiles = {"ground truth": labels[None] == ids[:, None, None]}
        row_tiles.update({name: masks[k] for name, masks in tiles.items() if k < len(masks)})
        rows.append(comparison_panel(sequence.load_frame(t), row_tiles, f"{sequence.name} #{t}"))
    strip = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "black")
    top = 0
    for row in rows:
        strip.paste(row, (0, top))
        top += row.height
    return strip
