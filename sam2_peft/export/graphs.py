"""The two ONNX graphs of an exported SAM 2 (transformers.js / Optimum layout) as `nn.Module`s over an adapted model.

`VisionEncoderGraph`: `pixel_values` -> `image_embeddings.0`, `.1` (the decoder's high-resolution features) and `.2`
(the image embedding). `PromptDecoderGraph`: those three, `input_points` `(B, P, N, 2)`, `input_labels` `(B, P, N)`
and `input_boxes` `(B, P or 0, 4)` -> `iou_scores`, `pred_masks`, `object_score_logits`. `PromptFreeDecoderGraph`:
the three embeddings alone (a PTSAM adapter's tokens are the prompt). With `input_masks` (`--mask-input`), the
prompt decoder also takes a previous mask's logits per image; `multimask_output` gives SAM 2's three masks.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.segmenter import unwrap_sam

EMBEDDING_NAMES = ("image_embeddings.0", "image_embeddings.1", "image_embeddings.2")
PROMPT_NAMES = ("input_points", "input_labels", "input_boxes")
MASK_INPUT_NAME = "input_masks"
OUTPUT_NAMES = ("iou_scores", "pred_masks", "object_score_logits")

BOX_CORNER_LABELS = (2, 3)
"""SAM's point labels of a box's top-left and bottom-right corners: a box embeds exactly as these two points."""


class VisionEncoderGraph(nn.Module):
    """The image encoder with the adapter inside (PTSAM encoder prompts, LoRA or partial weights)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.sam = unwrap_sam(model)
        self.eval()

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.sam.get_image_embeddings(pixel_values))


class PromptDecoderGraph(nn.Module):
    """Prompt encoder + mask decoder for P prompts per image, each of N points and an optional box.

    Boxes become their two corner points (labels 2 and 3) after the points, and the prompt encoder pads one
    not-a-point, which is the token sequence `Sam2Model.forward` builds for points, a box, or both: one graph serves
    every prompt kind without branching on whether boxes were given. `input_boxes` holds one box per prompt, or none
    (`(B, 0, 4)`); for boxes alone give `input_points` `(B, P, 0, 2)` or, as transformers.js does, `(B, 1, 0, 2)`:
    `input_labels` `(B, P, N)` gives the number of prompts.
    """

    def __init__(self, model: nn.Module, multimask_output: bool = False) -> None:
        super().__init__()
        self.model = model
        self.multimask_output = multimask_output
        self.eval()  # eval: SAM 2's single-mask output falls back to the best multimask one when unstable

    def forward(
        self, e0, e1, e2, input_points, input_labels, input_boxes, input_masks=None
    ) -> tuple[torch.Tensor, ...]:
        batch, prompts = input_labels.shape[:2]  # not input_points: transformers.js sends boxes alone as (B, 1, 0, 2)
        corners = input_boxes.reshape(batch, prompts, -1, 2)
        corner_labels = torch.tensor(BOX_CORNER_LABELS, dtype=input_labels.dtype).repeat(input_boxes.shape[1])
        points = torch.cat([input_points.reshape(batch, prompts, -1, 2), corners], dim=2)
        labels = torch.cat([input_labels, corner_labels.reshape(1, prompts, -1).expand(batch, -1, -1)], dim=2)
        outputs = self.model(
            image_embeddings=[e0, e1, e2],
            input_points=points,
            input_labels=labels,
            input_masks=input_masks,  # given: one previous mask's logits per image, (B, 1, S/4, S/4)
            multimask_output=self.multimask_output,
        )
        return outputs.iou_scores, outputs.pred_masks, outputs.object_score_logits


class PromptFreeDecoderGraph(nn.Module):
    """The mask decoder with a PTSAM adapter's tokens as its only prompt: one mask per image, no prompt input."""

    def __init__(self, model: nn.Module, multimask_output: bool = False) -> None:
        super().__init__()
        self.model = model
        self.multimask_output = multimask_output
        self.eval()

    def forward(self, e0, e1, e2) -> tuple[torch.Tensor, ...]:
        outputs = self.model(image_embeddings=[e0, e1, e2], multimask_output=self.multimask_output)
        return outputs.iou_scores, outputs.pred_masks, outputs.object_score_logits
