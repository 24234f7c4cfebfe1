"""Prompt sampling for training: boxes, positive/negative points and mask prompts drawn from ground-truth masks.

All prompts are returned as points with labels, the form SAM 2's prompt encoder uses internally:
a box is its two corners labelled 2 (top-left) and 3 (bottom-right), exactly what `input_boxes` becomes inside
transformers' `Sam2PromptEncoder`; a positive point is labelled 1 and a negative one 0; padding is -10.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import PROMPT_TYPES, PromptConfig  # noqa: F401  (re-exported)

BOX_CORNER_LABELS = (2, 3)
POSITIVE, NEGATIVE, PADDING = 1, 0, -10


def mask_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight `(x0, y0, x1, y1)` boxes, in pixels, of `(N, H, W)` bool masks. Returns `(N, 4)` float."""
    rows = masks.any(dim=2)
    cols = masks.any(dim=1)
    height, width = masks.shape[1:]
    y = torch.arange(height, dtype=torch.float32)
    x = torch.arange(width, dtype=torch.float32)
    y0 = torch.where(rows, y, float(height)).amin(dim=1)
    y1 = torch.where(rows, y, -1.0).amax(dim=1)
    x0 = torch.where(cols, x, float(width)).amin(dim=1)
    x1 = torch.where(cols, x, -1.0).amax(dim=1)
    return torch.stack([x0, y0, x1, y1], dim=1)


def jitter_boxes(
    boxes: torch.Tensor, size: tuple[int, int], config: PromptConfig, generator: torch.Generator
) -> torch.Tensor:
    """Add clipped Gaussian noise to each coordinate, proportional to the box side, and keep boxes in the image."""
    if config.box_jitter <= 0:
        return boxes
    sides = torch.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], dim=1).repeat(1, 2) + 1
    noise = torch.randn(boxes.shape, generator=generator) * sides * config.box_jitter
    noise = noise.clamp(-config.max_box_jitter_px, config.max_box_jitter_px)
    height, width = size
    jittered = boxes + noise
    jittered[:, 0::2] = jittered[:, 0::2].clamp(0, width - 1)
    jittered[:, 1::2] = jittered[:, 1::2].clamp(0, height - 1)
    return jittered


def sample_points_in(mask: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` (x, y) pixel positions drawn uniformly from a `(H, W)` bool mask (with replacement if it is small)."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if len(ys) == 0:
        raise ValueError("Cannot sample a point from an empty region.")
    index = torch.randint(len(ys), (count,), generator=generator)
    return torch.stack([xs[index], ys[index]], dim=1).float()


def negative_region(mask: torch.Tensor, box: torch.Tensor, margin: float = 0.25) -> torch.Tensor:
    """Background pixels near the object (inside its box grown by `margin`); the whole background if none."""
    height, width = mask.shape
    x0, y0, x1, y1 = box.tolist()
    grow_x, grow_y = (x1 - x0 + 1) * margin, (y1 - y0 + 1) * margin
    near = torch.zeros_like(mask)
    near[
        int(max(y0 - grow_y, 0)) : int(min(y1 + grow_y, height - 1)) + 1,
        int(max(x0 - grow_x, 0)) : int(min(x1 + grow_x, width - 1)) + 1,
    ] = True
    region = near & ~mask
    return region if region.any() else ~mask


def sample_prompts(
    masks: torch.Tensor, config: PromptConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one prompt per object from `(N, H, W)` bool masks, in original-image pixels.

    Returns:
        points `(N, P, 2)` float (x, y) and labels `(N, P)` long. With `prompt="none"`, P is 0. Dense mask prompts
        are drawn per training step from the batch's targets (`mask_prompts`).
    """
    num_objects = len(masks)
    size = tuple(masks.shape[1:])
    kind = config.prompt
    if kind == "mixed":
        kind = "box" if torch.rand((), generator=generator) < 0.5 else "point"
    if kind == "none":
        points, labels = torch.zeros(num_objects, 0, 2), torch.zeros(num_objects, 0, dtype=torch.long)
    elif kind == "box":
        boxes = jitter_boxes(mask_to_boxes(masks), size, config, generator)
        points = boxes.view(num_objects, 2, 2)
        labels = torch.tensor(BOX_CORNER_LABELS).expand(num_objects, 2).clone()
    else:
        boxes = mask_to_boxes(masks)
        per_object = []
        for mask, box in zip(masks, boxes):
            chosen = [sample_points_in(mask, config.num_positive_points, generator)]
            if config.num_negative_points:
                chosen.append(sample_points_in(negative_region(mask, box), config.num_negative_points, generator))
            per_object.append(torch.cat(chosen))
        points = torch.stack(per_object)
        labels = torch.tensor([POSITIVE] * config.num_positive_points + [NEGATIVE] * config.num_negative_points)
        labels = labels.expand(num_objects, -1).clone()
    return points, labels


def mask_prompts(masks: torch.Tensor, size: int) -> torch.Tensor:
    """Ground-truth masks `(N, H, W)` bool as SAM's dense mask prompts `(N, 1, size, size)`: +-10 logits, resized
    bilinearly to the prompt encoder's mask input size (a quarter of the image size)."""
    logits = (masks[:, None].float() * 2 - 1) * 10
    return F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def to_model_coordinates(coords: torch.Tensor, original_size: tuple[int, int], image_size: int) -> torch.Tensor:
    """Rescale (x, y) pixel coordinates of an `original_size` (H, W) image to the model's square input.

    Same arithmetic as `Sam2Processor` applies to `input_points` / `input_boxes` (SAM 2 resizes without padding).
    """
    height, width = original_size
    scale = torch.tensor([image_size / width, image_size / height], dtype=coords.dtype)
    return coords * scale
