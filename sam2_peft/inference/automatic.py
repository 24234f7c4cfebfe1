"""Automatic instance segmentation: every object of an image as its own mask, without user prompts.

Two ways to place the point prompts, one way to keep masks:

- **grid** (SAM's automatic mask generation): a regular grid of points over the image, and optionally over crops of
  it (`crop_n_layers`) for small objects;
- **specialist-guided**: a prompt-free PTSAM adapter predicts the task's foreground; one point goes to each
  connected component of it, or to each grid cell of a component that spans several cells (at the piece's pixel
  farthest from its border), and no point lands on background. A box/point adapter or the base then decodes the
  points into separate objects, so touching objects that PTSAM merges come apart. A multi-class PTSAM adapter's
  foreground is every pixel of a class (after overlaps are resolved), and each instance takes the class of highest
  mean probability over its pixels.

The points are decoded in batches against one image encoding (3 candidate masks each), then masks are kept by
predicted IoU and stability score, de-duplicated by non-maximum suppression, and small ones dropped.

Reused from transformers' `Sam2ImageProcessor` (the helpers its `mask-generation` pipeline calls):
`generate_crop_boxes` (crop boxes, crop images and the point grid per crop), `filter_masks` (predicted-IoU and
stability thresholds, masks touching a crop edge, padding crops back to the image, RLE) and
`post_process_for_mask_generation` (box NMS over all masks). Not reused: the pipeline itself, since it runs the model
on its own (no adapters' predictor, no cached embedding shared with other prompts, no custom point set for the
specialist-guided mode) and returns no label image; and SAM's per-crop NMS with its preference for masks from smaller
crops (the processor does one NMS over all crops, scored by predicted IoU).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from scipy.special import expit

from ..evaluation.instances import instances_to_labels
from .automatic_config import AutomaticMaskConfig


@dataclass
class MaskFunnel:
    """How many candidate masks each step dropped (the answer to "why no instances?"), and the highest predicted IoU
    among all candidates."""

    candidates: int = 0
    below_iou: int = 0
    unstable: int = 0
    at_crop_edge: int = 0
    duplicates: int = 0
    small_or_covered: int = 0
    best_iou: float = float("-inf")

    def __iadd__(self, other: MaskFunnel) -> MaskFunnel:
        for name in (f.name for f in fields(self) if f.name != "best_iou"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.best_iou = max(self.best_iou, other.best_iou)
        return self

    def describe(self, config: AutomaticMaskConfig) -> str:
        """One line: candidates, what each setting dropped (named by its flag), the highest predicted IoU."""
        if not self.candidates:
            return "no candidate masks (no point prompts: the foreground was empty)"
        steps = [
            (self.below_iou, f"--pred-iou-thresh {config.pred_iou_thresh:g}"),
            (self.unstable, f"--stability-score-thresh {config.stability_score_thresh:g}"),
            (self.at_crop_edge, "touching a crop edge"),
            (self.duplicates, f"--nms-thresh {config.nms_thresh:g} (duplicates)"),
            (self.small_or_covered, f"--min-area {config.min_area} or covered by higher-scored instances"),
        ]
        return (
            f"{self.candidates} candidate mask(s); dropped: "
            + ", ".join(f"{count} by {step}" for count, step in steps)
            + f"; highest predicted IoU {self.best_iou:.3f}"
        )


@dataclass
class Instances:
    """Automatic segmentation of one image.

    Attributes:
        labels: `(H, W)` label image, 0 background, 1..K instances (uint8, or uint16 above 255 instances).
        scores: `(K,)` predicted IoU of instance k + 1.
        boxes: `(K, 4)` `x0, y0, x1, y1` boxes of the instances.
        points: `(P, 2)` the point prompts used (x, y pixels).
        foreground: `(H, W)` bool, the specialist's foreground (specialist-guided mode only).
        funnel: how many candidate masks each setting dropped.
        classes: `(K,)` the class id (mask value) of instance k + 1, with a multi-class PTSAM foreground only.
        class_names: with `classes`, each class id's name (`{1: "scratch", 2: "dent"}`), as the adapter's `id2label`.
    """

    labels: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray
    points: np.ndarray
    foreground: np.ndarray | None = None
    funnel: MaskFunnel = field(default_factory=MaskFunnel)
    classes: np.ndarray | None = None
    class_names: dict[int, str] | None = None

    @property
    def score_by_label(self) -> dict[int, float]:
        return {index + 1: float(score) for index, score in enumerate(self.scores)}

    @property
    def class_by_label(self) -> dict[int, int] | None:
        """`{instance label: class id}` (None without classes)."""
        return None if self.classes is None else {index + 1: int(c) for index, c in enumerate(self.classes)}


def instance_classes(labels: np.ndarray, logits: np.ndarray, class_ids: list[int]) -> np.ndarray:
    """`(K,)` the class id of each instance 1..K of `labels` `(H, W)`: the class whose probability (the sigmoid of its
    mask logit, `logits` `(C, H, W)` in the order of `class_ids`) is highest on average over the instance's pixels."""
    count = int(labels.max()) if labels.size else 0
    if count == 0:
        return np.zeros(0, np.int64)
    index = np.arange(1, count + 1)
    means = np.stack([ndimage.mean(probability, labels, index) for probability in expit(logits)])
    return np.asarray(class_ids, np.int64)[means.argmax(axis=0)]


def _grid_in_pixels(points: torch.Tensor, crop_size: tuple[int, int], target_size: int) -> np.ndarray:
    """The processor's grid points, which it scales to the model input of side `target_size`, back in crop pixels."""
    height, width = crop_size
    scale = target_size / max(height, width)
    resized = np.array([int(width * scale + 0.5), int(height * scale + 0.5)], np.float64)
    return (points.numpy().reshape(-1, 2) * np.array([width, height]) / resized).astype(np.float32)


def _count_filtered(funnel: MaskFunnel, logits: torch.Tensor, scores: torch.Tensor, kept: int, config) -> None:
    """Add to `funnel` what `filter_masks` dropped of these candidates (its tests: predicted IoU above the threshold,
    then stability score above its threshold, then boxes off crop edges; `kept` masks passed)."""
    scores = scores.flatten()
    funnel.candidates += len(scores)
    funnel.best_iou = max(funnel.best_iou, float(scores.max())) if len(scores) else funnel.best_iou
    confident = scores > config.pred_iou_thresh if config.pred_iou_thresh > 0 else torch.ones_like(scores, dtype=bool)
    funnel.below_iou += int((~confident).sum())
    stable = int(confident.sum())
    if config.stability_score_thresh > 0 and stable:
        logits = logits.flatten(0, 1)[confident.to(logits.device)]
        offset = config.stability_score_offset
        inside = (logits > offset).flatten(1).sum(1) / (logits > -offset).flatten(1).sum(1).clamp(min=1)
        stable = int((inside > config.stability_score_thresh).sum())
    funnel.unstable += int(confident.sum()) - stable
    funnel.at_crop_edge += stable - kept


def _decode_points(
    predictor, image: np.ndarray, points: np.ndarray, crop_box: list[int], full_size, config, funnel: MaskFunnel
):
    """Masks (RLE), scores and boxes kept by `filter_masks` for `points` `(P, 2)` in the pixels of `image`, the crop
    at `crop_box` (x0, y0, x1, y1) of an image of `full_size` (H, W); what it dropped is added to `funnel`."""
    image_processor = predictor.processor.image_processor
    encoded = predictor.encode(image)
    rles, scores, boxes = [], [], []
    for start in range(0, len(points), config.points_per_batch):
        batch = points[start : start + config.points_per_batch, None]
        decoded = predictor.decode_logits(encoded, points=batch, multimask_output=True)
        masks, kept_scores, kept_boxes = image_processor.filter_masks(
            decoded.logits,
            decoded.scores,
            full_size,
            torch.tensor(crop_box, dtype=torch.float32),
            pred_iou_thresh=config.pred_iou_thresh,
            stability_score_thresh=config.stability_score_thresh,
            mask_threshold=0.0,
            stability_score_offset=config.stability_score_offset,
        )
        _count_filtered(funnel, decoded.logits, decoded.scores, len(kept_scores), config)
        rles += masks
        scores.append(kept_scores)
        boxes.append(kept_boxes)
    return rles, scores, boxes


def _instances(
    image_processor, rles, scores, boxes, points, size, config, funnel, foreground=None, scale=1.0
) -> Instances:
    """NMS over all kept masks, then overlaps resolved (higher score wins) and instances under `min_area` (original
    pixels; `scale` is the working size's) dropped; the drops are added to `funnel`."""
    height, width = size
    scores = torch.cat(scores) if scores else torch.zeros(0)
    if not rles or len(scores) == 0:
        empty = np.zeros(size, np.uint8), np.zeros(0, np.float32), np.zeros((0, 4), np.float32)
        return Instances(*empty, points, foreground, funnel)
    masks, scores, _, boxes = image_processor.post_process_for_mask_generation(
        rles, scores, torch.cat(boxes), config.nms_thresh
    )
    funnel.duplicates += len(rles) - len(masks)
    masks = np.stack([m.numpy() for m in masks]).reshape(-1, height, width)
    if foreground is not None and config.clip_to_foreground:
        masks &= foreground
    scores = scores.numpy()
    labels = instances_to_labels(masks, scores)
    areas = np.bincount(labels.ravel(), minlength=len(masks) + 1)[1:]
    keep = areas >= max(round(config.min_area * scale**2), 1)
    funnel.small_or_covered += int((~keep).sum())
    order = np.argsort(-scores[keep], kind="stable")  # instance 1 = the highest score
    old = np.flatnonzero(keep)[order]
    lookup = np.zeros(len(masks) + 1, np.int64)
    lookup[old + 1] = np.arange(1, len(old) + 1)
    relabelled = lookup[labels]
    dtype = np.uint8 if len(old) <= 255 else np.uint16 if len(old) <= 65535 else np.int32
    relabelled = relabelled.astype(dtype)
    final_boxes = []
    for k in range(1, len(old) + 1):
        ys, xs = np.nonzero(relabelled == k)
        final_boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return Instances(
        labels=relabelled,
        scores=scores[old].astype(np.float32),
        boxes=np.array(final_boxes, np.float32).reshape(-1, 4),
        points=points,
        foreground=foreground,
        funnel=funnel,
    )


def _working_size(image: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """The image downscaled so that its longest side is at most `max_side` (0: unchanged), and the scale used."""
    height, width = image.shape[:2]
    if not max_side or max(height, width) <= max_side:
        return image, 1.0
    scale = max_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR)), scale


def _to_original(instances: Instances, size: tuple[int, int], scale: float) -> Instances:
    """Label image, boxes, points and foreground back at the original `size` (H, W) (nearest-neighbour labels)."""
    if scale == 1.0:
        return instances
    height, width = size

    def resize(array):
        return np.asarray(Image.fromarray(array).resize((width, height), Image.Resampling.NEAREST))

    instances.labels = resize(instances.labels)
    instances.boxes = instances.boxes / scale
    instances.points = instances.points / scale
    if instances.foreground is not None:
        instances.foreground = resize(instances.foreground.astype(np.uint8)).astype(bool)
    return instances


@torch.no_grad()
def generate_instances(predictor, image: np.ndarray, config: AutomaticMaskConfig | None = None) -> Instances:
    """SAM's automatic mask generation with a `Sam2PeftPredictor` (base or any adapter) on one `(H, W, 3)` image."""
    config = config or AutomaticMaskConfig()
    original_size = image.shape[:2]
    image, scale = _working_size(image, config.max_side)
    image_processor = predictor.processor.image_processor
    size = image.shape[:2]
    target = int(image_processor.size["height"])  # the square model input side
    crop_boxes, grid_points, _, _ = image_processor.generate_crop_boxes(
        torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1),
        target,
        crop_n_layers=config.crop_n_layers,
        overlap_ratio=config.crop_overlap_ratio,
        points_per_crop=config.points_per_side,
        crop_n_points_downscale_factor=config.crop_n_points_downscale_factor,
    )
    rles, scores, boxes, used, funnel = [], [], [], [], MaskFunnel()
    for index, box in enumerate(crop_boxes.long().tolist()):
        x0, y0, x1, y1 = box
        crop = image[y0:y1, x0:x1]
        layer_points = grid_points[0, :, index]  # (1, P, crops, 2)
        points = _grid_in_pixels(layer_points, crop.shape[:2], target)
        kept = _decode_points(predictor, crop, points, box, size, config, funnel)
        rles += kept[0]
        scores += kept[1]
        boxes += kept[2]
        used.append(points + np.array([x0, y0], np.float32))
    instances = _instances(
        image_processor, rles, scores, boxes, np.concatenate(used), size, config, funnel, scale=scale
    )
    return _to_original(instances, original_size, scale)


def specialist_points(foreground: np.ndarray, cells_per_side: int = 32, min_area: int = 0) -> np.ndarray:
    """Point prompts `(P, 2)` (x, y) from a foreground mask `(H, W)`: one per connected component, or, for a
    component spanning several grid cells (`cells_per_side` per side), one per cell piece that holds at least a
    tenth of a cell (the component's largest piece always counts); each at the piece's pixel farthest from its
    border. Components smaller than `min_area` pixels get none."""
    foreground = np.asarray(foreground, bool)
    height, width = foreground.shape
    components, count = ndimage.label(foreground)
    if count == 0:
        return np.zeros((0, 2), np.float32)
    row_cell = np.minimum(np.arange(height) * cells_per_side // height, cells_per_side - 1)
    col_cell = np.minimum(np.arange(width) * cells_per_side // width, cells_per_side - 1)
    cells = row_cell[:, None] * cells_per_side + col_cell[None, :]
    cell_area = height * width / cells_per_side**2
    pieces = np.where(foreground, (components.astype(np.int64) - 1) * cells_per_side**2 + cells + 1, 0)
    piece_ids, piece_index = np.unique(pieces, return_inverse=True)
    piece_index = piece_index.reshape(pieces.shape)
    areas = np.bincount(piece_index.ravel())
    component_area = np.bincount(components.ravel())
    # distance of each pixel to the border of its piece (cell edges and the image border count as border)
    inner = pieces > 0
    inner[:-1] &= pieces[:-1] == pieces[1:]
    inner[1:] &= pieces[1:] == pieces[:-1]
    inner[:, :-1] &= pieces[:, :-1] == pieces[:, 1:]
    inner[:, 1:] &= pieces[:, 1:] == pieces[:, :-1]
    distance = ndimage.distance_transform_edt(np.pad(inner, 1))[1:-1, 1:-1]
    points = []
    best = ndimage.maximum_position(distance + 1e-3, piece_index, index=np.arange(1, len(piece_ids)))
    largest_piece: dict[int, int] = {}
    for k in range(1, len(piece_ids)):
        component = (piece_ids[k] - 1) // cells_per_side**2 + 1
        if component_area[component] < max(min_area, 1):
            continue
        if component not in largest_piece or areas[k] > areas[largest_piece[component]]:
            largest_piece[component] = k
    for k in range(1, len(piece_ids)):
        component = (piece_ids[k] - 1) // cells_per_side**2 + 1
        if component not in largest_piece:
            continue
        if k == largest_piece[component] or areas[k] >= 0.1 * cell_area:
            y, x = best[k - 1]
            points.append((x + 0.5, y + 0.5))
    return np.array(points, np.float32).reshape(-1, 2)


@torch.no_grad()
def specialist_guided_instances(
    foreground_predictor,
    separator,
    image: np.ndarray,
    config: AutomaticMaskConfig | None = None,
) -> Instances:
    """Instances from a prompt-free PTSAM adapter's foreground (where the prompts go) and a box/point adapter or the
    base (`separator`, a `Sam2PeftPredictor`) that decodes one mask per prompt; with a multi-class adapter, each
    instance labelled by class (`Instances.classes`, see `instance_classes`)."""
    config = config or AutomaticMaskConfig()
    image_processor = separator.processor.image_processor
    original_size = image.shape[:2]
    image, scale = _working_size(image, config.max_side)
    prediction = foreground_predictor.predict(image, return_logits=True)
    foreground = prediction.masks[0] if prediction.class_map is None else prediction.class_map > 0
    points = specialist_points(foreground, config.cells_per_side, round(config.min_area * scale**2))
    height, width = image.shape[:2]
    rles, scores, boxes, funnel = [], [], [], MaskFunnel()
    if len(points):
        crop = [0, 0, width, height]
        rles, scores, boxes = _decode_points(separator, image, points, crop, (height, width), config, funnel)
    instances = _instances(
        image_processor, rles, scores, boxes, points, (height, width), config, funnel, foreground, scale
    )
    if prediction.class_map is not None:
        instances.classes = instance_classes(instances.labels, prediction.logits, list(prediction.class_names))
        instances.class_names = prediction.class_names
    return _to_original(instances, original_size, scale)
