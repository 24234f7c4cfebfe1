"""Up-front validation of a dataset, so that a run never dies on sample 3,000 for something checkable at load time."""

from __future__ import annotations

import logging
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from .config import ValidationConfig
from .sources import BadFileError, DataError, Objects, SampleRecord

logger = logging.getLogger(__name__)


class MaskSizeError(BadFileError):
    """A mask whose size is not its image's."""


@dataclass
class ValidationReport:
    """What validation kept and dropped, with one example file per reason."""

    kept: int = 0
    checked: int = 0
    """Samples decoded and judged (fewer than the records given when a limit was reached first)."""
    skipped: Counter = field(default_factory=Counter)
    dropped_objects: int = 0
    examples: dict[str, str] = field(default_factory=dict)

    def add_skip(self, reason: str, origin: str) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, origin)

    def summary(self) -> str:
        parts = [f"{self.kept} samples kept"]
        parts += [f"{n} skipped ({reason}, e.g. {self.examples[reason]})" for reason, n in self.skipped.items()]
        if self.dropped_objects:
            parts.append(f"{self.dropped_objects} objects dropped below the minimum area")
        return "; ".join(parts)

    def skips(self) -> str:
        """The skipped samples in one phrase: their count, then each reason with its count and an example."""
        total = sum(self.skipped.values())
        if not total:
            return "none skipped"
        reasons = ", ".join(f"{reason} ({n}, e.g. {self.examples[reason]})" for reason, n in self.skipped.items())
        return f"{total} skipped: {reasons}"


def clean_instances(instances: np.ndarray, config: ValidationConfig) -> np.ndarray:
    """Apply the optional closing and drop objects below the minimum area. `(N, H, W)` bool -> `(M, H, W)` bool."""
    if config.closing_radius > 0 and len(instances):
        structure = _disk(config.closing_radius)
        instances = np.stack([ndimage.binary_closing(m, structure=structure) for m in instances])
    areas = instances.reshape(len(instances), -1).sum(axis=1)
    return instances[areas >= max(config.min_object_area, 1)]


def kept_objects(objects: Objects, config: ValidationConfig) -> np.ndarray:
    """Indices of the objects `clean_instances` keeps (area after the optional closing at least the minimum), found
    without building their full-size masks: areas from the label map, or closings of each object's crop."""
    if config.closing_radius > 0 and len(objects):
        areas = np.array([_closed_crop(objects, i, config.closing_radius)[0].sum() for i in range(len(objects))])
    else:
        areas = np.asarray(objects.areas())
    return np.flatnonzero(areas >= max(config.min_object_area, 1))


def build_masks(objects: Objects, indices: np.ndarray, config: ValidationConfig) -> np.ndarray:
    """The cleaned masks `(n, H, W)` bool of the objects `indices` only (as `clean_instances` would give them)."""
    if config.closing_radius <= 0:
        return objects.masks(indices)
    masks = np.zeros((len(indices), *objects.shape), dtype=bool)
    for row, index in enumerate(indices):
        closed, window = _closed_crop(objects, int(index), config.closing_radius)
        masks[row][window] = closed
    return masks


def _closed_crop(objects: Objects, index: int, radius: int) -> tuple[np.ndarray, tuple[slice, slice]]:
    """The closing of one object within its box grown by `radius + 1`: equal to the full-image closing there (the
    dilation cannot leave that box, so the erosion sees zeros beyond it either way) and zero outside it."""
    crop, window = objects.crop(index, radius + 1)
    return ndimage.binary_closing(crop, structure=_disk(radius)), window


def _disk(radius: int) -> np.ndarray:
    y, x = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    return x * x + y * y <= radius * radius


def _check(record: SampleRecord, config: ValidationConfig) -> tuple[str | None, int]:
    """Return (skip reason or None, number of objects dropped). Raises DataError for bad files unless skipping."""
    reason, dropped, _, _ = check_sample(record, config)
    return reason, dropped


def check_sample(
    record: SampleRecord, config: ValidationConfig
) -> tuple[str | None, int, np.ndarray | None, Objects | None]:
    """Decode and judge one sample: (skip reason or None, objects dropped, image, objects), image and objects None
    when the files could not be used. Raises DataError for bad files unless `skip_bad_files`. Only this sample's
    image and label map are held, so checking a stream costs one sample's memory."""
    try:
        image = record.load_image()
        objects = record.objects()  # masks not built: the check holds one label map at a time per thread
        if objects.shape != image.shape[:2]:
            raise MaskSizeError(
                f"Mask for '{record.origin}' is {objects.shape[1]}x{objects.shape[0]} (width x height) "
                f"but the image is {image.shape[1]}x{image.shape[0]} (as a viewer shows it, EXIF orientation "
                "applied): save the mask at the image's size, or pass --skip-bad-files to skip it."
            )
    except DataError as err:
        if not config.skip_bad_files:
            raise
        logger.warning("Skipping %s", err)
        reason = "mask size differs from image" if isinstance(err, MaskSizeError) else "unreadable file"
        return reason, 0, None, None
    if len(objects) == 0:
        return "mask has no object", 0, image, objects
    kept = kept_objects(objects, config)
    if len(kept) == 0:
        return f"every object below {config.min_object_area} px", len(objects), image, objects
    return None, len(objects) - len(kept), image, objects


def validate_records(
    records: list[SampleRecord],
    config: ValidationConfig | None = None,
    *,
    limit: int | None = None,
    description: str = "Checking images",
) -> tuple[list[SampleRecord], ValidationReport]:
    """Decode samples once and keep the usable ones, in order, showing a progress bar (decoding is slow).

    Unreadable files and masks of the wrong size raise `DataError` naming the file (or are skipped and counted with
    `skip_bad_files`); masks with no object, or none above the minimum area, are skipped and counted. With `limit`,
    samples are checked in order only until `limit` usable ones are found: the same ones whatever the thread count,
    and files after them are not checked (at most `num_threads - 1` are read ahead, their errors ignored).
    """
    config = config or ValidationConfig()
    report = ValidationReport()
    wanted = len(records) if limit is None else min(limit, len(records))
    kept: list[SampleRecord] = []
    upcoming = iter(records)
    pending: deque[tuple[SampleRecord, Future | None]] = deque()
    with (
        ThreadPoolExecutor(max_workers=config.num_threads) as pool,
        tqdm(total=wanted, desc=description, unit="image", leave=False) as progress,
    ):

        def submit_next() -> None:
            record = next(upcoming, None)
            if record is not None:  # generated samples need no check (nor a thread)
                pending.append((record, None if record.known_valid else pool.submit(_check, record, config)))

        for _ in range(config.num_threads):
            submit_next()
        try:
            while pending and len(kept) < wanted:
                record, check = pending.popleft()
                reason, dropped = (None, 0) if check is None else check.result()
                report.checked += 1
                report.dropped_objects += dropped
                if reason is None:
                    kept.append(record)
                else:
                    report.add_skip(reason, record.origin)
                if reason is None or limit is None:  # with a limit the bar counts usable images, else checked ones
                    progress.update()
                if len(kept) < wanted:
                    submit_next()
        finally:
            for _, check in pending:  # checks after the last one needed (or after an error) are not waited for
                if check is not None:
                    check.cancel()
    report.kept = len(kept)
    logger.info("Data validation: %s", report.summary())
    if not kept and records:
        raise DataError(
            f"No usable sample among {len(records)}: {report.summary()}. Fix the files named, or lower "
            "--min-object-area if the objects are small."
        )
    return kept, report
