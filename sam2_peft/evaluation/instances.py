"""Instance segmentation metrics for label images: mean segmentation accuracy (as micro-sam reports it), and COCO
AP / mAP computed by pycocotools' `COCOeval` itself.

Segmentation accuracy at an IoU threshold t (the Data Science Bowl / StarDist definition that micro-sam computes with
`elf.evaluation.mean_segmentation_accuracy`): predicted and true instances are matched one to one by an optimal
assignment in which a pair counts only if its IoU is at least t (IoU breaks ties); SA(t) = TP / (TP + FP + FN).
mSA is the mean of SA over t = 0.5, 0.55, ..., 0.95. Label 0 is background in both images. An image with no true and
no predicted instance scores 1.

AP50 and mAP are COCO's: the predicted instances (with their scores, e.g. the predicted IoU; all 1 for a plain label
image) and the true ones go to `pycocotools.cocoeval.COCOeval(iouType="segm")` (area ranges, matching, 101-point
interpolation are all its own), and mAP@[0.5:0.95], AP50, AP75 are read from its accumulated precision (area "all")
as its `summarize` does.

Deliberate differences from the references (micro-sam's `elf.evaluation`, pycocotools' defaults):
- IoU thresholds are the values as written (0.6 is 0.6), and a pair matches at IoU >= t, as COCOeval does; elf's
  `np.arange(0.5, 1.0, 0.05)` puts 0.6, ..., 0.95 one float step above, so a pair whose IoU is exactly one of them
  (3/5, 7/10, ...: small objects) counts as matched here and not in elf. Any other IoU is scored the same.
- An image with no true and no predicted instance has SA 1 at every threshold (nothing to find, nothing wrong); elf
  scores it 0 (its SA is 0 whenever TP is 0).
- COCOeval keeps the 100 highest-scored detections per image (`maxDets`); here the cap is the larger of 100 and the
  most detections any image has (reported as `coco_max_dets`), so no detection is dropped: on images with more than
  100 instances (nuclei) `segment-all` can predict more, and the default would score the extra ones as misses. With
  at most 100 detections per image the numbers are COCOeval's own.
"""

from __future__ import annotations

import contextlib
import io
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from scipy.optimize import linear_sum_assignment

COCO_MAX_DETS = 100
"""COCOeval's default detections per image; raised to the largest per-image count when an image has more."""

IOU_THRESHOLDS = tuple(np.round(np.arange(0.5, 0.96, 0.05), 2).tolist())
"""0.5, 0.55, ..., 0.95: the thresholds of mSA (and of COCO's mAP)."""


def _check_label_image(labels: np.ndarray, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{name} must be an (H, W) integer label image (0 background), found {labels.dtype} {labels.shape}."
        )
    return labels


def instances_to_labels(masks: np.ndarray, scores: np.ndarray | None = None) -> np.ndarray:
    """Paint `(N, H, W)` bool masks into one `(H, W)` label image (1..N in the order given; 0 background).

    Where masks overlap, the one with the higher score wins (the later one when no scores are given). The dtype is
    uint8 up to 255 instances, uint16 up to 65535, else int32.
    """
    masks = np.asarray(masks, bool)
    count = len(masks)
    dtype = np.uint8 if count <= 255 else np.uint16 if count <= 65535 else np.int32
    labels = np.zeros(masks.shape[1:], dtype)
    order = np.arange(count) if scores is None else np.argsort(np.asarray(scores), kind="stable")
    for index in order:
        labels[masks[index]] = index + 1
    return labels


def labels_to_instances(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`(N, H, W)` bool masks of the non-zero labels of an `(H, W)` label image, and the label values `(N,)`."""
    labels = _check_label_image(labels, "labels")
    values = np.unique(labels)
    values = values[values != 0]
    return labels[None] == values[:, None, None], values


def iou_matrix(true_labels: np.ndarray, pred_labels: np.ndarray) -> np.ndarray:
    """IoU of every true instance (rows) with every predicted instance (columns), from the two label images' overlap
    counts. `(num_true, num_pred)` float64; instances are the non-zero labels in ascending order."""
    true_labels = _check_label_image(true_labels, "true labels")
    pred_labels = _check_label_image(pred_labels, "predicted labels")
    if true_labels.shape != pred_labels.shape:
        raise ValueError(f"Label images differ in shape: true {true_labels.shape}, predicted {pred_labels.shape}.")
    true_values, true_index = np.unique(true_labels, return_inverse=True)
    pred_values, pred_index = np.unique(pred_labels, return_inverse=True)
    overlap = np.zeros((len(true_values), len(pred_values)), np.int64)
    np.add.at(overlap, (true_index.ravel(), pred_index.ravel()), 1)
    overlap = overlap[true_values != 0][:, pred_values != 0]
    if not overlap.size:
        return overlap.astype(np.float64)
    pred_area = np.bincount(pred_index.ravel(), minlength=len(pred_values))[pred_values != 0]
    true_area = np.bincount(true_index.ravel(), minlength=len(true_values))[true_values != 0]
    union = true_area[:, None] + pred_area[None, :] - overlap
    return overlap / np.maximum(union, 1)


def true_positives(ious: np.ndarray, threshold: float) -> int:
    """Matched pairs with IoU >= `threshold` in the optimal one-to-one matching (StarDist's `_compute_tps`, which
    micro-sam's elf uses): maximise the number of pairs above the threshold, IoU as the tie-breaker."""
    num_matched = min(ious.shape) if ious.size else 0
    if num_matched == 0 or not (ious >= threshold).any():
        return 0
    costs = -(ious >= threshold).astype(float) - ious / (2 * num_matched)
    rows, cols = linear_sum_assignment(costs)
    return int((ious[rows, cols] >= threshold).sum())


def segmentation_accuracy(
    true_labels: np.ndarray, pred_labels: np.ndarray, thresholds: Sequence[float] = IOU_THRESHOLDS
) -> dict[str, float]:
    """mSA and SA at each threshold for one image, with the counts behind SA50.

    Returns `{"msa", "sa50", "sa75", "sa@<t>" for each t, "num_true", "num_pred", "tp50"}`.
    """
    ious = iou_matrix(true_labels, pred_labels)
    num_true, num_pred = ious.shape
    result: dict[str, float] = {}
    for threshold in thresholds:
        tp = true_positives(ious, threshold)
        denominator = num_true + num_pred - tp  # TP + FP + FN
        result[f"sa@{threshold:g}"] = 1.0 if denominator == 0 else tp / denominator
    result["msa"] = float(np.mean([result[f"sa@{t:g}"] for t in thresholds]))
    result["sa50"] = result.get("sa@0.5", float("nan"))
    result["sa75"] = result.get("sa@0.75", float("nan"))
    result.update(num_true=num_true, num_pred=num_pred, tp50=true_positives(ious, 0.5))
    return result


def encode_rle(mask: np.ndarray) -> dict:
    """COCO compressed RLE of an `(H, W)` bool mask, JSON-ready (`counts` as text)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def coco_annotations(
    labels: np.ndarray,
    image_id: int,
    scores: Mapping[int, float] | None = None,
    classes: Mapping[int, int] | None = None,
) -> list[dict]:
    """One COCO annotation per non-zero label of `labels` (RLE segmentation, bbox, area, category 1 or, with
    `classes` {label: category id}, the label's; with `scores` {label: score} a `score` field for results)."""
    masks, values = labels_to_instances(labels)
    annotations = []
    for mask, value in zip(masks, values.tolist()):
        rle = encode_rle(mask)
        x, y, w, h = mask_utils.toBbox(rle).tolist()
        annotation = {
            "image_id": image_id,
            "category_id": int(classes[value]) if classes is not None else 1,
            "segmentation": rle,
            "area": int(mask.sum()),
            "bbox": [x, y, w, h],
            "iscrowd": 0,
        }
        if scores is not None:
            annotation["score"] = float(scores.get(value, 1.0))
        annotations.append(annotation)
    return annotations


def coco_map(
    true_labels: Sequence[np.ndarray],
    pred_labels: Sequence[np.ndarray],
    pred_scores: Sequence[Mapping[int, float] | None] | None = None,
) -> dict[str, float]:
    """COCO segmentation AP over a set of images, by `COCOeval` (iouType "segm", one category "object").

    Args:
        true_labels / pred_labels: `(H, W)` integer label images, one pair per image.
        pred_scores: per image, {label: confidence} of its predicted instances (default 1 for every instance).

    Returns:
        `{"map": AP@[.5:.95], "ap50", "ap75", "coco_max_dets"}` (the detections per image kept: 100, or the largest
        per-image count if more); NaN where COCOeval has no ground truth (its -1). With no prediction at all, the APs
        are 0.
    """
    images, truth, results, max_dets = _coco_inputs(true_labels, pred_labels, pred_scores)
    if not results:
        return {"map": 0.0, "ap50": 0.0, "ap75": 0.0, "coco_max_dets": max_dets}
    precision, thresholds = _coco_precision(images, truth, results, {1: "object"}, max_dets)
    return {**_average_precisions(precision, thresholds), "coco_max_dets": max_dets}


def coco_class_ap(
    true_labels: Sequence[np.ndarray],
    pred_labels: Sequence[np.ndarray],
    pred_scores: Sequence[Mapping[int, float] | None] | None,
    true_classes: Sequence[Mapping[int, int]],
    pred_classes: Sequence[Mapping[int, int]],
    names: Mapping[int, str],
) -> dict:
    """COCO segmentation AP per category: `COCOeval` with the categories `names` gives ({id: name}), each instance
    in its class ({label: class id} per image, for the true and the predicted label images), its precision sliced
    per category as `COCOeval.summarize` reads it with `params.catIds=[k]`.

    Returns `{"per_class": {name: {"map", "ap50", "ap75"}}, "map", "ap50", "ap75"}`, the last three COCO's mean over
    the categories (a category with no true instance: NaN, as COCOeval's -1; predicted classes not in `names` are
    not scored)."""
    images, truth, results, max_dets = _coco_inputs(true_labels, pred_labels, pred_scores, true_classes, pred_classes)
    ids = sorted(names)
    if not results:  # nothing predicted: 0 where there is something to find
        shown = {a["category_id"] for a in truth}
        per_class = {names[c]: dict.fromkeys(("map", "ap50", "ap75"), 0.0 if c in shown else NAN) for c in ids}
        mean = 0.0 if shown & set(ids) else NAN
        return {"per_class": per_class, "map": mean, "ap50": mean, "ap75": mean}
    precision, thresholds = _coco_precision(images, truth, results, names, max_dets)
    per_class = {names[c]: _average_precisions(precision[:, :, [k]], thresholds) for k, c in enumerate(ids)}
    return {"per_class": per_class, **_average_precisions(precision, thresholds)}


NAN = float("nan")


def _coco_inputs(
    true_labels: Sequence[np.ndarray],
    pred_labels: Sequence[np.ndarray],
    pred_scores: Sequence[Mapping[int, float] | None] | None,
    true_classes: Sequence[Mapping[int, int]] | None = None,
    pred_classes: Sequence[Mapping[int, int]] | None = None,
) -> tuple[list[dict], list[dict], list[dict], int]:
    """COCO images, ground-truth annotations (numbered), results, and the detections per image to keep (100, or the
    most any image has)."""
    if len(true_labels) != len(pred_labels):
        raise ValueError(f"{len(true_labels)} true label images but {len(pred_labels)} predicted ones.")
    images, truth, results = [], [], []
    for index, (true, pred) in enumerate(zip(true_labels, pred_labels)):
        image_id = index + 1
        images.append({"id": image_id, "height": int(true.shape[0]), "width": int(true.shape[1])})
        truth += coco_annotations(true, image_id, classes=None if true_classes is None else true_classes[index])
        scores = (pred_scores[index] if pred_scores is not None else None) or {}
        results += coco_annotations(pred, image_id, scores, None if pred_classes is None else pred_classes[index])
    for number, annotation in enumerate(truth, start=1):
        annotation["id"] = number
    max_dets = max([COCO_MAX_DETS, *Counter(r["image_id"] for r in results).values()])
    return images, truth, results, max_dets


def _coco_precision(
    images: list[dict], truth: list[dict], results: list[dict], names: Mapping[int, str], max_dets: int
) -> tuple[np.ndarray, np.ndarray]:
    """COCOeval's accumulated precision `(IoU threshold, recall, category)` (area "all", the last detection cap;
    categories in increasing id) and its IoU thresholds."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ground_truth = COCO()
    categories = [{"id": int(c), "name": names[c]} for c in sorted(names)]
    ground_truth.dataset = {"images": images, "annotations": truth, "categories": categories}
    with contextlib.redirect_stdout(io.StringIO()):  # COCO and COCOeval print progress
        ground_truth.createIndex()
        detections = ground_truth.loadRes(results)
        evaluator = COCOeval(ground_truth, detections, iouType="segm")
        evaluator.params.maxDets = [1, 10, max_dets]
        evaluator.evaluate()
        evaluator.accumulate()
    return evaluator.eval["precision"][..., 0, -1], evaluator.params.iouThrs


def _average_precisions(precision: np.ndarray, thresholds: np.ndarray) -> dict[str, float]:
    """mAP@[.5:.95], AP50 and AP75 of an accumulated precision `(IoU threshold, recall, category)`."""
    return {
        "map": _mean_precision(precision),
        "ap50": _mean_precision(precision[thresholds == 0.5]),
        "ap75": _mean_precision(precision[thresholds == 0.75]),
    }


def _mean_precision(precision: np.ndarray) -> float:
    """COCOeval `summarize`'s mean over the defined (> -1) precision values; NaN where none is."""
    defined = precision[precision > -1]
    return float(defined.mean()) if defined.size else float("nan")


def instance_metrics(
    true_labels: Mapping[str, np.ndarray],
    pred_labels: Mapping[str, np.ndarray],
    pred_scores: Mapping[str, Mapping[int, float]] | None = None,
    true_classes: Mapping[str, Mapping[int, int]] | None = None,
    pred_classes: Mapping[str, Mapping[int, int]] | None = None,
    class_names: Mapping[int, str] | None = None,
) -> dict:
    """Per image mSA / SA50 / SA75 (and counts), and overall: their mean over images plus COCO mAP / AP50 / AP75
    of all images together. Keys of the mappings are image ids (the same in both).

    With classes on both sides ({label: class id} per image, `class_names` {id: name}, ids without a name named by
    their number), overall also gets `per_class` (`coco_class_ap`'s AP per class) and `class_map`, `class_ap50`,
    `class_ap75` (COCO's mean over the classes); with classes on one side only, `per_class` is None and
    `per_class_note` says which side has none."""
    missing = sorted(set(true_labels) ^ set(pred_labels))
    if missing:
        raise ValueError(f"True and predicted label images differ in ids, e.g. {missing[:3]}.")
    ids = list(true_labels)
    per_image = {i: segmentation_accuracy(true_labels[i], pred_labels[i]) for i in ids}
    overall = {key: float(np.mean([per_image[i][key] for i in ids])) for key in ("msa", "sa50", "sa75")}
    scores = [pred_scores.get(i) for i in ids] if pred_scores is not None else None
    overall.update(coco_map([true_labels[i] for i in ids], [pred_labels[i] for i in ids], scores))
    if true_classes is not None and pred_classes is not None:
        found = {c for i in ids for c in true_classes[i].values()}
        names = {c: str(c) for c in found} | dict(class_names or {})
        by_class = coco_class_ap(
            [true_labels[i] for i in ids],
            [pred_labels[i] for i in ids],
            scores,
            [true_classes[i] for i in ids],
            [pred_classes[i] for i in ids],
            names,
        )
        overall.update(
            per_class=by_class["per_class"],
            class_map=by_class["map"],
            class_ap50=by_class["ap50"],
            class_ap75=by_class["ap75"],
        )
    elif true_classes is not None or pred_classes is not None:
        overall["per_class"] = None
        overall["per_class_note"] = (
            "class-agnostic AP only: the predictions carry no class (only a multi-class PTSAM --foreground-adapter "
            "labels instances by class)"
            if pred_classes is None
            else "class-agnostic AP only: the ground truth names no class (give COCO categories or --mask-type "
            "semantic)"
        )
    overall["num_images"] = len(ids)
    overall["num_true"] = int(sum(per_image[i]["num_true"] for i in ids))
    overall["num_pred"] = int(sum(per_image[i]["num_pred"] for i in ids))
    return {"overall": overall, "per_image": per_image}
