"""Adapters: the training methods (`methods`), the adapter folder format with its sidecar and loaders (`files`),
finding an adapter locally or on the Hub and loading it onto its base (`resolve`), and folding it in (`merge`)."""

from .files import AdapterLoadError, AdapterMismatchError, load_adapter
from .merge import merge_adapter
from .methods import FullMethod, LoraMethod, PartialFinetuneMethod, PtsamMethod, TuningMethod
from .resolve import AdapterInfo, inspect_adapter, load_adapted_model

__all__ = [
    "AdapterInfo",
    "AdapterLoadError",
    "AdapterMismatchError",
    "FullMethod",
    "LoraMethod",
    "PartialFinetuneMethod",
    "PtsamMethod",
    "TuningMethod",
    "inspect_adapter",
    "load_adapted_model",
    "load_adapter",
    "merge_adapter",
]
