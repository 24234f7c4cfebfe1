"""Load Meta's own SAM 2 / SAM 2.1 checkpoints (`*.pt` from facebookresearch/sam2) into transformers models.

Meta's `.pt` files hold a state dict for Meta's `SAM2Base`, and Meta describes the architecture in Hydra YAML
files. This module builds the matching transformers [`Sam2Config`] / [`Sam2VideoConfig`] from a Meta config name or
YAML file, renames the state-dict keys, checks every name and shape, and loads the weights. It never imports Meta's
`sam2` package.

Example:

```python
>>> from sam2_peft.models.meta_checkpoint import load_meta_checkpoint
>>> model = load_meta_checkpoint("sam2.1_hiera_tiny.pt", "sam2.1_hiera_t")  # Sam2Model
>>> video_model = load_meta_checkpoint("sam2.1_hiera_tiny.pt", "sam2.1_hiera_t", video=True)  # Sam2VideoModel
```
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import pickle
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import (
    Sam2Config,
    Sam2ImageProcessor,
    Sam2Model,
    Sam2Processor,
    Sam2VideoConfig,
    Sam2VideoModel,
    Sam2VideoProcessor,
)
from transformers.initialization import no_init_weights
from transformers.models.sam2_video.video_processing_sam2_video import (
    Sam2VideoVideoProcessor,
)

logger = logging.getLogger(__name__)

__all__ = [
    "META_CONFIG_NAMES",
    "MetaCheckpointError",
    "convert_meta_checkpoint",
    "load_meta_checkpoint",
    "main",
    "meta_state_dict_to_transformers",
    "transformers_config_from_meta",
]


class MetaCheckpointError(ValueError):
    """A Meta checkpoint or config cannot be converted; the message names the file, keys or settings at fault."""


# ---------------------------------------------------------------------------------------------------------------
# Meta configs
# ---------------------------------------------------------------------------------------------------------------

# Settings shared by the 8 official configs (`sam2/configs/sam2{,.1}/sam2{,.1}_hiera_{t,s,b+,l}.yaml`), written in
# Meta's own YAML layout so that the official names and user YAML files go through the same code.
_OFFICIAL_COMMON: dict[str, Any] = {
    "image_size": 1024,
    "image_encoder": {
        "scalp": 1,
        "neck": {
            "d_model": 256,
            "fpn_top_down_levels": [2, 3],
            "fpn_interp_model": "nearest",
        },
    },
    "memory_attention": {
        "d_model": 256,
        "pos_enc_at_input": True,
        "num_layers": 4,
        "layer": {
            "activation": "relu",
            "dim_feedforward": 2048,
            "dropout": 0.1,
            "pos_enc_at_attn": False,
            "d_model": 256,
            "pos_enc_at_cross_attn_keys": True,
            "pos_enc_at_cross_attn_queries": False,
            "self_attention": {
                "rope_theta": 10000.0,
                "embedding_dim": 256,
                "num_heads": 1,
                "downsample_rate": 1,
                "dropout": 0.1,
            },
            "cross_attention": {
                "rope_theta": 10000.0,
                "rope_k_repeat": True,
                "embedding_dim": 256,
                "num_heads": 1,
                "downsample_rate": 1,
                "dropout": 0.1,
                "kv_in_dim": 64,
            },
        },
    },
    "memory_encoder": {
        "out_dim": 64,
        "mask_downsampler": {"kernel_size": 3, "stride": 2, "padding": 1},
        "fuser": {
            "layer": {
                "dim": 256,
                "kernel_size": 7,
                "padding": 3,
                "layer_scale_init_value": 1e-6,
                "use_dwconv": True,
            },
            "num_layers": 2,
        },
    },
    "num_maskmem": 7,
    "sigmoid_scale_for_mem_enc": 20.0,
    "sigmoid_bias_for_mem_enc": -10.0,
    "use_mask_input_as_output_without_sam": True,
    "directly_add_no_mem_embed": True,
    "use_high_res_features_in_sam": True,
    "multimask_output_in_sam": True,
    "iou_prediction_use_sigmoid": True,
    "use_obj_ptrs_in_encoder": True,
    "only_obj_ptrs_in_the_past_for_eval": True,
    "pred_obj_scores": True,
    "pred_obj_scores_mlp": True,
    "fixed_no_obj_ptr": True,
    "multimask_output_for_tracking": True,
    "use_multimask_token_for_obj_ptr": True,
    "multimask_min_pt_num": 0,
    "multimask_max_pt_num": 1,
    "use_mlp_for_obj_ptr_proj": True,
}

# Hiera trunks of the four sizes; keys left out take Meta's `Hiera` defaults (see `_HIERA_DEFAULTS`).
_OFFICIAL_TRUNKS: dict[str, dict[str, Any]] = {
    "t": {
        "embed_dim": 96,
        "num_heads": 1,
        "stages": [1, 2, 7, 2],
        "global_att_blocks": [5, 7, 9],
        "window_pos_embed_bkg_spatial_size": [7, 7],
    },
    "s": {
        "embed_dim": 96,
        "num_heads": 1,
        "stages": [1, 2, 11, 2],
        "global_att_blocks": [7, 10, 13],
        "window_pos_embed_bkg_spatial_size": [7, 7],
    },
    "b+": {"embed_dim": 112, "num_heads": 2},
    "l": {
        "embed_dim": 144,
        "num_heads": 2,
        "stages": [2, 6, 36, 4],
        "global_att_blocks": [23, 33, 43],
        "window_pos_embed_bkg_spatial_size": [7, 7],
        "window_spec": [8, 4, 16, 8],
    },
}

# SAM 2.1 added the occlusion embedding and signed, projected temporal encodings of object pointers.
_OFFICIAL_VERSIONS: dict[str, dict[str, Any]] = {
    "sam2.1": {
        "no_obj_embed_spatial": True,
        "add_tpos_enc_to_obj_ptrs": True,
        "proj_tpos_enc_in_obj_ptrs": True,
        "use_signed_tpos_enc_to_obj_ptrs": True,
    },
    "sam2": {"add_tpos_enc_to_obj_ptrs": False},
}

META_CONFIG_NAMES: tuple[str, ...] = tuple(
    f"{version}_hiera_{size}" for version in _OFFICIAL_VERSIONS for size in _OFFICIAL_TRUNKS
)
"""The official Meta config names, e.g. `sam2.1_hiera_t` (also accepted as `configs/sam2.1/sam2.1_hiera_t.yaml`)."""

# Defaults of Meta's classes, used where a YAML file leaves a setting out.
_HIERA_DEFAULTS: dict[str, Any] = {
    "embed_dim": 96,
    "num_heads": 1,
    "q_pool": 3,
    "q_stride": [2, 2],
    "stages": [2, 3, 16, 3],
    "dim_mul": 2.0,
    "head_mul": 2.0,
    "window_pos_embed_bkg_spatial_size": [14, 14],
    "window_spec": [8, 4, 14, 7],
    "global_att_blocks": [12, 16, 20],
}

# Meta settings that transformers' SAM 2 hard-codes: (dotted path in `model`, value transformers implements,
# Meta's default when the YAML leaves it out). A config asking for anything else is refused by name.
_FIXED_IN_TRANSFORMERS: tuple[tuple[str, Any, Any], ...] = (
    ("backbone_stride", 16, 16),
    ("image_encoder.scalp", 1, 0),
    ("image_encoder.neck.fpn_interp_model", "nearest", "bilinear"),
    ("image_encoder.neck.fuse_type", "sum", "sum"),
    ("image_encoder.neck.kernel_size", 1, 1),
    ("image_encoder.neck.stride", 1, 1),
    ("image_encoder.neck.padding", 0, 0),
    ("use_high_res_features_in_sam", True, False),
    ("directly_add_no_mem_embed", True, False),
    ("use_mask_input_as_output_without_sam", True, False),
    ("iou_prediction_use_sigmoid", True, False),
    ("pred_obj_scores", True, False),
    ("pred_obj_scores_mlp", True, False),
    ("fixed_no_obj_ptr", True, False),
    ("soft_no_obj_ptr", False, False),
    ("use_multimask_token_for_obj_ptr", True, False),
    ("use_mlp_for_obj_ptr_proj", True, False),
    ("use_obj_ptrs_in_encoder", True, False),
    ("only_obj_ptrs_in_the_past_for_eval", True, False),
    ("memory_temporal_stride_for_eval", 1, 1),
    ("non_overlap_masks_for_mem_enc", False, False),
    ("memory_attention.pos_enc_at_input", True, None),
    ("memory_attention.layer.pos_enc_at_attn", False, None),
    ("memory_attention.layer.pos_enc_at_cross_attn_keys", True, None),
    ("memory_attention.layer.pos_enc_at_cross_attn_queries", False, None),
    ("memory_attention.layer.cross_attention.rope_k_repeat", True, False),
    ("memory_encoder.in_dim", 256, 256),
    ("memory_encoder.fuser.input_projection", False, False),
    ("memory_encoder.fuser.layer.use_dwconv", True, True),
)


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge `update` into a copy of `base`."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _official_model_config(name: str) -> dict[str, Any]:
    """The `model` section of an official Meta config, e.g. `sam2.1_hiera_b+`."""
    version, size = name.split("_hiera_")
    trunk = _merge(_HIERA_DEFAULTS, _OFFICIAL_TRUNKS[size])
    dims = [int(trunk["embed_dim"] * trunk["dim_mul"] ** i) for i in range(4)]
    arch = {
        "image_encoder": {
            "trunk": _OFFICIAL_TRUNKS[size],
            "neck": {"backbone_channel_list": dims[::-1]},
        }
    }
    return _merge(_merge(_OFFICIAL_COMMON, arch), _OFFICIAL_VERSIONS[version])


def _read_yaml_model_config(path: Path) -> dict[str, Any]:
    """The `model` section of a Meta YAML file."""
    with open(path, encoding="utf-8") as f:
        document = yaml.safe_load(f)
    if not isinstance(document, dict) or not isinstance(document.get("model"), dict):
        raise MetaCheckpointError(f"{path} is not a Meta SAM 2 config: it has no `model:` section.")
    return document["model"]


def _resolve_model_config(config: str | os.PathLike) -> dict[str, Any]:
    """Meta `model` section for an official config name (with or without `configs/.../` and `.yaml`) or a YAML path."""
    path = Path(config)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return _read_yaml_model_config(path)
    name = path.name.removesuffix(".yaml")
    if name not in META_CONFIG_NAMES:
        raise MetaCheckpointError(
            f"Unknown SAM 2 config {str(config)!r}: it is neither an existing YAML file nor an official Meta config "
            f"name. Valid names: {', '.join(META_CONFIG_NAMES)}."
        )
    return _official_model_config(name)


def _get(model_cfg: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    """Value at `dotted` (e.g. `image_encoder.trunk.stages`) in the Meta `model` section, `default` if absent."""
    node: Any = model_cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    if isinstance(node, str) and "${" in node:
        raise MetaCheckpointError(
            f"Config setting model.{dotted} = {node!r} is a Hydra interpolation; pass a resolved YAML file."
        )
    return node


def _require(model_cfg: Mapping[str, Any], dotted: str) -> Any:
    value = _get(model_cfg, dotted)
    if value is None:
        raise MetaCheckpointError(f"The SAM 2 config has no `model.{dotted}` setting, which conversion needs.")
    return value


def _check_supported(model_cfg: Mapping[str, Any]) -> None:
    """Refuse, by name, every Meta setting whose value transformers' SAM 2 does not implement."""
    unsupported = []
    for dotted, supported, default in _FIXED_IN_TRANSFORMERS:
        value = _get(model_cfg, dotted, default)
        if isinstance(supported, (int, float)) and not isinstance(supported, bool) and value is not None:
            value = type(supported)(value)
        if value != supported:
            unsupported.append(f"model.{dotted} = {value!r} (transformers implements {supported!r})")
    add_tpos = _get(model_cfg, "add_tpos_enc_to_obj_ptrs", True)
    for dotted in ("proj_tpos_enc_in_obj_ptrs", "use_signed_tpos_enc_to_obj_ptrs"):
        if add_tpos and not _get(model_cfg, dotted, False):
            unsupported.append(f"model.{dotted} = False with add_tpos_enc_to_obj_ptrs = True (transformers: both True)")
    self_attn = _get(model_cfg, "memory_attention.layer.self_attention", {})
    cross_attn = _get(model_cfg, "memory_attention.layer.cross_attention", {})
    for key in ("rope_theta", "num_heads", "downsample_rate", "dropout"):
        if self_attn.get(key) != cross_attn.get(key):
            unsupported.append(f"memory_attention self_attention.{key} != cross_attention.{key} (transformers: equal)")
    if unsupported:
        raise MetaCheckpointError(
            "The SAM 2 config uses settings transformers does not implement: " + "; ".join(unsupported)
        )


def _vision_config(model_cfg: Mapping[str, Any], image_size: int) -> dict[str, Any]:
    trunk = _merge(_HIERA_DEFAULTS, _get(model_cfg, "image_encoder.trunk", {}))
    dims = [int(trunk["embed_dim"] * trunk["dim_mul"] ** i) for i in range(4)]
    heads = [int(trunk["num_heads"] * trunk["head_mul"] ** i) for i in range(4)]
    top_down = _get(model_cfg, "image_encoder.neck.fpn_top_down_levels")
    return {
        "backbone_config": {
            "model_type": "sam2_hiera_det_model",
            "hidden_size": trunk["embed_dim"],
            "num_attention_heads": trunk["num_heads"],
            "image_size": [image_size, image_size],
            "query_stride": list(trunk["q_stride"]),
            "num_query_pool_stages": trunk["q_pool"],
            "window_positional_embedding_background_size": list(trunk["window_pos_embed_bkg_spatial_size"]),
            "blocks_per_stage": list(trunk["stages"]),
            "embed_dim_per_stage": dims,
            "num_attention_heads_per_stage": heads,
            "window_size_per_stage": list(trunk["window_spec"]),
            "global_attention_blocks": list(trunk["global_att_blocks"]),
        },
        "backbone_channel_list": list(_require(model_cfg, "image_encoder.neck.backbone_channel_list")),
        "backbone_feature_sizes": [[image_size // stride] * 2 for stride in (4, 8, 16)],
        "fpn_hidden_size": _require(model_cfg, "image_encoder.neck.d_model"),
        "fpn_top_down_levels": list(range(4)) if top_down is None else list(top_down),
    }


def _memory_config(model_cfg: Mapping[str, Any], image_size: int) -> dict[str, Any]:
    """`Sam2VideoConfig` keyword arguments for the memory attention, memory encoder and object pointers."""
    layer = _require(model_cfg, "memory_attention.layer")
    self_attn = layer["self_attention"]
    downsampler = _get(model_cfg, "memory_encoder.mask_downsampler", {})
    fuser_layer = _require(model_cfg, "memory_encoder.fuser.layer")
    add_tpos = bool(_get(model_cfg, "add_tpos_enc_to_obj_ptrs", True))
    return {
        "num_maskmem": _get(model_cfg, "num_maskmem", 7),
        "sigmoid_scale_for_mem_enc": float(_get(model_cfg, "sigmoid_scale_for_mem_enc", 1.0)),
        "sigmoid_bias_for_mem_enc": float(_get(model_cfg, "sigmoid_bias_for_mem_enc", 0.0)),
        "enable_occlusion_spatial_embedding": bool(_get(model_cfg, "no_obj_embed_spatial", False)),
        "enable_temporal_pos_encoding_for_object_pointers": add_tpos,
        "multimask_output_in_sam": bool(_get(model_cfg, "multimask_output_in_sam", False)),
        "multimask_min_pt_num": _get(model_cfg, "multimask_min_pt_num", 1),
        "multimask_max_pt_num": _get(model_cfg, "multimask_max_pt_num", 1),
        "multimask_output_for_tracking": bool(_get(model_cfg, "multimask_output_for_tracking", False)),
        "max_object_pointers_in_encoder": _get(model_cfg, "max_obj_ptrs_in_encoder", 16),
        "max_cond_frame_num": _get(model_cfg, "max_cond_frames_in_attn", -1),
        "memory_attention_hidden_size": _require(model_cfg, "memory_attention.d_model"),
        "memory_attention_num_layers": _require(model_cfg, "memory_attention.num_layers"),
        "memory_attention_num_attention_heads": self_attn["num_heads"],
        "memory_attention_downsample_rate": self_attn.get("downsample_rate", 1),
        "memory_attention_feed_forward_hidden_size": layer["dim_feedforward"],
        "memory_attention_feed_forward_hidden_act": layer["activation"],
        "memory_attention_dropout": float(layer["dropout"]),
        "memory_attention_rope_dropout": float(self_attn.get("dropout", 0.0)),
        # Meta recomputes the RoPE grid for the actual feature map, so the YAML's `feat_sizes` is not used.
        "memory_attention_rope_feat_sizes": [image_size // 16] * 2,
        "rope_parameters": {
            "rope_type": "axial",
            "rope_theta": float(self_attn.get("rope_theta", 10000.0)),
        },
        "memory_encoder_hidden_size": fuser_layer["dim"],
        "memory_encoder_output_channels": _require(model_cfg, "memory_encoder.out_dim"),
        "mask_downsampler_embed_dim": downsampler.get("embed_dim", 256),
        "mask_downsampler_kernel_size": downsampler.get("kernel_size", 4),
        "mask_downsampler_stride": downsampler.get("stride", 4),
        "mask_downsampler_padding": downsampler.get("padding", 0),
        "mask_downsampler_total_stride": downsampler.get("total_stride", 16),
        "memory_fuser_num_layers": _require(model_cfg, "memory_encoder.fuser.num_layers"),
        "memory_fuser_embed_dim": fuser_layer["dim"],
        "memory_fuser_intermediate_dim": 4 * fuser_layer["dim"],
        "memory_fuser_kernel_size": fuser_layer.get("kernel_size", 7),
        "memory_fuser_padding": fuser_layer.get("padding", 3),
        "memory_fuser_layer_scale_init_value": float(fuser_layer.get("layer_scale_init_value", 1e-6)),
    }


def transformers_config_from_meta(config: str | os.PathLike, *, video: bool = False) -> Sam2Config | Sam2VideoConfig:
    """Build the transformers config equivalent to a Meta SAM 2 config.

    Args:
        config: an official Meta config name (`sam2.1_hiera_t`, `sam2_hiera_l`, `configs/sam2.1/sam2.1_hiera_b+.yaml`,
            see `META_CONFIG_NAMES`) or the path of a Meta YAML file.
        video: build a `Sam2VideoConfig` (memory attention, memory encoder) instead of an image-only `Sam2Config`.
    """
    model_cfg = _resolve_model_config(config)
    _check_supported(model_cfg)
    image_size = int(_get(model_cfg, "image_size", 512))
    if image_size % 32:
        raise MetaCheckpointError(f"model.image_size = {image_size} is not a multiple of 32, which Hiera needs.")
    hidden_size = _require(model_cfg, "image_encoder.neck.d_model")
    decoder_extra = _get(model_cfg, "sam_mask_decoder_extra_args") or {}
    kwargs: dict[str, Any] = {
        "vision_config": _vision_config(model_cfg, image_size),
        "prompt_encoder_config": {
            "hidden_size": hidden_size,
            "image_size": image_size,
            "patch_size": 16,
        },
        "mask_decoder_config": {
            "hidden_size": hidden_size,
            # Meta's `build_sam2*` turn on dynamic multimask selection unless `apply_postprocessing=False`.
            "dynamic_multimask_via_stability": decoder_extra.get("dynamic_multimask_via_stability", True),
            "dynamic_multimask_stability_delta": decoder_extra.get("dynamic_multimask_stability_delta", 0.05),
            "dynamic_multimask_stability_thresh": decoder_extra.get("dynamic_multimask_stability_thresh", 0.98),
        },
    }
    if not video:
        return Sam2Config(**kwargs)
    return Sam2VideoConfig(image_size=image_size, **kwargs, **_memory_config(model_cfg, image_size))


# ---------------------------------------------------------------------------------------------------------------
# State-dict keys
# ---------------------------------------------------------------------------------------------------------------

_ATTENTIONS = (
    r"(self_attn|cross_attn_token_to_image|cross_attn_image_to_token|final_attn_token_to_image|cross_attn_image)"
)
_THREE_LAYER_MLPS = r"(output_hypernetworks_mlps\.\d+|iou_prediction_head|pred_obj_score_head|object_pointer_proj)"

# Ordered (pattern, replacement) renames from Meta's `SAM2Base` keys to transformers' `Sam2VideoModel` keys.
# `sam_prompt_encoder.point_embeddings.{i}.weight` is not a rename (4 tensors become one) and is handled apart.
_KEY_RENAMES: tuple[tuple[str, str], ...] = (
    # top-level parameters
    (r"^maskmem_tpos_enc$", "memory_temporal_positional_encoding"),
    (r"^no_mem_embed$", "no_memory_embedding"),
    (r"^no_mem_pos_enc$", "no_memory_positional_encoding"),
    (r"^no_obj_ptr$", "no_object_pointer"),
    (r"^no_obj_embed_spatial$", "occlusion_spatial_embedding_parameter"),
    (r"^obj_ptr_proj\.", "object_pointer_proj."),
    (r"^obj_ptr_tpos_proj\.", "temporal_positional_encoding_projection_layer."),
    # image encoder
    (r"^image_encoder\.trunk\.", "vision_encoder.backbone."),
    (r"^image_encoder\.neck\.convs\.(\d+)\.conv\.", r"vision_encoder.neck.convs.\1."),
    (r"\.patch_embed\.proj\.", ".patch_embed.projection."),
    # prompt encoder
    (
        r"^sam_prompt_encoder\.pe_layer\.positional_encoding_gaussian_matrix$",
        "shared_image_embedding.positional_embedding",
    ),
    (r"^sam_prompt_encoder\.", "prompt_encoder."),
    (r"\.mask_downscaling\.0\.", ".mask_embed.conv1."),
    (r"\.mask_downscaling\.1\.", ".mask_embed.layer_norm1."),
    (r"\.mask_downscaling\.3\.", ".mask_embed.conv2."),
    (r"\.mask_downscaling\.4\.", ".mask_embed.layer_norm2."),
    (r"\.mask_downscaling\.6\.", ".mask_embed.conv3."),
    # mask decoder
    (r"^sam_mask_decoder\.", "mask_decoder."),
    (r"\.output_upscaling\.0\.", ".upscale_conv1."),
    (r"\.output_upscaling\.1\.", ".upscale_layer_norm."),
    (r"\.output_upscaling\.3\.", ".upscale_conv2."),
    # memory encoder (the mask downsampler's `encoder.{i}` indices are handled by `_rename_mask_downsampler`)
    (r"^memory_encoder\.pix_feat_proj\.", "memory_encoder.feature_projection."),
    (r"^memory_encoder\.out_proj\.", "memory_encoder.projection."),
    (r"^memory_encoder\.fuser\.", "memory_encoder.memory_fuser."),
    (r"\.gamma$", ".scale"),
    (r"\.dwconv\.", ".depthwise_conv."),
    (r"\.pwconv(\d)\.", r".pointwise_conv\1."),
    # shared layer names
    (rf"\.{_ATTENTIONS}\.out_proj\.", r".\1.o_proj."),
    (r"\.norm(\d?)\.", r".layer_norm\1."),
    (r"\.norm_final_attn\.", ".layer_norm_final_attn."),
    # Meta's MLP(num_layers=n) holds layers.0..n-1; transformers names them proj_in, layers.0..n-3, proj_out
    (r"\.mlp\.layers\.0\.", ".mlp.proj_in."),
    (r"\.mlp\.layers\.1\.", ".mlp.proj_out."),
    (rf"(^|\.){_THREE_LAYER_MLPS}\.layers\.0\.", r"\1\2.proj_in."),
    (rf"(^|\.){_THREE_LAYER_MLPS}\.layers\.1\.", r"\1\2.layers.0."),
    (rf"(^|\.){_THREE_LAYER_MLPS}\.layers\.2\.", r"\1\2.proj_out."),
)
_COMPILED_RENAMES = tuple((re.compile(pattern), replacement) for pattern, replacement in _KEY_RENAMES)

_POINT_EMBEDDING = re.compile(r"^sam_prompt_encoder\.point_embeddings\.(\d+)\.weight$")
_MASK_DOWNSAMPLER = re.compile(r"^memory_encoder\.mask_downsampler\.encoder\.(\d+)\.(weight|bias)$")

# Meta keys an image-only `Sam2Model` legitimately has no place for: the video memory and object-pointer modules.
_VIDEO_ONLY_META_KEYS = re.compile(
    r"^(memory_attention\.|memory_encoder\.|mask_downsample\.|obj_ptr_proj\.|obj_ptr_tpos_proj\."
    r"|maskmem_tpos_enc$|no_mem_pos_enc$|no_obj_ptr$|no_obj_embed_spatial$)"
)

# transformers keeps the prompt encoder's copy of the positional-encoding matrix apart; Meta has one matrix.
_SHARED_PE_KEY = "shared_image_embedding.positional_embedding"
_PROMPT_PE_KEY = "prompt_encoder.shared_embedding.positional_embedding"


def _rename_mask_downsampler(index: int, suffix: str, num_layers: int) -> str:
    """Meta's `nn.Sequential` of (conv, LayerNorm, GELU) x num_layers + conv -> transformers' named layers."""
    layer, position = divmod(index, 3)
    if layer == num_layers and position == 0:
        return f"memory_encoder.mask_downsampler.final_conv.{suffix}"
    if layer < num_layers and position in (0, 1):
        part = "conv" if position == 0 else "layer_norm"
        return f"memory_encoder.mask_downsampler.layers.{layer}.{part}.{suffix}"
    return f"memory_encoder.mask_downsampler.encoder.{index}.{suffix}"  # no counterpart: reported as unexpected


def _rename_key(key: str, num_downsampler_layers: int) -> str:
    """The transformers name of one Meta state-dict key (keys with no counterpart come back unchanged)."""
    match = _MASK_DOWNSAMPLER.match(key)
    if match:
        return _rename_mask_downsampler(int(match.group(1)), match.group(2), num_downsampler_layers)
    for pattern, replacement in _COMPILED_RENAMES:
        key = pattern.sub(replacement, key)
    return key


def _missing_point_embeddings(indices: set[int]) -> list[str]:
    """Meta names of the gaps in `sam_prompt_encoder.point_embeddings.{i}` (they are stacked into one tensor)."""
    return [f"sam_prompt_encoder.point_embeddings.{i}.weight" for i in range(max(indices)) if i not in indices]


def meta_state_dict_to_transformers(
    state_dict: Mapping[str, torch.Tensor],
    model: Sam2Model | Sam2VideoModel,
) -> dict[str, torch.Tensor]:
    """Rename a Meta `SAM2Base` state dict to `model`'s keys and check it covers `model` exactly.

    Every Meta key must land on a `model` key of the same shape; the only keys dropped are the video-only ones
    (`memory_*`, `obj_ptr_*`, `maskmem_tpos_enc`, ...) when `model` is an image-only `Sam2Model`. Raises
    `MetaCheckpointError` naming all unexpected, missing and mis-shaped keys at once.

    Returns:
        The state dict to pass to `model.load_state_dict`, including the prompt encoder's copy of the positional
        encoding matrix (the same tensor as `shared_image_embedding.positional_embedding`).
    """
    config = model.config
    video = isinstance(model, Sam2VideoModel)
    num_downsampler_layers = (
        int(math.log2(config.mask_downsampler_total_stride) // math.log2(config.mask_downsampler_stride))
        if video
        else 0
    )
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items() if key != _PROMPT_PE_KEY}

    converted: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    point_embeddings: dict[int, str] = {}
    unexpected: list[str] = []
    skipped: list[str] = []
    for meta_key, tensor in state_dict.items():
        if not video and _VIDEO_ONLY_META_KEYS.match(meta_key):
            skipped.append(meta_key)
            continue
        match = _POINT_EMBEDDING.match(meta_key)
        if match:
            point_embeddings[int(match.group(1))] = meta_key
            continue
        key = _rename_key(meta_key, num_downsampler_layers)
        if key not in expected or key in converted:
            unexpected.append(meta_key)
            continue
        converted[key] = tensor
        origin[key] = meta_key
    missing_meta = _missing_point_embeddings(set(point_embeddings)) if point_embeddings else []
    if point_embeddings and not missing_meta:
        stacked = [state_dict[point_embeddings[i]] for i in sorted(point_embeddings)]
        converted["prompt_encoder.point_embed.weight"] = torch.cat(stacked, dim=0)
        origin["prompt_encoder.point_embed.weight"] = "sam_prompt_encoder.point_embeddings.*.weight"
    if skipped:
        logger.info(
            "Skipped %d video-only tensors of the Meta checkpoint for the image model.",
            len(skipped),
        )

    missing = sorted(
        set(expected) - set(converted) - ({"prompt_encoder.point_embed.weight"} if missing_meta else set())
    )
    mis_shaped = [
        f"{origin[key]} {tuple(tensor.shape)} -> {key} {expected[key]}"
        for key, tensor in converted.items()
        if tuple(tensor.shape) != expected[key]
    ]
    problems = []
    if unexpected:
        problems.append(f"unexpected key(s) with no place in {type(model).__name__}: {', '.join(unexpected)}")
    if missing_meta:
        problems.append(f"missing key(s): {', '.join(missing_meta)}")
    if missing:
        problems.append(f"missing key(s) (transformers names, no checkpoint key maps to them): {', '.join(missing)}")
    if mis_shaped:
        problems.append(f"mis-shaped key(s) (checkpoint shape -> expected shape): {', '.join(mis_shaped)}")
    if problems:
        raise MetaCheckpointError(
            "The Meta checkpoint does not match the config. " + "; ".join(problems) + ". Check that --config "
            "names the architecture the checkpoint was trained with."
        )
    if _SHARED_PE_KEY in converted:
        converted[_PROMPT_PE_KEY] = converted[_SHARED_PE_KEY]
    return converted


# ---------------------------------------------------------------------------------------------------------------
# Loading and converting
# ---------------------------------------------------------------------------------------------------------------


def _read_meta_state_dict(
    checkpoint_path: str | os.PathLike,
) -> dict[str, torch.Tensor]:
    """Tensors of a Meta `.pt` file (`{"model": state_dict, ...}` or a bare state dict), read with weights_only."""
    try:
        payload = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise MetaCheckpointError(
            f"{checkpoint_path} cannot be read with torch.load(weights_only=True): it needs arbitrary unpickling, "
            "which can run code, so it is refused. Re-save its state dict with torch.save(model.state_dict(), path)."
        ) from err
    state_dict = payload.get("model", payload) if isinstance(payload, dict) else payload
    if not isinstance(state_dict, dict) or not all(isinstance(value, torch.Tensor) for value in state_dict.values()):
        raise MetaCheckpointError(
            f"{checkpoint_path} holds neither a state dict nor a dict with a 'model' state dict of tensors."
        )
    return state_dict


def load_meta_checkpoint(
    checkpoint_path: str | os.PathLike,
    config: str | os.PathLike,
    *,
    video: bool = False,
    dtype: torch.dtype | None = None,
) -> Sam2Model | Sam2VideoModel:
    """Load a Meta SAM 2 checkpoint into a transformers model (in eval mode).

    Args:
        checkpoint_path: Meta `.pt` file, e.g. `sam2.1_hiera_tiny.pt`.
        config: Meta config name (`sam2.1_hiera_t`, see `META_CONFIG_NAMES`) or path of a Meta YAML file.
        video: return a `Sam2VideoModel` (with memory modules) instead of an image-only `Sam2Model`.
        dtype: cast the loaded model to this dtype (the checkpoint is float32).

    Returns:
        The model. Meta's one positional-encoding matrix is loaded into both `shared_image_embedding` and
        `prompt_encoder.shared_embedding` as equal copies (as the Hub's SAM 2 checkpoints store it), so the model
        saves with `save_pretrained` like any other.

    Raises:
        MetaCheckpointError: the file needs unpickling, the config is unknown or unsupported, or keys do not match.
    """
    hf_config = transformers_config_from_meta(config, video=video)
    state_dict = _read_meta_state_dict(checkpoint_path)
    model_class = Sam2VideoModel if video else Sam2Model
    with no_init_weights():
        model = model_class(hf_config)
    model.load_state_dict(meta_state_dict_to_transformers(state_dict, model), strict=True)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def _processor(config: Sam2Config | Sam2VideoConfig, video: bool) -> Sam2Processor | Sam2VideoProcessor:
    """A processor resizing to the model's square input (`image_size`) with matching low-res mask size."""
    image_size = config.prompt_encoder_config.image_size
    size = {"height": image_size, "width": image_size}
    mask_size = {"height": image_size // 4, "width": image_size // 4}
    image_processor = Sam2ImageProcessor(size=size, mask_size=mask_size)
    if not video:
        return Sam2Processor(image_processor=image_processor)
    return Sam2VideoProcessor(
        image_processor=image_processor,
        video_processor=Sam2VideoVideoProcessor(size=size),
    )


def convert_meta_checkpoint(
    checkpoint: str | os.PathLike,
    config: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    video: bool = False,
) -> Path:
    """Convert a Meta SAM 2 checkpoint into a transformers folder (model + processor) at `out_dir`.

    The folder loads with `Sam2Model.from_pretrained` (`Sam2VideoModel` with `video=True`) and
    `Sam2Processor.from_pretrained` (`Sam2VideoProcessor` with `video=True`). It is written to a temporary folder
    beside `out_dir` and renamed into place, so `out_dir` never holds a partial conversion.

    Raises:
        FileExistsError: `out_dir` already exists.
        MetaCheckpointError: see `load_meta_checkpoint`.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; choose a new output folder.")
    model = load_meta_checkpoint(checkpoint, config, video=video)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp_dir)
        _processor(model.config, video).save_pretrained(tmp_dir)
        tmp_dir.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sam2-peft convert-meta",
        description=(
            "Convert a checkpoint of Meta's SAM 2 repository (a .pt file such as sam2.1_hiera_tiny.pt)\n"
            "into a transformers folder (model + processor) that Sam2Model.from_pretrained\n"
            "(Sam2VideoModel with --video) and Sam2Processor.from_pretrained load.\n\n"
            "The file is read with torch.load(weights_only=True): a file that needs arbitrary\n"
            "unpickling is refused. Every tensor must match the config by name and shape.\n"
            "Meta's sam2 package is not needed."
        ),
        epilog=(
            "example:\n"
            "  sam2-peft convert-meta sam2.1_hiera_tiny.pt --config sam2.1_hiera_t ./sam2.1-hiera-tiny-hf\n\n"
            f"official config names:\n  {', '.join(META_CONFIG_NAMES)}"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="Meta .pt checkpoint to convert.")
    parser.add_argument(
        "--config",
        required=True,
        metavar="NAME",
        help="Meta config the checkpoint was trained with: an official name (e.g. sam2.1_hiera_t, sam2_hiera_l, "
        "configs/sam2.1/sam2.1_hiera_b+.yaml) or the path of a Meta YAML file.",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="Folder to create (must not exist).")
    parser.add_argument(
        "--video",
        action="store_true",
        help="Write a Sam2VideoModel (memory attention and encoder, for video tracking) and a Sam2VideoProcessor "
        "instead of an image-only Sam2Model and Sam2Processor.",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI `sam2-peft convert-meta CHECKPOINT --config NAME OUT_DIR [--video]`; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        out_dir = convert_meta_checkpoint(args.checkpoint, args.config, args.out_dir, video=args.video)
    except (MetaCheckpointError, FileExistsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"Wrote {'Sam2VideoModel' if args.video else 'Sam2Model'} and processor to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
