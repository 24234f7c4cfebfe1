"""Masks as JSON: COCO RLE (pycocotools), PNG in base64, or polygons (OpenCV's contours, when it is installed)."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from .errors import ServeError

FORMATS = ("rle", "png", "polygon")


def encode_mask(mask: np.ndarray, fmt: str) -> dict:
    """`{"bbox": [x, y, w, h], "area", fmt: ...}` for an `(H, W)` bool mask.

    `rle` is COCO's compressed RLE (`{"size": [h, w], "counts": str}`, column-major, `pycocotools.mask.decode`
    reads it back); `png` a base64 1-bit PNG; `polygon` a list of `[x0, y0, x1, y1, ...]` outer contours.
    """
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    out = {"bbox": [float(v) for v in mask_utils.toBbox(rle)], "area": int(mask_utils.area(rle))}
    if fmt == "rle":
        out["rle"] = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
    elif fmt == "png":
        buffer = io.BytesIO()
        Image.fromarray(mask.astype(bool)).save(buffer, format="PNG")
        out["png"] = base64.b64encode(buffer.getvalue()).decode("ascii")
    elif fmt == "polygon":
        out["polygon"] = polygons(mask)
    else:
        raise ServeError(422, "bad_format", f"'format' must be one of {', '.join(FORMATS)}; got '{fmt}'.")
    return out


def polygon_support() -> str | None:
    """None when polygons can be made, else why not (OpenCV missing)."""
    try:
        import cv2  # noqa: F401
    except ImportError:
        return "format 'polygon' needs OpenCV on the server (pip install opencv-python-headless); use 'rle' or 'png'."
    return None


def polygons(mask: np.ndarray) -> list[list[float]]:
    """Outer contours of a mask as flat `[x0, y0, x1, y1, ...]` lists (OpenCV `findContours`, no approximation)."""
    problem = polygon_support()
    if problem:
        raise ServeError(422, "polygon_unavailable", problem)
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    return [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]
