"""Correction clicks for interactive training, as SAM's training does: after a prediction, click where it is most
wrong (the centre of the largest error region), and feed the previous mask logits back as a mask prompt."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from ..data.prompts import NEGATIVE, PADDING, POSITIVE


def correction_click(predicted: np.ndarray, target: np.ndarray) -> tuple[tuple[float, float], int] | None:
    """One click for `(H, W)` bool masks: ((x, y), label), or None if the prediction is already exact.

    The click goes to the interior point (farthest from the region's edge) of the largest error region: positive
    where the object was missed, negative where background was taken. Ties go to the larger of the two error kinds.
    """
    missed = target & ~predicted
    extra = predicted & ~target
    if not missed.any() and not extra.any():
        return None
    region_kind = missed if missed.sum() >= extra.sum() else extra
    labels, count = ndimage.label(region_kind)
    sizes = ndimage.sum_labels(region_kind, labels, index=np.arange(1, count + 1))
    largest = labels == (int(np.argmax(sizes)) + 1)
    distance = ndimage.distance_transform_edt(np.pad(largest, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return (float(x), float(y)), POSITIVE if region_kind is missed else NEGATIVE


def add_correction_clicks(
    points: torch.Tensor | None,
    labels: torch.Tensor | None,
    mask_logits: torch.Tensor,
    targets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Append one correction click per prompt.

    Args:
        points / labels: `(N, P, 2)` / `(N, P)` current prompts in model-input pixels, or None (prompt-free).
        mask_logits: `(N, 1, h, w)` the previous round's chosen mask.
        targets: `(N, S, S)` bool targets at the model-input resolution S.

    Returns:
        points `(N, P + 1, 2)` and labels `(N, P + 1)`; an already exact prediction gets a padding click (-10).
    """
    size = targets.shape[-2:]
    upsampled = torch.nn.functional.interpolate(mask_logits.detach().float(), size=size, mode="bilinear")
    predicted = (upsampled[:, 0] > 0).cpu().numpy()
    truth = targets.bool().cpu().numpy()
    new_points = torch.zeros(len(truth), 1, 2)
    new_labels = torch.full((len(truth), 1), PADDING, dtype=torch.long)
    for index, (pred, target) in enumerate(zip(predicted, truth)):
        click = correction_click(pred, target)
        if click is not None:
            new_points[index, 0] = torch.tensor(click[0])
            new_labels[index, 0] = click[1]
    new_points, new_labels = new_points.to(mask_logits.device), new_labels.to(mask_logits.device)
    if points is None:
        return new_points, new_labels
    return torch.cat([points, new_points], dim=1), torch.cat([labels, new_labels], dim=1)
