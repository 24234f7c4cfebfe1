"""A differentiable SAM 2 video forward: a prompt on a clip's first frame, masks on every frame through memory.

transformers' `Sam2VideoModel.forward` and `propagate_in_video_iterator` run under `torch.inference_mode()`, store
memories in bfloat16 and only return object scores in eval mode, so they cannot train. `Sam2VideoTracker` drives the
same per-frame steps itself, in the same order, with gradients: image encoder -> memory attention over the memory bank
(`_prepare_memory_conditioned_features`, reused as is) -> prompt encoder and mask decoder -> object pointer -> memory
encoder. Objects are tracked one by one on shared image features, exactly as the inference session does, so the
training forward and the model users run agree (tested to 1e-4 against `propagate_in_video_iterator`).

The same steps drive the family's other video models: `Sam3TrackerVideoModel` (SAM 2's memory as is) and
`EdgeTamVideoModel`, whose memory encoder output passes through a spatial perceiver that resamples it to a few latent
tokens; each agrees bit for bit with its own `propagate_in_video_iterator` (tests/test_families.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Sam2VideoModel
from transformers.models.sam2_video.modeling_sam2_video import NO_OBJ_SCORE

from .segmenter import unwrap_sam

logger = logging.getLogger(__name__)


@dataclass
class ClipPrompt:
    """The prompt for N objects on a clip's first frame: points/boxes, or masks (not both).

    Attributes:
        points: `(N, P, 2)` points in model-input pixels (a box is two corners labelled 2 and 3).
        point_labels: `(N, P)` long labels (1 positive, 0 negative, 2/3 box corners, -10 padding).
        masks: `(N, H, W)` binary masks; resized to the model input size as transformers' processor does.
    """

    points: torch.Tensor | None = None
    point_labels: torch.Tensor | None = None
    masks: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.points is None) == (self.masks is None):
            raise ValueError("A clip prompt needs exactly one of points (with point_labels) or masks.")
        if (self.points is None) != (self.point_labels is None):
            raise ValueError("points and point_labels go together.")

    @property
    def num_objects(self) -> int:
        return len(self.points if self.points is not None else self.masks)


@dataclass
class FrameOutput:
    """Predictions for N objects on one frame.

    Attributes:
        mask_logits: `(N, M, S/4, S/4)` every candidate mask (M = 3 where SAM 2 uses multimask output, else 1).
        iou_scores: `(N, M)` predicted IoU of each candidate.
        object_score_logits: `(N, 1)` logit that the object is visible.
        pred_masks: `(N, 1, S/4, S/4)` the candidate the model keeps (best predicted IoU) and writes to memory;
            a constant `NO_OBJ_SCORE` where the object score is not positive.
        from_mask_prompt: the frame's masks are the mask prompt itself (nothing to train on this frame).
        memory_frames: frames held in each object's memory bank after this one (bounded by the bank's window).
    """

    mask_logits: torch.Tensor
    iou_scores: torch.Tensor
    object_score_logits: torch.Tensor
    pred_masks: torch.Tensor
    from_mask_prompt: bool = False
    memory_frames: int = 0


@dataclass
class _MemoryBank:
    """What `Sam2VideoModel._prepare_memory_conditioned_features` reads from an inference session, for one object."""

    dtype: torch.dtype = torch.float32
    output_dict_per_obj: dict = field(
        default_factory=lambda: {0: {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}}
    )

    @property
    def outputs(self) -> dict:
        return self.output_dict_per_obj[0]

    def __len__(self) -> int:
        return len(self.outputs["cond_frame_outputs"]) + len(self.outputs["non_cond_frame_outputs"])

    def forget_before(self, frame_idx: int) -> None:
        """Drop tracked frames older than `frame_idx` (no longer reachable by memory or pointers)."""
        tracked = self.outputs["non_cond_frame_outputs"]
        for old in [t for t in tracked if t < frame_idx]:
            del tracked[old]


class Sam2VideoTracker(nn.Module):
    """Tracks N prompted objects through `T` frames of one clip, differentiably.

    Args:
        sam: a `Sam2VideoModel`, plain or peft-wrapped (adapters act because their modules are called).
        memory_dtype: round stored memory features to this dtype (transformers' inference stores bfloat16);
            None keeps them as computed (training).
    """

    def __init__(self, sam: nn.Module, memory_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.sam = sam
        self.memory_dtype = memory_dtype

    @property
    def base(self) -> Sam2VideoModel:
        return unwrap_sam(self.sam)

    def forward(self, pixel_values: torch.Tensor, prompt: ClipPrompt) -> list[FrameOutput]:
        """Predict every frame of a clip. `pixel_values`: `(T, 3, S, S)` preprocessed frames, prompt on frame 0."""
        return list(self.track(pixel_values, prompt, num_frames=len(pixel_values)))

    def track(
        self,
        frames: Iterable[torch.Tensor],
        prompt: ClipPrompt,
        num_frames: int | None = None,
        keep_memory_of_last: bool = False,
    ) -> Iterator[FrameOutput]:
        """Yield one `FrameOutput` per frame of `frames` (`(3, S, S)` each), the prompt applying to the first.

        Args:
            num_frames: the clip length, as transformers uses it to scale object-pointer positions; None when
                streaming a video of unknown length. Either way frames are consumed one by one and only the frames
                that memory can still reach are kept, so the bank's size, not the video's length, bounds memory.
            keep_memory_of_last: also encode the memory of the final frame (needed only to continue tracking).

        The bound holds without gradients (inference: `torch.no_grad()`, as `VideoPredictor` runs it). With gradients
        enabled and trainable parameters, every frame's activations stay reachable through the memory for the
        backward pass, so memory grows with the video; streaming that way gets a warning.
        """
        base = self.base
        streaming = num_frames is None
        if streaming and torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            logger.warning(
                "Streaming a video with gradients enabled: every frame's activations are kept for backward, so memory "
                "grows with the video's length. Wrap inference in torch.no_grad() (VideoPredictor does)."
            )
        banks = [_MemoryBank() for _ in range(prompt.num_objects)]
        window = max(base.num_maskmem, base.config.max_object_pointers_in_encoder)
        frames = iter(frames)
        current = next(frames, None)
        frame_idx = 0
        while current is not None:
            following = next(frames, None)
            vision_feats, vision_pos = self._frame_features(current)
            outputs = [
                self._track_object(bank, frame_idx, vision_feats, vision_pos, prompt, index, num_frames, streaming)
                for index, bank in enumerate(banks)
            ]
            if following is not None or keep_memory_of_last:
                self._encode_memories(banks, frame_idx, vision_feats[-1], outputs, from_prompt=frame_idx == 0)
            for bank in banks:  # memory stays bounded by the bank size, whatever the video length
                bank.forget_before(frame_idx - window)
            yield FrameOutput(
                mask_logits=torch.cat([o["mask_logits"] for o in outputs]),
                iou_scores=torch.cat([o["iou_scores"] for o in outputs]),
                object_score_logits=torch.cat([o["object_score_logits"] for o in outputs]).view(-1, 1),
                pred_masks=torch.cat([o["pred_masks"] for o in outputs]),
                from_mask_prompt=frame_idx == 0 and prompt.masks is not None,
                memory_frames=len(banks[0]),
            )
            current, frame_idx = following, frame_idx + 1

    # ------------------------------------------------------------------------------------------------ steps

    def _frame_features(self, frame: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Encoder features of one `(3, S, S)` frame as `(HW, 1, C)` sequences (decoder convs applied), and positions."""
        outputs = self.base.get_image_features(frame[None], return_dict=True)
        return outputs.fpn_hidden_states, outputs.fpn_position_encoding

    def _track_object(
        self,
        bank: _MemoryBank,
        frame_idx: int,
        vision_feats: list[torch.Tensor],
        vision_pos: list[torch.Tensor],
        prompt: ClipPrompt,
        index: int,
        num_frames: int | None,
        streaming: bool,
    ) -> dict[str, torch.Tensor]:
        """One object on one frame, as `Sam2VideoModel._run_single_frame_inference` does; stores it in `bank`."""
        base = self.base
        is_prompt_frame = frame_idx == 0
        high_res = [
            x.permute(1, 2, 0).view(1, x.size(2), *s) for x, s in zip(vision_feats[:-1], base.backbone_feature_sizes)
        ]
        if is_prompt_frame and prompt.masks is not None:
            pix_feat = vision_feats[-1].permute(1, 2, 0).view(1, base.hidden_dim, *base.backbone_feature_sizes[-1])
            mask = self._mask_prompt(prompt.masks[index], pix_feat.dtype)
            sam = base._use_mask_as_output(pix_feat, high_res, mask)
            out = {
                "mask_logits": sam.pred_masks,
                "iou_scores": sam.iou_scores,
                "object_score_logits": sam.object_score_logits,
                "pred_masks": sam.pred_masks,
                "high_res_masks": sam.high_res_masks,
                "object_pointer": sam.object_pointer,
            }
        else:
            pix_feat = base._prepare_memory_conditioned_features(
                inference_session=bank,
                frame_idx=frame_idx,
                obj_idx=0,
                is_initial_conditioning_frame=is_prompt_frame,
                current_vision_features=vision_feats[-1],
                current_vision_positional_embeddings=vision_pos[-1],
                num_total_frames=num_frames,
                streaming=streaming,
            )
            points = labels = None
            if is_prompt_frame:
                points = prompt.points[index][None, None].to(pix_feat.dtype)
                labels = prompt.point_labels[index][None, None].int()
            multimask = base._use_multimask(is_prompt_frame, None if labels is None else {"point_labels": labels})
            out = self._decode(high_res + [pix_feat], points, labels, multimask)
        storage = "cond_frame_outputs" if is_prompt_frame else "non_cond_frame_outputs"
        bank.outputs[storage][frame_idx] = {"object_pointer": out["object_pointer"]}
        return out

    def _mask_prompt(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`(H, W)` binary -> `(1, 1, S, S)` float at the model size, as `Sam2VideoProcessor` prepares mask inputs."""
        mask = mask.float()[None, None]
        size = self.base.image_size
        if mask.shape[-2:] != (size, size):
            mask = F.interpolate(mask, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            mask = (mask >= 0.5).float()
        return mask.to(dtype)

    def _decode(
        self,
        image_embeddings: list[torch.Tensor],
        points: torch.Tensor | None,
        labels: torch.Tensor | None,
        multimask_output: bool,
    ) -> dict[str, torch.Tensor]:
        """Prompt encoder + mask decoder on memory-conditioned features, as `Sam2VideoModel._single_frame_forward`,
        but returning every candidate mask (the loss trains the best of them)."""
        base = self.base
        positional = base.get_image_wide_positional_embeddings()
        if points is None:
            points = torch.zeros(1, 1, 1, 2, dtype=image_embeddings[-1].dtype, device=image_embeddings[-1].device)
            labels = -torch.ones(1, 1, 1, dtype=torch.int32, device=image_embeddings[-1].device)
        sparse, dense = base.prompt_encoder(
            input_points=points, input_labels=labels, input_boxes=None, input_masks=None
        )
        masks, iou_scores, tokens, object_score_logits = base.mask_decoder(
            image_embeddings=image_embeddings[-1],
            image_positional_embeddings=positional,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            high_resolution_features=image_embeddings[:-1],
        )
        appearing = object_score_logits > 0
        masks = torch.where(appearing[:, None, None], masks, NO_OBJ_SCORE)[:, 0]  # (1, M, h, w)
        iou_scores = iou_scores[:, 0]
        best = iou_scores.argmax(dim=-1) if multimask_output else torch.zeros(1, dtype=torch.long, device=masks.device)
        pred_masks = masks[torch.arange(1), best][:, None]
        # every candidate is upsampled before the choice, as transformers does
        high_res_masks = F.interpolate(
            masks.float(), size=(base.image_size, base.image_size), mode="bilinear", align_corners=False
        ).to(masks.dtype)[torch.arange(1), best][:, None]
        token = tokens[:, :, best[0] if tokens.size(2) > 1 else 0]  # (1, 1, C)
        pointer = base.object_pointer_proj(token)
        weight = appearing.to(pointer.dtype)
        pointer = weight * pointer + (1 - weight) * base.no_object_pointer
        return {
            "mask_logits": masks,
            "iou_scores": iou_scores,
            "object_score_logits": object_score_logits[:, 0],
            "pred_masks": pred_masks,
            "high_res_masks": high_res_masks,
            "object_pointer": pointer,
        }

    def _encode_memories(
        self,
        banks: list[_MemoryBank],
        frame_idx: int,
        top_feats: torch.Tensor,
        outputs: list[dict[str, torch.Tensor]],
        from_prompt: bool,
    ) -> None:
        """Memory encoder on every object's kept mask at once, as `Sam2VideoModel._encode_new_memory`, storing the
        `(HW, 1, C_mem)` memory of each object in its bank (rounded to `memory_dtype` if set).

        EdgeTAM's memory goes object by object through `EdgeTamVideoModel._encode_new_memory` itself, as its forward
        calls it: the memory encoder, then the spatial perceiver that resamples the map to `(1, L, C_mem)` latent
        tokens."""
        base, config = self.base, self.base.config
        storage = "cond_frame_outputs" if from_prompt else "non_cond_frame_outputs"
        if getattr(base, "spatial_perceiver", None) is not None:
            for bank, out in zip(banks, outputs):
                features, positions = base._encode_new_memory(
                    current_vision_feats=top_feats,
                    pred_masks_high_res=out["high_res_masks"],
                    object_score_logits=out["object_score_logits"],
                    is_mask_from_pts=from_prompt,
                )
                if self.memory_dtype is not None:
                    features = features.to(self.memory_dtype)
                entry = bank.outputs[storage][frame_idx]
                entry["maskmem_features"], entry["maskmem_pos_enc"] = features, positions
            return
        masks = torch.cat([o["high_res_masks"] for o in outputs])
        scores = torch.cat([o["object_score_logits"] for o in outputs]).view(-1, 1, 1, 1)
        size = tuple(4 * s for s in base.prompt_encoder.mask_input_size)
        if masks.shape[-2:] != size:
            masks = F.interpolate(masks.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
        height, width = base.backbone_feature_sizes[-1]
        pix_feat = top_feats.permute(1, 2, 0).view(1, base.hidden_dim, height, width).expand(len(banks), -1, -1, -1)
        # SAM 2 binarises prompted masks at inference only; training keeps them soft
        mask_for_mem = (masks > 0).to(masks.dtype) if from_prompt and not base.training else masks.sigmoid()
        mask_for_mem = mask_for_mem * config.sigmoid_scale_for_mem_enc + config.sigmoid_bias_for_mem_enc
        features, positions = base.memory_encoder(pix_feat, mask_for_mem)
        if base.occlusion_spatial_embedding_parameter is not None:
            hidden = (scores <= 0).to(features.dtype)
            features = features + hidden * base.occlusion_spatial_embedding_parameter[..., None, None]
        if self.memory_dtype is not None:
            features = features.to(self.memory_dtype)
        features = features.flatten(2).permute(2, 0, 1)
        positions = positions.to(masks.dtype).flatten(2).permute(2, 0, 1)
        for i, bank in enumerate(banks):
            entry = bank.outputs[storage][frame_idx]
            entry["maskmem_features"] = features[:, i : i + 1]
            entry["maskmem_pos_enc"] = positions[:, i : i + 1]
