"""Helpers for the volume tests: small synthetic CT-like volumes (HU intensities, anisotropic spacing) on disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SPACING = (0.8, 0.7, 3.0)
"""Voxel size (mm) of the synthetic NIfTI volumes along x, y, z: slices 3 mm apart, as in a routine CT."""


def synthetic_ct(shape: tuple[int, int, int] = (64, 56, 12), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like `(X, Y, Z)` int16 volume in HU and its uint8 labels: air (-1000) around a soft-tissue body (40), an
    organ (id 1, 160 HU) that moves and grows from slice to slice, and a smaller lesion (id 2, -80 HU) present on the
    middle slices only, which shrinks towards its ends."""
    width, height, depth = shape
    xx, yy = np.mgrid[:width, :height]
    rng = np.random.default_rng(seed)
    image = np.empty(shape, np.int16)
    labels = np.zeros(shape, np.uint8)
    for z in range(depth):
        body = ((xx - width / 2) / (0.45 * width)) ** 2 + ((yy - height / 2) / (0.45 * height)) ** 2 <= 1
        organ = (xx - (20 + 1.5 * z)) ** 2 + (yy - 22) ** 2 <= (5 + 0.6 * z) ** 2
        lesion_radius = 5 - abs(z - depth / 2) * 0.9
        lesion = (xx - 44) ** 2 + (yy - (36 - 0.5 * z)) ** 2 <= lesion_radius**2 if lesion_radius > 1 else 0 * xx > 0
        hu = np.where(body, 40, -1000)
        hu = np.where(organ, 160, hu)
        hu = np.where(lesion, -80, hu)
        image[..., z] = hu + rng.normal(0, 10, hu.shape).round()
        labels[..., z][organ] = 1
        labels[..., z][lesion] = 2
    return image, labels


def nifti_affine(spacing=SPACING) -> np.ndarray:
    """An oblique-free affine with `spacing`, a flipped x axis (radiological) and an origin away from 0."""
    return np.array(
        [[-spacing[0], 0, 0, 120.5], [0, spacing[1], 0, -80.25], [0, 0, spacing[2], 33.0], [0, 0, 0, 1]], float
    )


def write_nifti_folder(root: Path, names=("case_a", "case_b"), decathlon: bool = False) -> Path:
    """`root/images/NAME.nii.gz` + `root/labels/NAME.nii.gz` (or the Decathlon's imagesTr/labelsTr)."""
    import nibabel

    images, labels = ("imagesTr", "labelsTr") if decathlon else ("images", "labels")
    (root / images).mkdir(parents=True, exist_ok=True)
    (root / labels).mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        image, label = synthetic_ct(seed=i)
        nibabel.save(nibabel.Nifti1Image(image, nifti_affine()), str(root / images / f"{name}.nii.gz"))
        nibabel.save(nibabel.Nifti1Image(label, nifti_affine()), str(root / labels / f"{name}.nii.gz"))
    return root


def write_tiff_pair(root: Path, name: str = "stack") -> Path:
    """A `(Z, Y, X)` multi-page ImageJ TIFF with 0.5 um pixels and 2 um z steps, and its label stack."""
    import tifffile

    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    image, label = synthetic_ct()
    stacks = {"images": (image.T + 1000).astype(np.uint16), "labels": label.T}
    for folder, data in stacks.items():
        tifffile.imwrite(
            root / folder / f"{name}.tif",
            data,
            imagej=True,
            resolution=(2.0, 2.0),
            metadata={"axes": "ZYX", "spacing": 2.0, "unit": "um"},
        )
    return root
