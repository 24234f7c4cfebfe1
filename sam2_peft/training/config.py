"""The training settings as plain dataclasses (no torch import): optimisation, evaluation, checkpointing, the
embedding cache (`TrainingConfig`) and the loss (`LossConfig`). Each field's help is its command-line help: the
recipes parse these classes directly (`HfArgumentParser`), and the trainer saves them with the results."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from ..data.sources import DataError

MIXED_PRECISION = ("no", "fp16", "bf16")
TRACKERS = ("tensorboard", "wandb", "all", "none")
HALF_DTYPES = ("float16", "bfloat16")
CACHE_DTYPES = ("auto", "bfloat16")
"""How cached features are stored: in the dtype they are computed in, or in bfloat16 (half the memory)."""
MASK_LOSSES = ("focal", "bce")
LOSS_RESOLUTIONS = ("full", "native", "points")
"""Where the mask loss is computed: on logits upsampled to the model input (SAM 2's training), at the decoder's own
output resolution (a quarter of it per side), or at points sampled around the uncertain ones (PointRend)."""
LOSS_FRAMES = ("last", "all")
"""Annotated frames of a video clip in its loss: the last one only (the sparse-annotation setting) or all."""


class ConfigError(DataError):
    """Settings that cannot work together or on this machine (the message names the flags and the fix)."""


def check_report_to(report_to: str) -> None:
    """Raise `ConfigError` when `report_to` names an unknown tracker or one whose package is missing: Accelerate
    would drop it with a debug line and the run would train untracked."""
    from accelerate.utils import is_tensorboard_available, is_wandb_available  # accelerate imports torch

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


def default_num_workers(cores: int | None = None) -> int:
    """DataLoader workers for a machine with `cores` usable cores (default: this process's): 0 with 1-2 cores,
    where workers compete with the training step for the same cores, else `min(4, cores // 2)`."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 0 if cores <= 2 else min(4, cores // 2)


CPU_PROMPT_CHUNK = 4


def default_prompt_chunk(device_type: str) -> int:
    """Prompts per decoder chunk on a device: `CPU_PROMPT_CHUNK` on CPU, where big batches of prompts run out of
    the caches, and all at once (0) on accelerators, which want big batches (not measured: no GPU here)."""
    return CPU_PROMPT_CHUNK if device_type == "cpu" else 0


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class TrainingConfig:
    """Optimisation, evaluation, checkpointing and caching of one run (the data, the task and the method are
    configured apart)."""

    _argument_group_name = "training"

    output_dir: str = field(default="outputs/run", metadata=_help("Folder of the run: adapter, metrics, pictures."))
    max_steps: int | None = field(default=None, metadata=_help("Optimizer steps in all (overrides --epochs)."))
    epochs: int = field(default=10, metadata=_help("Passes over the training set when --max-steps is not given."))
    batch_size: int = field(
        default=2, metadata=_help("Images per process per micro-step (each brings up to --max-objects prompts).")
    )
    grad_accum: int = field(default=1, metadata=_help("Micro-steps accumulated per optimizer step."))
    lr: float = field(default=1e-4, metadata=_help("Peak learning rate (each recipe sets its method's default)."))
    weight_decay: float = field(default=1e-4, metadata=_help("AdamW weight decay."))
    warmup_ratio: float = field(
        default=0.1, metadata=_help("Linear warm-up over this fraction of the steps, then cosine decay to zero.")
    )
    max_grad_norm: float = field(default=1.0, metadata=_help("Gradient clipping norm."))
    mixed_precision: str | None = field(
        default=None,
        metadata=_help(
            "no, fp16 (dynamic loss scaling) or bf16. Default: Accelerate's choice (accelerate launch "
            "--mixed_precision, accelerate config), else no.",
            choices=MIXED_PRECISION,
        ),
    )
    seed: int = field(default=0, metadata=_help("Seed of every random draw (also of the adapter's initialisation)."))
    eval_every: int = field(default=0, metadata=_help("Evaluate and checkpoint every N steps (0 = each epoch)."))
    keep_best: int = field(default=3, metadata=_help("Checkpoints kept by validation score (plus the latest)."))
    load_best: bool = field(
        default=True,
        metadata=_help(
            "End with the fine-tuned evaluation that scored best (the task's metric, e.g. Dice; the earliest of equal "
            "ones) as the adapter, not the last steps' (--no-load-best keeps the last). The base model's own "
            "step-0 score is never kept: a run that does not beat it says so."
        ),
    )
    resume: str | None = field(
        default=None,
        metadata=_help("Resume: 'latest' (alone: --resume) or a checkpoint folder.", nargs="?", const="latest"),
    )
    overwrite: bool = field(
        default=False, metadata=_help("Replace a previous run in --output-dir (deletes its checkpoints).")
    )
    max_nonfinite_steps: int = field(
        default=5, metadata=_help("Consecutive NaN/infinite losses tolerated (each skipped) before the run stops.")
    )
    log_every: int = field(default=10, metadata=_help("Log training losses every N steps."))
    report_to: str = field(
        default="tensorboard", metadata=_help("Tracker (wandb needs the 'trackers' extra).", choices=TRACKERS)
    )
    num_workers: int | None = field(
        default=None,
        metadata=_help(
            "DataLoader worker processes (kept alive between epochs). Default: 0 on machines with 1-2 cores (workers "
            "there compete with the training step for the same cores), else min(4, cores // 2). The batches are the "
            "same with any number."
        ),
    )
    num_panels: int = field(
        default=4,
        metadata=_help(
            "Validation images drawn side by side (image | ground truth | base | fine-tuned) per evaluation."
        ),
    )
    cache_embeddings: bool = field(
        default=True,
        metadata=_help("Cache the frozen image encoder's outputs (--no-cache-embeddings re-encodes every step)."),
    )
    cache_dir: str | None = field(
        default=None, metadata=_help("Keep cached features on disk here (memory-mapped, reused by later runs).")
    )
    cache_memory_gb: float = field(
        default=8.0, metadata=_help("Memory budget of cached features (beyond it: --cache-dir, or re-encoding).")
    )
    cache_views: int = field(
        default=4, metadata=_help("With augmentation and the cache: fixed augmented views encoded per image.")
    )
    prompt_chunk: int | None = field(
        default=None,
        metadata=_help(
            "With the embedding cache: prompts decoded and back-propagated together, chunk after chunk (the same "
            "gradients; a working set that does not grow with the objects per image). 0: all at once. Default: 4 on "
            "CPU, all at once on a GPU."
        ),
    )
    cache_dtype: str = field(
        default="auto",
        metadata=_help(
            "Store cached features as computed (auto: the base dtype, or the autocast dtype) or in bfloat16 (half "
            "the memory per view).",
            choices=CACHE_DTYPES,
        ),
    )

    def __post_init__(self) -> None:
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got '{self.mixed_precision}'.")
        if self.cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"cache_dtype must be one of {CACHE_DTYPES}, got '{self.cache_dtype}'.")
        for name in ("batch_size", "grad_accum", "epochs", "cache_views"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.prompt_chunk is not None and self.prompt_chunk < 0:
            raise ValueError(f"prompt_chunk must be 0 or more, got {self.prompt_chunk}.")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"num_workers must be 0 or more, got {self.num_workers}.")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {self.max_steps}.")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LossConfig:
    """Weights and forms of the loss terms (defaults as in SAM 2's training)."""

    _argument_group_name = "loss"

    mask_loss: str = field(
        default="focal",
        metadata=_help(
            "focal, or bce (class-balanced binary cross-entropy: helps from-scratch training avoid all-background; "
            "the default of multi-class PTSAM on semantic label maps).",
            choices=MASK_LOSSES,
        ),
    )
    mask_weight: float = field(default=20.0, metadata=_help("Weight of the focal/BCE mask term."))
    dice_weight: float = field(default=1.0, metadata=_help("Weight of the Dice term."))
    iou_weight: float = field(default=1.0, metadata=_help("Weight of the IoU-prediction term."))
    object_score_weight: float = field(default=1.0, metadata=_help("Weight of the object-score term."))
    focal_alpha: float = field(default=0.25, metadata=_help("Focal loss alpha."))
    focal_gamma: float = field(default=2.0, metadata=_help("Focal loss gamma."))
    loss_resolution: str = field(
        default="full",
        metadata=_help(
            "full: logits upsampled to the model input (SAM 2's training); native: at the decoder's output (1/4 per "
            "side, targets averaged down); points: at --loss-points points per mask, most of them where the "
            "prediction is least certain (PointRend, Mask2Former).",
            choices=LOSS_RESOLUTIONS,
        ),
    )
    loss_points: int = field(default=112 * 112, metadata=_help("Points per mask with --loss-resolution points."))
    loss_chunk: int = field(
        default=4,
        metadata=_help(
            "Prompts whose full-resolution loss is computed (and recomputed for the backward pass) together: "
            "bounds the loss's memory at any number of prompts; 0 computes all at once and keeps it for the "
            "backward pass."
        ),
    )

    def __post_init__(self) -> None:
        if self.mask_loss not in MASK_LOSSES:
            raise ValueError(f"mask_loss must be one of {MASK_LOSSES}, got '{self.mask_loss}'.")
        if self.loss_resolution not in LOSS_RESOLUTIONS:
            raise ValueError(f"loss_resolution must be one of {LOSS_RESOLUTIONS}, got '{self.loss_resolution}'.")
        if self.loss_points < 1 or self.loss_chunk < 0:
            raise ValueError(
                f"loss_points must be >= 1 and loss_chunk >= 0, got {self.loss_points}, {self.loss_chunk}."
            )
