"""Uploaded images: decoded as `sources.read_image` reads files (EXIF orientation, grey and 16-bit converted), with
the pixel limit checked on the header, before anything is decoded, and named by their content hash."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..data.sources import image_to_rgb
from .errors import ServeError


def content_id(data: bytes) -> str:
    """The image's id: a hash of the uploaded bytes (the same file uploaded twice is one image)."""
    return hashlib.sha256(data).hexdigest()[:32]


def decode_image(data: bytes, max_pixels: int | None) -> np.ndarray:
    """`(H, W, 3)` uint8 RGB from an encoded image (PNG, JPEG, TIFF, ...).

    Raises `ServeError` 413 when the header declares more than `max_pixels` pixels (a decompression bomb is refused
    before it is decoded), 415 when the bytes are not an image PIL can read.
    """
    if not data:
        raise ServeError(400, "empty_image", "The uploaded image is empty (0 bytes).")
    try:
        with Image.open(io.BytesIO(data)) as image:
            pixels = image.width * image.height
            if max_pixels and pixels > max_pixels:
                raise ServeError(
                    413,
                    "image_too_large",
                    f"The image is {image.width}x{image.height} = {pixels} pixels, over this server's limit of "
                    f"{max_pixels} (--max-image-pixels, a guard against decompression bombs). Downscale it first.",
                )
            image.load()
            image = ImageOps.exif_transpose(image)
            return image_to_rgb(image)
    except ServeError:
        raise
    except Image.DecompressionBombError as err:
        raise ServeError(413, "image_too_large", f"The image is a decompression bomb: {err}") from err
    except UnidentifiedImageError as err:
        raise ServeError(
            415, "not_an_image", "The upload is not an image this server can read (PNG, JPEG, TIFF, BMP, WebP ...)."
        ) from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ServeError(
            415, "not_an_image", f"The upload is not an image this server can read (PNG, JPEG, TIFF, ...): {err}"
        ) from err


def decode_base64(text: str) -> bytes:
    """The bytes of a base64 image field (a `data:image/...;base64,` prefix is allowed); 400 if not base64."""
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ServeError(400, "bad_base64", f"'image' must be a base64-encoded image file: {err}.") from err
