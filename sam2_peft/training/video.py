"""Video fine-tuning with the one trainer: the clip loss and the clip task (training on clips, J&F evaluation on
whole sequences)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from PIL import Image
from torch import nn
from transformers import Sam2Processor

from ..data.video import VideoClipDataset, VideoSequenceDataset, collate_clips
from ..evaluation.runner import EvaluationResult
from ..evaluation.video_runner import evaluate_video, frame_strip
from ..models.video_forward import ClipPrompt, FrameOutput, Sam2VideoTracker
from .config import LOSS_FRAMES, LossConfig
from .losses import SCALAR_TERMS, LossOutput, sam2_loss
from .tasks import Autocast, Encode, Task, spread_indices


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
    means = {name: torch.stack([getattr(p, name) for p in parts]).mean() for name in SCALAR_TERMS}
    return LossOutput(**means, mask_iou=torch.cat([p.mask_iou for p in parts]))


class VideoClipTask(Task):
    """Training on clips (sparse annotations, a prompt on the first frame, memory carried through the clip) and J, F
    and J&F on whole validation sequences.

    Args:
        train_dataset: a `VideoClipDataset`; val_dataset: a `VideoSequenceDataset` (or None).
        processor: the base model's processor.
        loss_frames: `last` or `all` annotated frames of each clip in the loss.
        eval_prompt: `box` or `point` on the first frame of each validation sequence.
        loss: the loss terms' forms and weights.
        strip_frames: frames per validation picture (a strip of evenly spaced frames).
    """

    metric_for_best = "J&F"

    def __init__(
        self,
        train_dataset: VideoClipDataset,
        val_dataset: VideoSequenceDataset | None,
        processor: Sam2Processor,
        loss_frames: str = "last",
        eval_prompt: str = "box",
        loss: LossConfig | None = None,
        strip_frames: int = 4,
    ) -> None:
        if loss_frames not in LOSS_FRAMES:
            raise ValueError(f"loss_frames must be one of {LOSS_FRAMES}, got '{loss_frames}'.")
        self.train_dataset, self.val_dataset, self.processor = train_dataset, val_dataset, processor
        self.loss_frames, self.eval_prompt = loss_frames, eval_prompt
        self.loss_config = loss or LossConfig()
        self.strip_frames = strip_frames

    def segmenter(self, model: nn.Module) -> Sam2VideoTracker:
        return Sam2VideoTracker(model)

    def collate(self, items: list) -> list:
        return collate_clips(items)

    def loss(
        self,
        segmenter: nn.Module,
        batch: list[dict],
        device: torch.device,
        autocast: Autocast,
        encode: Encode | None,
    ) -> LossOutput:
        parts = []
        for clip in batch:
            masks = clip.get("prompt_masks")
            prompt = ClipPrompt(
                points=None if masks is not None else clip["points"].to(device),
                point_labels=None if masks is not None else clip["point_labels"].to(device),
                masks=None if masks is None else masks.to(device),
            )
            with autocast():
                frames = segmenter(clip["pixel_values"].to(device), prompt)
            targets = clip["target_masks"].to(device)
            parts.append(video_loss(frames, targets, clip["annotated"], self.loss_frames, self.loss_config))
        means = {n: torch.stack([getattr(p, n) for p in parts]).mean() for n in SCALAR_TERMS}
        return LossOutput(**means, mask_iou=torch.cat([p.mask_iou for p in parts]))

    def evaluate(
        self,
        segmenter: nn.Module,
        loader: Iterator,
        accelerator: Accelerator,
        keep_ids: frozenset[str],
        encode: Encode | None,
    ) -> EvaluationResult:
        """J, F and J&F on the validation sequences (each process scores its shard; results are gathered)."""
        result = evaluate_video(
            accelerator.unwrap_model(segmenter),
            (sequence for batch in loader for sequence in batch),
            self.processor,
            accelerator.device,
            keep_ids=keep_ids,
            prompt=self.eval_prompt,
            num_strip_frames=self.strip_frames,
            autocast=accelerator.autocast,
        )
        per_sequence, kept = {}, {}
        for part in gather_object([result.per_image]):
            per_sequence.update(part)
        for part in gather_object([result.kept_predictions]):
            kept.update(part)
        metrics = {k: float(np.mean([s[k] for s in per_sequence.values()])) for k in ("J", "F", "J&F")}
        return EvaluationResult(metrics=metrics, per_image=per_sequence, kept_predictions=kept)

    def panel_ids(self, count: int, seed: int) -> list[str]:
        if self.val_dataset is None:
            return []
        sequences = self.val_dataset.sequences
        return [sequences[i].name for i in spread_indices(len(sequences), count, seed)]

    def draw_panels(
        self,
        tuned: dict[str, np.ndarray],
        names: dict[str, str],
        base: dict[str, np.ndarray],
        scores: dict[str, dict[str, dict[str, float]]],
    ) -> dict[str, Image.Image]:
        """Frame strips (base and fine-tuned masks over evenly spaced frames) of the sequences in `names`."""
        sequences = {s.name: s for s in self.val_dataset.sequences}
        strips = {}
        for name, sequence in names.items():
            if sequence in tuned:
                tiles = {"base": base.get(sequence), "fine-tuned": tuned[sequence]}
                tiles = {k: v for k, v in tiles.items() if v is not None}
                strips[name] = frame_strip(sequences[sequence], tiles, self.strip_frames)
        return strips

    def settings(self) -> dict:
        return {
            "dataset": asdict(self.train_dataset.config),
            "loss": asdict(self.loss_config),
            "loss_frames": self.loss_frames,
            "eval_prompt": self.eval_prompt,
        }
