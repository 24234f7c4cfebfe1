"""Run a segmenter over a validation set and score it at the original image resolution."""

from __future__ import annotations

from collections.abc import Callable, Sized
from dataclasses import dataclass, field

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import Sam2Processor

from ..data.classes import ClassList
from ..data.dataset import SegmentationDataset, model_inputs
from ..data.prompts import mask_to_boxes
from ..models.segmenter import Sam2Segmenter, select_best_mask, wants_multimask
from ..tuners.ptsam.layer import ptsam_classes
from .metrics import ClassAccumulator, MetricAccumulator, resolve_classes


@dataclass
class EvaluationResult:
    """Mean metrics, per-image metrics, and the predicted masks `(N, H, W)` bool of the images asked for."""

    metrics: dict[str, float]
    per_image: dict[str, dict[str, float]]
    kept_predictions: dict[str, np.ndarray] = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    """More than numbers, saved beside them in `metrics.json` (multi-class: the classes and the confusion matrix)."""


@torch.no_grad()
def evaluate_segmenter(
    segmenter: Sam2Segmenter,
    dataloader: DataLoader,
    processor: Sam2Processor,
    accelerator: Accelerator,
    keep_ids: set[str] | frozenset[str] = frozenset(),
    dilation_ratio: float = 0.02,
    encode: Callable[[list[str], torch.Tensor], dict[str, list[torch.Tensor]]] | None = None,
    description: str = "evaluate",
    classes: ClassList | None = None,
) -> EvaluationResult:
    """Predict every validation batch (single mask, or the best of 3 for single clicks) and score each image.

    Works in several processes: each scores its shard and the per-image results are gathered. `encode(keys,
    pixel_values)`, e.g. `EmbeddingCache.segmenter_inputs`, supplies the encoded images (keys `eval/<sample_id>`).
    A progress bar per image, labelled `description`, shows on the main process (counting every process's images)
    and disappears when done.

    With `classes` and batches of one row per class (a multi-class PTSAM task), a model that decodes every class
    (the adapter) has its overlaps resolved by `resolve_classes` (highest probability, background below
    `BACKGROUND_THRESHOLD`), while one that does not (the prompt-free base) has its one mask scored against each class;
    per-class scores, their means and the confusion matrix come from `ClassAccumulator`, without ignored pixels.
    With `classes` and batches of one row per object that carry each object's class (`object_classes`, prompted
    methods), the objects' IoU and Dice are also averaged per class (`MetricAccumulator.class_scores`).
    """
    was_training = segmenter.training
    segmenter.eval()
    accumulator = MetricAccumulator(dilation_ratio=dilation_ratio)
    by_class = None if classes is None else ClassAccumulator(classes.names)
    resolve = classes is not None and ptsam_classes(segmenter) > 1
    kept: dict[str, np.ndarray] = {}
    dataset = getattr(dataloader, "dataset", None)
    progress = tqdm(
        total=len(dataset) if isinstance(dataset, Sized) else None,
        desc=description,
        unit="image",
        leave=False,
        disable=not accelerator.is_main_process,
    )
    for batch in dataloader:
        inputs = model_inputs(batch, accelerator.device)
        if encode is not None:
            inputs.update(encode([f"eval/{s}" for s in batch["sample_ids"]], inputs.pop("pixel_values")))
        with accelerator.autocast():
            output = segmenter(**inputs, multimask_output=wants_multimask(inputs["point_labels"]))
        logits = select_best_mask(output).float().cpu()
        index = batch["object_image_index"]
        for i, sample_id in enumerate(batch["sample_ids"]):
            size = [batch["original_sizes"][i]]
            if resolve:
                full = processor.post_process_masks([logits[index == i]], size, binarize=False)[0][:, 0].numpy()
                masks = resolve_classes(full)[None] == np.arange(1, len(full) + 1)[:, None, None]
            else:
                masks = processor.post_process_masks([logits[index == i]], size)[0][:, 0].numpy()
            targets = batch["original_masks"][i].numpy()
            if "object_classes" in batch:
                accumulator.update(sample_id, masks, targets, batch["object_classes"][i].numpy())
            elif by_class is not None:
                ignore = batch["original_ignore"][i].numpy()
                by_class.update(masks, targets, ignore)
                masks, targets = masks & ~ignore, targets & ~ignore
                accumulator.update(sample_id, masks, targets)
            else:
                accumulator.update(sample_id, masks, targets)
            if sample_id in keep_ids:
                kept[sample_id] = masks
        done = len(batch["sample_ids"]) * accelerator.num_processes  # the shards advance together
        progress.update(done if progress.total is None else min(done, progress.total - progress.n))
    progress.close()
    segmenter.train(was_training)
    per_image: dict[str, dict[str, float]] = {}
    for part in gather_object([accumulator.per_image]):
        per_image.update(part)
    for part in gather_object([kept]):
        kept.update(part)
    accumulator.per_image = per_image
    metrics, details = accumulator.compute(), {}
    if classes is None:
        return EvaluationResult(metrics=metrics, per_image=per_image, kept_predictions=kept, details=details)
    by_object: dict[int, list[dict[str, float]]] = {}
    for part in gather_object([accumulator.by_class]):
        for class_id, scores in part.items():
            by_object.setdefault(class_id, []).extend(scores)
    accumulator.by_class = by_object
    total = ClassAccumulator(classes.names)
    for part in gather_object([by_class]):
        total.merge(part)
    if by_object:  # one row per object, each with its class
        names = dict(zip(classes.ids, classes.names))
        metrics |= accumulator.class_scores(names)
        details = {"classes": {str(c): names.get(c, str(c)) for c in sorted(by_object)}}
    elif total.confusion.any():  # one row per class
        metrics |= total.compute()
        details = {"classes": classes.id2label, "confusion_matrix": total.confusion.tolist()}
    return EvaluationResult(metrics=metrics, per_image=per_image, kept_predictions=kept, details=details)


def box_baseline_metrics(dataset: SegmentationDataset, dilation_ratio: float = 0.02) -> dict[str, float]:
    """Scores of the trivial prediction "mask = the object's tight box" on the objects `dataset` evaluates: what a
    box-prompted model has to beat to show it segments at all."""
    accumulator = MetricAccumulator(dilation_ratio=dilation_ratio)
    for record in dataset.records:
        masks = dataset.evaluated_masks(record.sample_id)
        boxes = mask_to_boxes(torch.from_numpy(masks)).long().tolist()
        filled = np.zeros_like(masks)
        for box_mask, (x0, y0, x1, y1) in zip(filled, boxes):
            box_mask[y0 : y1 + 1, x0 : x1 + 1] = True
        accumulator.update(record.sample_id, filled, masks)
    return accumulator.compute()
