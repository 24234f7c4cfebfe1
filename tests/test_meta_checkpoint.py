"""Loading and converting Meta SAM 2 checkpoints, without Meta's `sam2` package.

The Meta checkpoints here have random values and the exact key layout of Meta's `sam2.1_hiera_t` model, recorded in
`fixtures/meta_sam2.1_hiera_t_shapes.json` (`test_meta_parity.py` checks it against Meta's own model).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import (
    Sam2Model,
    Sam2Processor,
    Sam2VideoModel,
    Sam2VideoProcessor,
)

from sam2_peft.models.meta_checkpoint import (
    META_CONFIG_NAMES,
    MetaCheckpointError,
    convert_meta_checkpoint,
    load_meta_checkpoint,
    main,
    transformers_config_from_meta,
)

SHAPES_FILE = Path(__file__).parent / "fixtures" / "meta_sam2.1_hiera_t_shapes.json"
SAM2_1_ONLY_KEYS = (
    "no_obj_embed_spatial",
    "obj_ptr_tpos_proj.weight",
    "obj_ptr_tpos_proj.bias",
)

# Meta key -> transformers key, one pair for every kind of rename.
IMAGE_RENAMES = [
    ("no_mem_embed", "no_memory_embedding"),
    ("image_encoder.trunk.pos_embed", "vision_encoder.backbone.pos_embed"),
    (
        "image_encoder.trunk.patch_embed.proj.weight",
        "vision_encoder.backbone.patch_embed.projection.weight",
    ),
    (
        "image_encoder.trunk.blocks.1.norm2.bias",
        "vision_encoder.backbone.blocks.1.layer_norm2.bias",
    ),
    (
        "image_encoder.trunk.blocks.1.proj.weight",
        "vision_encoder.backbone.blocks.1.proj.weight",
    ),
    (
        "image_encoder.trunk.blocks.3.mlp.layers.1.weight",
        "vision_encoder.backbone.blocks.3.mlp.proj_out.weight",
    ),
    ("image_encoder.neck.convs.2.conv.weight", "vision_encoder.neck.convs.2.weight"),
    (
        "sam_prompt_encoder.mask_downscaling.4.weight",
        "prompt_encoder.mask_embed.layer_norm2.weight",
    ),
    (
        "sam_prompt_encoder.mask_downscaling.6.bias",
        "prompt_encoder.mask_embed.conv3.bias",
    ),
    (
        "sam_prompt_encoder.not_a_point_embed.weight",
        "prompt_encoder.not_a_point_embed.weight",
    ),
    (
        "sam_mask_decoder.transformer.layers.1.cross_attn_image_to_token.out_proj.weight",
        "mask_decoder.transformer.layers.1.cross_attn_image_to_token.o_proj.weight",
    ),
    (
        "sam_mask_decoder.transformer.layers.0.mlp.layers.0.bias",
        "mask_decoder.transformer.layers.0.mlp.proj_in.bias",
    ),
    (
        "sam_mask_decoder.transformer.layers.0.norm4.weight",
        "mask_decoder.transformer.layers.0.layer_norm4.weight",
    ),
    (
        "sam_mask_decoder.transformer.norm_final_attn.bias",
        "mask_decoder.transformer.layer_norm_final_attn.bias",
    ),
    (
        "sam_mask_decoder.output_upscaling.1.weight",
        "mask_decoder.upscale_layer_norm.weight",
    ),
    ("sam_mask_decoder.output_upscaling.3.weight", "mask_decoder.upscale_conv2.weight"),
    (
        "sam_mask_decoder.output_hypernetworks_mlps.2.layers.1.weight",
        "mask_decoder.output_hypernetworks_mlps.2.layers.0.weight",
    ),
    (
        "sam_mask_decoder.iou_prediction_head.layers.2.bias",
        "mask_decoder.iou_prediction_head.proj_out.bias",
    ),
    (
        "sam_mask_decoder.pred_obj_score_head.layers.0.weight",
        "mask_decoder.pred_obj_score_head.proj_in.weight",
    ),
]
VIDEO_RENAMES = [
    ("maskmem_tpos_enc", "memory_temporal_positional_encoding"),
    ("no_obj_embed_spatial", "occlusion_spatial_embedding_parameter"),
    ("obj_ptr_proj.layers.2.weight", "object_pointer_proj.proj_out.weight"),
    ("obj_ptr_tpos_proj.bias", "temporal_positional_encoding_projection_layer.bias"),
    (
        "memory_attention.layers.3.cross_attn_image.out_proj.weight",
        "memory_attention.layers.3.cross_attn_image.o_proj.weight",
    ),
    ("memory_attention.norm.weight", "memory_attention.layer_norm.weight"),
    (
        "memory_encoder.mask_downsampler.encoder.3.weight",
        "memory_encoder.mask_downsampler.layers.1.conv.weight",
    ),
    (
        "memory_encoder.mask_downsampler.encoder.10.bias",
        "memory_encoder.mask_downsampler.layers.3.layer_norm.bias",
    ),
    (
        "memory_encoder.mask_downsampler.encoder.12.weight",
        "memory_encoder.mask_downsampler.final_conv.weight",
    ),
    ("memory_encoder.pix_feat_proj.weight", "memory_encoder.feature_projection.weight"),
    (
        "memory_encoder.fuser.layers.1.gamma",
        "memory_encoder.memory_fuser.layers.1.scale",
    ),
    (
        "memory_encoder.fuser.layers.0.pwconv2.weight",
        "memory_encoder.memory_fuser.layers.0.pointwise_conv2.weight",
    ),
    ("memory_encoder.out_proj.bias", "memory_encoder.projection.bias"),
    ("mask_downsample.weight", "mask_downsample.weight"),
]


@pytest.fixture(scope="module")
def meta_state_dict() -> dict[str, torch.Tensor]:
    """Random Meta `sam2.1_hiera_t` state dict (every tensor distinct)."""
    shapes = json.loads(SHAPES_FILE.read_text())
    generator = torch.Generator().manual_seed(0)
    return {key: torch.randn(shape, generator=generator) for key, shape in shapes.items()}


@pytest.fixture(scope="module")
def checkpoint(meta_state_dict, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("meta") / "sam2.1_hiera_tiny.pt"
    torch.save({"model": meta_state_dict}, path)
    return path


def _save(state_dict: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save({"model": state_dict}, path)
    return path


def _official_yaml(tmp_path: Path, name: str = "sam2.1_hiera_t", **model_overrides) -> Path:
    """A Meta-style YAML file with the settings of an official config, with `model_overrides` applied."""
    config = transformers_config_from_meta(name, video=True)
    backbone = config.vision_config.backbone_config
    model = {
        "image_size": config.image_size,
        "image_encoder": {
            "scalp": 1,
            "trunk": {
                "embed_dim": backbone.hidden_size,
                "num_heads": backbone.num_attention_heads,
                "stages": backbone.blocks_per_stage,
                "global_att_blocks": backbone.global_attention_blocks,
                "window_pos_embed_bkg_spatial_size": backbone.window_positional_embedding_background_size,
            },
            "neck": {
                "d_model": 256,
                "backbone_channel_list": config.vision_config.backbone_channel_list,
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
                "pos_enc_at_cross_attn_keys": True,
                "pos_enc_at_cross_attn_queries": False,
                "self_attention": {
                    "rope_theta": 10000.0,
                    "feat_sizes": [64, 64],
                    "num_heads": 1,
                    "dropout": 0.1,
                },
                "cross_attention": {
                    "rope_theta": 10000.0,
                    "feat_sizes": [64, 64],
                    "rope_k_repeat": True,
                    "num_heads": 1,
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
                    "layer_scale_init_value": "1e-6",
                },
                "num_layers": 2,
            },
        },
        "num_maskmem": 7,
        "sigmoid_scale_for_mem_enc": 20.0,
        "sigmoid_bias_for_mem_enc": -10.0,
        "use_mask_input_as_output_without_sam": True,
        "directly_add_no_mem_embed": True,
        "no_obj_embed_spatial": True,
        "use_high_res_features_in_sam": True,
        "multimask_output_in_sam": True,
        "iou_prediction_use_sigmoid": True,
        "use_obj_ptrs_in_encoder": True,
        "add_tpos_enc_to_obj_ptrs": True,
        "proj_tpos_enc_in_obj_ptrs": True,
        "use_signed_tpos_enc_to_obj_ptrs": True,
        "only_obj_ptrs_in_the_past_for_eval": True,
        "pred_obj_scores": True,
        "pred_obj_scores_mlp": True,
        "fixed_no_obj_ptr": True,
        "multimask_output_for_tracking": True,
        "use_multimask_token_for_obj_ptr": True,
        "multimask_min_pt_num": 0,
        "multimask_max_pt_num": 1,
        "use_mlp_for_obj_ptr_proj": True,
        "compile_image_encoder": False,
    }
    model.update(model_overrides)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"model": model}))
    return path


# ------------------------------------------------------------------------------------------------- loading


def test_image_model_gets_every_renamed_tensor(checkpoint, meta_state_dict):
    model = load_meta_checkpoint(checkpoint, "sam2.1_hiera_t")

    assert isinstance(model, Sam2Model) and not model.training
    state = model.state_dict()
    for meta_key, hf_key in IMAGE_RENAMES:
        torch.testing.assert_close(state[hf_key], meta_state_dict[meta_key], atol=0, rtol=0, msg=meta_key)
    point_embeddings = [meta_state_dict[f"sam_prompt_encoder.point_embeddings.{i}.weight"] for i in range(4)]
    torch.testing.assert_close(
        state["prompt_encoder.point_embed.weight"],
        torch.cat(point_embeddings),
        atol=0,
        rtol=0,
    )


def test_video_model_gets_memory_and_pointer_tensors(checkpoint, meta_state_dict):
    model = load_meta_checkpoint(checkpoint, "sam2.1_hiera_t", video=True)

    assert isinstance(model, Sam2VideoModel)
    state = model.state_dict()
    for meta_key, hf_key in IMAGE_RENAMES + VIDEO_RENAMES:
        torch.testing.assert_close(state[hf_key], meta_state_dict[meta_key], atol=0, rtol=0, msg=meta_key)


def test_positional_encoding_matrix_is_loaded_into_both_modules(checkpoint, meta_state_dict, tmp_path):
    model = load_meta_checkpoint(checkpoint, "sam2.1_hiera_t")

    shared = model.shared_image_embedding.positional_embedding
    torch.testing.assert_close(model.prompt_encoder.shared_embedding.positional_embedding, shared, atol=0, rtol=0)
    model.save_pretrained(tmp_path)  # equal copies, not one shared tensor: saves like any model
    expected = meta_state_dict["sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"]
    torch.testing.assert_close(shared, expected, atol=0, rtol=0)


def test_bare_state_dict_and_dtype(meta_state_dict, tmp_path):
    path = tmp_path / "bare.pt"
    torch.save(meta_state_dict, path)

    model = load_meta_checkpoint(path, "sam2.1_hiera_t", dtype=torch.bfloat16)

    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    shared = model.shared_image_embedding.positional_embedding
    assert shared.dtype == torch.bfloat16
    torch.testing.assert_close(model.prompt_encoder.shared_embedding.positional_embedding, shared, atol=0, rtol=0)
    expected = meta_state_dict["sam_mask_decoder.iou_token.weight"].to(torch.bfloat16)
    torch.testing.assert_close(model.mask_decoder.iou_token.weight, expected, atol=0, rtol=0)


def test_sam2_0_layout_loads_and_sam2_1_keys_are_refused(meta_state_dict, tmp_path):
    sam2_0 = {k: v for k, v in meta_state_dict.items() if k not in SAM2_1_ONLY_KEYS}
    model = load_meta_checkpoint(_save(sam2_0, tmp_path / "sam2.pt"), "sam2_hiera_t", video=True)

    assert model.occlusion_spatial_embedding_parameter is None
    assert not model.config.enable_temporal_pos_encoding_for_object_pointers
    with pytest.raises(
        MetaCheckpointError,
        match=r"unexpected key.*no_obj_embed_spatial.*obj_ptr_tpos_proj\.weight",
    ):
        load_meta_checkpoint(_save(meta_state_dict, tmp_path / "sam2.1.pt"), "sam2_hiera_t", video=True)


# ------------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("spelling", ["configs/sam2.1/sam2.1_hiera_t.yaml", "sam2.1_hiera_t.yaml"])
def test_config_name_spellings(spelling):
    assert (
        transformers_config_from_meta(spelling).to_dict() == transformers_config_from_meta("sam2.1_hiera_t").to_dict()
    )


@pytest.mark.parametrize(
    ("name", "dims", "blocks", "global_blocks", "windows", "background"),
    [
        (
            "sam2.1_hiera_s",
            [96, 192, 384, 768],
            [1, 2, 11, 2],
            [7, 10, 13],
            [8, 4, 14, 7],
            [7, 7],
        ),
        (
            "sam2.1_hiera_b+",
            [112, 224, 448, 896],
            [2, 3, 16, 3],
            [12, 16, 20],
            [8, 4, 14, 7],
            [14, 14],
        ),
        (
            "sam2_hiera_l",
            [144, 288, 576, 1152],
            [2, 6, 36, 4],
            [23, 33, 43],
            [8, 4, 16, 8],
            [7, 7],
        ),
    ],
)
def test_official_architectures(name, dims, blocks, global_blocks, windows, background):
    vision = transformers_config_from_meta(name).vision_config

    backbone = vision.backbone_config
    assert backbone.embed_dim_per_stage == dims
    assert backbone.blocks_per_stage == blocks
    assert backbone.global_attention_blocks == global_blocks
    assert backbone.window_size_per_stage == windows
    assert backbone.window_positional_embedding_background_size == background
    assert vision.backbone_channel_list == dims[::-1]


def test_yaml_file_sets_image_size_everywhere(tmp_path):
    config = transformers_config_from_meta(_official_yaml(tmp_path, image_size=512), video=True)

    assert config.image_size == 512
    assert config.prompt_encoder_config.image_size == 512
    assert config.vision_config.backbone_config.image_size == [512, 512]
    assert config.vision_config.backbone_feature_sizes == [
        [128, 128],
        [64, 64],
        [32, 32],
    ]
    assert config.memory_attention_rope_feat_sizes == [32, 32]
    assert config.memory_fuser_layer_scale_init_value == 1e-6
    assert config.enable_occlusion_spatial_embedding and config.enable_temporal_pos_encoding_for_object_pointers


def test_unknown_config_name_lists_valid_names():
    with pytest.raises(MetaCheckpointError, match="Unknown SAM 2 config 'sam2.1_hiera_xl'") as info:
        transformers_config_from_meta("sam2.1_hiera_xl")
    assert all(name in str(info.value) for name in META_CONFIG_NAMES)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"use_high_res_features_in_sam": False},
            r"model\.use_high_res_features_in_sam = False",
        ),
        ({"pred_obj_scores_mlp": False}, r"model\.pred_obj_scores_mlp = False"),
        (
            {"use_signed_tpos_enc_to_obj_ptrs": False},
            r"model\.use_signed_tpos_enc_to_obj_ptrs = False",
        ),
        ({"image_size": "${scratch.resolution}"}, "Hydra interpolation"),
        ({"image_size": 1000}, "not a multiple of 32"),
    ],
)
def test_unsupported_yaml_settings_are_named(tmp_path, overrides, message):
    with pytest.raises(MetaCheckpointError, match=message):
        transformers_config_from_meta(_official_yaml(tmp_path, **overrides))


# ------------------------------------------------------------------------------------------------- errors


def test_file_needing_unpickling_is_refused(meta_state_dict, tmp_path):
    path = tmp_path / "with_args.pt"
    torch.save({"model": meta_state_dict, "args": argparse.Namespace(lr=1e-4)}, path)

    with pytest.raises(MetaCheckpointError, match="needs arbitrary unpickling") as info:
        load_meta_checkpoint(path, "sam2.1_hiera_t")
    assert str(path) in str(info.value)


def test_missing_unexpected_and_mis_shaped_keys_are_named(meta_state_dict, tmp_path):
    broken = dict(meta_state_dict)
    del broken["sam_mask_decoder.iou_token.weight"]
    del broken["sam_prompt_encoder.point_embeddings.2.weight"]
    broken["sam_mask_decoder.extra_head.weight"] = torch.zeros(3)
    broken["sam_mask_decoder.mask_tokens.weight"] = torch.zeros(5, 256)

    with pytest.raises(MetaCheckpointError) as info:
        load_meta_checkpoint(_save(broken, tmp_path / "broken.pt"), "sam2.1_hiera_t")

    message = str(info.value)
    assert "unexpected key(s) with no place in Sam2Model: sam_mask_decoder.extra_head.weight;" in message
    assert "missing key(s): sam_prompt_encoder.point_embeddings.2.weight;" in message
    assert "no checkpoint key maps to them): mask_decoder.iou_token.weight;" in message
    assert "sam_mask_decoder.mask_tokens.weight (5, 256) -> mask_decoder.mask_tokens.weight (4, 256)" in message


def test_wrong_architecture_is_reported_by_shape(checkpoint):
    with pytest.raises(
        MetaCheckpointError,
        match=r"image_encoder\.trunk\.pos_embed \(1, 96, 7, 7\) -> ",
    ):
        load_meta_checkpoint(checkpoint, "sam2.1_hiera_b+")


# ------------------------------------------------------------------------------------------------- conversion


@pytest.mark.parametrize(
    ("video", "model_class", "processor_class"),
    [(False, Sam2Model, Sam2Processor), (True, Sam2VideoModel, Sam2VideoProcessor)],
)
def test_converted_folder_loads_with_from_pretrained(checkpoint, tmp_path, video, model_class, processor_class):
    out_dir = convert_meta_checkpoint(
        checkpoint,
        _official_yaml(tmp_path, image_size=512),
        tmp_path / "hf",
        video=video,
    )

    reference = load_meta_checkpoint(checkpoint, _official_yaml(tmp_path, image_size=512), video=video)
    model = model_class.from_pretrained(out_dir)
    assert model.config.prompt_encoder_config.image_size == 512
    assert model.config.vision_config.backbone_feature_sizes == [
        [128, 128],
        [64, 64],
        [32, 32],
    ]
    reference_state = reference.state_dict()
    assert model.state_dict().keys() == reference_state.keys()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, reference_state[key], atol=0, rtol=0, msg=key)
    for processor in (
        processor_class.from_pretrained(out_dir),
        Sam2Processor.from_pretrained(out_dir),
    ):
        assert processor.image_processor.size == {"height": 512, "width": 512}
        assert processor.image_processor.mask_size == {"height": 128, "width": 128}
        assert processor.target_size == 512
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "hf"]


def test_conversion_never_leaves_partial_output(checkpoint, meta_state_dict, tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        convert_meta_checkpoint(checkpoint, "sam2.1_hiera_t", existing)

    broken = {k: v for k, v in meta_state_dict.items() if k != "no_mem_embed"}
    with pytest.raises(MetaCheckpointError, match="no_memory_embedding"):
        convert_meta_checkpoint(_save(broken, tmp_path / "broken.pt"), "sam2.1_hiera_t", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.pt", "existing"]


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])

    assert info.value.code == 0
    help_text = capsys.readouterr().out
    assert help_text.startswith("usage: sam2-peft convert-meta [-h] --config NAME [--video] CHECKPOINT OUT_DIR")
    assert all(name in help_text for name in META_CONFIG_NAMES)


def test_cli_converts_and_reports_errors(checkpoint, tmp_path, capsys):
    assert main([str(checkpoint), "--config", "sam2.1_hiera_t", str(tmp_path / "hf")]) == 0
    assert "Wrote Sam2Model and processor to" in capsys.readouterr().out
    assert isinstance(Sam2Model.from_pretrained(tmp_path / "hf"), Sam2Model)
    capsys.readouterr()

    assert main([str(checkpoint), "--config", "sam2.1_hiera_t", str(tmp_path / "hf")]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "already exists" in error


def test_converter_does_not_import_meta_sam2():
    code = "import sys, sam2_peft.models.meta_checkpoint; print('sam2' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    assert result.stdout.strip() == "False"
