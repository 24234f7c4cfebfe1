"""Video fine-tuning on top of the one trainer: the clip loss, and the step and evaluation hooks for clips."""

from __future__ import annotations

import torch

from ..models.video_forward import FrameOutput
from .losses import LossConfig, LossOutput, sam2_loss

LOSS_FRAMES = ("last", "all")


def video_loss(
    frames: list[FrameOutput],
    target_masks: torch.Tensor,
    annotated: torch.Tensor,
    loss_frames: str = "last",
    config: LossConfig | None = None,
) -> LossOutput:
    """`sam2_loss` on the annotated frames of one clip, averaged over those frames.

    Args:
        frames: the tracker's T outputs (N objects each).
        target_masks: `(T, N, H, W)` targets; all-zero where an object is absent (trains the object-score head).
        annotated: `(T,)` bool, frames that have ground truth.
        loss_frames: `last` (the last annotated frame only, the sparse-annotation setting) or `all`.

    Frames whose output is the mask prompt itself are never trained on. Raises `ValueError` when no frame is left.
    """
    if loss_frames not in LOSS_FRAMES:
        raise ValueError(f"loss_frames must be one of {LOSS_FRAMES}, got '{loss_frames}'.")
    chosen = [t for t, out in enumerate(frames) if bool(annotated[t]) and not out.from_mask_prompt]
    if loss_frames == "last":
        chosen = chosen[-1:]
    if not chosen:
        raise ValueError("No annotated frame to train on in this clip (the only annotated frame is the mask prompt).")
    parts = [
        sam2_loss(frames[t].mask_logits, frames[t].iou_scores, frames[t].object_score_logits, target_masks[t], config)
        for t in chosen
    ]
    means = {
        name: torch.stack([getattr(p, name) for p in parts]).mean()
        for name in ("loss", "mask", "dice", "iou", "object_score")
    }
    return LossOutput(**means, mask_iou=torch.cat([p.mask_iou for p in parts]))
