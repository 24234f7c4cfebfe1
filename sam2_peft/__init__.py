"""sam2-peft: small, shareable adapters that specialise SAM 2.

The names below load on first use (PEP 562), so that `import sam2_peft` and the command line stay fast; importing
`sam2_peft.tuners.ptsam` (or loading any PTSAM adapter) registers the PTSAM peft method.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "DEFAULT_MODEL": "sam2_peft.models.names",
    "Sam2LoadError": "sam2_peft.models.loading",
    "load_base_model": "sam2_peft.models.loading",
    "AdapterLoadError": "sam2_peft.adapters.files",
    "AdapterMismatchError": "sam2_peft.adapters.files",
    "load_adapter": "sam2_peft.adapters.files",
    "LoraMethod": "sam2_peft.adapters.methods",
    "PartialFinetuneMethod": "sam2_peft.adapters.methods",
    "PtsamMethod": "sam2_peft.adapters.methods",
    "LoraOptions": "sam2_peft.tuners.options",
    "PtsamOptions": "sam2_peft.tuners.options",
    "PtsamConfig": "sam2_peft.tuners.ptsam",
    "Sam2PeftPredictor": "sam2_peft.inference.predictor",
}
"""Public name -> the module that defines it."""

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sam2_peft' has no attribute '{name}'")


def __dir__() -> list[str]:
    return [*globals(), *_EXPORTS]
