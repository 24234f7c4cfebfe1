"""Data sources: a folder of images and masks, COCO JSON, and Hugging Face `datasets`.

Every source yields `SampleRecord`s: an id, a description for error messages, and two loaders. Nothing is decoded
until a loader is called, so large datasets cost nothing to list.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")


class DataError(ValueError):
    """Bad input data; the message names the file or field."""


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


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as `(H, W, 3)` uint8 RGB (grey and 16-bit images are converted)."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I;16", "I;16B", "I", "F"):
                array = np.asarray(image, dtype=np.float64)
                span = max(float(array.max() - array.min()), 1e-9)
                image = Image.fromarray(((array - array.min()) / span * 255).astype(np.uint8))
            return np.array(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"Cannot read image '{path}': {err}") from err


def label_map_to_instances(labels: np.ndarray, origin: str) -> np.ndarray:
    """Turn a binary or instance-label mask `(H, W)` into `(N, H, W)` bool, one channel per label.

    A mask whose only non-zero value is 1 or 255 is binary (one object); otherwise each distinct non-zero value is
    one object.
    """
    if labels.ndim == 3:
        if not (labels[..., :1] == labels).all():
            raise DataError(f"Mask '{origin}' is a colour image: expected single-channel binary or instance labels.")
        labels = labels[..., 0]
    if labels.ndim != 2:
        raise DataError(f"Mask '{origin}' has shape {labels.shape}: expected (height, width).")
    values = np.unique(labels)
    values = values[values != 0]
    return labels[None] == values[:, None, None]


def read_label_image(path: str | os.PathLike, kind: str = "mask") -> np.ndarray:
    """The raw values of a label image (PNG, TIFF; palette PNGs give their indices); `kind` names it in errors."""
    try:
        with Image.open(path) as image:
            image.load()
            return np.asarray(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"Cannot read {kind} '{path}': {err}") from err


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a binary or instance-label mask file (PNG, TIFF, palette PNG) as `(N, H, W)` bool."""
    return label_map_to_instances(read_label_image(path), str(path))


def folder_records(root: str | os.PathLike) -> list[SampleRecord]:
    """Records from `root/images/*` and `root/masks/*`, matched by file stem."""
    root = Path(root)
    image_dir, mask_dir = root / "images", root / "masks"
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            raise DataError(f"Data folder '{root}' needs 'images/' and 'masks/' subfolders; '{folder}' is missing.")
    images = _files_by_stem(image_dir, IMAGE_SUFFIXES)
    masks = _files_by_stem(mask_dir, MASK_SUFFIXES)
    missing = sorted(set(images) - set(masks))
    if missing:
        raise DataError(
            f"{len(missing)} image(s) in '{image_dir}' have no mask in '{mask_dir}' with the same stem, "
            f"e.g. '{images[missing[0]].name}'."
        )
    return [
        SampleRecord(
            sample_id=stem,
            origin=str(images[stem]),
            load_image=lambda p=images[stem]: read_image(p),
            load_instances=lambda p=masks[stem]: read_mask(p),
        )
        for stem in sorted(images)
    ]


def _files_by_stem(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in suffixes or path.name.startswith("."):
            continue
        if path.stem in files:
            raise DataError(
                f"Two files in '{folder}' share the stem '{path.stem}': {files[path.stem].name}, {path.name}."
            )
        files[path.stem] = path
    return files


def coco_records(annotation_file: str | os.PathLike, image_root: str | os.PathLike | None = None) -> list[SampleRecord]:
    """Records from a COCO instances JSON (polygons and RLE); crowd annotations are left out.

    Images are looked up under `image_root` (default: the JSON's folder, then its `images/` subfolder).
    """
    from pycocotools.coco import COCO

    annotation_file = Path(annotation_file)
    try:
        with open(annotation_file) as handle:
            dataset = json.load(handle)
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"Cannot read COCO annotations '{annotation_file}': {err}") from err
    for field in ("images", "annotations"):
        if field not in dataset:
            raise DataError(f"COCO file '{annotation_file}' has no '{field}' field.")
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
        anns = [a for a in coco.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        if not anns:
            return np.zeros((0, info["height"], info["width"]), dtype=bool)
        try:
            masks = [coco.annToMask(a) for a in anns]
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise DataError(f"Bad segmentation in '{annotation_file}' for image id {image_id}: {err}") from err
        return np.stack(masks).astype(bool)

    records = []
    for image_id, info in sorted(coco.imgs.items()):
        path = resolve(info["file_name"])
        records.append(
            SampleRecord(
                sample_id=str(Path(info["file_name"]).with_suffix("")),
                origin=str(path),
                load_image=lambda p=path: read_image(p),
                load_instances=lambda i=image_id: instances(i),
            )
        )
    return records


def hf_dataset_records(
    name_or_path: str, split: str = "train", image_column: str = "image", mask_column: str = "mask"
) -> list[SampleRecord]:
    """Records from a Hugging Face dataset (Hub name or `save_to_disk` folder) with image and mask columns."""
    import datasets

    if os.path.isdir(name_or_path) and Path(name_or_path, "dataset_info.json").exists():
        loaded = datasets.load_from_disk(name_or_path)
    elif os.path.isdir(name_or_path) and Path(name_or_path, "dataset_dict.json").exists():
        loaded = datasets.load_from_disk(name_or_path)[split]
    else:
        loaded = datasets.load_dataset(name_or_path, split=split)
    if isinstance(loaded, datasets.DatasetDict):
        loaded = loaded[split]
    for column in (image_column, mask_column):
        if column not in loaded.column_names:
            raise DataError(
                f"Dataset '{name_or_path}' has no column '{column}' (columns: {loaded.column_names}); "
                "set --image-column / --mask-column."
            )

    def cell(index: int, column: str) -> np.ndarray:
        value = loaded[index][column]
        if isinstance(value, Image.Image):
            return np.asarray(value.convert("RGB") if column == image_column else value)
        return np.asarray(value)

    def image(index: int) -> np.ndarray:
        array = cell(index, image_column)
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=-1)
        return array.astype(np.uint8)

    return [
        SampleRecord(
            sample_id=f"{index:06d}",
            origin=f"{name_or_path}[{split}][{index}]",
            load_image=lambda i=index: image(i),
            load_instances=lambda i=index: label_map_to_instances(cell(i, mask_column), f"{name_or_path}[{i}]"),
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
            load_instances=lambda i=index: label_map_to_instances(scenes[i].instances, f"synthetic scene {i}"),
            known_valid=True,
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


def open_records(
    data: str, *, split: str = "train", image_column: str = "image", mask_column: str = "mask"
) -> list[SampleRecord]:
    """Records from any supported source: a folder, a COCO `.json`, a `datasets` name or folder, or
    `synthetic:N[:SEED[:SIZE]]` (N generated scenes)."""
    synthetic = parse_synthetic_spec(data)
    if synthetic is not None:
        return synthetic_records(*synthetic)
    path = Path(data)
    if path.suffix.lower() == ".json":
        if not path.exists():
            raise DataError(f"COCO annotation file '{data}' does not exist.")
        return coco_records(path)
    if (path / "images").is_dir() or (path / "masks").is_dir():
        return folder_records(path)
    if path.is_dir() and not any((path / f).exists() for f in ("dataset_info.json", "dataset_dict.json")):
        raise DataError(f"'{data}' is neither an images/ + masks/ folder, a COCO .json, nor a saved `datasets` folder.")
    return hf_dataset_records(data, split=split, image_column=image_column, mask_column=mask_column)


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
            raise DataError(f"Validation split names ids not in the data: {sorted(unknown)[:5]}")
        return [r for r in records if r.sample_id not in wanted], [r for r in records if r.sample_id in wanted]
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}.")
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
        raise DataError(f"Cannot read split file '{path}': {err}") from err
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]
