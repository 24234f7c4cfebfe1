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


def _resize(array: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    return np.asarray(Image.fromarray(array).resize(size, resample))


def comparison_panel(image: np.ndarray, tiles: dict[str, np.ndarray], title: str = "") -> Image.Image:
    """One row: the image, then each named set of masks `(N, H, W)` over it, each tile labelled.

    Everything is first scaled so the longer side is `TILE_SIZE` pixels.
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
        columns.append((name, overlay(small, scaled)))
    header = 18
    panel = Image.new("RGB", (size[0] * len(columns), size[1] + header), "black")
    draw = ImageDraw.Draw(panel)
    for i, (name, picture) in enumerate(columns):
        panel.paste(Image.fromarray(picture), (i * size[0], header))
        draw.text((i * size[0] + 4, 3), name, fill="white")
    return panel


def save_panels(panels: dict[str, Image.Image], directory: str | os.PathLike) -> None:
    """Write panels as `<name>.png` into `directory`, atomically."""
    with atomic_write_dir(directory) as staging:
        for name, panel in panels.items():
            panel.save(staging / f"{name}.png")
