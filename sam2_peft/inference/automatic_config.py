"""The settings of automatic mask generation (`inference.automatic`) as a plain dataclass: no torch import, so
that commands build their flags from it quickly."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class AutomaticMaskConfig:
    """Settings of automatic mask generation (SAM's names and defaults where it has them)."""

    _argument_group_name = "automatic masks"

    points_per_side: int = field(default=32, metadata={"help": "Grid points per image side (grid mode)."})
    points_per_batch: int = field(default=64, metadata={"help": "Point prompts decoded together."})
    pred_iou_thresh: float = field(default=0.88, metadata={"help": "Keep masks whose predicted IoU is above this."})
    stability_score_thresh: float = field(
        default=0.95,
        metadata={"help": "Keep masks whose stability score (IoU of the mask at logit +-offset) is above this."},
    )
    stability_score_offset: float = field(default=1.0, metadata={"help": "Logit offset of the stability score."})
    nms_thresh: float = field(default=0.7, metadata={"help": "Box IoU above which the lower-scored mask is dropped."})
    crop_n_layers: int = field(default=0, metadata={"help": "Crop layers (layer i: (2^i)^2 crops) for small objects."})
    crop_overlap_ratio: float = field(default=512 / 1500, metadata={"help": "Overlap of crops, fraction of the side."})
    crop_n_points_downscale_factor: int = field(
        default=1, metadata={"help": "Points per side shrink by this per layer."}
    )
    min_area: int = field(default=0, metadata={"help": "Drop instances with fewer pixels (after overlaps resolved)."})
    cells_per_side: int = field(
        default=32, metadata={"help": "Specialist-guided mode: grid cells per side that split large foreground parts."}
    )
    max_side: int = field(
        default=0,
        metadata={"help": "Make masks at this longest side (image downscaled, labels scaled back; 0 = original size): "
                  "the model sees a small square input anyway, and full-size masks are most of the time on a CPU."},
    )  # fmt: skip
    clip_to_foreground: bool = field(
        default=False, metadata={"help": "Specialist-guided mode: cut each instance to the predicted foreground."}
    )
