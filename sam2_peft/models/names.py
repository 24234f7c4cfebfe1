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
}

BUILTIN_PRETRAINED = {
    "compact-synthetic": Path(__file__).parent / "weights" / "compact-synthetic",
}
"""Models shipped with the package (half-precision files, loaded as float32). `compact-synthetic` is the
`compact-random` architecture pre-trained by the `pretrain` recipe on synthetic scenes only: a base that segments,
for tests and CI, not a foundation model (its README holds the command, seed and scores)."""
