"""3D volumes (CT, MR as NIfTI; confocal and EM stacks as multi-page TIFF) read as sequences of 2D slices.

Layout: `ROOT/images/NAME.nii.gz` with its label volume `ROOT/labels/NAME.nii.gz` (same file name; the Medical
Segmentation Decathlon's `imagesTr/` + `labelsTr/` too), or `.nii`, `.tif`, `.tiff`. A label volume has the image's
shape; each label id is one object (0 is background). Slices are taken along one axis (`slice_axis`, default: the
axis with the coarsest voxel spacing, ties broken by the fewest voxels, i.e. the through-plane axis of a scan), shown to
SAM 2 as grey RGB after CT windowing (`window`) or percentile normalisation. A `VolumeSequence` has the interface of
`VideoSequence` (slices as frames), so the video clip dataset, task and evaluation run on volumes unchanged.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .sources import DataError, LabelMap, SampleRecord, natural_key, printable

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".tif", ".tiff")
VOLUME_FOLDERS = (("images", "labels"), ("imagesTr", "labelsTr"))
"""Image and label subfolders of a volume folder: ours, and the Decathlon's."""

WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "soft-tissue": (40.0, 400.0),
    "abdomen": (50.0, 350.0),
    "liver": (60.0, 160.0),
    "mediastinum": (50.0, 350.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "stroke": (32.0, 8.0),
}
"""CT windows in Hounsfield units, `name: (level, width)`: the intensities level +- width/2 span black to white."""

PERCENTILES = (0.5, 99.5)
"""Without a window, intensities between these percentiles of the volume span black to white."""


def volume_suffix(path: str | os.PathLike) -> str | None:
    """The volume suffix of `path` (`.nii.gz`, `.nii`, `.tif`, `.tiff`), or None."""
    name = Path(path).name.lower()
    return next((s for s in VOLUME_SUFFIXES if name.endswith(s)), None)


def volume_stem(path: str | os.PathLike) -> str:
    """The file name without its volume suffix (`case_01.nii.gz` -> `case_01`)."""
    name = Path(path).name
    return name[: len(name) - len(volume_suffix(name) or "")]


def parse_window(value: str | None) -> tuple[float, float] | None:
    """`--window`: a preset name (`WINDOW_PRESETS`) or `LEVEL,WIDTH` in HU -> (level, width); None for none."""
    if value is None:
        return None
    if value in WINDOW_PRESETS:
        return WINDOW_PRESETS[value]
    try:
        level, width = (float(v) for v in value.split(","))
    except ValueError:
        level = width = None
    if width is None or not width > 0:
        raise DataError(
            f"--window '{value}' is neither a preset ({', '.join(WINDOW_PRESETS)}) nor LEVEL,WIDTH in HU with a "
            "positive width (e.g. 40,400)."
        )
    return level, width


def to_grey(volume: np.ndarray, window: tuple[float, float] | None = None) -> np.ndarray:
    """Intensities -> uint8: the CT window `(level, width)`, or the volume's `PERCENTILES` without one."""
    data = np.asarray(volume, np.float32)
    if window is not None:
        low, high = window[0] - window[1] / 2, window[0] + window[1] / 2
    else:
        low, high = (float(v) for v in np.percentile(data, PERCENTILES))
    scaled = (data - low) / max(high - low, 1e-6)
    return np.round(np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)


@dataclass
class VolumeFile:
    """A volume on disk: its array in file order and what is needed to write a label volume aligned with it.

    Attributes:
        spacing: voxel size along each array axis (mm for NIfTI; the file's unit for TIFF, 1.0 where unrecorded).
        header: NIfTI: `{"affine", "header"}`; TIFF: `{"resolution", "resolutionunit", "imagej"}`.
    """

    path: Path
    data: np.ndarray
    spacing: tuple[float, float, float]
    header: dict = field(default_factory=dict)


def read_volume(path: str | os.PathLike, kind: str = "image") -> VolumeFile:
    """Read a 3D NIfTI or multi-page TIFF (a trailing axis of size 1 is dropped); `DataError` naming the file when it
    cannot be read or is not 3D."""
    path = Path(path)
    suffix = volume_suffix(path)
    if suffix is None:
        raise DataError(f"{kind.capitalize()} '{printable(path)}' is not a volume ({', '.join(VOLUME_SUFFIXES)}).")
    if not path.is_file():
        raise DataError(f"{kind.capitalize()} volume '{printable(path)}' does not exist.")
    try:
        volume = _read_nifti(path) if suffix.startswith(".nii") else _read_tiff(path)
    except DataError:
        raise
    except Exception as err:  # nibabel and tifffile raise many kinds of errors on a damaged file
        raise DataError(
            f"Cannot read {kind} volume '{printable(path)}' ({type(err).__name__}: {err}): re-export it."
        ) from err
    data = volume.data
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(
            f"{kind.capitalize()} volume '{printable(path)}' has shape {volume.data.shape}: a 3D volume (one channel) "
            "is needed; save one channel or modality per file."
        )
    volume.data = data
    return volume


def volume_library(name: str):
    """Import `name` (nibabel, tifffile, monai), or raise `DataError` naming the extra that installs it."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise DataError(f'Volumes need {name} (the volumes extra): pip install "sam2-peft[volumes]"') from err


def _read_nifti(path: Path) -> VolumeFile:
    nibabel = volume_library("nibabel")

    image = nibabel.load(str(path))
    data = np.asanyarray(image.dataobj)
    spacing = tuple(float(z) for z in image.header.get_zooms()[:3])
    return VolumeFile(path, data, spacing, {"affine": image.affine, "header": image.header})


def _read_tiff(path: Path) -> VolumeFile:
    tifffile = volume_library("tifffile")

    with tifffile.TiffFile(path) as tiff:
        data = tiff.asarray()
        page = tiff.pages.first
        imagej = dict(tiff.imagej_metadata or {})
        tags = {tag.name: tag.value for tag in page.tags}
    x_res, y_res = tags.get("XResolution"), tags.get("YResolution")
    resolution = tuple(_per_unit(r) for r in (x_res, y_res)) if x_res and y_res else None
    unit = tags.get("ResolutionUnit")
    spacing_yx = (1.0 / resolution[1], 1.0 / resolution[0]) if resolution and all(resolution) else (1.0, 1.0)
    spacing = (float(imagej.get("spacing", 1.0)), *spacing_yx)
    header = {"resolution": resolution, "resolutionunit": int(unit) if unit is not None else None, "imagej": imagej}
    return VolumeFile(path, data, spacing, header)


def _per_unit(value) -> float:
    """A TIFF rational (numerator, denominator) as a float."""
    numerator, denominator = value if isinstance(value, tuple) else (value, 1)
    return float(numerator) / float(denominator) if denominator else 0.0


def write_label_volume(labels: np.ndarray, like: VolumeFile, path: str | os.PathLike) -> None:
    """Write `labels` (in `like`'s array order) in `like`'s format with its header: the NIfTI affine, zooms and
    orientation; the TIFF resolution and ImageJ spacing and unit. The path's suffix picks the format."""
    path = Path(path)
    dtype = np.uint8 if labels.max(initial=0) < 256 else np.uint16
    labels = labels.astype(dtype)
    if (volume_suffix(path) or "").startswith(".nii"):
        nibabel = volume_library("nibabel")

        header = like.header["header"].copy() if "header" in like.header else None
        image = nibabel.Nifti1Image(labels, like.header.get("affine", np.eye(4)), header)
        image.set_data_dtype(dtype)
        image.header.set_slope_inter(1, 0)
        nibabel.save(image, str(path))
        return
    tifffile = volume_library("tifffile")
    imagej = like.header.get("imagej") or {}
    metadata = {"axes": "ZYX", **{k: imagej[k] for k in ("spacing", "unit") if k in imagej}}
    resolution = like.header.get("resolution")
    tifffile.imwrite(path, labels, imagej=True, resolution=resolution, metadata=metadata)


@dataclass
class VolumeSequence:
    """One volume as a sequence of slices, with the interface of `VideoSequence` (slices for frames).

    Arrays are loaded on first use and kept (uint8 image, label ids in their file dtype), in slice order
    `(S, H, W)`. `annotations` maps each annotated slice to itself: every slice of a label volume, or every K-th.

    Attributes:
        slice_axis: the axis of the file's array the slices are taken along.
        spacing: voxel size in slice order `(between slices, rows, columns)`.
    """

    name: str
    image_file: Path
    label_file: Path | None
    slice_axis: int
    spacing: tuple[float, float, float]
    num_slices: int
    window: tuple[float, float] | None = None
    annotated_every: int = 1
    _arrays: tuple[np.ndarray, np.ndarray | None] | None = field(default=None, repr=False)

    @property
    def frames(self) -> range:
        return range(self.num_slices)

    @property
    def annotations(self) -> dict[int, int]:
        if self.label_file is None:
            return {}
        return {t: t for t in range(0, self.num_slices, self.annotated_every)}

    @property
    def annotated_frames(self) -> list[int]:
        return sorted(self.annotations)

    def arrays(self) -> tuple[np.ndarray, np.ndarray | None]:
        """`(S, H, W)` uint8 grey slices and `(S, H, W)` labels (None without a label volume)."""
        if self._arrays is None:
            image = read_volume(self.image_file).data
            grey = np.moveaxis(to_grey(image, self.window), self.slice_axis, 0)
            labels = None
            if self.label_file is not None:
                labels = np.moveaxis(read_label_volume(self.label_file, image.shape), self.slice_axis, 0)
            self._arrays = (np.ascontiguousarray(grey), labels)
        return self._arrays

    def load_frame(self, index: int) -> np.ndarray:
        """Slice `index` as `(H, W, 3)` uint8 grey RGB."""
        return np.repeat(self.arrays()[0][index][..., None], 3, axis=2)

    def load_labels(self, index: int) -> np.ndarray:
        """The `(H, W)` int64 label ids of slice `index`."""
        labels = self.arrays()[1]
        if labels is None:
            raise DataError(f"Volume '{self.name}' has no label volume.")
        return labels[index].astype(np.int64)


def read_label_volume(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A label volume of integer ids with the image's `shape`; `DataError` naming the file otherwise."""
    data = read_volume(path, "label").data
    if data.shape != tuple(shape):
        raise DataError(
            f"Label volume '{printable(path)}' has shape {data.shape} but its image has shape {tuple(shape)}: a "
            "label volume must match its image voxel for voxel."
        )
    if data.dtype.kind == "f":
        if not np.array_equal(data, np.round(data)) or data.min(initial=0) < 0:
            raise DataError(
                f"Label volume '{printable(path)}' holds non-integer or negative values: save label ids (0 background,"
                " 1, 2, ... one per object) as integers."
            )
        data = data.astype(np.int64)
    elif data.dtype.kind not in "ui" and data.dtype.kind != "b":
        raise DataError(f"Label volume '{printable(path)}' has dtype {data.dtype}: save integer label ids.")
    return data


def choose_slice_axis(shape: tuple[int, int, int], spacing: tuple[float, ...], slice_axis: int | None) -> int:
    """`slice_axis`, or the axis with the coarsest spacing (ties: the fewest voxels, then the first)."""
    if slice_axis is None:
        return min(range(3), key=lambda a: (-round(spacing[a], 6), shape[a], a))
    if slice_axis not in (0, 1, 2):
        raise DataError(f"--slice-axis {slice_axis} is not an axis of a 3D volume: give 0, 1 or 2.")
    return slice_axis


def open_volume(
    image_file: str | os.PathLike,
    label_file: str | os.PathLike | None = None,
    *,
    slice_axis: int | None = None,
    window: tuple[float, float] | None = None,
    annotated_every: int = 1,
) -> VolumeSequence:
    """One volume (and its label volume) as a `VolumeSequence`, its shape and header read now, its voxels later."""
    volume = read_volume(image_file)
    if label_file is not None:
        read_label_volume(Path(label_file), volume.data.shape)
    axis = choose_slice_axis(volume.data.shape, volume.spacing, slice_axis)
    order = [axis, *(a for a in range(3) if a != axis)]
    return VolumeSequence(
        name=volume_stem(image_file),
        image_file=Path(image_file),
        label_file=Path(label_file) if label_file is not None else None,
        slice_axis=axis,
        spacing=tuple(volume.spacing[a] for a in order),
        num_slices=volume.data.shape[axis],
        window=window,
        annotated_every=annotated_every,
    )


def volume_folders(root: str | os.PathLike) -> tuple[Path, Path] | None:
    """The image and label subfolders of a volume folder (`images/` + `labels/` or `imagesTr/` + `labelsTr/`), or
    None when `root` is not one. Without a label folder only NIfTI images make one: `images/*.tif` beside `masks/`
    is a folder of 2D images."""
    root = Path(root)
    for images, labels in VOLUME_FOLDERS:
        if not (root / images).is_dir():
            continue
        suffixes = {volume_suffix(p) for p in (root / images).iterdir()} - {None}
        if suffixes and ((root / labels).is_dir() or suffixes <= {".nii", ".nii.gz"}):
            return root / images, root / labels
    return None


def open_volume_folder(
    root: str | os.PathLike,
    *,
    slice_axis: int | None = None,
    window: tuple[float, float] | None = None,
    annotated_every: int = 1,
    names: list[str] | None = None,
) -> list[VolumeSequence]:
    """The volumes of a volume folder (all, or those `names`), each with its label volume, checked up front."""
    if annotated_every < 1:
        raise ValueError(f"annotated_every must be at least 1, got {annotated_every}.")
    folders = volume_folders(root)
    if folders is None:
        raise DataError(
            f"'{printable(root)}' is not a volume folder: put NIfTI or TIFF volumes in 'images/' (or 'imagesTr/') and "
            "their label volumes, with the same file names, in 'labels/' (or 'labelsTr/')."
        )
    image_dir, label_dir = folders
    images = _volumes_by_stem(image_dir)
    labels = _volumes_by_stem(label_dir) if label_dir.is_dir() else {}
    for stem in names or []:
        if stem not in images:
            raise DataError(f"No volume '{printable(stem)}' in '{printable(image_dir)}': check the names given.")
    chosen = names if names is not None else sorted(images, key=natural_key)
    sequences = []
    for stem in chosen:
        if stem not in labels:
            raise DataError(
                f"Volume '{printable(images[stem])}' has no label volume '{printable(label_dir / images[stem].name)}':"
                " add it (same file name) or remove the image."
            )
        sequences.append(
            open_volume(
                images[stem],
                labels[stem],
                slice_axis=slice_axis,
                window=window,
                annotated_every=annotated_every,
            )
        )
    return sequences


def _volumes_by_stem(folder: Path) -> dict[str, Path]:
    """Volume files of `folder` by stem, hidden files (`._case.nii.gz` from macOS archives) left out."""
    return {
        volume_stem(p): p
        for p in sorted(folder.iterdir())
        if volume_suffix(p) and not p.name.startswith(".") and p.is_file()
    }


def volume_slice_records(root: str | os.PathLike, **options) -> list[SampleRecord]:
    """The slices of a volume folder's volumes that hold an object, as 2D samples for the image recipes (`options`:
    those of `open_volume_folder`; each label id of a slice is one instance). Ids: `NAME@SLICE`."""
    records = []
    for volume in open_volume_folder(root, **options):
        labels = volume.arrays()[1]
        for t in np.flatnonzero(labels.reshape(len(labels), -1).any(axis=1)).tolist():
            records.append(
                SampleRecord(
                    sample_id=f"{volume.name}@{t}",
                    origin=f"{volume.image_file}, slice {t}",
                    load_image=lambda v=volume, t=t: v.load_frame(t),
                    load_instances=lambda v=volume, t=t: LabelMap.from_labels(v.load_labels(t)).masks(),
                    load_objects=lambda v=volume, t=t: LabelMap.from_labels(v.load_labels(t)),
                    known_valid=True,
                )
            )
    return records
