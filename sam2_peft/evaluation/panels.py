"""Side-by-side pictures: image | ground truth | base model | fine-tuned, masks drawn as coloured overlays."""

from __future__ import annotations

import colorsys
import os

import numpy as np
from PIL import Image, ImageDraw

from ..io import atomic_write_dir

TILE_SIZE = 384


def _palette(count: int) -> np.ndarray:
    """`count` distinct colours `(count, 3)` uint8 (golden-ratio hues)."""
    hues = (np.arange(count) * 0.618033988749895) % 1.0
    return (np.array([colorsys.hsv_to_rgb(h, 0.85, 1.0) for h in hues]).reshape(-1, 3) * 255).astype(np.uint8)


def overlay(image: np.ndarray, masks: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend `(N, H, W)` bool masks onto `(H, W, 3)` uint8, one colour per object, with white outlines."""
    labels = np.zeros(image.shape[:2], dtype=np.int32)
    for index, mask in enumerate(masks, start=1):
        labels[mask] = index
    colours = np.concatenate([np.zeros((1, 3), np.uint8), _palette(len(masks))]).astype(np.float32)
    out = image.astype(np.float32)
    inside = labels > 0
    out[inside] = (1 - alpha) * out[inside] + alpha * colours[labels[inside]]
    edges = np.zeros_like(inside)
    edges[:-1] |= labels[:-1] != labels[1:]
    edges[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    out[edges] = 255
    return out.clip(0, 255).astype(np.uint8)


def class_overlay(image: np.ndarray, class_map: np.ndarray, names: dict[int, str], alpha: float = 0.5) -> np.ndarray:
    """Blend a class-index map `(H, W)` (values: the keys of `names`, 0 background) onto `(H, W, 3)` uint8, one
    colour per class, with a legend of the class names in the top-left corner."""
    masks = class_map[None] == np.array(list(names))[:, None, None]
    picture = Image.fromarray(overlay(image, masks, alpha))
    draw = ImageDraw.Draw(picture)
    for row, (colour, name) in enumerate(zip(_palette(len(names)), names.values())):
        top = 4 + 14 * row
        draw.rectangle((4, top, 14, top + 10), fill=tuple(int(c) for c in colour), outline=(255, 255, 255))
        draw.text((18, top - 1), name, fill=(255, 255, 255), stroke_width=1, stroke_fill=(0, 0, 0))
    return np.asarray(picture)


def _resize(array: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    return np.asarray(Image.fromarray(array).resize(size, resample))


def comparison_panel(
    image: np.ndarray,
    tiles: dict[str, np.ndarray],
    title: str = "",
    *,
    boxes: np.ndarray | None = None,
    points: np.ndarray | None = None,
    point_labels: np.ndarray | None = None,
    dice: dict[str, float] | None = None,
) -> Image.Image:
    """One row: the image, then each named set of masks `(N, H, W)` over it, each tile labelled.

    Everything is first scaled so the longer side is `TILE_SIZE` pixels. The prompts, in original image pixels, are
    drawn on every tile in their object's colour (object k = mask k of each tile), so a reader sees what each mask
    was asked for: `boxes` `(N, 4)` as `x0, y0, x1, y1`; `points` `(N, P, 2)` as `x, y` with `point_labels` `(N, P)`
    (1 foreground: filled dot, 0 background: hollow dot; default all foreground). `dice` maps tile names to the
    image's Dice, shown in the tile's label (e.g. `{"base": 0.61, "fine-tuned": 0.87}`).
    """
    scale = TILE_SIZE / max(image.shape[:2])
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    small = _resize(image, size, Image.Resampling.BILINEAR)
    columns = [("image" + (f" {title}" if title else ""), small)]
    for name, masks in tiles.items():
        scaled = (
            np.stack([_resize(m.astype(np.uint8), size, Image.Resampling.NEAREST) > 0 for m in masks])
            if len(masks)
            else masks
        )
        label = name + (f"  Dice {dice[name]:.3f}" if dice and dice.get(name) is not None else "")
        columns.append((label, overlay(small, scaled)))
    header = 18
    panel = Image.new("RGB", (size[0] * len(columns), size[1] + header), "black")
    draw = ImageDraw.Draw(panel)
    factors = np.array([size[0] / image.shape[1], size[1] / image.shape[0]])
    for i, (name, picture) in enumerate(columns):
        panel.paste(Image.fromarray(picture), (i * size[0], header))
        draw.text((i * size[0] + 4, 3), name, fill="white")
        _draw_prompts(draw, np.array([i * size[0], header]), factors, boxes, points, point_labels)
    return panel


def _draw_prompts(
    draw: ImageDraw.ImageDraw,
    origin: np.ndarray,
    factors: np.ndarray,
    boxes: np.ndarray | None,
    points: np.ndarray | None,
    point_labels: np.ndarray | None,
) -> None:
    """Draw boxes and clicks (original pixels, scaled by `factors` `(x, y)`) onto the tile whose corner is `origin`."""
    if boxes is not None and len(boxes):
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 2, 2) * factors + origin
        for colour, box in zip(_palette(len(boxes)), boxes):
            draw.rectangle(box.reshape(-1).tolist(), outline=tuple(colour.tolist()), width=2)
    if points is not None and len(points):
        points = np.asarray(points, dtype=np.float64).reshape(len(points), -1, 2) * factors + origin
        labels = (
            np.ones(points.shape[:2]) if point_labels is None else np.asarray(point_labels).reshape(points.shape[:2])
        )
        for colour, object_points, object_labels in zip(_palette(len(points)), points, labels):
            for (x, y), positive in zip(object_points, object_labels):
                rgb = tuple(colour.tolist())
                draw.ellipse(
                    [x - 4, y - 4, x + 4, y + 4],
                    fill=rgb if positive else "black",
                    outline="white" if positive else rgb,
                    width=2,
                )


def save_panels(panels: dict[str, Image.Image], directory: str | os.PathLike) -> None:
    """Write panels as `<name>.png` into `directory`, atomically."""
    with atomic_write_dir(directory) as staging:
        for name, panel in panels.items():
            panel.save(staging / f"{name}.png")


CONFUSION_PICTURE = "confusion_matrix.png"
"""The multi-class confusion matrix's picture, beside a training run's `metrics.json`."""


def plot_confusion(details: dict, path: str | os.PathLike) -> bool:
    """Save a multi-class evaluation's confusion matrix (`EvaluationResult.details`: pixel counts, rows the
    reference, columns the prediction, index 0 background, then `classes`) as a PNG at `path`, each cell coloured and
    labelled by its share of its row (of that reference class). Returns False, writing nothing, without one."""
    if "confusion_matrix" not in details:
        return False
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    confusion = np.asarray(details["confusion_matrix"], dtype=np.float64)
    shares = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    labels = ["background", *details["classes"].values()]
    size = 1.5 + 0.6 * len(labels)
    figure, axis = plt.subplots(figsize=(size + 1, size), dpi=120)
    image = axis.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for (row, column), share in np.ndenumerate(shares):
        axis.text(column, row, f"{share:.0%}", ha="center", va="center", color="white" if share > 0.5 else "black")
    axis.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    axis.set_yticks(range(len(labels)), labels)
    axis.set_xlabel("predicted")
    axis.set_ylabel("reference")
    figure.colorbar(image, ax=axis, label="share of the reference class's pixels")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True
