"""Video object segmentation metrics as the DAVIS benchmark defines them: region J and boundary F, and J&F.

J is the IoU of the predicted and true masks (`metrics.iou`; two empty masks score 1). F is the boundary
F-measure of the DAVIS toolkit (`davis2017-evaluation`, `f_boundary.py`): both masks are turned into one-pixel
boundary maps (`seg2bmap`, after Martin et al.), each boundary is dilated by a disk of radius
ceil(0.008 x image diagonal), a boundary pixel counts as matched if the other dilated boundary covers it, and F is the
harmonic mean of the matched fractions (precision, recall). As in the toolkit, a sequence's first and last frames are
left out (the first carries the prompt), each object is averaged over its frames, and the mean over all objects gives
the benchmark's J, F and J&F.

The dilation (`dilate_disk`) is exact and fast: F of a 480 x 854 frame takes 3.7 ms against 5.9 ms for the reference's
`f_measure` (cv2) and 141 ms with scipy's `binary_dilation` (`benchmarks/boundary_f_speed.py`, equal F on every frame).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .metrics import iou

BOUNDARY_THRESHOLD = 0.008
"""Boundary tolerance as a fraction of the image diagonal (DAVIS)."""


def seg2bmap(mask: np.ndarray) -> np.ndarray:
    """The one-pixel boundary map of a `(H, W)` bool mask, offset half a pixel towards the origin (DAVIS)."""
    seg = mask.astype(bool)
    east = np.zeros_like(seg)
    south = np.zeros_like(seg)
    south_east = np.zeros_like(seg)
    east[:, :-1] = seg[:, 1:]
    south[:-1, :] = seg[1:, :]
    south_east[:-1, :-1] = seg[1:, 1:]
    boundary = (seg ^ east) | (seg ^ south) | (seg ^ south_east)
    boundary[-1, :] = seg[-1, :] ^ east[-1, :]
    boundary[:, -1] = seg[:, -1] ^ south[:, -1]
    boundary[-1, -1] = False
    return boundary


def disk(radius: int) -> np.ndarray:
    """`(2r+1, 2r+1)` bool disk, x^2 + y^2 <= r^2 (as `skimage.morphology.disk`)."""
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return xx**2 + yy**2 <= radius**2


def dilate_disk(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of a `(H, W)` bool mask by `disk(radius)`, outside the image counting as False: exactly
    `ndimage.binary_dilation(mask, disk(radius))` and the reference's `cv2.dilate`, at cv2's speed.

    The disk is a stack of horizontal runs, so the mask is dilated along rows once per run half-width, and those rows
    OR-ed in, shifted by each run's row offset; all of it on the box around the mask grown by `radius`.
    """
    mask = np.asarray(mask, bool)
    out = np.zeros_like(mask)
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not len(rows):
        return out
    window = (
        slice(max(rows[0] - radius, 0), rows[-1] + radius + 1),
        slice(max(cols[0] - radius, 0), cols[-1] + radius + 1),
    )
    source = mask[window]
    half_widths = [math.isqrt(radius * radius - dy * dy) for dy in range(radius + 1)]
    wanted, along_rows = set(half_widths), {}
    horizontal = source.copy()
    for width in range(max(half_widths) + 1):
        if width:
            horizontal[:, width:] |= source[:, :-width]
            horizontal[:, :-width] |= source[:, width:]
        if width in wanted:
            along_rows[width] = horizontal.copy()
    dilated = along_rows[half_widths[0]]
    for dy in range(1, radius + 1):
        run = along_rows[half_widths[dy]]
        dilated[dy:] |= run[:-dy]
        dilated[:-dy] |= run[dy:]
    out[window] = dilated
    return out


def boundary_f_measure(pred: np.ndarray, target: np.ndarray, bound_th: float = BOUNDARY_THRESHOLD) -> float:
    """DAVIS boundary F-measure of two `(H, W)` bool masks (`bound_th` >= 1 is a radius in pixels)."""
    radius = int(bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*target.shape)))
    pred_boundary, true_boundary = seg2bmap(pred), seg2bmap(target)
    n_pred, n_true = int(pred_boundary.sum()), int(true_boundary.sum())
    if n_pred == 0 or n_true == 0:
        precision = 0.0 if n_pred > 0 else 1.0
        recall = 0.0 if n_true > 0 else 1.0
    else:
        precision = float((pred_boundary & dilate_disk(true_boundary, radius)).sum()) / n_pred
        recall = float((true_boundary & dilate_disk(pred_boundary, radius)).sum()) / n_true
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def region_jaccard(pred: np.ndarray, target: np.ndarray) -> float:
    """DAVIS region similarity J of two `(H, W)` bool masks: their IoU, 1 when both are empty."""
    return iou(pred.astype(bool), target.astype(bool))


@dataclass
class VideoMetricAccumulator:
    """Per-object J and F over frames, then per sequence and over all objects (the DAVIS summary)."""

    bound_th: float = BOUNDARY_THRESHOLD
    per_object: dict[tuple[str, int], dict[str, list[float]]] = field(default_factory=dict)

    def update(self, sequence: str, object_ids: list[int], preds: np.ndarray, targets: np.ndarray) -> None:
        """Add one evaluated frame: `preds`, `targets` `(N, H, W)` bool for the objects `object_ids`."""
        if preds.shape != targets.shape:
            raise ValueError(f"Prediction shape {preds.shape} differs from target shape {targets.shape}.")
        for object_id, pred, target in zip(object_ids, preds, targets):
            scores = self.per_object.setdefault((sequence, int(object_id)), {"J": [], "F": []})
            scores["J"].append(region_jaccard(pred, target))
            scores["F"].append(boundary_f_measure(pred, target, self.bound_th))

    def _object_means(self) -> dict[tuple[str, int], dict[str, float]]:
        means = {}
        for key, scores in self.per_object.items():
            j, f = float(np.mean(scores["J"])), float(np.mean(scores["F"]))
            means[key] = {"J": j, "F": f, "J&F": (j + f) / 2}
        return means

    def per_sequence(self) -> dict[str, dict[str, float]]:
        """Mean over each sequence's objects."""
        grouped: dict[str, list[dict[str, float]]] = {}
        for (sequence, _), scores in self._object_means().items():
            grouped.setdefault(sequence, []).append(scores)
        return {s: {k: float(np.mean([o[k] for o in objs])) for k in ("J", "F", "J&F")} for s, objs in grouped.items()}

    def compute(self) -> dict[str, float]:
        """J, F and J&F: means over all objects of all sequences, as the DAVIS benchmark reports them."""
        objects = list(self._object_means().values())
        if not objects:
            return {"J": float("nan"), "F": float("nan"), "J&F": float("nan")}
        return {k: float(np.mean([o[k] for o in objects])) for k in ("J", "F", "J&F")}
