"""The trainer, its configuration and losses."""

from .config import TrainingConfig
from .losses import LossConfig, sam2_loss
from .trainer import Trainer

__all__ = ["LossConfig", "Trainer", "TrainingConfig", "sam2_loss"]
