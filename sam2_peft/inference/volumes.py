"""Segment a 3D volume through SAM 2's memory: one prompted slice per object, propagated both ways along the slices.

Each object is tracked on its own (as the video task tracks each object), in two passes that start on its prompted
slice: forward over the slices after it, and backward over the slices before it (the slices fed in reverse order, so
that memory always holds the slices next to the current one, as transformers' `propagate_in_video_iterator(...,
reverse=True)` does). Merge rule: every slice but the prompted one is reached by exactly one pass, which gives its
mask; on the prompted slice both passes compute the same output from the same prompt, and the forward pass's is kept.
Objects are then combined into one label volume: a voxel takes the id of the object with the highest positive mask
logit there (0 where none is positive).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from scipy import ndimage

from .video import VideoPredictor

DIRECTIONS = ("both", "forward")


class Slices(Protocol):
    """What propagation reads: a `VolumeSequence` or a `VideoSequence` (frames as slices)."""

    frames: object

    def load_frame(self, index: int) -> np.ndarray: ...


@dataclass
class SlicePrompt:
    """One object's prompt on slice `slice`, in that slice's pixels: a `box` `(4,)` x0 y0 x1 y1, or `points`
    `(P, 2)` x y with `labels` `(P,)` (1 positive, 0 negative), or a `mask` `(H, W)` bool."""

    slice: int
    box: np.ndarray | None = None
    points: np.ndarray | None = None
    labels: np.ndarray | None = None
    mask: np.ndarray | None = None

    def as_track_kwargs(self) -> dict[str, np.ndarray]:
        """The `VideoPredictor.track` prompt arguments for this one object."""
        if self.box is not None:
            return {"boxes": np.asarray(self.box, np.float32)[None]}
        if self.points is not None:
            labels = np.ones(len(self.points)) if self.labels is None else self.labels
            return {"points": np.asarray(self.points, np.float32)[None], "labels": np.asarray(labels)[None]}
        if self.mask is not None:
            return {"masks": np.asarray(self.mask, bool)[None]}
        raise ValueError("A slice prompt needs a box, points or a mask.")


def middle_slice_prompts(labels: np.ndarray, kind: str = "box") -> dict[int, SlicePrompt]:
    """A prompt per label id of `(S, H, W)` labels, on the middle slice of the object's extent (the median of the
    slices it appears on, so it is always there): its tight box, its deepest pixel (`point`), or its `mask`."""
    prompts = {}
    for object_id in np.unique(labels[labels > 0]).tolist():
        present = np.flatnonzero((labels == object_id).any(axis=(1, 2)))
        middle = int(present[len(present) // 2])
        mask = labels[middle] == object_id
        if kind == "mask":
            prompts[object_id] = SlicePrompt(middle, mask=mask)
        elif kind == "point":
            depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
            y, x = np.unravel_index(int(depth.argmax()), depth.shape)
            prompts[object_id] = SlicePrompt(middle, points=np.array([[x, y]], np.float32), labels=np.array([1]))
        elif kind == "box":
            ys, xs = np.nonzero(mask)
            prompts[object_id] = SlicePrompt(middle, box=np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]))
        else:
            raise ValueError(f"kind must be box, point or mask, got '{kind}'.")
    return prompts


def propagate_object(
    predictor: VideoPredictor, slices: Slices, prompt: SlicePrompt, directions: str = "both"
) -> Iterator[tuple[int, np.ndarray]]:
    """`(slice, (H, W) float logits)` for one object: forward from `prompt.slice` to the last slice, then (with
    `directions="both"`) backward from the slice before it to the first (see the module's merge rule)."""
    if directions not in DIRECTIONS:
        raise ValueError(f"directions must be one of {DIRECTIONS}, got '{directions}'.")
    count = len(slices.frames)
    passes = [range(prompt.slice, count)]
    if directions == "both" and prompt.slice > 0:
        passes.append(range(prompt.slice, -1, -1))
    for order in passes:
        frames = (slices.load_frame(t) for t in order)
        for t, logits in zip(order, predictor.track(frames, logits=True, **prompt.as_track_kwargs())):
            if order.step < 0 and t == prompt.slice:
                continue  # the prompted slice: the forward pass's output is kept
            yield t, logits[0]


def segment_volume(
    predictor: VideoPredictor, slices: Slices, prompts: dict[int, SlicePrompt], directions: str = "both"
) -> np.ndarray:
    """`(S, H, W)` label ids: each object of `prompts` (id -> prompt) propagated on its own, then combined by the
    highest positive logit per voxel. Memory: two `(S, H, W)` arrays, whatever the number of objects."""
    best: np.ndarray | None = None
    labels: np.ndarray | None = None
    for object_id, prompt in prompts.items():
        for t, logits in propagate_object(predictor, slices, prompt, directions):
            if best is None:
                best = np.zeros((len(slices.frames), *logits.shape), np.float32)
                labels = np.zeros(best.shape, np.uint16 if max(prompts) > 255 else np.uint8)
            wins = logits > best[t]
            best[t][wins] = logits[wins]
            labels[t][wins] = object_id
    if labels is None:
        height, width = slices.load_frame(0).shape[:2]
        labels = np.zeros((len(slices.frames), height, width), np.uint8)
    return labels
