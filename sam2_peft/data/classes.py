"""Classes of semantic label maps (`--mask-type semantic`): their names, and a check of every mask against them.

A semantic mask's pixel value is a class id: 0 is background, `ignore_index` (255 by default) is left out of loss and
metrics, every other value must be a named class. Names come from `classes.json` beside `masks/` (`{"1": "scratch",
"2": "dent"}`), a COCO file's categories, a `datasets` mask column of `ClassLabel` values (`names[i]` names value
`i`), or `--class-names scratch,dent` (ids 1, 2, ...), or else the ids found in the masks.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .config import DatasetConfig
from .sources import DataError, LabelMap, SampleRecord, _load_hf_dataset, check_data_source, printable

logger = logging.getLogger(__name__)

CLASSES_FILE = "classes.json"
IGNORE_INDEX = 255
"""The ignore value of semantic masks where no flag sets it (`--ignore-index`'s default; `sam2-peft eval`)."""


@dataclass(frozen=True)
class ClassList:
    """The trained classes: `ids[c]` is the mask value of class index `c`, `names[c]` its name."""

    ids: tuple[int, ...]
    names: tuple[str, ...]
    ignore_index: int | None = None
    pixels: tuple[int, ...] | None = None
    """Each class's pixel count over the checked masks (None: not counted)."""
    weights: tuple[float, ...] | None = None
    """Each class's weight in the per-class mask losses and the class-map loss (None: all 1), see
    `with_class_weights`."""

    @property
    def id2label(self) -> dict[str, str]:
        """`{"1": "scratch", ...}`, as transformers names classes (keys are the mask values)."""
        return {str(i): name for i, name in zip(self.ids, self.names)}

    @classmethod
    def from_names(cls, named: dict[int, str], ignore_index: int | None = None) -> ClassList:
        """The classes of {mask value: name}, in increasing value."""
        ids = sorted(named)
        return cls(tuple(ids), tuple(named[i] for i in ids), ignore_index)

    @classmethod
    def from_id2label(cls, id2label: dict[str, str], ignore_index: int | None = None) -> ClassList:
        return cls.from_names({int(key): name for key, name in id2label.items()}, ignore_index)


def named_classes(
    data: str, class_names: str | None, split: str | None = "train", mask_column: str = "mask"
) -> dict[int, str] | None:
    """The names `--class-names`, `DATA/classes.json`, a COCO file's categories or a `datasets` mask column's
    `ClassLabel` give, by id (None: none of them; names come from the masks). `split` and `mask_column` apply to
    `datasets` sources."""
    if class_names is not None:
        names = [name.strip() for name in class_names.split(",")]
        if not all(names) or len(set(names)) != len(names):
            raise DataError(f"--class-names '{class_names}' needs distinct, non-empty names separated by commas.")
        return {i + 1: name for i, name in enumerate(names)}
    kind = check_data_source(data)
    if kind == "coco":
        return coco_categories(Path(data))
    if kind in ("saved datasets", "hub"):
        return class_label_names(data, split, mask_column)
    path = Path(data) / CLASSES_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        named = {int(key): str(value) for key, value in raw.items()}
    except (ValueError, AttributeError, UnicodeDecodeError) as err:
        raise DataError(
            f'\'{printable(path)}\' must be a JSON object of class ids to names, e.g. {{"1": "scratch", "2": '
            f'"dent"}} ({err}).'
        ) from None
    bad = [key for key in named if key <= 0]
    if bad or not named:
        raise DataError(
            f"'{printable(path)}' must name classes with ids 1 and up (0 is background); got {bad or '{}'}."
        )
    return named


def coco_classes(data: str) -> ClassList | None:
    """The classes of a COCO file's instances (its `categories`; each annotation's class its `category_id`), or None
    for other sources and COCO files that list no categories."""
    if check_data_source(data) != "coco":
        return None
    named = coco_categories(Path(data))
    return None if named is None else ClassList.from_names(named)


def objects_by_class(records: list[SampleRecord], config: DatasetConfig) -> list[SampleRecord]:
    """The records for per-object targets of semantic masks (`config.class_ids` without class targets): each class's
    region in an image is one object, and the ignore value's region is none (no prompt, no target)."""
    if config.class_ids is None or config.class_targets or config.ignore_index is None:
        return records

    def objects(record: SampleRecord):
        found = record.objects()
        return found.without(config.ignore_index) if isinstance(found, LabelMap) and found.semantic else found

    return [
        replace(
            record,
            load_objects=lambda r=record: objects(r),
            load_instances=lambda r=record: objects(r).masks(),
        )
        for record in records
    ]


def coco_categories(path: Path) -> dict[int, str] | None:
    """A COCO file's `categories`, by id (None when it lists none)."""
    categories = json.loads(path.read_text(encoding="utf-8")).get("categories") or []
    try:
        named = {int(category["id"]): str(category["name"]) for category in categories}
    except (KeyError, TypeError, ValueError):
        raise DataError(f"'{printable(path)}': each of its categories needs an 'id' and a 'name'.") from None
    if any(key <= 0 for key in named):
        raise DataError(f"'{printable(path)}': category ids must be 1 and up (0 is background); got {sorted(named)}.")
    return named or None


def class_label_names(data: str, split: str | None, mask_column: str) -> dict[int, str] | None:
    """The names of a `datasets` mask column whose values are a `ClassLabel` (also nested in lists, as a 2D label
    map is), by id: `names[i]` names mask value `i`, and `names[0]` is the background's (None: no `ClassLabel`)."""
    from datasets import ClassLabel

    dataset = _load_hf_dataset(data, split)[0]
    feature = dataset.features.get(mask_column)
    while feature is not None and hasattr(feature, "feature"):  # List / Sequence / LargeList of ...
        feature = feature.feature
    if not isinstance(feature, ClassLabel):
        return None
    if len(feature.names) < 2:
        raise DataError(
            f"Dataset '{printable(data)}': the ClassLabel of column '{mask_column}' names {feature.names}; it needs "
            "the background (value 0) and at least one class."
        )
    return {i: name for i, name in enumerate(feature.names) if i > 0}


def check_classes(
    records: list[SampleRecord], named: dict[int, str] | None, ignore_index: int | None, source: str
) -> ClassList:
    """Read every mask once: refuse a value with no name and a name with no pixels, log pixel and image counts per
    class, and return the class list (named classes, or every id found)."""
    pixels: dict[int, int] = {}
    images: dict[int, int] = {}
    for record in records:
        objects = record.objects()
        if not isinstance(objects, LabelMap):
            raise DataError(f"--mask-type semantic needs label-map masks; '{source}' gives built instance masks.")
        for value, area in zip(objects.values.tolist(), objects.areas().tolist()):
            value = int(value)
            if value == ignore_index:
                continue
            if named is not None and value not in named:
                raise DataError(
                    f"Mask '{record.origin}' has pixels of class id {value}, which has no name: add it to "
                    f"{CLASSES_FILE} or --class-names, or pass --ignore-index {value} to leave it out."
                )
            pixels[value] = pixels.get(value, 0) + int(area)
            images[value] = images.get(value, 0) + 1
    names = named if named is not None else {value: str(value) for value in pixels}
    empty = [f"{i} ({name})" for i, name in sorted(names.items()) if i not in pixels]
    if empty:
        raise DataError(
            f"Class {', '.join(empty)} has no pixels in any mask of '{source}': remove it from {CLASSES_FILE} or "
            "--class-names, or add images that show it."
        )
    if not names:
        raise DataError(f"No mask of '{source}' has a class (every pixel is background or --ignore-index).")
    total = sum(pixels.values())
    for i, name in sorted(names.items()):
        logger.info(
            "Class %d '%s': %d pixels (%.1f %% of labelled), in %d of %d images",
            i,
            name,
            pixels[i],
            100 * pixels[i] / total,
            images[i],
            len(records),
        )
    ids = tuple(sorted(names))
    return ClassList(ids, tuple(names[i] for i in ids), ignore_index, pixels=tuple(pixels[i] for i in ids))


def with_class_weights(classes: ClassList, spec: str | None) -> ClassList:
    """`classes` with the loss weights `--class-weights` gives: 'auto', each class's inverse pixel frequency scaled to
    a mean of 1; or one positive number per class, comma-separated, in class order; None leaves every weight 1."""
    if spec is None:
        return classes
    if spec.strip() == "auto":
        inverse = [1 / count for count in classes.pixels]
        weights = [len(inverse) * value / sum(inverse) for value in inverse]
    else:
        try:
            weights = [float(value) for value in spec.split(",")]
        except ValueError:
            weights = []
        if len(weights) != len(classes.ids) or not all(0 < w < float("inf") for w in weights):
            raise DataError(
                f"--class-weights '{spec}' needs 'auto' or {len(classes.ids)} positive numbers, one per class in the "
                f"order {', '.join(classes.names)}."
            )
    logger.info("Class weights: %s", ", ".join(f"{n} {w:.3g}" for n, w in zip(classes.names, weights)))
    return replace(classes, weights=tuple(weights))


def class_masks(objects: LabelMap, ids: tuple[int, ...]) -> np.ndarray:
    """`(C, H, W)` bool: the pixels of each class id (empty where the image does not show it)."""
    return objects.labels[None] == np.asarray(ids, dtype=objects.labels.dtype)[:, None, None]


def ignored_pixels(objects: LabelMap, ignore_index: int | None) -> np.ndarray:
    """`(H, W)` bool: the pixels whose value is `ignore_index` (none when it is None)."""
    if ignore_index is None:
        return np.zeros(objects.shape, dtype=bool)
    return objects.labels == ignore_index
