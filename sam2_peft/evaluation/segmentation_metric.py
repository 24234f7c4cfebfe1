"""The mask metrics as a Hugging Face `evaluate` module.

import evaluate
from sam2_peft.evaluation import segmentation_metric
metric = evaluate.load(segmentation_metric.__file__)
metric.compute(predictions=[pred_mask, ...], references=[true_mask, ...])   # (H, W) masks, one object each
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

from sam2_peft.evaluation.metrics import METRIC_NAMES, object_metrics

_DESCRIPTION = (
    "IoU, Dice, boundary IoU (Cheng et al., CVPR 2021; boundary width = dilation_ratio x image diagonal) and pixel "
    "accuracy of binary masks, one object per prediction/reference pair, averaged over pairs."
)

_KWARGS = """
Args:
    predictions: list of (H, W) binary masks (0/1 or bool), one object each.
    references: list of (H, W) binary masks of the same sizes.
    dilation_ratio: boundary width as a fraction of the image diagonal (default 0.02).
    per_object: also return each pair's scores under "per_object".
Returns:
    iou, dice, boundary_iou, pixel_accuracy: means over the pairs.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Sam2Segmentation(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        mask = datasets.Sequence(datasets.Sequence(datasets.Value("uint8")))
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Cheng et al., Boundary IoU: Improving Object-Centric Image Segmentation Evaluation, CVPR 2021",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": mask, "references": mask}),
        )

    def _compute(
        self, predictions, references, dilation_ratio: float = 0.02, per_object: bool = False
    ) -> dict[str, float | list]:
        scores = []
        for prediction, reference in zip(predictions, references):
            prediction, reference = np.asarray(prediction, dtype=bool), np.asarray(reference, dtype=bool)
            if prediction.shape != reference.shape:
                raise ValueError(f"Prediction shape {prediction.shape} differs from reference shape {reference.shape}.")
            scores.append(object_metrics(prediction, reference, dilation_ratio))
        result: dict[str, float | list] = {name: float(np.mean([s[name] for s in scores])) for name in METRIC_NAMES}
        if per_object:
            result["per_object"] = scores
        return result
