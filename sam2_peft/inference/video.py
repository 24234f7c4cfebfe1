"""Streaming video segmentation with a base SAM 2 and an optional adapter: frame by frame, bounded memory."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch import nn
from transformers import Sam2Processor

from ..adapters.files import load_adapter
from ..data.prompts import to_model_coordinates
from ..models.loading import load_base_model
from ..models.video_forward import ClipPrompt, Sam2VideoTracker


class VideoPredictor:
    """Tracks objects prompted on a video's first frame through any number of frames.

    Frames are processed one at a time and only the frames SAM 2's memory can still reach are kept, so memory use is
    set by the memory bank's size (`num_maskmem`, `max_object_pointers_in_encoder`), not by the video's length.
    """

    def __init__(self, model: nn.Module, processor: Sam2Processor, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.tracker = Sam2VideoTracker(model.to(self.device)).eval()
        self.processor = processor
        self.image_size = int(processor.image_processor.size["height"])

    @classmethod
    def from_pretrained(
        cls,
        base_model: str | None = None,
        adapter_id_or_path: str | os.PathLike | None = None,
        device: torch.device | str = "cpu",
        **deprecated,
    ) -> VideoPredictor:
        """A predictor for base model `base_model` (see `load_base_model`) with the adapter saved in
        `adapter_id_or_path`, if any (the names `Sam2PeftPredictor.from_pretrained` uses; `base=` and `adapter=` still
        work, with a `DeprecationWarning`)."""
        base_model = _renamed(deprecated, "base", "base_model", base_model)
        adapter_id_or_path = _renamed(deprecated, "adapter", "adapter_id_or_path", adapter_id_or_path)
        if deprecated:
            raise TypeError(f"from_pretrained() got unexpected keyword arguments: {', '.join(deprecated)}")
        if base_model is None:
            raise TypeError("from_pretrained() needs base_model, the base SAM 2 id or folder.")
        model, processor = load_base_model(base_model, video=True)
        if adapter_id_or_path is not None:
            model = load_adapter(model, adapter_id_or_path)
        return cls(model, processor, device)

    @torch.no_grad()
    def track(
        self,
        frames: Iterable[np.ndarray],
        boxes: np.ndarray | None = None,
        points: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        masks: np.ndarray | None = None,
        logits: bool = False,
        **deprecated,
    ) -> Iterator[np.ndarray]:
        """Yield `(N, H, W)` bool masks for each `(H, W, 3)` uint8 frame, the N objects prompted on the first frame
        (with `logits`, the float mask logits at the frame's size instead: positive inside).

        Give one prompt kind, in the first frame's pixels: `boxes` `(N, 4)` x0 y0 x1 y1; `points` `(N, P, 2)` with
        `labels` `(N, P)` (1 positive, 0 negative; `Sam2PeftPredictor.predict`'s name, `point_labels=` still works
        with a `DeprecationWarning`); or `masks` `(N, H, W)` bool.
        """
        labels = _renamed(deprecated, "point_labels", "labels", labels)
        if deprecated:
            raise TypeError(f"track() got unexpected keyword arguments: {', '.join(deprecated)}")
        frames = iter(frames)
        first = next(frames, None)
        if first is None:
            return
        size = tuple(first.shape[:2])
        prompt = self._prompt(size, boxes, points, labels, masks)

        def pixel_values(frame: np.ndarray) -> torch.Tensor:
            if tuple(frame.shape[:2]) != size:
                raise ValueError(
                    f"Frame of size {frame.shape[:2]} in a video of size {size}: all frames need one size."
                )
            values = self.processor.image_processor(images=frame, return_tensors="pt")["pixel_values"][0]
            return values.to(self.device)

        stream = (pixel_values(f) for f in _chain(first, frames))
        for output in self.tracker.track(stream, prompt, keep_memory_of_last=True):
            low_res = output.pred_masks.float().cpu()
            yield self.processor.post_process_masks([low_res], [size], binarize=not logits)[0][:, 0].numpy()

    def _prompt(self, size, boxes, points, point_labels, masks) -> ClipPrompt:
        given = [p is not None for p in (boxes, points, masks)]
        if sum(given) != 1:
            raise ValueError("Give exactly one prompt kind for the first frame: boxes, points (+ labels) or masks.")
        if masks is not None:
            return ClipPrompt(masks=torch.as_tensor(np.asarray(masks, dtype=bool), device=self.device))
        if boxes is not None:
            corners = torch.as_tensor(np.asarray(boxes, dtype=np.float32)).view(-1, 2, 2)
            labels = torch.tensor([[2, 3]]).expand(len(corners), 2)
        else:
            if point_labels is None:
                raise ValueError("points need labels (1 positive, 0 negative), shape (N, P).")
            corners = torch.as_tensor(np.asarray(points, dtype=np.float32))
            labels = torch.as_tensor(np.asarray(point_labels)).long()
        coords = to_model_coordinates(corners, size, self.image_size)
        return ClipPrompt(points=coords.to(self.device), point_labels=labels.to(self.device))


def _renamed(given: dict, old: str, new: str, value):
    """`value`, or the argument given under its old name `old` (popped from `given`, with a `DeprecationWarning`)."""
    if old not in given:
        return value
    if value is not None:
        raise TypeError(f"give {new}= only (it replaces {old}=).")
    warnings.warn(f"{old}= is deprecated: use {new}=.", DeprecationWarning, stacklevel=3)
    return given.pop(old)


def _chain(first: np.ndarray, rest: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    yield first
    yield from rest
