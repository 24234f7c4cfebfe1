"""Writing instance segmentations: label images (PNG, 16-bit above 255 instances; TIFF), COCO results JSON with
compressed RLE, and colour overlays."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.sources import DataError, printable
from ..evaluation.instances import coco_annotations, labels_to_instances

LABEL_FORMATS = ("png", "tif")


def output_names(paths: Sequence[Path]) -> dict[Path, str]:
    """Each input file's output name (without suffix): its stem (`a.png` -> `a`), or its whole name where another
    input has the same stem (`a.png`, `a.jpg` -> `a.png`, `a.jpg`), so that no output replaces another's.

    Raises DataError in the rare case that names still collide (`a.png`, `a.jpg` and `a.png.tif`)."""
    stems = Counter(path.stem for path in paths)
    names = {path: path.stem if stems[path.stem] == 1 else path.name for path in paths}
    clashes = [name for name, count in Counter(names.values()).items() if count > 1]
    if clashes:
        same = [printable(path.name) for path, name in names.items() if name == clashes[0]]
        raise DataError(f"Images {', '.join(same)} would write one output '{printable(clashes[0])}': rename one.")
    return names


def save_label_image(labels: np.ndarray, path: str | os.PathLike) -> Path:
    """Save an `(H, W)` label image losslessly: 8-bit PNG/TIFF up to 255 instances, 16-bit up to 65535 (PIL writes
    both); more instances raise ValueError. The format follows the suffix (.png, .tif, .tiff)."""
    path = Path(path)
    top = int(labels.max()) if labels.size else 0
    if top > 65535 or (labels.size and labels.min() < 0):
        raise ValueError(f"{path.name}: labels must lie in 0..65535 for PNG/TIFF, found {labels.min()}..{top}.")
    array = np.ascontiguousarray(labels, np.uint8 if top <= 255 else np.uint16)
    if path.suffix.lower() not in (".png", ".tif", ".tiff"):
        raise ValueError(f"{path.name}: label images are saved as .png, .tif or .tiff.")
    Image.fromarray(array).save(path, **({"compression": "tiff_deflate"} if path.suffix.lower() != ".png" else {}))
    return path


def coco_results(
    labels_by_image: Mapping[str, np.ndarray],
    scores_by_image: Mapping[str, Mapping[int, float]] | None = None,
    classes_by_image: Mapping[str, Mapping[int, int]] | None = None,
    categories: Mapping[int, str] | None = None,
) -> dict:
    """A COCO-format dict (images, annotations with compressed RLE, bbox, area, score) of label images keyed by file
    name; image ids 1.. in the given order, annotation ids 1... One category "object", or `categories` (id: name) with
    each instance's id from `classes_by_image` ({label: class id} per image)."""
    images, annotations = [], []
    for image_id, (name, labels) in enumerate(labels_by_image.items(), start=1):
        images.append(
            {"id": image_id, "file_name": name, "height": int(labels.shape[0]), "width": int(labels.shape[1])}
        )
        scores = (scores_by_image or {}).get(name) or {}
        annotations += coco_annotations(labels, image_id, scores, (classes_by_image or {}).get(name))
    for annotation_id, annotation in enumerate(annotations, start=1):
        annotation["id"] = annotation_id
    categories = [{"id": int(i), "name": name} for i, name in (categories or {1: "object"}).items()]
    return {"images": images, "annotations": annotations, "categories": categories}


def instance_overlay(image: np.ndarray, labels: np.ndarray, points: np.ndarray | None = None) -> np.ndarray:
    """`(H, W, 3)` uint8: each instance of `labels` in its own colour with outlines, prompts as small dots."""
    from ..evaluation.panels import overlay

    masks, _ = labels_to_instances(labels)
    picture = overlay(image, masks) if len(masks) else image.copy()
    if points is not None and len(points):
        height, width = labels.shape
        for x, y in np.asarray(points).astype(int):
            picture[max(y - 1, 0) : min(y + 2, height), max(x - 1, 0) : min(x + 2, width)] = (255, 40, 40)
    return picture
