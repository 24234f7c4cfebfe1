"""Per-volume metrics: 3D Dice and the normalised surface distance (NSD, "surface Dice") at a tolerance in mm.

NSD (Nikolov et al. 2021) is the share of both surfaces that lies within `tolerance` of the other surface, distances
measured with the voxel spacing (anisotropic spacing counts as it is). It is MONAI's `compute_surface_dice` with
`use_subvoxels=True` (surface elements weighted by their area, as DeepMind's `surface-distance` does); an object
absent from both volumes scores 1 on both metrics, absent from one only 0.
"""

from __future__ import annotations

import numpy as np

from .metrics import dice

NSD_TOLERANCE_MM = 2.0
"""Default NSD tolerance (mm): the value used for organs in the Medical Segmentation Decathlon's NSD reports."""


def surface_dice(
    pred: np.ndarray, target: np.ndarray, spacing: tuple[float, float, float], tolerance: float = NSD_TOLERANCE_MM
) -> float:
    """NSD of two `(D, H, W)` bool volumes with voxel `spacing` (same units as `tolerance`)."""
    import torch

    from ..data.volumes import volume_library

    compute_surface_dice = volume_library("monai.metrics").compute_surface_dice

    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    if not pred.any() or not target.any():
        return 1.0 if pred.any() == target.any() else 0.0
    one_hot = [torch.from_numpy(np.stack([~m, m])[None]) for m in (pred, target)]
    score = compute_surface_dice(
        *one_hot, [float(tolerance)], include_background=False, spacing=tuple(spacing), use_subvoxels=True
    )
    return float(score.item())


def volume_metrics(
    pred: np.ndarray,
    target: np.ndarray,
    spacing: tuple[float, float, float],
    object_ids: list[int],
    tolerance: float = NSD_TOLERANCE_MM,
) -> dict[str, dict[str, float]]:
    """`{id: {"dice": ..., "nsd": ...}}` for each object id of `(D, H, W)` label volumes."""
    return {
        str(i): {
            "dice": dice(pred == i, target == i),
            "nsd": surface_dice(pred == i, target == i, spacing, tolerance),
        }
        for i in object_ids
    }
