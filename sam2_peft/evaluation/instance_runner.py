"""`sam2-peft eval --protocol automatic | interactive`: base vs adapter on the instances of an annotated dataset."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

import numpy as np
from tqdm.auto import tqdm

from ..inference.distributed import gather_dicts, gather_list, my_share
from .instances import instance_metrics, instances_to_labels
from .interactive import MAX_CLICKS, evaluate_interactive


def samples(records: Iterable) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """`(sample id, image (H, W, 3) uint8, objects (N, H, W) bool)` of each record, decoded one at a time."""
    for record in records:
        yield record.sample_id, record.load_image(), record.load_instances()


def automatic_report(
    segmenters: dict[str, Callable[[np.ndarray], object]], records: list, progress: bool = True
) -> dict:
    """Run each named segmenter (`image -> Instances`) on every record and score its label images against the true
    instances: per image and overall mSA, SA50, SA75 and COCO mAP / AP50 / AP75, plus seconds per image."""
    records = my_share(records)  # under accelerate launch: this process's share; the per-image results gathered
    truth: dict[str, np.ndarray] = {}
    predicted: dict[str, dict[str, np.ndarray]] = {name: {} for name in segmenters}
    scores: dict[str, dict[str, dict[int, float]]] = {name: {} for name in segmenters}
    seconds = {name: 0.0 for name in segmenters}
    prompts = {name: 0 for name in segmenters}
    for sample_id, image, objects in tqdm(
        samples(records), total=len(records), desc="automatic", unit="image", leave=False, disable=not progress
    ):
        truth[sample_id] = instances_to_labels(objects).astype(np.int32)
        for name, segment in segmenters.items():
            started = time.perf_counter()
            instances = segment(image)
            seconds[name] += time.perf_counter() - started
            predicted[name][sample_id] = instances.labels.astype(np.int32)
            scores[name][sample_id] = instances.score_by_label
            prompts[name] += len(instances.points)
    truth = gather_dicts(truth)
    results = {}
    for name in segmenters:
        predicted[name], scores[name] = gather_dicts(predicted[name]), gather_dicts(scores[name])
        seconds[name], prompts[name] = sum(gather_list([seconds[name]])), sum(gather_list([prompts[name]]))
        metrics = instance_metrics(truth, predicted[name], scores[name])
        metrics["overall"]["seconds_per_image"] = seconds[name] / max(len(truth), 1)
        metrics["overall"]["prompts_per_image"] = prompts[name] / max(len(truth), 1)
        results[name] = metrics
    return {"protocol": "automatic", "num_images": len(truth), "results": results}


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
