"""Video fine-tuning on top of the one trainer: the clip loss, and the step and evaluation hooks for clips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from accelerate.logging import get_logger
from accelerate.utils import gather_object
from PIL import Image

from ..data.video import collate_clips
from ..evaluation.panels import save_panels
from ..evaluation.runner import EvaluationResult
from ..evaluation.video_runner import evaluate_video, frame_strip
from ..models.video_forward import ClipPrompt, FrameOutput, Sam2VideoTracker
from .losses import LossConfig, LossOutput, sam2_loss
from .trainer import Trainer, spread_indices

logger = get_logger(__name__)

LOSS_FRAMES = ("last", "all")
_SCALARS = ("loss", "mask", "dice", "iou", "object_score")


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
    means = {name: torch.stack([getattr(p, name) for p in parts]).mean() for name in _SCALARS}
    return LossOutput(**means, mask_iou=torch.cat([p.mask_iou for p in parts]))


class VideoTrainer(Trainer):
    """The trainer on video clips: same loop, optimizer, checkpoints, mixed precision and resume; a clip step and
    J&F evaluation on whole sequences.

    Args (besides `Trainer`'s): train_dataset is a `VideoClipDataset`, val_dataset a `VideoSequenceDataset`;
        loss_frames: `last` or `all` annotated frames of each clip; eval_prompt: `box` or `point` on the first frame.
    """

    segmenter_class = Sam2VideoTracker
    collate_fn = staticmethod(collate_clips)

    def __init__(self, *args, loss_frames: str = "last", eval_prompt: str = "box", **kwargs) -> None:
        if loss_frames not in LOSS_FRAMES:
            raise ValueError(f"loss_frames must be one of {LOSS_FRAMES}, got '{loss_frames}'.")
        self.loss_frames = loss_frames
        self.eval_prompt = eval_prompt
        super().__init__(*args, **kwargs)

    def _embedding_cache(self) -> None:
        logger.info("Embedding cache off: video clips are encoded on every step.")
        self.run_info["embedding_cache"] = {"enabled": False, "views": 0}
        return None

    def _step(self, batch: list[dict]) -> LossOutput:
        device = self.accelerator.device
        parts = []
        for clip in batch:
            masks = clip.get("prompt_masks")
            prompt = ClipPrompt(
                points=None if masks is not None else clip["points"].to(device),
                point_labels=None if masks is not None else clip["point_labels"].to(device),
                masks=None if masks is None else masks.to(device),
            )
            with self.accelerator.autocast():
                frames = self.wrapped(clip["pixel_values"].to(device), prompt)
            targets = clip["target_masks"].to(device)
            parts.append(video_loss(frames, targets, clip["annotated"], self.loss_frames, self.config.loss))
        means = {n: torch.stack([getattr(p, n) for p in parts]).mean() for n in _SCALARS}
        return LossOutput(**means, mask_iou=torch.cat([p.mask_iou for p in parts]))

    def evaluate(self, keep_ids: set[str] | None = None) -> EvaluationResult:
        """J, F and J&F on the validation sequences (each process scores its shard; results are gathered)."""
        sequences = (sequence for batch in self.val_loader for sequence in batch)
        result = evaluate_video(
            self.accelerator.unwrap_model(self.wrapped),
            sequences,
            self.processor,
            self.accelerator.device,
            keep_ids=frozenset(keep_ids or ()),
            prompt=self.eval_prompt,
            num_strip_frames=self.config.num_panels,
            autocast=self.accelerator.autocast,
        )
        per_sequence, kept = {}, {}
        for part in gather_object([result.per_image]):
            per_sequence.update(part)
        for part in gather_object([result.kept_predictions]):
            kept.update(part)
        metrics = {k: float(np.mean([s[k] for s in per_sequence.values()])) for k in ("J", "F", "J&F")}
        return EvaluationResult(metrics=metrics, per_image=per_sequence, kept_predictions=kept)

    def _panel_ids(self) -> list[str]:
        if self.val_dataset is None:
            return []
        sequences = self.val_dataset.sequences
        return [sequences[i].name for i in spread_indices(len(sequences), self.config.num_panels, self.config.seed)]

    def _write_panels(
        self,
        tuned: dict[str, np.ndarray],
        directory: Path,
        names: dict[str, str] | None = None,
        base: dict[str, np.ndarray] | None = None,
        tuned_scores: dict[str, dict[str, float]] | None = None,
    ) -> dict[str, Image.Image]:
        """Frame strips of the sequences of `names` (file name -> sequence; default the panel ids), as `Trainer`'s
        (without per-sequence scores: `tuned_scores` is accepted for the shared call and not drawn)."""
        names = {name: name for name in self.panel_ids} if names is None else names
        base = self.base_predictions if base is None else base
        sequences = {s.name: s for s in self.val_dataset.sequences}
        strips = {}
        for name, sequence in names.items():
            if sequence in tuned:
                tiles = {"base": base.get(sequence), "fine-tuned": tuned[sequence]}
                tiles = {k: v for k, v in tiles.items() if v is not None}
                strips[name] = frame_strip(sequences[sequence], tiles, self.config.num_panels)
        if strips:
            save_panels(strips, directory)
        return strips
