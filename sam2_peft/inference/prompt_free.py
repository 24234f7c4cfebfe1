"""Prompt-free prediction with a PTSAM adapter: the task's mask for a whole image, with no box or point."""

from __future__ import annotations

import numpy as np
from PIL import Image
from torch import nn
from transformers import Sam2Processor

from ..tuners.ptsam.layer import PtsamPromptEncoderLayer, ptsam_classes
from .predictor import Sam2PeftPredictor


def predict_prompt_free(
    model: nn.Module,
    processor: Sam2Processor,
    images: list[np.ndarray | Image.Image],
    batch_size: int = 4,
) -> list[tuple[np.ndarray, float]]:
    """Segment each image with the model's active PTSAM adapter, no prompt given.

    Args:
        model: a `Sam2Model` carrying a PTSAM adapter (e.g. `PeftModel.from_pretrained(sam, adapter)`).
        processor: the base model's `Sam2Processor` (resizing, normalisation, and resizing masks back).
        images: `(H, W, 3)` or `(H, W)` uint8 arrays, or PIL images; sizes may differ.
        batch_size: images per forward pass.

    Returns:
        One `(mask, score)` per image: `mask` `(H, W)` bool at the image's original size, `score` the decoder's
        predicted IoU for that mask.

    Raises:
        ValueError: the model has no active PTSAM adapter (a plain SAM 2 has no task to segment without a prompt).
    """
    if not has_active_ptsam(model):
        raise ValueError("predict_prompt_free needs a model with an active PTSAM adapter; load one with PeftModel.")
    if ptsam_classes(model) > 1:
        raise ValueError(
            "This PTSAM adapter segments several classes: use Sam2PeftPredictor.predict, whose class_map names them."
        )
    was_training = model.training
    device = next(model.parameters()).device
    try:
        predictions = Sam2PeftPredictor(model, processor, device=device, batch_size=batch_size).predict(list(images))
    finally:
        model.train(was_training)
    return [(p.masks[0], float(p.scores[0])) for p in predictions]


def has_active_ptsam(model: nn.Module) -> bool:
    """Whether a PTSAM adapter is active in `model` (its decoder tokens take part in the forward pass)."""
    return any(
        isinstance(m, PtsamPromptEncoderLayer) and m._active_entry(m.ptsam_tokens) is not None for m in model.modules()
    )
