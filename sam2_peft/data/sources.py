"""Data sources: a folder of images and masks, COCO JSON, and Hugging Face `datasets`.

Every source yields `SampleRecord`s: an id, a description for error messages, and two loaders. Nothing is decoded
until a loader is called, so large datasets cost nothing to list. Images are read as an image viewer shows them
(EXIF orientation applied), so masks drawn on the viewed image line up.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import math
import os
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg")
"""JPEG masks are noisy (grey levels near 0 and 255); `--mask-type auto` reads them as binary."""
MASK_TYPES = ("auto", "binary", "instance", "semantic")
VALIDATION_SPLITS = ("validation", "valid", "val", "dev")
"""Split names taken, in this order, as the validation split of a `datasets` source when none is named."""
SKIP_HINT = "or pass --skip-bad-files to skip it"
SAVED_DATASET_FILES = ("dataset_info.json", "dataset_dict.json")
"""Files that `datasets`' `save_to_disk` writes into a folder (a `Dataset` and a `DatasetDict` respectively)."""
DATA_SOURCES = (
    "an images/ + masks/ folder, a COCO .json file, a saved `datasets` folder, a Hub dataset name (org/name), "
    "a folder of volumes (images/ + labels/ NIfTI or TIFF), or synthetic:N[:SEED[:SIZE]]"
)
"""What `--data` and `--val-data` take, for help texts and errors."""

DEFAULT_MAX_IMAGE_PIXELS: int = Image.MAX_IMAGE_PIXELS or 0
"""PIL's decompression-bomb limit (89,478,485 pixels unless changed before this import)."""
_max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS or None
"""Images with more pixels are refused (None: no limit); see `set_max_image_pixels`."""


class DataError(ValueError):
    """Bad input data; the message names the file or field and the fix."""


class BadFileError(DataError):
    """A file (image, mask, annotation) that cannot be used; the message says how to fix it or skip it with
    --skip-bad-files (`SKIP_HINT`)."""


@dataclass
class SampleRecord:
    """One annotated image, not yet decoded.

    `load_image()` returns `(H, W, 3)` uint8 RGB; `load_instances()` returns `(N, H, W)` bool, one channel per object.
    """

    sample_id: str
    origin: str
    load_image: Callable[[], np.ndarray]
    load_instances: Callable[[], np.ndarray]
    known_valid: bool = False
    """Set by sources that guarantee readable, matching, non-empty samples (generated data): not decoded up front."""
    identity: str = ""
    """What the sample is, however its source was spelled (a resolved file path, a dataset row in a split); two
    records with one identity are the same sample. Empty: the origin."""
    load_objects: Callable[[], Objects] | None = None
    """The objects before their masks are built (a label map), so that only the chosen ones are built; None: from
    `load_instances`."""
    image_file: str | None = None
    """The image's file, when it has one: its path, size and modification time fingerprint the pixels."""

    @property
    def key(self) -> str:
        return self.identity or self.origin

    def image_fingerprint(self) -> str | None:
        """What identifies the image without decoding it: its file's path, size and modification time (None: no
        file)."""
        if self.image_file is None:
            return None
        try:
            stat = os.stat(self.image_file)
        except OSError:
            return None  # gone or unreadable: decoding it says so, in the reader's words
        return f"{self.image_file}:{stat.st_size}:{stat.st_mtime_ns}"

    def objects(self) -> Objects:
        """The sample's objects, masks not yet built (`LabelMap`), or built (`MaskStack`) by sources without one."""
        return self.load_objects() if self.load_objects is not None else MaskStack(self.load_instances())


class Objects:
    """A sample's objects, in order, whose `(H, W)` bool masks are built on request: `len`, `shape` `(H, W)`,
    `areas()` `(N,)` pixel counts, `masks(indices)` `(n, H, W)` bool and `boxes()` `(N, 4)` (y0, x0, y1, x1) slices
    bounds, each end exclusive."""

    shape: tuple[int, int]

    def __len__(self) -> int:
        raise NotImplementedError

    def areas(self) -> np.ndarray:
        raise NotImplementedError

    def masks(self, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        raise NotImplementedError

    def classes(self) -> np.ndarray | None:
        """`(N,)` each object's class id where the data names one (a semantic mask's value, a COCO annotation's
        `category_id` when the file lists `categories`); None where it names none."""
        return None

    def crop(self, index: int, margin: int) -> tuple[np.ndarray, tuple[slice, slice]]:
        """Object `index`'s mask inside its bounding box grown by `margin` (clipped to the image), and where that
        crop lies in the image."""
        mask = self.masks([index])[0]
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        if not len(rows):
            return mask[:0, :0], (slice(0, 0), slice(0, 0))
        window = _window(rows[0], rows[-1] + 1, cols[0], cols[-1] + 1, margin, mask.shape)
        return mask[window], window


def _window(y0: int, y1: int, x0: int, x1: int, margin: int, shape: tuple[int, int]) -> tuple[slice, slice]:
    return slice(max(0, y0 - margin), min(shape[0], y1 + margin)), slice(
        max(0, x0 - margin), min(shape[1], x1 + margin)
    )


class MaskStack(Objects):
    """Objects whose masks are already built: `(N, H, W)` bool, with their class ids `(N,)` if the data names them."""

    def __init__(self, masks: np.ndarray, classes: np.ndarray | None = None) -> None:
        self._masks = masks
        self._classes = classes
        self.shape = tuple(masks.shape[1:])

    def classes(self) -> np.ndarray | None:
        return self._classes

    def __len__(self) -> int:
        return len(self._masks)

    def areas(self) -> np.ndarray:
        return self._masks.reshape(len(self._masks), -1).sum(axis=1)

    def masks(self, indices=None) -> np.ndarray:
        return self._masks if indices is None else self._masks[np.asarray(indices, dtype=np.int64)]


class LabelMap(Objects):
    """Objects as the distinct non-zero `values` of an `(H, W)` label map; a mask is built only when asked for. In a
    `semantic` map each value is a class id (the object is that class's region, its class the value)."""

    def __init__(
        self, labels: np.ndarray, values: np.ndarray, areas: np.ndarray | None = None, semantic: bool = False
    ) -> None:
        self.labels = labels
        self.values = values
        self.shape = tuple(labels.shape)
        self._areas = areas
        self.semantic = semantic

    @classmethod
    def from_labels(cls, labels: np.ndarray, semantic: bool = False) -> LabelMap:
        """Every distinct non-zero value of `labels` `(H, W)` is one object (in increasing order)."""
        values, counts = value_counts(labels)
        nonzero = values != 0
        return cls(labels, values[nonzero], counts[nonzero], semantic)

    def classes(self) -> np.ndarray | None:
        return self.values if self.semantic else None

    def without(self, value: int) -> LabelMap:
        """The same map with the object of `value` (e.g. a semantic map's ignore value) left out."""
        keep = self.values != value
        return LabelMap(self.labels, self.values[keep], self.areas()[keep], self.semantic)

    def __len__(self) -> int:
        return len(self.values)

    def areas(self) -> np.ndarray:
        if self._areas is None:
            self._areas = np.array([(self.labels == value).sum() for value in self.values], dtype=np.int64)
        return self._areas

    def masks(self, indices=None) -> np.ndarray:
        values = self.values if indices is None else self.values[np.asarray(indices, dtype=np.int64)]
        return self.labels[None] == values[:, None, None]

    def crop(self, index: int, margin: int) -> tuple[np.ndarray, tuple[slice, slice]]:
        mask = self.labels == self.values[index]
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        window = _window(rows[0], rows[-1] + 1, cols[0], cols[-1] + 1, margin, mask.shape)
        return mask[window], window


def printable(text: str | os.PathLike) -> str:
    """`text` as valid UTF-8: bytes of a file name that are not UTF-8 (Linux allows any) shown as `\\xNN`.

    File names are kept as they are for reading; ids and messages use this form, because cache keys, JSON and logs
    need valid text, and a user cannot always rename files (read-only shared data).
    """
    text = os.fspath(text)
    try:
        return os.fsencode(text).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # surrogates that did not come from a file name
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple:
    """Sort key in which runs of digits compare as numbers: `2.jpg` before `10.jpg` (as text it comes after)."""
    return tuple(int(part) if index % 2 else part for index, part in enumerate(_DIGITS.split(name)))


def set_max_image_pixels(limit: int | None) -> None:
    """Refuse images with more than `limit` pixels (0 or None: no limit), naming `--max-image-pixels`.

    This check replaces PIL's process-wide decompression-bomb guard (`Image.MAX_IMAGE_PIXELS`), which warns above
    its limit and raises, with no hint of the fix, above twice its limit.
    """
    global _max_image_pixels
    if limit is not None and limit < 0:
        raise DataError(f"--max-image-pixels must be a pixel count, or 0 for no limit; got {limit}.")
    _max_image_pixels = limit or None
    Image.MAX_IMAGE_PIXELS = None


def _load(path: str | os.PathLike, kind: str) -> Image.Image:
    """Decode an image file in viewer orientation; unreadable or oversized files raise DataError naming them."""
    shown = printable(path)
    try:
        with Image.open(path) as image:
            pixels = image.width * image.height
            if _max_image_pixels and pixels > _max_image_pixels:
                raise BadFileError(
                    f"{kind.capitalize()} '{shown}' is {image.width}x{image.height} = {pixels} pixels, over the limit "
                    f"of {_max_image_pixels} (a guard against decompression bombs): if the file is trusted, raise "
                    f"--max-image-pixels (0 = no limit), {SKIP_HINT}."
                )
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # no copy when there is nothing to turn
            return image
    except DataError:
        raise
    except Image.DecompressionBombError as err:
        raise BadFileError(
            f"{kind.capitalize()} '{shown}' is over PIL's decompression-bomb limit ({err}): if the file is trusted, "
            f"raise --max-image-pixels (0 = no limit), {SKIP_HINT}."
        ) from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise BadFileError(f"Cannot read {kind} '{shown}': {err}. Replace or re-export the file, {SKIP_HINT}.") from err


def image_to_rgb(image: Image.Image) -> np.ndarray:
    """`(H, W, 3)` uint8 RGB; 16-bit and float images are stretched to their value range first."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        span = max(float(array.max() - array.min()), 1e-9)
        image = Image.fromarray(((array - array.min()) / span * 255).astype(np.uint8))
    return np.array(image.convert("RGB"))


def viewed_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) as a viewer shows the image (EXIF orientation), from the file header, without decoding."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            turned = image.getexif().get(ExifTags.Base.Orientation) in (5, 6, 7, 8)  # a quarter turn
            return (height, width) if turned else (width, height)
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"Cannot read '{printable(path)}': {err}. Replace or re-export the file.") from err


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as `(H, W, 3)` uint8 RGB as a viewer shows it (EXIF orientation; grey, 16-bit converted)."""
    return image_to_rgb(_load(path, "image"))


def read_label_image(path: str | os.PathLike, kind: str = "mask") -> np.ndarray:
    """The raw values of a label image (PNG, TIFF; palette PNGs give their indices) in viewer orientation; `kind`
    names it in errors."""
    return np.asarray(_load(path, kind))


def value_counts(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`np.unique(labels, return_counts=True)`, by counting (`np.bincount`, linear, about 10x faster on a megapixel
    map) where the values are non-negative integers below 2^16 (label maps), else by sorting (`np.unique`)."""
    if labels.dtype in (np.uint8, np.uint16, np.bool_) or (
        np.issubdtype(labels.dtype, np.integer) and labels.size and 0 <= labels.min() and labels.max() < 2**16
    ):
        counts = np.bincount(labels.ravel().astype(np.intp, copy=False))
        values = np.flatnonzero(counts)
        return values.astype(labels.dtype), counts[values]
    return np.unique(labels, return_counts=True)


def _mask_kind(labels: np.ndarray, origin: str) -> str:
    """What `--mask-type auto` makes of a label map: "binary", "noisy binary" or "instance"; DataError if unclear.

    Two levels are binary. A mask whose maximum is the white of its format (255, 65535, or any non-integer maximum
    such as 1.0), with few pixels in the middle of the range and whose other levels are scattered noise (JPEG or
    anti-aliasing: few of their pixels touch one of the same value) is binary. Integer labels whose levels are regions
    and use most values from their smallest to their largest (1, 2, 3, ... or 250 ... 255) are instances. Anything
    else is refused.
    """
    values, counts = value_counts(labels)
    if len(values) <= 2:
        return "binary"
    top = float(values[-1])
    integral = np.issubdtype(labels.dtype, np.integer) or bool(np.all(values == np.round(values)))
    band = top / 8
    high = counts[values >= top - band].sum()
    middle = counts[(values > band) & (values < top - band)].sum()
    white = top in (255, 65535) or not integral
    regions = _level_coherence(labels) >= 0.5
    if white and high > 0 and middle <= 0.25 * high and not regions:
        return "noisy binary"
    nonzero = values[values != 0]
    if integral and regions and len(nonzero) >= 0.5 * (top - nonzero[0] + 1):
        return "instance"
    shown = ", ".join(f"{v:g}" for v in values[:8]) + (", ..." if len(values) > 8 else "")
    raise DataError(
        f"Mask '{origin}' has {len(values)} grey levels ({shown}) that look neither binary (values near 0 and the "
        "maximum) nor instance labels (1, 2, 3, ...): say which with --mask-type binary (threshold at half the "
        "maximum) or --mask-type instance (each non-zero value is one object)."
    )


def _level_coherence(labels: np.ndarray) -> float:
    """The share of pixels neither 0 nor the maximum that touch (4-neighbours) a pixel of the same value: near 1 when
    each level is a region (labels), about 0.2 or less for JPEG and anti-aliasing noise."""
    inner = (labels != 0) & (labels != labels.max())
    if not inner.any():
        return 1.0
    same = np.zeros(labels.shape, bool)
    same[1:] |= labels[1:] == labels[:-1]
    same[:-1] |= labels[:-1] == labels[1:]
    same[:, 1:] |= labels[:, 1:] == labels[:, :-1]
    same[:, :-1] |= labels[:, :-1] == labels[:, 1:]
    return float((same & inner).sum() / inner.sum())


def label_map_to_instances(
    labels: np.ndarray,
    origin: str,
    mask_type: str = "auto",
    on_noisy_binary: Callable[[str], None] | None = None,
) -> np.ndarray:
    """Turn a binary or instance-label mask `(H, W)` into `(N, H, W)` bool, one channel per object.

    `mask_type` "binary" thresholds at half the mask's maximum (one object); "instance" makes each distinct non-zero
    value one object; "auto" decides per mask (see `_mask_kind`) and calls `on_noisy_binary(origin)` when it reads
    a mask of more than two levels as binary.
    """
    return label_map_objects(labels, origin, mask_type, on_noisy_binary).masks()


def label_map_objects(
    labels: np.ndarray,
    origin: str,
    mask_type: str = "auto",
    on_noisy_binary: Callable[[str], None] | None = None,
) -> LabelMap:
    """The objects of a binary or instance-label mask `(H, W)` (see `label_map_to_instances`), masks not yet built."""
    if mask_type not in MASK_TYPES:
        raise DataError(f"--mask-type must be one of {', '.join(MASK_TYPES)}; got '{mask_type}'.")
    if labels.ndim == 3:
        if not (labels[..., :1] == labels).all():
            raise DataError(
                f"Mask '{origin}' is a colour image: save it as single-channel binary or instance labels (grey or "
                "palette PNG)."
            )
        labels = labels[..., 0]
    if labels.ndim != 2:
        raise DataError(f"Mask '{origin}' has shape {labels.shape}: save it as a (height, width) label image.")
    kind = _mask_kind(labels, origin) if mask_type == "auto" else mask_type
    if kind == "noisy binary" and on_noisy_binary is not None:
        on_noisy_binary(origin)
    if kind not in ("instance", "semantic"):  # semantic: each value is a class id, read as instances are
        foreground = labels > labels.max() / 2 if labels.size else np.zeros(labels.shape, bool)
        return LabelMap.from_labels(foreground)
    return LabelMap.from_labels(labels, semantic=kind == "semantic")


class MaskReader:
    """Label maps to objects for one dataset, per `mask_type`; says once (not per image) when it reads noisy masks
    as binary."""

    def __init__(self, mask_type: str, dataset: str) -> None:
        if mask_type not in MASK_TYPES:
            raise DataError(f"--mask-type must be one of {', '.join(MASK_TYPES)}; got '{mask_type}'.")
        self.mask_type = mask_type
        self.dataset = dataset
        self._noted = False
        self._lock = threading.Lock()

    def __call__(self, labels: np.ndarray, origin: str) -> np.ndarray:
        return self.objects(labels, origin).masks()

    def objects(self, labels: np.ndarray, origin: str) -> LabelMap:
        """The objects of a label map, masks not yet built."""
        return label_map_objects(labels, origin, self.mask_type, self._note)

    def _note(self, origin: str) -> None:
        with self._lock:
            if self._noted:
                return
            self._noted = True
        logger.info(
            "Masks of '%s' have more than two grey levels but look binary (e.g. '%s': values near 0 and near the "
            "maximum, as from JPEG or anti-aliasing): reading them as binary, thresholded at half the maximum. Pass "
            "--mask-type instance if every value is an object.",
            self.dataset,
            origin,
        )


def read_mask(path: str | os.PathLike, mask_type: str = "auto") -> np.ndarray:
    """Read a binary or instance-label mask file (PNG, TIFF, palette PNG, JPEG) as `(N, H, W)` bool."""
    return label_map_to_instances(read_label_image(path), printable(path), mask_type)


def folder_records(root: str | os.PathLike, mask_type: str = "auto") -> list[SampleRecord]:
    """Records from `root/images/*` and `root/masks/*`, matched by file stem."""
    root = Path(root)
    image_dir, mask_dir = root / "images", root / "masks"
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            raise DataError(
                f"Data folder '{printable(root)}' needs 'images/' and 'masks/' subfolders; create "
                f"'{printable(folder)}' or point --data at the folder that holds both."
            )
    images = _files_by_stem(image_dir, IMAGE_SUFFIXES)
    masks = _match_masks(images, _files_by_stem(mask_dir, MASK_SUFFIXES), mask_dir)
    reader = MaskReader(mask_type, printable(root))
    return [
        SampleRecord(
            sample_id=stem,
            origin=printable(images[stem]),
            load_image=lambda p=images[stem]: read_image(p),
            load_instances=lambda p=masks[stem]: reader(read_label_image(p), printable(p)),
            identity=os.fspath(images[stem].resolve()),
            load_objects=lambda p=masks[stem]: reader.objects(read_label_image(p), printable(p)),
            image_file=os.fspath(images[stem].resolve()),
        )
        for stem in sorted(images)
    ]


MASK_NAME_SUFFIXES = ("_mask", "_masks", "-mask", "-masks", "_label", "_labels", "-label", "_gt", "-gt", "_seg")
"""Endings of a mask's stem after its image's (`001_mask.png` for `001.png`), tried when no mask has the image's
stem."""


def _match_masks(images: dict[str, Path], masks: dict[str, Path], mask_dir: Path) -> dict[str, Path]:
    """Each image stem's mask: the mask of the same stem, else the one whose stem adds one of `MASK_NAME_SUFFIXES`.

    DataError when an image has two masks by suffix, or none (naming the unmatched masks with similar names)."""
    matched, missing = {}, []
    for stem in sorted(images):
        candidates = [stem] if stem in masks else [stem + end for end in MASK_NAME_SUFFIXES if stem + end in masks]
        if len(candidates) > 1:
            names = " and ".join(f"'{printable(masks[c].name)}'" for c in candidates)
            raise DataError(
                f"Image '{printable(images[stem].name)}' has two masks in '{printable(mask_dir)}', {names}: remove "
                "one, or rename its mask to the image's stem."
            )
        if candidates:
            matched[stem] = masks[candidates[0]]
        else:
            missing.append(stem)
    if missing:
        used = set(matched.values())
        unused = [m for m in masks if masks[m] not in used]
        similar = [m for m in unused if m.startswith(missing[0])][:3] or difflib.get_close_matches(missing[0], unused)
        hint = f" (masks with similar names: {', '.join(repr(printable(masks[m].name)) for m in similar)})"
        raise DataError(
            f"{len(missing)} image(s) in '{printable(images[missing[0]].parent)}' have no mask in "
            f"'{printable(mask_dir)}' with the same stem (or the stem and {', '.join(MASK_NAME_SUFFIXES)}), e.g. "
            f"'{printable(images[missing[0]].name)}'{hint if similar else ''}: name each mask after its image, add "
            "the missing masks or move those images out."
        )
    return matched


def _files_by_stem(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """Files by printable stem (the sample id)."""
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in suffixes or path.name.startswith("."):
            continue
        stem = printable(path.stem)
        if stem in files:
            raise DataError(
                f"Two files in '{printable(folder)}' share the stem '{stem}': {printable(files[stem].name)}, "
                f"{printable(path.name)}. Rename or remove one."
            )
        files[stem] = path
    return files


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _compressed_rle_counts(text: str) -> list[int]:
    """The run lengths of a COCO compressed RLE string (pycocotools' `rleFrString`, which trusts its input)."""
    counts: list[int] = []
    position = 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            if position == len(text):
                raise ValueError("it ends inside a number")
            char = ord(text[position]) - 48
            if not 0 <= char < 64:
                raise ValueError(f"it holds the character {text[position]!r}")
            value |= (char & 0x1F) << shift
            more = bool(char & 0x20)
            position += 1
            shift += 5
            if not more and char & 0x10:
                value |= -1 << shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def _check_segmentation(annotation: dict, height: int, width: int, where: str) -> None:
    """Refuse geometry that pycocotools cannot handle safely (NaN coordinates exhaust memory, bad RLE overruns its
    buffer): a DataError naming the annotation and the fix."""
    fix = f"correct or delete that annotation, {SKIP_HINT.replace('it', 'its image')}"
    segmentation = annotation.get("segmentation")
    if isinstance(segmentation, list):
        if not segmentation:
            raise BadFileError(f"{where} has an empty polygon list: {fix}.")
        for k, polygon in enumerate(segmentation):
            if not isinstance(polygon, list) or not all(_is_number(v) for v in polygon):
                raise BadFileError(f"{where}: polygon {k} is not a list of numbers [x0, y0, x1, y1, ...]: {fix}.")
            if not all(math.isfinite(v) for v in polygon):
                raise BadFileError(f"{where}: polygon {k} holds values that are not finite numbers (NaN, inf): {fix}.")
            if len(polygon) % 2:
                raise BadFileError(f"{where}: polygon {k} has {len(polygon)} values, not an even count of x, y: {fix}.")
            if len(polygon) < 6:
                raise BadFileError(
                    f"{where}: polygon {k} has {len(polygon) // 2} point(s); a polygon needs at least 3 points (6 "
                    f"numbers): {fix}."
                )
            xs, ys = polygon[0::2], polygon[1::2]
            if min(xs) < -width or max(xs) > 2 * width or min(ys) < -height or max(ys) > 2 * height:
                raise BadFileError(f"{where}: polygon {k} reaches far outside the {width}x{height} image: {fix}.")
    elif isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v >= 0 for v in size)):
            raise BadFileError(f"{where}: RLE 'size' must be [height, width], got {size!r}: {fix}.")
        if size != [height, width]:
            raise BadFileError(
                f"{where}: RLE 'size' {size} differs from the image's [height, width] {[height, width]}: {fix}."
            )
        if isinstance(counts, str):
            try:
                counts = _compressed_rle_counts(counts)
            except ValueError as err:
                raise BadFileError(f"{where}: RLE 'counts' is not COCO-compressed RLE ({err}): {fix}.") from err
        if not isinstance(counts, list) or not all(isinstance(v, int) and v >= 0 for v in counts):
            raise BadFileError(f"{where}: RLE 'counts' must be run lengths (whole numbers >= 0) or a string: {fix}.")
        if sum(counts) != height * width:
            raise BadFileError(
                f"{where}: RLE 'counts' add up to {sum(counts)} pixels, not {height}x{width} = {height * width}: {fix}."
            )
    else:
        raise DataError(f"{where}: 'segmentation' must be polygons (a list) or RLE (a dict), got {segmentation!r}.")


def coco_records(
    annotation_file: str | os.PathLike, image_root: str | os.PathLike | None = None, semantic: bool = False
) -> list[SampleRecord]:
    """Records from a COCO instances JSON (polygons and RLE); crowd annotations are left out.

    Images are looked up under `image_root` (default: the JSON's folder, then its `images/` subfolder). With
    `semantic`, each record's objects are a class map: an annotation's pixels hold its `category_id` (a later
    annotation over an earlier one), as `--mask-type semantic` reads a folder's masks; without it, each annotation
    is one object, whose class is its `category_id` when the file lists `categories`.
    """
    from pycocotools.coco import COCO

    annotation_file = Path(annotation_file)
    shown = printable(annotation_file)
    try:
        with open(annotation_file) as handle:
            dataset = json.load(handle)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"Cannot read COCO annotations '{shown}': {err}. Fix or re-export the file.") from err
    for field in ("images", "annotations"):
        if field not in dataset:
            raise DataError(f"COCO file '{shown}' has no '{field}' field: is it a COCO instances file?")
    bad_images = [info for info in dataset["images"] if "id" not in info or "file_name" not in info]
    if bad_images:
        raise DataError(f"COCO file '{shown}': image entry {bad_images[0]!r} needs an 'id' and a 'file_name'.")
    coco = COCO()
    coco.dataset = dataset
    coco.createIndex()
    roots = [Path(image_root)] if image_root else [annotation_file.parent, annotation_file.parent / "images"]

    def resolve(file_name: str) -> Path:
        for candidate_root in roots:
            if (candidate_root / file_name).exists():
                return candidate_root / file_name
        return roots[0] / file_name

    def instances(image_id: int) -> np.ndarray:
        info = coco.imgs[image_id]
        height, width = info.get("height"), info.get("width")
        if not (isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0):
            raise BadFileError(
                f"COCO file '{shown}', image id {image_id}: 'height' and 'width' must be positive whole numbers, "
                f"got {height!r} x {width!r}; fix them, {SKIP_HINT.replace('it', 'the image')}."
            )
        anns = [a for a in coco.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        for a in anns:
            _check_segmentation(
                a, height, width, f"COCO file '{shown}', annotation id {a.get('id')} (image id {image_id})"
            )
        if not anns:
            return np.zeros((0, height, width), dtype=bool)
        try:
            masks = [coco.annToMask(a) for a in anns]
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise BadFileError(
                f"Bad segmentation in '{shown}' for image id {image_id}: {err}. Fix its annotations, "
                f"{SKIP_HINT.replace('it', 'the image')}."
            ) from err
        return np.stack(masks).astype(bool)

    def categories(image_id: int) -> list[int]:
        """The `category_id` of each non-crowd annotation of the image, in the order `instances` gives them."""
        return [a["category_id"] for a in coco.imgToAnns[image_id] if not a.get("iscrowd", 0)]

    def class_map(image_id: int) -> LabelMap:
        masks = instances(image_id)
        labels = np.zeros(masks.shape[1:], dtype=np.int64)
        for mask, category in zip(masks, categories(image_id)):
            labels[mask] = category
        return LabelMap.from_labels(labels, semantic=True)

    def classified(image_id: int) -> MaskStack:
        return MaskStack(instances(image_id), np.asarray(categories(image_id), dtype=np.int64))

    # a file that lists categories gives each instance its class
    objects = class_map if semantic else classified if dataset.get("categories") else None

    records = []
    for image_id, info in sorted(coco.imgs.items()):
        path = resolve(info["file_name"])
        records.append(
            SampleRecord(
                sample_id=printable(str(Path(info["file_name"]).with_suffix(""))),
                origin=printable(path),
                load_image=lambda p=path: read_image(p),
                load_instances=lambda i=image_id: instances(i),
                identity=os.fspath(path.resolve()),
                image_file=os.fspath(path.resolve()),
                load_objects=None if objects is None else lambda i=image_id: objects(i),
            )
        )
    return records


def _choose_split(available: list[str], wanted: str | None, name: str) -> str:
    """`wanted` if the dataset has it; with `wanted` None, its validation split (see VALIDATION_SPLITS) or its only one."""
    if wanted is None:
        for candidate in VALIDATION_SPLITS:
            if candidate in available:
                return candidate
        if len(available) == 1:
            return available[0]
        raise DataError(
            f"Dataset '{name}' has the splits {available} and none is named {' or '.join(VALIDATION_SPLITS)}: name "
            "the split to validate on with --val-split."
        )
    if wanted not in available:
        raise DataError(f"Dataset '{name}' has no split '{wanted}' (splits: {available}): choose one with --split.")
    return wanted


def _load_hf_dataset(name_or_path: str, split: str | None):
    """(dataset, split name, folder relative paths start from or None) for a saved folder or a Hub dataset."""
    import datasets

    if os.path.isdir(name_or_path) and any(Path(name_or_path, f).exists() for f in SAVED_DATASET_FILES):
        loaded = datasets.load_from_disk(name_or_path)
        if isinstance(loaded, datasets.DatasetDict):
            split = _choose_split(list(loaded), split, name_or_path)
            return loaded[split], split, Path(name_or_path)
        return loaded, "train", Path(name_or_path)  # one saved Dataset: its rows, whatever split was asked for
    if split is None:
        split = _choose_split(datasets.get_dataset_split_names(name_or_path), None, name_or_path)
    try:
        return datasets.load_dataset(name_or_path, split=split), split, None
    except ValueError as err:
        if "split" not in str(err).lower():
            raise
        _choose_split(datasets.get_dataset_split_names(name_or_path), split, name_or_path)  # names the splits
        raise


def cell_array(value: object, is_image: bool, base: Path | None) -> np.ndarray:
    """A `datasets` cell as an array: an image (decoded), an array, or a path to an image file (relative ones from
    `base`, else the working directory); image cells become RGB."""
    if isinstance(value, str):
        path = Path(value)
        if not path.is_absolute() and base is not None:
            path = base / path
        return read_image(path) if is_image else read_label_image(path)
    if isinstance(value, Image.Image):
        return image_to_rgb(value) if is_image else np.asarray(value)
    return np.asarray(value)


def image_array(array: np.ndarray, origin: str) -> np.ndarray:
    """`(H, W, 3)` uint8 from an image cell (grey repeated): floats in [0, 1] are scaled to 0..255, other values
    must lie in 0..255; DataError naming `origin` otherwise."""
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.dtype in (np.uint8, np.bool_) or not array.size:
        return array.astype(np.uint8) * (255 if array.dtype == np.bool_ else 1)
    low, high = float(array.min()), float(array.max())
    if not (np.isfinite(low) and np.isfinite(high) and 0 <= low and high <= 255):
        raise DataError(
            f"Image '{origin}' holds values {low:g}..{high:g}: image arrays must be floats in [0, 1] or 0..255 "
            "(uint8); rescale the column."
        )
    if np.issubdtype(array.dtype, np.floating):
        array = np.round(array * 255 if high <= 1 else array)  # floats up to 1 are in [0, 1]: 1.0 is white
    return array.astype(np.uint8)


def hf_dataset_records(
    name_or_path: str,
    split: str | None = "train",
    image_column: str = "image",
    mask_column: str = "mask",
    mask_type: str = "auto",
) -> list[SampleRecord]:
    """Records from a Hugging Face dataset (Hub name or `save_to_disk` folder) with image and mask columns.

    Columns hold images, arrays, or paths to image files (relative ones from the saved folder, else the working
    directory). `split` None takes the dataset's validation split. Sample ids are `SPLIT-ROW`, so one row of one split
    has one id and rows of different splits never share one.
    """
    loaded, split, base = _load_hf_dataset(name_or_path, split)
    for column in (image_column, mask_column):
        if column not in loaded.column_names:
            raise DataError(
                f"Dataset '{name_or_path}' has no column '{column}' (columns: {loaded.column_names}); "
                "set --image-column / --mask-column."
            )
    reader = MaskReader(mask_type, f"{name_or_path}[{split}]")
    where = str(Path(name_or_path).resolve()) if base is not None else name_or_path

    def cell(index: int, column: str) -> np.ndarray:
        return cell_array(loaded[index][column], column == image_column, base)

    def image(index: int) -> np.ndarray:
        return image_array(cell(index, image_column), f"{name_or_path}[{split}][{index}]")

    return [
        SampleRecord(
            sample_id=f"{split}-{index:06d}",
            origin=f"{name_or_path}[{split}][{index}]",
            load_image=lambda i=index: image(i),
            load_instances=lambda i=index: reader(cell(i, mask_column), f"{name_or_path}[{split}][{i}]"),
            identity=f"datasets:{where}[{split}][{index}]",
            load_objects=lambda i=index: reader.objects(cell(i, mask_column), f"{name_or_path}[{split}][{i}]"),
        )
        for index in range(len(loaded))
    ]


def synthetic_records(num_scenes: int, seed: int = 0, image_size: int = 256) -> list[SampleRecord]:
    """Records of procedurally generated scenes (`sam2_peft.data.synthetic`), generated when loaded."""
    from .synthetic import SyntheticSceneConfig, SyntheticSceneDataset

    scenes = SyntheticSceneDataset(num_scenes, seed, SyntheticSceneConfig(image_size=image_size))
    return [
        SampleRecord(
            sample_id=f"scene_{index:06d}",
            origin=f"synthetic:{num_scenes}:{seed} scene {index}",
            load_image=lambda i=index: scenes[i].image,
            load_instances=lambda i=index: label_map_to_instances(
                scenes[i].instances, f"synthetic scene {i}", "instance"
            ),
            known_valid=True,
            identity=f"synthetic:{seed}:{image_size}:{index}",
            load_objects=lambda i=index: label_map_objects(scenes[i].instances, f"synthetic scene {i}", "instance"),
        )
        for index in range(num_scenes)
    ]


def parse_synthetic_spec(data: str) -> tuple[int, int, int] | None:
    """`synthetic:N[:SEED[:SIZE]]` -> (N, SEED, SIZE); None for any other source."""
    if not data.startswith("synthetic:"):
        return None
    parts = data.split(":")[1:]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if not 1 <= len(values) <= 3 or values[0] < 1:
        raise DataError(f"Synthetic data is written 'synthetic:N[:SEED[:SIZE]]' with whole numbers, got '{data}'.")
    seed = values[1] if len(values) > 1 else 0
    size = values[2] if len(values) > 2 else 256
    return values[0], seed, size


def _is_hub_name(data: str) -> bool:
    """Whether `data` reads as a Hub dataset id `org/name` rather than a path (whose first folder would exist)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if data.count("/") != 1 or Path(data.split("/")[0]).is_dir():
        return False
    try:
        validate_repo_id(data)
    except HFValidationError:
        return False
    return True


def check_data_source(data: str, flag: str = "--data") -> str:
    """The kind of source `data` names ("synthetic", "coco", "folder", "saved datasets" or "hub"), or a DataError
    naming `flag`, the path and what the flag takes.

    Cheap (looks only at names and folders; reads no file, never asks the Hub), so that a typo in a path is reported
    before a model is loaded. An `org/name` that is not a path is taken as a Hub name and left to `datasets`.
    """
    takes = f"{flag} takes {DATA_SOURCES}"
    if parse_synthetic_spec(data) is not None:
        return "synthetic"
    path, shown = Path(data), printable(data)
    if path.suffix.lower() == ".json" and path.is_file():
        return "coco"
    if path.is_dir():
        from .volumes import volume_folders

        if volume_folders(path) is not None:
            return "volumes"
        if (path / "images").is_dir() or (path / "masks").is_dir():
            return "folder"
        if any((path / name).exists() for name in SAVED_DATASET_FILES):
            return "saved datasets"
        if path.name in ("images", "masks"):
            raise DataError(
                f"{flag} '{shown}' is the {path.name}/ folder of a dataset: point {flag} at its parent "
                f"'{printable(path.absolute().parent)}', the folder that holds images/ and masks/."
            )
        raise DataError(
            f"{flag} '{shown}' is a folder but not a data source (no images/ and masks/ subfolders, no saved "
            f"`datasets` files): {takes}."
        )
    if path.exists():
        raise DataError(f"{flag} '{shown}' is a file but not a data source: {takes}.")
    if _is_hub_name(data):
        return "hub"
    raise DataError(f"{flag} '{shown}' does not exist: {takes}.")


def open_records(
    data: str,
    *,
    split: str | None = "train",
    image_column: str = "image",
    mask_column: str = "mask",
    mask_type: str = "auto",
    flag: str = "--data",
) -> list[SampleRecord]:
    """Records from any supported source: a folder, a COCO `.json`, a `datasets` name or folder, a volume folder (its
    labelled slices as 2D images), or
    `synthetic:N[:SEED[:SIZE]]` (N generated scenes). `split` (None: the validation split) and the columns apply to
    `datasets` sources, `mask_type` to folder and `datasets` masks and, as `semantic` only, to COCO files (whose
    categories are then the classes; otherwise COCO and synthetic data are instances). `flag`
    names the option that gave `data` in errors (see `check_data_source`)."""
    kind = check_data_source(data, flag)
    if kind == "synthetic":
        return synthetic_records(*parse_synthetic_spec(data))
    if kind == "coco":
        return coco_records(data, semantic=mask_type == "semantic")
    if kind == "folder":
        return folder_records(data, mask_type)
    if kind == "volumes":
        from .volumes import volume_slice_records

        return volume_slice_records(data)
    return hf_dataset_records(
        data, split=split, image_column=image_column, mask_column=mask_column, mask_type=mask_type
    )


def split_records(
    records: list[SampleRecord],
    val_fraction: float = 0.1,
    seed: int = 0,
    val_ids: list[str] | None = None,
) -> tuple[list[SampleRecord], list[SampleRecord]]:
    """Deterministic train/validation split.

    With `val_ids`, those ids are validation. Otherwise each id is hashed with the seed, so the split does not
    depend on file order and adding images does not move existing ones between splits.
    """
    if val_ids is not None:
        wanted = set(val_ids)
        unknown = wanted - {r.sample_id for r in records}
        if unknown:
            raise DataError(
                f"The validation id list names {len(unknown)} id(s) not in the data, e.g. {sorted(unknown)[:5]}: "
                "list sample ids as the data names them (file stems; SPLIT-ROW for datasets rows)."
            )
        return [r for r in records if r.sample_id not in wanted], [r for r in records if r.sample_id in wanted]
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}.")
    ranked = sorted(records, key=lambda r: hashlib.sha256(f"{seed}:{r.sample_id}".encode()).hexdigest())
    num_val = int(round(len(records) * val_fraction))
    if val_fraction > 0 and len(records) > 1:
        num_val = max(num_val, 1)
    val = {r.sample_id for r in ranked[:num_val]}
    return [r for r in records if r.sample_id not in val], [r for r in records if r.sample_id in val]


def read_split_file(path: str | os.PathLike) -> list[str]:
    """Ids listed one per line (blank lines and `#` comments ignored)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise DataError(f"Cannot read split file '{path}': {err}. Check the path given to --val-split-file.") from err
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def check_disjoint(train: list[SampleRecord], val: list[SampleRecord]) -> None:
    """Refuse validation samples that are also training samples (same file, or same dataset row of the same split):
    scores on them say nothing about new images."""
    train_keys = {record.key for record in train}
    shared = [record for record in val if record.key in train_keys]
    if shared:
        raise DataError(
            f"{len(shared)} validation sample(s) are also training samples (e.g. id '{shared[0].sample_id}', "
            f"{shared[0].origin}): validate on other images: another split with --val-split, another source with "
            "--val-data, or no --val-data to split --data."
        )
