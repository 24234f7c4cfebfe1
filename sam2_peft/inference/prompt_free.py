"""Prompt-free prediction with a PTSAM adapter: the task's mask for a whole image, with no box or point."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import Sam2Processor

from ..tuners.ptsam.layer import PtsamPromptEncoderLayer


@torch.no_grad()
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
    parameter = next(model.parameters())
    was_training = model.training
    model.eval()
    results: list[tuple[np.ndarray, float]] = []
    try:
        for start in range(0, len(images), batch_size):
            chunk = [_rgb(image) for image in images[start : start + batch_size]]
            inputs = processor(images=chunk, return_tensors="pt")
            pixel_values = inputs["pixel_values"].to(parameter.device, parameter.dtype)
            output = model(pixel_values=pixel_values, multimask_output=False)
            masks = processor.post_process_masks(output.pred_masks.float().cpu(), inputs["original_sizes"])
            scores = output.iou_scores[:, 0, 0].float().cpu()
            results.extend((mask[0, 0].numpy().astype(bool), float(score)) for mask, score in zip(masks, scores))
    finally:
        model.train(was_training)
    return results


def has_active_ptsam(model: nn.Module) -> bool:
    """Whether a PTSAM adapter is active in `model` (its decoder tokens take part in the forward pass)."""
    return any(
        isinstance(m, PtsamPromptEncoderLayer) and m._active_entry(m.ptsam_tokens) is not None for m in model.modules()
    )


def _rgb(image: np.ndarray | Image.Image) -> np.ndarray:
    array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"Expected an (H, W, 3) or (H, W) image, got shape {array.shape}.")
    return array
