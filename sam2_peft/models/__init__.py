"""Loading SAM 2 base models (Hub ids, folders, Meta checkpoints, built-in architectures and test base)."""

from .loading import BUILTIN_ARCHITECTURES, BUILTIN_PRETRAINED, DEFAULT_MODEL, Sam2LoadError, load_base_model
from .meta_checkpoint import MetaCheckpointError, convert_meta_checkpoint, load_meta_checkpoint
from .segmenter import Sam2Segmenter

__all__ = [
    "BUILTIN_ARCHITECTURES",
    "BUILTIN_PRETRAINED",
    "DEFAULT_MODEL",
    "MetaCheckpointError",
    "Sam2LoadError",
    "Sam2Segmenter",
    "convert_meta_checkpoint",
    "load_base_model",
    "load_meta_checkpoint",
]
