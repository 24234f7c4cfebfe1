"""PTSAM: learned prompt tokens for SAM 2's mask decoder and (optionally) its Hiera encoder, as a peft method.

Importing this package registers `PeftType.PTSAM` with peft (see `registration.py`) and the `ptsam` tuning method with
the trainer, so that `PeftModel.from_pretrained(sam, path)` loads PTSAM adapters.
"""

from ..methods import METHODS
from .config import PtsamConfig
from .layer import PtsamAttentionLayer, PtsamMaskDecoderLayer, PtsamPromptEncoderLayer
from .method import PtsamMethod
from .model import PtsamArchitectureError, PtsamModel
from .registration import PtsamRegistrationError, register_ptsam

register_ptsam(PtsamConfig, PtsamModel)
METHODS[PtsamMethod.name] = PtsamMethod

__all__ = [
    "PtsamArchitectureError",
    "PtsamAttentionLayer",
    "PtsamConfig",
    "PtsamMaskDecoderLayer",
    "PtsamMethod",
    "PtsamModel",
    "PtsamPromptEncoderLayer",
    "PtsamRegistrationError",
    "register_ptsam",
]
