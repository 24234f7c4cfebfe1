"""Mask metrics: IoU, Dice, boundary IoU and pixel accuracy, per object, per image and over a dataset.

Boundary IoU follows Cheng et al., "Boundary IoU: Improving Object-Centric Image Segmentation Evaluation"
(CVPR 2021): each mask's boundary region is the set of its pixels within distance d of its contour (the image
border counts as contour), with d = `dilation_ratio` x the image diagonal (default 2 %, at least 1 pixel), measured
in the chessboard metric as the reference implementation's iterated 3x3 erosion does; the score is the IoU of the
two boundary regions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

METRIC_NAMES = ("iou", "dice", "boundary_iou", "pixel_accuracy")


def _ratio(numerator: float, denominator: float) -> float:
    """Score of two masks; two empty masks agree perfectly."""
    return 1.0 if denominator == 0 else float(numerator) / float(denominator)


def iou(pred: np.ndarray, target: np.ndarray) -> float:
    """Intersection over union of two `(H, W)` bool masks."""
    return _ratio(np.logical_and(pred, target).sum(), np.logical_or(pred, target).sum())


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice coefficient 2|P∩G| / (|P| + |G|) of two `(H, W)` bool masks."""
    return _ratio(2 * np.logical_and(pred, target).sum(), pred.sum() + target.sum())


def pixel_accuracy(pred: np.ndarray, target: np.ndarray) -> float:
    """Fraction of pixels where the two `(H, W)` bool masks agree."""
    return float((pred == target).mean())


def boundary_width(shape: tuple[int, int], dilation_ratio: float = 0.02) -> int:
    """The boundary width d in pixels for an image of `shape` (H, W)."""
    return max(1, int(round(dilation_ratio * math.hypot(*shape))))


def mask_boundary(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels of `mask` within chessboard distance `width` of its contour or the image border. `(H, W)` bool."""
    if not mask.any():
        return np.zeros_like(mask, dtype=bool)
    padded = np.pad(mask, 1)
    distance = ndimage.distance_transform_cdt(padded, metric="chessboard")[1:-1, 1:-1]
    return mask & (distance <= width)


def _crop_around(pred: np.ndarray, target: np.ndarray, margin: int) -> tuple[slice, slice] | None:
    """The box around both masks grown by `margin` (clipped to the image); None when both are empty."""
    either = pred | target
    if not either.any():
        return None
    rows, cols = np.flatnonzero(either.any(1)), np.flatnonzero(either.any(0))
    return (
        slice(max(rows[0] - margin, 0), rows[-1] + margin + 1),
        slice(max(cols[0] - margin, 0), cols[-1] + margin + 1),
    )


def boundary_iou(pred: np.ndarray, target: np.ndarray, dilation_ratio: float = 0.02) -> float:
    """Boundary IoU of two `(H, W)` bool masks."""
    return object_metrics(pred, target, dilation_ratio)["boundary_iou"]


def object_metrics(pred: np.ndarray, target: np.ndarray, dilation_ratio: float = 0.02) -> dict[str, float]:
    """All metrics for one object.

    Computed on the crop around both masks grown by the boundary width: pixels outside it are background in both
    (they only add agreeing pixels to the accuracy), and a crop edge that is not the image border lies beyond the
    reach of any mask pixel, so boundaries are unchanged.
    """
    pred, target = pred.astype(bool), target.astype(bool)
    width = boundary_width(target.shape, dilation_ratio)
    crop = _crop_around(pred, target, width + 1)
    if crop is None:
        return {"iou": 1.0, "dice": 1.0, "boundary_iou": 1.0, "pixel_accuracy": 1.0}
    pred, target, total = pred[crop], target[crop], target.size
    disagree = np.logical_xor(pred, target).sum()
    return {
        "iou": iou(pred, target),
        "dice": dice(pred, target),
        "boundary_iou": iou(mask_boundary(pred, width), mask_boundary(target, width)),
        "pixel_accuracy": 1.0 - float(disagree) / total,
    }


def image_metrics(preds: np.ndarray, targets: np.ndarray, dilation_ratio: float = 0.02) -> dict[str, float]:
    """Mean over the objects of one image. `preds`, `targets`: `(N, H, W)` bool."""
    return _mean(_objects_metrics(preds, targets, dilation_ratio))


def _objects_metrics(preds: np.ndarray, targets: np.ndarray, dilation_ratio: float) -> list[dict[str, float]]:
    if preds.shape != targets.shape:
        raise ValueError(f"Prediction shape {preds.shape} differs from target shape {targets.shape}.")
    return [object_metrics(p, t, dilation_ratio) for p, t in zip(preds, targets)]


def _mean(per_object: list[dict[str, float]]) -> dict[str, float]:
    return {name: float(np.mean([m[name] for m in per_object])) for name in METRIC_NAMES}


CLASS_METRICS = ("iou", "dice")
"""The metrics reported per class (`iou_<class>`, `dice_<class>`) and as their mean over classes (`mean_iou`)."""


@dataclass
class MetricAccumulator:
    """Collects per-image metrics and reports their mean (each image weighs the same, whatever its object count);
    given each object's class, also each class's mean over its objects (`by_class`)."""

    dilation_ratio: float = 0.02
    per_image: dict[str, dict[str, float]] = field(default_factory=dict)
    by_class: dict[int, list[dict[str, float]]] = field(default_factory=dict)
    """Class id -> the IoU and Dice of each of its objects."""

    def update(
        self, image_id: str, preds: np.ndarray, targets: np.ndarray, classes: np.ndarray | None = None
    ) -> dict[str, float]:
        """Score one image's objects `(N, H, W)`; with `classes` `(N,)`, each object's class id, also by class."""
        per_object = _objects_metrics(preds, targets, self.dilation_ratio)
        for class_id, scores in zip([] if classes is None else classes.tolist(), per_object):
            self.by_class.setdefault(int(class_id), []).append({k: scores[k] for k in CLASS_METRICS})
        self.per_image[image_id] = _mean(per_object)
        return self.per_image[image_id]

    def class_scores(self, names: dict[int, str]) -> dict[str, float]:
        """`iou_<class>` and `dice_<class>`: the mean over the class's objects, for each class with an object (named
        by `names`, else by its id), and `mean_iou`, `mean_dice`: their mean over those classes (the keys of
        `ClassAccumulator.compute`). Empty without classes."""
        if not self.by_class:
            return {}
        scores = {}
        for metric in CLASS_METRICS:
            means = {
                names.get(c, str(c)): float(np.mean([o[metric] for o in objects]))
                for c, objects in sorted(self.by_class.items())
            }
            scores |= {f"{metric}_{name}": value for name, value in means.items()}
            scores[f"mean_{metric}"] = float(np.mean(list(means.values())))
        return scores

    def compute(self) -> dict[str, float]:
        if not self.per_image:
            return {name: float("nan") for name in METRIC_NAMES}
        return _mean(list(self.per_image.values()))


BACKGROUND_THRESHOLD = 0.5
"""A pixel is background unless some class's probability (sigmoid of its mask logit) reaches this."""


def resolve_classes(logits: np.ndarray, threshold: float = BACKGROUND_THRESHOLD) -> np.ndarray:
    """The class-index map `(H, W)` of per-class mask logits `(C, H, W)`: each pixel takes the class of highest
    probability, or 0 (background) when no class reaches `threshold`; class `c` is written `c + 1`."""
    best = logits.argmax(axis=0)
    top = np.take_along_axis(logits, best[None], axis=0)[0]
    logit_threshold = np.log(threshold / (1 - threshold))
    return np.where(top >= logit_threshold, best + 1, 0)


def index_map(masks: np.ndarray) -> np.ndarray:
    """`(H, W)` class-index map of disjoint class masks `(C, H, W)` bool (first class wins any overlap; 0: none)."""
    return np.where(masks.any(axis=0), masks.argmax(axis=0) + 1, 0)


@dataclass
class ClassAccumulator:
    """Per-class pixel counts over a dataset: per-class IoU and Dice (each class's pixels pooled over images), their
    mean over the classes the references show (`mean_iou`, `mean_dice`), the frequency-weighted IoU (classes weighed
    by their reference pixels) and the confusion matrix (rows: reference, columns: prediction; index 0 background,
    `c + 1` class `c`). Pixels marked ignored count nowhere."""

    names: tuple[str, ...]
    confusion: np.ndarray = field(init=False)
    overlap: np.ndarray = field(init=False)
    predicted: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        count = len(self.names)
        self.confusion = np.zeros((count + 1, count + 1), dtype=np.int64)
        self.overlap, self.predicted = np.zeros(count, np.int64), np.zeros(count, np.int64)

    def update(self, preds: np.ndarray, targets: np.ndarray, ignore: np.ndarray | None = None) -> None:
        """Add one image: predicted and reference class masks `(C, H, W)` bool (predictions may overlap; the
        confusion matrix takes the first), ignored pixels `(H, W)` bool."""
        valid = np.ones(targets.shape[1:], bool) if ignore is None else ~ignore
        preds, targets = preds & valid, targets & valid
        self.overlap += (preds & targets).sum(axis=(1, 2))
        self.predicted += preds.sum(axis=(1, 2))
        size = len(self.names) + 1
        pairs = index_map(targets)[valid] * size + index_map(preds)[valid]
        self.confusion += np.bincount(pairs, minlength=size * size).reshape(size, size)

    def merge(self, other: ClassAccumulator) -> None:
        """Add another process's counts."""
        self.confusion += other.confusion
        self.overlap += other.overlap
        self.predicted += other.predicted

    def compute(self) -> dict[str, float]:
        reference = self.confusion[1:].sum(axis=1)
        union = reference + self.predicted - self.overlap
        iou_c = np.where(union > 0, self.overlap / np.maximum(union, 1), 1.0)
        total = reference + self.predicted
        dice_c = np.where(total > 0, 2 * self.overlap / np.maximum(total, 1), 1.0)
        shown = reference > 0
        scores = {f"iou_{name}": float(v) for name, v in zip(self.names, iou_c)}
        scores |= {f"dice_{name}": float(v) for name, v in zip(self.names, dice_c)}
        nan = float("nan")
        scores["mean_iou"] = float(iou_c[shown].mean()) if shown.any() else nan
        scores["mean_dice"] = float(dice_c[shown].mean()) if shown.any() else nan
        scores["fw_iou"] = float((reference * iou_c).sum() / reference.sum()) if shown.any() else nan
        return scores
