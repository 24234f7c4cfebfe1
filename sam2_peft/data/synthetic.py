"""Procedural synthetic scenes for promptable segmentation.

Every scene is a textured background with a few overlapping objects of varied
shape, colour and texture, followed by camera-like degradations (illumination
gradient, blur, noise, sometimes greyscale). Scenes are a pure function of an
integer seed, so any dataset built from them is reproducible without storing it.

Example:

>>> from sam2_peft.data.synthetic import SyntheticSceneDataset
>>> dataset = SyntheticSceneDataset(num_scenes=100, seed=0)
>>> scene = dataset[3]
>>> scene.image.shape, scene.instances.shape
((256, 256, 3), (256, 256))
>>> int(scene.instances.max()) == scene.num_objects
True

The folder format read by the toolkit (``images/`` and ``masks/`` matched by file
stem) is written by `write_scene_folder` or from the command line:

```bash
python -m sam2_peft.data.synthetic OUT_DIR --num-scenes 24 --seed 0 --size 256
```
"""

from __future__ import annotations

import argparse
import json
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import get_type_hints

import numpy as np
from PIL import Image
from scipy import ndimage

SHAPE_KINDS = ("ellipse", "polygon", "blob", "curve", "ring")
TEXTURE_KINDS = ("solid", "gradient", "stripes", "noise")
BACKGROUND_KINDS = ("noise", "gradient", "stripes", "checkers")

# `blur_sigma` is given for this image size and scaled linearly with `image_size`.
_REFERENCE_SIZE = 256
_COLOUR_CANDIDATES = 8

# Pixel offsets from a centre: `dy` of shape (h, 1) and `dx` of shape (1, w).
Grid = tuple[np.ndarray, np.ndarray]


@dataclass
class SyntheticSceneConfig:
    """Knobs of the scene generator. Strengths are upper bounds: each scene draws its
    own value uniformly between 0 and the bound."""

    image_size: int = field(
        default=256,
        metadata={"help": "Height and width of the square image, in pixels."},
    )
    min_objects: int = field(default=3, metadata={"help": "Fewest objects in a scene."})
    max_objects: int = field(default=15, metadata={"help": "Most objects in a scene (inclusive)."})
    min_object_area: int = field(
        default=48,
        metadata={"help": "Smallest visible area of any object after occlusion, in pixels."},
    )
    min_visible_fraction: float = field(
        default=0.25,
        metadata={"help": "Smallest fraction of an object's drawn area left visible by the objects drawn over it."},
    )
    object_radius: tuple[float, float] = field(
        default=(0.06, 0.24),
        metadata={"help": "Range of an object's radius, as a fraction of `image_size`."},
    )
    shape_kinds: tuple[str, ...] = field(
        default=SHAPE_KINDS,
        metadata={"help": f"Shapes to draw from, a subset of {SHAPE_KINDS}."},
    )
    shape_weights: tuple[float, ...] | None = field(
        default=None,
        metadata={"help": "Relative frequency of each of `shape_kinds` (None: equal); skewed weights make imbalanced "
                  "classes for semantic folders, whose classes are the shapes."},
    )  # fmt: skip
    texture_kinds: tuple[str, ...] = field(
        default=TEXTURE_KINDS,
        metadata={"help": f"Object textures to draw from, a subset of {TEXTURE_KINDS}."},
    )
    texture_by_shape: bool = field(
        default=False,
        metadata={"help": "Give every object of the i-th shape kind the i-th of `texture_kinds` (cycling through them "
                  "when there are fewer) instead of a random one, so that the classes of a semantic folder differ in "
                  "texture as well as outline (on by default with `--semantic`)."},
    )  # fmt: skip
    background_kinds: tuple[str, ...] = field(
        default=BACKGROUND_KINDS,
        metadata={"help": f"Backgrounds to draw from, among {BACKGROUND_KINDS}."},
    )
    touching_probability: float = field(
        default=0.35,
        metadata={"help": "Probability that an object is placed against a previous one."},
    )
    min_contrast: float = field(
        default=0.25,
        metadata={
            "help": "Target distance (RGB, or luma in grey scenes, in [0, 1]) between "
            "an object's colour and the pixels it covers; of a few candidate colours "
            "the first reaching it is used, else the most distant."
        },
    )
    grey_probability: float = field(
        default=0.15,
        metadata={"help": "Probability that a scene is greyscale (R == G == B)."},
    )
    noise_probability: float = field(
        default=0.5,
        metadata={"help": "Probability that a scene gets additive Gaussian noise."},
    )
    noise_std: float = field(
        default=4.0,
        metadata={"help": "Upper bound of the additive Gaussian noise std, in 8-bit levels."},
    )
    blur_sigma: float = field(
        default=1.0,
        metadata={"help": "Upper bound of the Gaussian blur sigma, in pixels at 256 px."},
    )
    illumination_strength: float = field(
        default=0.35,
        metadata={"help": "Upper bound of the relative brightness change across the image."},
    )
    max_attempts: int = field(
        default=40,
        metadata={"help": "Random draws (shape, size, position) tried per object before the object is skipped."},
    )

    def __post_init__(self) -> None:
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects <= 65535:
            raise ValueError("need 1 <= min_objects <= max_objects <= 65535")
        if not 0 < self.object_radius[0] <= self.object_radius[1]:
            raise ValueError(f"invalid object_radius range {self.object_radius}")
        for name, allowed in (
            ("shape_kinds", SHAPE_KINDS),
            ("texture_kinds", TEXTURE_KINDS),
            ("background_kinds", BACKGROUND_KINDS),
        ):
            kinds = getattr(self, name)
            if not kinds or not set(kinds) <= set(allowed):
                raise ValueError(f"{name} must be a non-empty subset of {allowed}, got {kinds}")
        weights = self.shape_weights
        if weights is not None and (len(weights) != len(self.shape_kinds) or min(weights) < 0 or sum(weights) <= 0):
            raise ValueError(f"shape_weights needs one non-negative weight per shape kind, got {weights}")
        for name in (
            "touching_probability",
            "grey_probability",
            "noise_probability",
            "min_visible_fraction",
        ):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")


@dataclass
class SyntheticScene:
    """One generated scene.

    Attributes:
        image: RGB image, ``(H, W, 3)`` uint8.
        instances: instance labels, ``(H, W)`` int32; 0 is background and objects are
            ``1..num_objects``, covering only their visible (unoccluded) pixels.
        shape_kinds: shape of each object; ``shape_kinds[k - 1]`` is label ``k``'s.
        texture_kinds: texture of each object, indexed like `shape_kinds`.
        background_kind: texture of the background.
        is_grey: whether the image is greyscale (all three channels equal).
        seed: the seed the scene was generated from.
    """

    image: np.ndarray
    instances: np.ndarray
    shape_kinds: tuple[str, ...]
    texture_kinds: tuple[str, ...]
    background_kind: str
    is_grey: bool
    seed: int

    @property
    def num_objects(self) -> int:
        return len(self.shape_kinds)

    def class_map(self, classes: tuple[str, ...]) -> np.ndarray:
        """Semantic labels `(H, W)` uint8: each visible pixel the class id of its object's shape (`classes[k - 1]`
        is class `k`'s shape), 0 background; an occluded object loses its pixels to the one in front."""
        lookup = np.array([0] + [classes.index(kind) + 1 for kind in self.shape_kinds], dtype=np.uint8)
        return lookup[self.instances]


# ----------------------------------------------------------------------------- textures


def _luma(rgb: np.ndarray) -> np.ndarray:
    """Rec. 601 luma of the last axis (elementwise, so exactly reproducible)."""
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


def _smoothstep(t: np.ndarray) -> np.ndarray:
    return t * t * (3.0 - 2.0 * t)


def _value_noise(rng: np.random.Generator, shape: tuple[int, int], cell: float) -> np.ndarray:
    """Smooth noise in [0, 1]: random values every `cell` pixels, interpolated."""
    gy = np.arange(shape[0]) / cell + rng.random()
    gx = np.arange(shape[1]) / cell + rng.random()
    iy, ix = gy.astype(np.intp), gx.astype(np.intp)
    fy, fx = _smoothstep(gy - iy)[:, None], _smoothstep(gx - ix)[None, :]
    grid = rng.random((iy[-1] + 2, ix[-1] + 2))
    rows, rows_below = grid[iy], grid[iy + 1]
    top = rows[:, ix] * (1 - fx) + rows[:, ix + 1] * fx
    bottom = rows_below[:, ix] * (1 - fx) + rows_below[:, ix + 1] * fx
    return top * (1 - fy) + bottom * fy


def _fractal_noise(rng: np.random.Generator, shape: tuple[int, int], cell: float, octaves: int = 3) -> np.ndarray:
    """Sum of `octaves` value-noise layers of halving cell size, stretched to [0, 1]."""
    total = sum(0.5**octave * _value_noise(rng, shape, max(cell / 2**octave, 1.0)) for octave in range(octaves))
    return (total - total.min()) / max(np.ptp(total), 1e-6)


def _direction(rng: np.random.Generator, grid: Grid) -> np.ndarray:
    """Signed distance along a random direction, shape ``(h, w)``."""
    angle = rng.uniform(0, 2 * np.pi)
    dy, dx = grid
    return dx * np.cos(angle) + dy * np.sin(angle)


def _mix(weight: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Blend two colours ``(2, 3)`` per pixel; `weight` in [0, 1] gets a colour axis."""
    return colours[0] + weight[..., None] * (colours[1] - colours[0])


def _solid(rng: np.random.Generator, grid: Grid, scale: float) -> np.ndarray:
    return np.zeros((grid[0].shape[0], grid[1].shape[1]))


def _gradient(rng: np.random.Generator, grid: Grid, scale: float) -> np.ndarray:
    distance = _direction(rng, grid)
    return (distance - distance.min()) / max(np.ptp(distance), 1e-6)


def _stripes(rng: np.random.Generator, grid: Grid, scale: float) -> np.ndarray:
    period = rng.uniform(0.025, 0.08) * scale
    sharpness = rng.uniform(1.0, 4.0)
    wave = np.sin(2 * np.pi * _direction(rng, grid) / period + rng.uniform(0, 2 * np.pi))
    return np.clip(0.5 + sharpness * wave / 2, 0, 1)


def _noise(rng: np.random.Generator, grid: Grid, scale: float) -> np.ndarray:
    shape = (grid[0].shape[0], grid[1].shape[1])
    cell = rng.uniform(0.02, 0.1) * scale
    return _fractal_noise(rng, shape, cell)


def _checkers(rng: np.random.Generator, grid: Grid, scale: float) -> np.ndarray:
    cell = rng.uniform(0.04, 0.15) * scale
    angle = rng.uniform(0, np.pi / 2)
    dy, dx = grid
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / cell
    v = (dy * np.cos(angle) - dx * np.sin(angle)) / cell
    parity = (np.floor(u).astype(np.int64) + np.floor(v).astype(np.int64)) % 2
    return parity.astype(np.float64)


# A texture maps a grid to blend weights in [0, 1] between an object's two colours;
# `scale` is the length its periods are relative to.
Texture = Callable[[np.random.Generator, Grid, float], np.ndarray]
_TEXTURES: dict[str, Texture] = {
    "solid": _solid,
    "gradient": _gradient,
    "stripes": _stripes,
    "noise": _noise,
    "checkers": _checkers,
}


# ------------------------------------------------------------------------------- shapes


def _rotated(rng: np.random.Generator, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    angle = rng.uniform(0, np.pi)
    dy, dx = grid
    cos, sin = np.cos(angle), np.sin(angle)
    return dx * cos + dy * sin, dy * cos - dx * sin


def _ellipse(rng: np.random.Generator, grid: Grid, radius: float) -> np.ndarray:
    u, v = _rotated(rng, grid)
    minor = radius * rng.uniform(0.35, 1.0)
    return (u / radius) ** 2 + (v / minor) ** 2 <= 1.0


def _ring(rng: np.random.Generator, grid: Grid, radius: float) -> np.ndarray:
    u, v = _rotated(rng, grid)
    minor = radius * rng.uniform(0.6, 1.0)
    distance = (u / radius) ** 2 + (v / minor) ** 2
    return (distance <= 1.0) & (distance >= rng.uniform(0.3, 0.65) ** 2)


def _polygon(rng: np.random.Generator, grid: Grid, radius: float) -> np.ndarray:
    """Star-shaped polygon of 3-8 jittered vertices, filled by the even-odd rule."""
    count = int(rng.integers(3, 9))
    angles = (np.arange(count) + rng.uniform(-0.3, 0.3, count)) * 2 * np.pi / count
    angles += rng.uniform(0, 2 * np.pi)
    radii = radius * rng.uniform(0.6, 1.0, count)
    ys, xs = radii * np.sin(angles), radii * np.cos(angles)
    dy, dx = grid
    inside = np.zeros((dy.shape[0], dx.shape[1]), dtype=bool)
    for y0, x0, y1, x1 in zip(ys, xs, np.roll(ys, -1), np.roll(xs, -1)):
        if y0 == y1:
            continue
        crosses = (y0 > dy) != (y1 > dy)
        inside ^= crosses & (dx < x0 + (dy - y0) * (x1 - x0) / (y1 - y0))
    return inside


def _blob(rng: np.random.Generator, grid: Grid, radius: float) -> np.ndarray:
    """Smooth star-shaped blob: a circle whose radius is a low-order Fourier series."""
    dy, dx = grid
    angle = np.arctan2(dy, dx)
    boundary = np.ones_like(angle)
    for order in range(2, 6):
        amplitude = rng.uniform(0, 0.35 / order)
        boundary += amplitude * np.cos(order * angle + rng.uniform(0, 2 * np.pi))
    return np.hypot(dy, dx) <= radius * boundary


def _curve(rng: np.random.Generator, grid: Grid, radius: float) -> np.ndarray:
    """Thick cubic Bezier curve between two roughly opposite points at `radius`."""
    dy, dx = grid
    start = rng.uniform(0, 2 * np.pi)
    ends = np.array([start, start + np.pi + rng.uniform(-0.6, 0.6)])
    ends = radius * rng.uniform(0.7, 1.0, (2, 1)) * np.stack([np.sin(ends), np.cos(ends)], 1)
    middle = rng.uniform(-radius, radius, (2, 2))
    controls = np.stack([ends[0], middle[0], middle[1], ends[1]])
    half_width = max(radius * rng.uniform(0.05, 0.1), 1.0)
    length = np.linalg.norm(np.diff(controls, axis=0), axis=1).sum()
    t = np.linspace(0.0, 1.0, int(2 * length) + 2)[:, None]
    weights = np.hstack([(1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t**2, t**3])
    points = weights @ controls
    shape = (dy.shape[0], dx.shape[1])
    rows = np.rint(points[:, 0] - dy[0, 0]).astype(np.intp)
    cols = np.rint(points[:, 1] - dx[0, 0]).astype(np.intp)
    inside = (rows >= 0) & (rows < shape[0]) & (cols >= 0) & (cols < shape[1])
    off_curve = np.ones(shape, dtype=bool)
    off_curve[rows[inside], cols[inside]] = False
    return ndimage.distance_transform_edt(off_curve) <= half_width


# A shape is a boolean mask over a grid of offsets from its centre.
Shape = Callable[[np.random.Generator, Grid, float], np.ndarray]
_SHAPES: dict[str, Shape] = {
    "ellipse": _ellipse,
    "polygon": _polygon,
    "blob": _blob,
    "curve": _curve,
    "ring": _ring,
}


# -------------------------------------------------------------------------------- scene


@dataclass
class _Canvas:
    """Scene under construction: float RGB image, labels and per-label areas."""

    image: np.ndarray
    instances: np.ndarray
    visible_area: list[int]
    full_area: list[int]
    circles: list[tuple[float, float, float]]  # (cy, cx, radius) of each object


def _random_colours(
    rng: np.random.Generator,
    reference: np.ndarray,
    grey: bool,
    config: SyntheticSceneConfig,
) -> np.ndarray:
    """Two related colours for an object, the base one contrasting with `reference`."""
    candidates = rng.random((_COLOUR_CANDIDATES, 3))
    difference = candidates - reference
    distance = np.abs(_luma(difference)) if grey else np.linalg.norm(difference, axis=1)
    reaches = distance >= config.min_contrast
    base = candidates[np.argmax(reaches) if reaches.any() else np.argmax(distance)]
    second = np.clip(base + rng.normal(0.0, 0.15, 3), 0.0, 1.0)
    return np.stack([base, second])


def _object_centre(
    rng: np.random.Generator,
    canvas: _Canvas,
    radius: float,
    config: SyntheticSceneConfig,
) -> tuple[float, float]:
    """Uniform centre, or one placed against a previous object's outline."""
    size = config.image_size
    if canvas.circles and rng.random() < config.touching_probability:
        cy, cx, other_radius = canvas.circles[int(rng.integers(len(canvas.circles)))]
        angle = rng.uniform(0, 2 * np.pi)
        distance = (other_radius + radius) * rng.uniform(0.6, 0.9)
        return cy + distance * np.sin(angle), cx + distance * np.cos(angle)
    return rng.uniform(0, size), rng.uniform(0, size)


def _draw_texture(rng: np.random.Generator, kind: str, config: SyntheticSceneConfig) -> str:
    """An object's texture: its shape kind's with `config.texture_by_shape`, else a random one."""
    textures = config.texture_kinds
    if config.texture_by_shape:
        return textures[config.shape_kinds.index(kind) % len(textures)]
    return textures[int(rng.integers(len(textures)))]


def _try_place(
    rng: np.random.Generator,
    canvas: _Canvas,
    kind: str,
    radius: float,
    grey: bool,
    config: SyntheticSceneConfig,
) -> str | None:
    """Draw one object on top of `canvas` if every object keeps enough visible area.

    Returns the texture kind when the object was drawn, else None (canvas unchanged).
    """
    size = config.image_size
    cy, cx = _object_centre(rng, canvas, radius, config)
    reach = 1.6 * radius + 2
    y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 1, size)
    x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 1, size)
    if y1 - y0 < 2 or x1 - x0 < 2:
        return None
    grid = (np.arange(y0, y1)[:, None] - cy, np.arange(x0, x1)[None, :] - cx)
    mask = _SHAPES[kind](rng, grid, radius)
    area = int(mask.sum())
    if area < config.min_object_area:
        return None
    window = (slice(y0, y1), slice(x0, x1))
    covered = np.bincount(canvas.instances[window][mask], minlength=len(canvas.visible_area))
    remaining = np.asarray(canvas.visible_area) - covered
    needed = np.maximum(
        config.min_object_area,
        config.min_visible_fraction * np.asarray(canvas.full_area),
    )
    if np.any(remaining[1:] < needed[1:]):
        return None

    texture = _draw_texture(rng, kind, config)
    reference = canvas.image[window][mask].mean(axis=0)
    colours = _random_colours(rng, reference, grey, config)
    weight = _TEXTURES[texture](rng, grid, size)[mask]
    canvas.image[window][mask] = _mix(weight, colours)
    canvas.instances[window][mask] = len(canvas.visible_area)
    canvas.visible_area[:] = [*remaining.tolist(), area]
    canvas.full_area.append(area)
    canvas.circles.append((cy, cx, radius))
    return texture


def _centred_grid(size: int) -> Grid:
    centre = size / 2
    return np.arange(size)[:, None] - centre, np.arange(size)[None, :] - centre


def _background(rng: np.random.Generator, config: SyntheticSceneConfig) -> tuple[np.ndarray, str]:
    kind = config.background_kinds[int(rng.integers(len(config.background_kinds)))]
    size = config.image_size
    base = rng.uniform(0.1, 0.9, 3)
    colours = np.stack([base, np.clip(base + rng.normal(0.0, 0.12, 3), 0.0, 1.0)])
    grid = _centred_grid(size)
    image = _mix(_TEXTURES[kind](rng, grid, 2 * size), colours)
    return image, kind


def _degrade(
    rng: np.random.Generator,
    image: np.ndarray,
    grey: bool,
    config: SyntheticSceneConfig,
) -> np.ndarray:
    """Illumination gradient, optional greyscale, blur, optional noise; to uint8."""
    size = config.image_size
    ramp = _direction(rng, _centred_grid(size)) / (size / np.sqrt(2))
    gain = 1.0 + rng.uniform(0, config.illumination_strength) * ramp
    image = image * gain[..., None]
    if grey:
        image = _luma(image)[..., None]
    sigma = rng.uniform(0, config.blur_sigma) * size / _REFERENCE_SIZE
    image = ndimage.gaussian_filter(image, sigma=(sigma, sigma, 0))
    if rng.random() < config.noise_probability:
        std = rng.uniform(0, config.noise_std) / 255
        image = image + rng.normal(0.0, std, image.shape)
    pixels = np.rint(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    return np.ascontiguousarray(np.broadcast_to(pixels, (size, size, 3)))


def _draw_shape(rng: np.random.Generator, config: SyntheticSceneConfig) -> str:
    kinds, weights = config.shape_kinds, config.shape_weights
    if weights is None:
        return kinds[int(rng.integers(len(kinds)))]
    return kinds[int(rng.choice(len(kinds), p=np.asarray(weights) / sum(weights)))]


def generate_scene(seed: int, config: SyntheticSceneConfig | None = None) -> SyntheticScene:
    """Generate one scene, a deterministic function of `seed` and `config`.

    Objects are drawn back to front (later objects occlude earlier ones). An object is
    only kept if every object, itself included, keeps at least `config.min_object_area`
    visible pixels, so labels are always ``1..N`` with no empty object.
    """
    config = config or SyntheticSceneConfig()
    rng = np.random.default_rng(seed)
    size = config.image_size
    image, background_kind = _background(rng, config)
    canvas = _Canvas(image, np.zeros((size, size), dtype=np.int32), [size * size], [0], [])
    grey = bool(rng.random() < config.grey_probability)
    target = int(rng.integers(config.min_objects, config.max_objects + 1))
    low, high = config.object_radius
    shape_kinds, texture_kinds = [], []
    for _ in range(target):
        for _ in range(config.max_attempts):
            kind = _draw_shape(rng, config)
            radius = rng.uniform(low, high) * size
            texture = _try_place(rng, canvas, kind, radius, grey, config)
            if texture is not None:
                shape_kinds.append(kind)
                texture_kinds.append(texture)
                break
    if len(shape_kinds) < config.min_objects:
        raise RuntimeError(
            f"seed {seed}: placed {len(shape_kinds)} objects, fewer than min_objects="
            f"{config.min_objects}; loosen min_object_area or object_radius"
        )
    return SyntheticScene(
        image=_degrade(rng, canvas.image, grey, config),
        instances=canvas.instances,
        shape_kinds=tuple(shape_kinds),
        texture_kinds=tuple(texture_kinds),
        background_kind=background_kind,
        is_grey=grey,
        seed=seed,
    )


# ------------------------------------------------------------------------ dataset & I/O


class SyntheticSceneDataset:
    """Map-style dataset of synthetic scenes, generated on access.

    `len()` is `num_scenes`, but any non-negative index is valid: scene ``i`` is
    generated from a seed derived from ``(seed, i)``, so the dataset can be extended
    without changing its first scenes. Negative indices count from `num_scenes`.
    """

    def __init__(self, num_scenes: int, seed: int = 0, config: SyntheticSceneConfig | None = None) -> None:
        if num_scenes < 0 or seed < 0:
            raise ValueError("num_scenes and seed must be non-negative")
        self.num_scenes = num_scenes
        self.seed = seed
        self.config = config or SyntheticSceneConfig()

    def scene_seed(self, index: int) -> int:
        """Seed of scene `index`: `np.random.SeedSequence` of ``(seed, index)``."""
        state = np.random.SeedSequence([self.seed, index]).generate_state(1, dtype=np.uint64)
        return int(state[0])

    def __len__(self) -> int:
        return self.num_scenes

    def __getitem__(self, index: int) -> SyntheticScene:
        if index < 0:
            index += self.num_scenes
        if index < 0:
            raise IndexError(f"index out of range for {self.num_scenes} scenes")
        return generate_scene(self.scene_seed(index), self.config)

    def __iter__(self) -> Iterator[SyntheticScene]:
        return (self[index] for index in range(self.num_scenes))


def _save_png_atomic(array: np.ndarray, path: Path) -> None:
    """Write `array` as a PNG at `path` through a temporary file and `os.replace`."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "xb") as file:
            Image.fromarray(array).save(file, format="PNG", optimize=True)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_scene_folder(
    out_dir: str | os.PathLike,
    num_scenes: int,
    seed: int = 0,
    config: SyntheticSceneConfig | None = None,
    semantic: bool = False,
) -> Path:
    """Write the scenes of `SyntheticSceneDataset(num_scenes, seed, config)` to disk.

    Produces ``images/scene_XXXX.png`` (RGB) and ``masks/scene_XXXX.png`` (instance
    labels, 8-bit when `config.max_objects` <= 255, else 16-bit). With `semantic`, the
    masks are class maps instead (`SyntheticScene.class_map`, one class per shape kind of
    the config, 8-bit) and ``classes.json`` names them (for `--mask-type semantic`).
    Existing files with the same names are replaced; other files are left alone. Returns `out_dir`.
    """
    dataset = SyntheticSceneDataset(num_scenes, seed, config)
    classes = dataset.config.shape_kinds
    mask_dtype = np.uint8 if dataset.config.max_objects <= 255 else np.uint16
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    for index, scene in enumerate(dataset):
        name = f"scene_{index:04d}.png"
        _save_png_atomic(scene.image, out_dir / "images" / name)
        mask = scene.class_map(classes) if semantic else scene.instances.astype(mask_dtype)
        _save_png_atomic(mask, out_dir / "masks" / name)
    if semantic:
        names = {str(k): kind for k, kind in enumerate(classes, 1)}
        (out_dir / "classes.json").write_text(json.dumps(names, indent=1) + "\n", encoding="utf-8")
    return out_dir


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per `SyntheticSceneConfig` field (but `image_size`, which is `--size`), with the field's help, so a
    sample of a particular scene style is one reproducible command."""
    hints = get_type_hints(SyntheticSceneConfig)
    group = parser.add_argument_group("scene style (SyntheticSceneConfig)")
    for config_field in fields(SyntheticSceneConfig):
        if config_field.name == "image_size":
            continue
        flag = "--" + config_field.name.replace("_", "-")
        kind = hints[config_field.name]
        help_text = f"{config_field.metadata['help']} Default: {config_field.default}."
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif kind == tuple[str, ...]:
            group.add_argument(flag, type=lambda text: tuple(text.split(",")), help=help_text + " Comma-separated.")
        elif kind == tuple[float, ...] | None:
            group.add_argument(
                flag, type=lambda text: tuple(float(v) for v in text.split(",")), help=help_text + " Comma-separated."
            )
        elif kind == tuple[float, float]:
            group.add_argument(flag, type=float, nargs=2, metavar=("LOW", "HIGH"), help=help_text)
        else:
            group.add_argument(flag, type=kind, help=help_text)


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: write a scene folder."""
    parser = argparse.ArgumentParser(
        prog="python -m sam2_peft.data.synthetic",
        description="Write synthetic segmentation scenes as images/ and masks/.",
    )
    parser.add_argument("out_dir", type=Path, help="folder to write images/ and masks/ into")
    parser.add_argument("--num-scenes", type=int, default=24, help="number of scenes (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default: %(default)s)")
    parser.add_argument("--size", type=int, default=256, help="image height and width in pixels (default: %(default)s)")
    parser.add_argument(
        "--semantic",
        action="store_true",
        help="write class maps (one class per shape kind) and classes.json; turns on --texture-by-shape unless "
        "--no-texture-by-shape is given",
    )
    _add_config_flags(parser)
    args = vars(parser.parse_args(argv))
    out_dir, num_scenes, seed, size, semantic = (
        args.pop(name) for name in ("out_dir", "num_scenes", "seed", "size", "semantic")
    )
    style = {
        name: tuple(value) if isinstance(value, list) else value for name, value in args.items() if value is not None
    }
    if semantic:
        style.setdefault("texture_by_shape", True)
    try:
        config = SyntheticSceneConfig(image_size=size, **style)
    except ValueError as error:
        parser.error(str(error))
    write_scene_folder(out_dir, num_scenes, seed, config, semantic=semantic)
    print(f"wrote {num_scenes} scenes to {out_dir}")


if __name__ == "__main__":
    main()
