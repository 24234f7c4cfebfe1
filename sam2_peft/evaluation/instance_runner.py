"""`sam2-peft eval --protocol automatic | interactive`: base vs adapter on the instances of an annotated dataset."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from ..data.sources import LabelMap, Objects
from ..inference.distributed import gather_dicts, gather_list, my_share
from .instances import instance_metrics, instances_to_labels
from .interactive import MAX_CLICKS, evaluate_interactive

CONNECTIVITY = np.ones((3, 3), bool)
"""A semantic map's instances are its classes' 8-connected components (pixels touching at a corner are one)."""


def samples(records: Iterable) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """`(sample id, image (H, W, 3) uint8, objects (N, H, W) bool)` of each record, decoded one at a time."""
    for record in records:
        yield record.sample_id, record.load_image(), record.load_instances()


def true_instances(objects: Objects, ignore_index: int | None = None) -> tuple[np.ndarray, dict[int, int] | None]:
    """The true instances of a sample as an `(H, W)` int32 label image, and each label's class id ({label: class};
    None where the data names no class). Each object is one instance, but a semantic map's class region is as many
    instances as it has connected components (`CONNECTIVITY`), and the `ignore_index` region is none."""
    if not (isinstance(objects, LabelMap) and objects.semantic):
        classes = objects.classes()
        labels = instances_to_labels(objects.masks()).astype(np.int32)
        return labels, None if classes is None else {k + 1: int(c) for k, c in enumerate(classes.tolist())}
    labels, by_label = np.zeros(objects.shape, np.int32), {}
    for value in objects.values.tolist():
        if value == ignore_index:
            continue
        components, count = ndimage.label(objects.labels == value, structure=CONNECTIVITY)
        inside = components > 0
        labels[inside] = components[inside] + len(by_label)
        by_label |= {len(by_label) + k: int(value) for k in range(1, count + 1)}
    return labels, by_label


def automatic_report(
    segmenters: dict[str, Callable[[np.ndarray], object]],
    records: list,
    progress: bool = True,
    class_names: dict[int, str] | None = None,
    ignore_index: int | None = None,
) -> dict:
    """Run each named segmenter (`image -> Instances`) on every record and score its label images against the true
    instances (`true_instances`): per image and overall mSA, SA50, SA75 and COCO mAP / AP50 / AP75, plus seconds per
    image; per class too where both the data and the segmenter give classes (`instance_metrics`; `class_names`
    names the data's class ids)."""
    records = my_share(records)  # under accelerate launch: this process's share; the per-image results gathered
    truth: dict[str, np.ndarray] = {}
    true_classes: dict[str, dict[int, int] | None] = {}
    predicted: dict[str, dict[str, np.ndarray]] = {name: {} for name in segmenters}
    scores: dict[str, dict[str, dict[int, float]]] = {name: {} for name in segmenters}
    classes: dict[str, dict[str, dict[int, int] | None]] = {name: {} for name in segmenters}
    seconds = {name: 0.0 for name in segmenters}
    prompts = {name: 0 for name in segmenters}
    for record in tqdm(records, total=len(records), desc="automatic", unit="image", leave=False, disable=not progress):
        sample_id, image = record.sample_id, record.load_image()
        truth[sample_id], true_classes[sample_id] = true_instances(record.objects(), ignore_index)
        for name, segment in segmenters.items():
            started = time.perf_counter()
            instances = segment(image)
            seconds[name] += time.perf_counter() - started
            predicted[name][sample_id] = instances.labels.astype(np.int32)
            scores[name][sample_id] = instances.score_by_label
            classes[name][sample_id] = instances.class_by_label
            prompts[name] += len(instances.points)
    truth, true_classes = gather_dicts(truth), _all_or_none(gather_dicts(true_classes))
    results = {}
    for name in segmenters:
        predicted[name], scores[name] = gather_dicts(predicted[name]), gather_dicts(scores[name])
        seconds[name], prompts[name] = sum(gather_list([seconds[name]])), sum(gather_list([prompts[name]]))
        named = _all_or_none(gather_dicts(classes[name]))
        metrics = instance_metrics(truth, predicted[name], scores[name], true_classes, named, class_names)
        metrics["overall"]["seconds_per_image"] = seconds[name] / max(len(truth), 1)
        metrics["overall"]["prompts_per_image"] = prompts[name] / max(len(truth), 1)
        results[name] = metrics
    return {"protocol": "automatic", "num_images": len(truth), "results": results}


def _all_or_none(classes: dict[str, dict[int, int] | None]) -> dict[str, dict[int, int]] | None:
    """Each image's {label: class}, or None unless every image has them."""
    return None if any(value is None for value in classes.values()) else classes


def interactive_report(
    predictors: dict[str, object], records: list, max_clicks: int = MAX_CLICKS, progress: bool = True
) -> dict:
    """The click protocol (clicks only, and box then clicks) for each named predictor on every object."""
    results = {}
    for name, predictor in predictors.items():
        by_start = evaluate_interactive(predictor, samples(my_share(records)), max_clicks, progress=progress)
        for result in by_start.values():  # under accelerate launch: every process's images, in order
            result.ious = gather_dicts(result.ious)
        results[name] = {start: result.summary(max_clicks) for start, result in by_start.items()}
    return {"protocol": "interactive", "num_images": len(records), "max_clicks": max_clicks, "results": results}
