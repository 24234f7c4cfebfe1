"""The data settings as plain dataclasses (no torch import): which objects are checked and kept, how training
prompts are drawn, how images are augmented. Each field's help is its command-line help: the recipes parse these
classes directly (`HfArgumentParser`), so every data flag is declared here once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

SAMPLE_DATA = Path(__file__).resolve().parent / "sample"
"""The small synthetic dataset bundled with the package (the recipes' default `--data`)."""

PROMPT_TYPES = ("box", "point", "mixed", "none")
TARGET_MODES = ("instances", "semantic")


@dataclass
class ValidationConfig:
    """What counts as a usable sample."""

    _argument_group_name = "data checks"

    min_object_area: int = field(
        default=50,
        metadata={"help": "Drop objects smaller than this (pixels, after closing); an image left without objects is "
                  "skipped."},
    )  # fmt: skip
    closing_radius: int = field(
        default=0, metadata={"help": "Radius (pixels) of a morphological closing of every object mask (0 = off)."}
    )
    skip_bad_files: bool = field(
        default=False,
        metadata={"help": "Skip unreadable or mis-sized samples, counting them (else stop with an error naming the "
                  "file)."},
    )  # fmt: skip
    num_threads: int = field(default=4, metadata={"help": "Threads that decode samples while they are checked."})


@dataclass
class PromptConfig:
    """How training prompts are drawn from each object's mask (`data.prompts` draws them)."""

    _argument_group_name = "prompts"

    prompt: str = field(
        default="box",
        metadata={
            "help": "Training prompt: box, point, mixed (box or points, chosen per image) or none (prompt-free, e.g. "
            "PTSAM). Evaluation uses tight boxes, fixed points, or none accordingly.",
            "choices": PROMPT_TYPES,
        },
    )
    box_jitter: float = field(
        default=0.1, metadata={"help": "Std of the noise on each box coordinate, as a fraction of the box side."}
    )
    max_box_jitter_px: float = field(default=20.0, metadata={"help": "Cap on that noise in original-image pixels."})
    num_positive_points: int = field(
        default=1, metadata={"help": "Positive points per object for point prompts.", "aliases": ["--num-points"]}
    )
    num_negative_points: int = field(default=0, metadata={"help": "Negative points per object."})
    mask_prompt_probability: float = field(
        default=0.0,
        metadata={
            "help": "Chance, per training step, that the objects also get their ground-truth mask as a dense prompt "
            "(+-10 logits); never in evaluation.",
            "aliases": ["--mask-prompt-prob"],
        },
    )
    correction_rounds: int = field(
        default=0,
        metadata={"help": "Interactive correction rounds per training step (a click in the largest error, the "
                  "previous mask fed back), as SAM trains."},
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.prompt not in PROMPT_TYPES:
            raise ValueError(f"prompt must be one of {PROMPT_TYPES}, got '{self.prompt}'.")
        if self.prompt in ("point", "mixed") and self.num_positive_points < 1:
            raise ValueError("num_positive_points must be at least 1 for point prompts.")


@dataclass
class AugmentationConfig:
    """Training augmentation; every probability 0 (or `augment=False`) turns it off."""

    _argument_group_name = "augmentation"

    augment: bool = field(default=True, metadata={"help": "Augment training images (--no-augment turns it off)."})
    horizontal_flip: float = field(default=0.5, metadata={"help": "Probability of a horizontal flip."})
    vertical_flip: float = field(default=0.5, metadata={"help": "Probability of a vertical flip."})
    color_jitter: float = field(default=0.8, metadata={"help": "Probability of brightness/contrast/saturation jitter."})
    color_jitter_strength: float = field(
        default=0.2,
        metadata={"help": "Each jitter factor is drawn from [1 - strength, 1 + strength] (0.8 also gives dim, "
                  "low-contrast images)."},
    )  # fmt: skip
    blur: float = field(default=0.2, metadata={"help": "Probability of a light Gaussian blur (sigma 0.1-1.5)."})
    affine: float = field(
        default=0.5,
        metadata={"help": "Probability of a small shift-scale-rotate (5 %% shift, 0.9-1.1 scale, 10 degrees)."},
    )


@dataclass
class DatasetConfig:
    """How samples become model inputs and targets (built by the recipes from the parsed settings above)."""

    target_mode: str = "instances"
    """`instances`: one prompt and target per object; `semantic`: the union of all objects, one target per image."""
    max_objects_per_image: int = 16
    """Objects drawn per training image per step (a random subset when there are more)."""
    max_eval_objects: int = 64
    """Objects evaluated per validation image (the first ones, deterministically)."""
    prompts: PromptConfig = field(default_factory=PromptConfig)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    class_ids: tuple[int, ...] | None = None
    """The classes the data names (mask values, COCO category ids). With `semantic` targets: one target per class,
    the pixels of each of these values (multi-class PTSAM). With `instances` targets: evaluation items carry each
    object's class (`object_classes`), so that the objects' scores are grouped by class too."""
    ignore_index: int | None = None
    """With `class_ids`: the mask value whose pixels no loss or metric counts."""

    def __post_init__(self) -> None:
        if self.target_mode not in TARGET_MODES:
            raise ValueError(f"target_mode must be one of {TARGET_MODES}, got '{self.target_mode}'.")

    @property
    def class_targets(self) -> bool:
        """One target per class (multi-class PTSAM), rather than one per object."""
        return self.class_ids is not None and self.target_mode == "semantic"
