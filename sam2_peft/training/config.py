"""Every knob of a training run, in one dataclass that is saved with the results."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from accelerate.utils import is_tensorboard_available, is_wandb_available

from ..data.sources import DataError
from .losses import LossConfig

MIXED_PRECISION = ("no", "fp16", "bf16")
TRACKERS = ("tensorboard", "wandb", "all", "none")
HALF_DTYPES = ("float16", "bfloat16")


class ConfigError(DataError):
    """Settings that cannot work together or on this machine (the message names the flags and the fix)."""


def check_report_to(report_to: str) -> None:
    """Raise `ConfigError` when `report_to` names an unknown tracker or one whose package is missing: Accelerate
    would drop it with a debug line and the run would train untracked."""
    if report_to not in TRACKERS:
        raise ConfigError(f"--report-to '{report_to}' is not a tracker: use one of {', '.join(TRACKERS)}.")
    if report_to == "wandb" and not is_wandb_available():
        raise ConfigError(
            "--report-to wandb: wandb is not installed. Install it (pip install wandb, or pip install -e "
            "'.[trackers]'), or pass --report-to tensorboard or none."
        )
    if report_to == "tensorboard" and not is_tensorboard_available():
        raise ConfigError(
            "--report-to tensorboard: tensorboard is not installed. Install it (pip install tensorboard), or pass "
            "--report-to none."
        )


def effective_mixed_precision(mixed_precision: str | None) -> str:
    """The mixed precision an Accelerator will use: the given one, else Accelerate's (`accelerate launch
    --mixed_precision` and `accelerate config` reach it as ACCELERATE_MIXED_PRECISION), else `no`."""
    return mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()


def check_half_base(base_dtype: str, mixed_precision: str | None) -> None:
    """Raise `ConfigError` when a half-precision base would train without autocast (float32 adapters cannot meet a
    half base outside it)."""
    if base_dtype in HALF_DTYPES and effective_mixed_precision(mixed_precision) == "no":
        raise ConfigError(
            f"--base-dtype {base_dtype} needs mixed precision (mixed_precision is 'no'): add --mixed-precision "
            f"{'fp16' if base_dtype == 'float16' else 'bf16'} (or accelerate launch --mixed_precision), or use "
            "--base-dtype float32."
        )


@dataclass
class TrainingConfig:
    """Optimisation, evaluation and checkpointing of one run (the data and the method are configured apart)."""

    output_dir: str = "outputs/run"
    max_steps: int | None = None
    """Optimizer steps in all; when None, `epochs` passes over the training set."""
    epochs: int = 10
    batch_size: int = 2
    """Images per process per micro-step (each brings up to `max_objects_per_image` prompts)."""
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 1e-4
    warmup_ratio: float = 0.1
    """Linear warm-up over this fraction of the steps, then cosine decay to zero."""
    max_grad_norm: float = 1.0
    mixed_precision: str | None = None
    """`no`, `fp16` (with dynamic loss scaling) or `bf16`; None leaves it to Accelerate (`accelerate launch
    --mixed_precision`, `accelerate config`, `ACCELERATE_MIXED_PRECISION`, else `no`). The trainer replaces None by
    what the Accelerator uses."""
    seed: int = 0
    eval_every: int = 0
    """Evaluate (and checkpoint) every N optimizer steps; 0 = at the end of each epoch."""
    metric_for_best: str = "dice"
    """Validation metric (higher is better) that ranks checkpoints."""
    keep_best: int = 3
    """Checkpoints kept by `metric_for_best` (the latest is always kept too, for resuming)."""
    resume: str | None = None
    """`latest` for the newest checkpoint in `output_dir/checkpoints`, or a checkpoint folder."""
    overwrite: bool = False
    """Start afresh in an `output_dir` that holds a previous run (its checkpoints and metrics are deleted)."""
    max_nonfinite_steps: int = 5
    """Consecutive non-finite losses tolerated (each skipped and logged) before the run stops."""
    log_every: int = 10
    report_to: str = "tensorboard"
    """Accelerate tracker: `tensorboard`, `wandb`, `all` or `none`."""
    num_workers: int = 0
    num_panels: int = 4
    """Validation images drawn side by side (image | ground truth | base | fine-tuned) at each evaluation."""
    correction_rounds: int = 0
    """Extra interactive rounds per step (a click in the largest error, the previous mask fed back), as SAM trains."""
    loss: LossConfig = field(default_factory=LossConfig)
    cache_embeddings: bool = True
    """Cache the image encoder's outputs when the method leaves the encoder frozen (see `embedding_cache`)."""
    cache_dir: str | None = None
    """Folder keeping cached features on disk (memory-mapped, reused by later runs); None = memory only."""
    cache_memory_gb: float = 8.0
    """Memory budget of cached features; beyond it they live in `cache_dir` (or are re-encoded without one)."""
    cache_views: int = 4
    """With augmentation on and the cache on: fixed augmented views encoded per image, one drawn per epoch."""

    def __post_init__(self) -> None:
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got '{self.mixed_precision}'.")
        for name in ("batch_size", "grad_accum", "epochs", "cache_views"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {self.max_steps}.")

    def to_dict(self) -> dict:
        return asdict(self)
