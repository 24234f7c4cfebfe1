"""sam2-peft: small, shareable adapters that specialise SAM 2."""

from .models.loading import DEFAULT_MODEL, Sam2LoadError, load_base_model
from .tuners import ptsam as _ptsam  # noqa: F401  (registers the PTSAM peft method)
from .tuners.methods import AdapterMismatchError, LoraMethod, PartialFinetuneMethod, load_adapter
from .tuners.ptsam import PtsamConfig

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "AdapterMismatchError",
    "LoraMethod",
    "PartialFinetuneMethod",
    "PtsamConfig",
    "Sam2LoadError",
    "load_adapter",
    "load_base_model",
]
