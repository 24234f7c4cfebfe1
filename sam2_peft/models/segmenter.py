"""One forward for training and evaluation: image encoder once per image, mask decoder once per prompt.

`Sam2Segmenter` wraps a `Sam2Model` (plain, or with peft adapters injected) and runs it on a flat batch of prompts
spread over a batch of images. The encoder step is split off so that frozen-encoder training can cache it, at one of
two points: the encoder's FPN maps (`vision_features`, 84 MiB per 1024 px image in float32), when the decoder's
`conv_s0/conv_s1` projections train; or the decoder's inputs after those projections (`image_embeddings`, 16 MiB),
when they are frozen too (`decoder_inputs_frozen`: decoder LoRA, PTSAM).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import Sam2Model

from ..tuners.ptsam.layer import ptsam_classes
from .clicks import add_correction_clicks


@dataclass
class SegmenterOutput:
    """Predictions for N prompts.

    Attributes:
        mask_logits: `(N, M, S/4, S/4)` low-resolution mask logits (M = 3 with multimask output, else 1).
        iou_scores: `(N, M)` predicted IoU of each mask.
        object_score_logits: `(N, 1)` logit that the prompted object is present.
        corrections: the predictions of each correction round, when asked for (interactive training).
    """

    mask_logits: torch.Tensor
    iou_scores: torch.Tensor
    object_score_logits: torch.Tensor
    corrections: list[SegmenterOutput] = field(default_factory=list)


def unwrap_sam(model: nn.Module) -> Sam2Model:
    """The `Sam2Model` inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class Sam2Segmenter(nn.Module):
    """Runs SAM 2 on `(B, 3, S, S)` images and N prompts, `object_image_index[n]` naming each prompt's image."""

    def __init__(self, sam: nn.Module) -> None:
        super().__init__()
        self.sam = sam

    @property
    def base(self) -> Sam2Model:
        return unwrap_sam(self.sam)

    def vision_features(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The image encoder's multi-scale features `[(B, C, S/4, S/4), (B, C, S/8, S/8), (B, C, S/16, S/16)]`.

        They depend only on the image and the encoder's weights, so they can be cached while the encoder is frozen.
        """
        return list(self.base.vision_encoder(pixel_values).fpn_hidden_states)

    def decoder_inputs_frozen(self) -> bool:
        """Whether everything between the encoder and the decoder's transformer (`conv_s0`, `conv_s1`,
        `no_memory_embedding`) is frozen, so that an image's `image_embeddings` never change while training."""
        base = self.base
        projections = [*base.mask_decoder.conv_s0.parameters(), *base.mask_decoder.conv_s1.parameters()]
        return not any(p.requires_grad for p in [*projections, base.no_memory_embedding])

    def image_embeddings(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Turn encoder features into the decoder's inputs, exactly as `Sam2Model.get_image_embeddings` does."""
        base = self.base
        high_res_0 = base.mask_decoder.conv_s0(features[0])
        high_res_1 = base.mask_decoder.conv_s1(features[1])
        lowest = features[2] + base.no_memory_embedding.view(1, -1, 1, 1)
        return [high_res_0, high_res_1, lowest]

    def forward(
        self,
        object_image_index: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        vision_features: list[torch.Tensor] | None = None,
        image_embeddings: list[torch.Tensor] | None = None,
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        mask_inputs: torch.Tensor | None = None,
        multimask_output: bool = False,
        correction_rounds: int = 0,
        target_masks: torch.Tensor | None = None,
    ) -> SegmenterOutput:
        """Predict masks for N prompts.

        Args:
            object_image_index: `(N,)` long, the image of each prompt.
            pixel_values: `(B, 3, S, S)` preprocessed images; or give their cached `vision_features` or
                `image_embeddings` (the decoder's inputs, valid while `decoder_inputs_frozen()`).
            points: `(N, P, 2)` prompt points in model-input pixels (boxes as two corners labelled 2 and 3).
            point_labels: `(N, P)` long; None with `points` None for prompt-free prediction.
            mask_inputs: `(N, 1, S/4, S/4)` dense mask prompts (logits), optional.
            multimask_output: return the 3 candidate masks instead of the single-mask output.
            correction_rounds: after the first prediction, this many rounds of SAM-style interactive training: a
                click in the largest error region against `target_masks` `(N, S, S)` is added to the prompts and
                the previous mask is fed back as a mask prompt. All rounds share one image encoding.
        """
        if sum(x is not None for x in (pixel_values, vision_features, image_embeddings)) != 1:
            raise ValueError("Give exactly one of pixel_values, vision_features or image_embeddings.")
        if correction_rounds and target_masks is None:
            raise ValueError("Correction rounds need target_masks to click on.")
        if pixel_values is not None:
            vision_features = self.vision_features(pixel_values)
        per_image = image_embeddings if image_embeddings is not None else self.image_embeddings(vision_features)
        per_object = [embedding[self._decoded_rows(object_image_index, points)] for embedding in per_image]
        output = self._decode(per_object, points, point_labels, mask_inputs, multimask_output)
        previous = output
        for _ in range(correction_rounds):
            best = select_best_mask(previous)
            points, point_labels = add_correction_clicks(points, point_labels, best, target_masks)
            previous = self._decode(per_object, points, point_labels, best.detach(), False)
            output.corrections.append(previous)
        return output

    def _decoded_rows(self, object_image_index: torch.Tensor, points: torch.Tensor | None) -> torch.Tensor:
        """The image of each decoder row: every prompt's, or, for a prompt-free multi-class PTSAM adapter (whose rows
        come as each image repeated once per class), each image once, its classes decoded together."""
        classes = ptsam_classes(self.sam) if points is None else 1
        if classes == 1:
            return object_image_index
        rows = object_image_index[::classes]
        if (
            len(object_image_index) != classes * len(rows)
            or not (object_image_index.view(-1, classes) == rows[:, None]).all()
        ):
            raise ValueError(f"A {classes}-class PTSAM adapter needs each image's rows repeated once per class.")
        return rows

    def _decode(
        self,
        per_object: list[torch.Tensor],
        points: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        mask_inputs: torch.Tensor | None,
        multimask_output: bool,
    ) -> SegmenterOutput:
        outputs = self.sam(
            image_embeddings=per_object,
            input_points=None if points is None else points[:, None],
            input_labels=None if point_labels is None else point_labels[:, None],
            input_masks=mask_inputs,
            multimask_output=multimask_output,
        )
        return SegmenterOutput(
            mask_logits=outputs.pred_masks.flatten(0, 1),  # (rows, prompts or classes, ...): one per prompt
            iou_scores=outputs.iou_scores.flatten(0, 1),
            object_score_logits=outputs.object_score_logits.flatten(0, 1),
        )


def wants_multimask(point_labels: torch.Tensor | None) -> bool:
    """SAM's rule: a single positive click is ambiguous, so ask for 3 candidates; boxes and several points are not."""
    return point_labels is not None and point_labels.shape[1] == 1 and bool((point_labels == 1).all())


def select_best_mask(output: SegmenterOutput) -> torch.Tensor:
    """The candidate with the highest predicted IoU for each prompt. Returns `(N, 1, h, w)` logits."""
    best = output.iou_scores.argmax(dim=1)
    return output.mask_logits[torch.arange(len(best)), best][:, None]
