"""The names a base model can be given, without importing torch: the default Hub id, the built-in architectures and
the shipped test base (the command line lists them in its help before any heavy import)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "facebook/sam2.1-hiera-tiny"

BASE_DTYPES = ("float32", "bfloat16", "float16")
"""Dtypes the frozen base weights may be loaded in."""

QUANTIZATION_MODES = ("4bit", "8bit")
"""bitsandbytes modes of the image encoder's Linear layers (QLoRA)."""


COMPONENTS = (
    "vision_encoder",
    "prompt_encoder",
    "mask_decoder",
    "memory_attention",
    "memory_encoder",
    "object_pointer_proj",
)
"""SAM 2's components (attributes of `Sam2Model` / `Sam2VideoModel`); the last three exist in video models only."""


@dataclass(frozen=True)
class BuiltinArchitecture:
    """A named architecture built from a config with random weights (smoke tests and offline recipes only)."""

    name: str
    description: str
    image_size: int


BUILTIN_ARCHITECTURES = {
    "tiny-random": BuiltinArchitecture("tiny-random", "0.5 M parameters, 256 px, random weights", 256),
    "compact-random": BuiltinArchitecture("compact-random", "2.3 M parameters, 256 px, random weights", 256),
    "hiera-tiny-random": BuiltinArchitecture(
        "hiera-tiny-random", "sam2.1-hiera-tiny architecture, 1024 px, random weights", 1024
    ),
    "edgetam-tiny-random": BuiltinArchitecture(
        "edgetam-tiny-random", "EdgeTAM (RepViT encoder, needs timm), 256 px, random weights", 256
    ),
    "sam3-tracker-tiny-random": BuiltinArchitecture(
        "sam3-tracker-tiny-random", "SAM 3 tracker (ViT encoder), 224 px, random weights", 224
    ),
}

BUILTIN_PRETRAINED = {
    "compact-synthetic": Path(__file__).parent / "weights" / "compact-synthetic",
}
"""Models shipped with the package (half-precision files, loaded as float32). `compact-synthetic` is the
`compact-random` architecture pre-trained by the `pretrain` recipe on synthetic scenes only: a base that segments,
for tests and CI, not a foundation model (its README holds the command, seed and scores)."""


@dataclass(frozen=True)
class Family:
    """A base-model family of transformers' SAM 2 line: same prompt encoder, mask decoder and video memory, its own
    image encoder.

    Attributes:
        name: the key recorded in adapters' sidecars.
        title: the name shown to users.
        model_types: config `model_type`s of its image and video models (and of checkpoints they load from).
        encoder: the image encoder's kind.
        encoder_prompts: whether PTSAM's encoder prompts fit that encoder (Hiera's attention only, today).
        classes: transformers' image config, image model, video config and video model classes.
        extra: the pip extra the family needs, if any.
    """

    name: str
    title: str
    model_types: tuple[str, ...]
    encoder: str
    encoder_prompts: bool
    classes: tuple[str, str, str, str]
    extra: str | None = None


FAMILIES = {
    "sam2": Family(
        "sam2",
        "SAM 2",
        ("sam2", "sam2_video"),
        "Hiera",
        True,
        ("Sam2Config", "Sam2Model", "Sam2VideoConfig", "Sam2VideoModel"),
    ),
    "edgetam": Family(
        "edgetam",
        "EdgeTAM",
        ("edgetam", "edgetam_video"),
        "RepViT (timm)",
        False,
        ("EdgeTamConfig", "EdgeTamModel", "EdgeTamVideoConfig", "EdgeTamVideoModel"),
        "edgetam",
    ),
    "sam3_tracker": Family(
        "sam3_tracker",
        "SAM 3 tracker",
        ("sam3_tracker", "sam3_tracker_video", "sam3", "sam3_video"),
        "ViT",
        False,
        ("Sam3TrackerConfig", "Sam3TrackerModel", "Sam3TrackerVideoConfig", "Sam3TrackerVideoModel"),
    ),
}
"""The families this toolkit loads, keyed by the name adapters record. `sam3` / `sam3_video` checkpoints (the Hub's
`facebook/sam3`) load as their tracker."""


def family_of_model_type(model_type: str) -> Family | None:
    """The family of a config's `model_type`, or None when it is not one of the SAM 2 line."""
    return next((f for f in FAMILIES.values() if model_type in f.model_types), None)
