"""PTSAM: learned prompt tokens for SAM 2's mask decoder and (optionally) its Hiera encoder, as a peft method.

Importing this package registers `PeftType.PTSAM` with peft (see `registration.py`), so that
`PeftModel.from_pretrained(sam, path)` loads PTSAM adapters. Its knobs are `tuners.options.PtsamOptions`.
"""

from .config import PtsamConfig
from .layer import PtsamAttentionLayer, PtsamMaskDecoderLayer, PtsamMergeError, PtsamPromptEncoderLayer
from .model import PtsamArchitectureError, PtsamModel
from .registration import PtsamRegistrationError, register_ptsam

register_ptsam(PtsamConfig, PtsamModel)

__all__ = [
    "PtsamArchitectureError",
    "PtsamAttentionLayer",
    "PtsamConfig",
    "PtsamMaskDecoderLayer",
    "PtsamMergeError",
    "PtsamModel",
    "PtsamPromptEncoderLayer",
    "PtsamRegistrationError",
    "register_ptsam",
]
