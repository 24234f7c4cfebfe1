"""sam2-peft: small, shareable adapters that specialise SAM 2."""

from .models.loading import DEFAULT_MODEL, Sam2LoadError, load_base_model
from .tuners.methods import AdapterMismatchError, LoraMethod, PartialFinetuneMethod, load_adapter

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "AdapterMismatchError",
    "LoraMethod",
    "PartialFinetuneMethod",
    "Sam2LoadError",
    "load_adapter",
    "load_base_model",
]
