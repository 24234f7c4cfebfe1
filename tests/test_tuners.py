"""LoRA presets inject only where asked; adapters round-trip through plain peft; partial fine-tuning."""

import json

import pytest
import torch
from peft import PeftModel
from transformers import Sam2Config, Sam2Model

from sam2_peft.adapters import (
    AdapterMismatchError,
    LoraMethod,
    PartialFinetuneMethod,
    load_adapter,
)
from sam2_peft.adapters.files import SIDECAR_FILE
from sam2_peft.models.loading import build_model_from_config, tiny_config
from sam2_peft.models.segmenter import Sam2Segmenter
from sam2_peft.tuners.lora import BitsDropout, preset_regex


def _trainable(model):
    return {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}


def _lora_modules(model):
    return sorted({name.rsplit(".lora_", 1)[0] for name in _trainable(model)})


def test_decoder_preset_targets_the_28_decoder_projections_of_hiera_tiny():
    model = LoraMethod("decoder", lora_r=16).prepare(
        build_model_from_config(Sam2Config()), "facebook/sam2.1-hiera-tiny"
    )
    modules = _lora_modules(model)
    assert len(modules) == 28
    assert all(
        ".mask_decoder.transformer." in m and m.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) for m in modules
    )
    # r x (in + out) per projection; attention inside the decoder is downsampled by 2 in cross-attention
    expected = 0
    for name, module in model.named_modules():
        if name in modules:
            expected += 16 * (module.in_features + module.out_features)
    assert sum(_trainable(model).values()) == expected


def test_decoder_plus_encoder_adds_hiera_attention_only(tiny_model):
    model = LoraMethod("decoder+encoder", lora_r=4).prepare(tiny_model, "tiny")
    modules = _lora_modules(model)
    encoder = [m for m in modules if ".vision_encoder." in m]
    assert encoder and all(m.endswith(("attn.qkv", "attn.proj")) for m in encoder)
    assert len(modules) - len(encoder) == 28
    assert not [m for m in modules if "prompt_encoder" in m or "neck" in m]


def test_custom_regex_and_unknown_preset(tiny_model):
    model = LoraMethod(
        target_regex=r".*mask_decoder\.transformer\.final_attn_token_to_image\.v_proj", lora_r=2
    ).prepare(tiny_model, None)
    assert _lora_modules(model) == ["base_model.model.mask_decoder.transformer.final_attn_token_to_image.v_proj"]
    with pytest.raises(ValueError, match="Unknown LoRA preset 'decodr'"):
        preset_regex("decodr")


def _outputs(model, pixels, boxes):
    with torch.no_grad():
        return model(pixel_values=pixels, input_boxes=boxes, multimask_output=False).pred_masks


def test_lora_adapter_round_trips_through_plain_peft(tmp_path, tiny_model):
    method = LoraMethod(lora_r=4, lora_dropout=0.0)
    model = method.prepare(tiny_model, "base-folder")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.eval()
    pixels, boxes = torch.randn(1, 3, 128, 128), torch.tensor([[[10.0, 10, 90, 100]]])
    expected = _outputs(model, pixels, boxes)
    method.save(model, tmp_path, "base-folder")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "base-folder"
    assert (tmp_path / "adapter_model.safetensors").stat().st_size < 200_000

    plain = PeftModel.from_pretrained(build_model_from_config(tiny_config(128), seed=0), tmp_path).eval()
    torch.testing.assert_close(_outputs(plain, pixels, boxes), expected, rtol=0, atol=0)
    ours = load_adapter(build_model_from_config(tiny_config(128), seed=0), tmp_path).eval()
    torch.testing.assert_close(_outputs(ours, pixels, boxes), expected, rtol=0, atol=0)
    assert not torch.equal(_outputs(build_model_from_config(tiny_config(128), seed=0), pixels, boxes), expected)


def test_adapter_for_another_architecture_is_refused_with_the_difference(tmp_path, tiny_model):
    method = LoraMethod(lora_r=4)
    method.save(method.prepare(tiny_model, "tiny-128"), tmp_path, "tiny-128")
    assert json.loads((tmp_path / SIDECAR_FILE).read_text())["base_signature"]["image_size"] == 128
    with pytest.raises(AdapterMismatchError, match="image_size: adapter expects 128, base model has 256"):
        load_adapter(build_model_from_config(tiny_config(256)), tmp_path)
    with pytest.raises(FileNotFoundError, match="No adapter"):
        load_adapter(build_model_from_config(tiny_config(128)), tmp_path / "missing")


def test_partial_finetuning_groups_saves_and_loads(tmp_path, tiny_model):
    method = PartialFinetuneMethod({"mask_decoder": 5e-6, "prompt_encoder": 1e-5})
    model = method.prepare(tiny_model, "tiny")
    names = _trainable(model)
    assert names and all(n.startswith(("mask_decoder.", "prompt_encoder.")) for n in names)
    groups = method.parameter_groups(model, lr=1.0, weight_decay=0.0)
    assert [g["lr"] for g in groups] == [5e-6, 1e-5] and all(g["weight_decay"] == 1e-4 for g in groups)
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(names.values())
    with torch.no_grad():
        model.mask_decoder.iou_token.weight.add_(1.0)
    method.save(model, tmp_path, "tiny")
    fresh = load_adapter(build_model_from_config(tiny_config(128), seed=0), tmp_path)
    torch.testing.assert_close(fresh.mask_decoder.iou_token.weight, model.mask_decoder.iou_token.weight)
    with pytest.raises(ValueError, match="Unknown component"):
        PartialFinetuneMethod({"decoder": 1e-5})


def test_partial_weights_of_wrong_shape_are_named(tmp_path, tiny_model):
    method = PartialFinetuneMethod({"mask_decoder": 1e-5})
    method.save(method.prepare(tiny_model, None), tmp_path, None)
    (tmp_path / SIDECAR_FILE).unlink()  # bypass the signature check to reach the weight check
    config = tiny_config(128)
    config.mask_decoder_config.iou_head_hidden_dim = 32
    other = Sam2Model(config)
    with pytest.raises(AdapterMismatchError, match="iou_prediction_head"):
        load_adapter(other, tmp_path)


def test_segmenter_gradients_reach_only_lora(tiny_model):
    model = LoraMethod(lora_r=4).prepare(tiny_model, None)
    segmenter = Sam2Segmenter(model)
    output = segmenter(
        torch.tensor([0]),
        pixel_values=torch.randn(1, 3, 128, 128),
        points=torch.tensor([[[10.0, 10], [80, 90]]]),
        point_labels=torch.tensor([[2, 3]]),
    )
    output.mask_logits.sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)


def _dropout_by_module(model) -> dict[str, bool]:
    from peft.tuners.lora import LoraLayer

    return {
        name.removeprefix("base_model.model.mask_decoder.transformer."): isinstance(
            module.lora_dropout["default"], BitsDropout
        )
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    }


def test_dropout_stays_on_the_decoders_prompt_token_projections_only(tiny_model):
    """The image-token projections are found by their inputs: those that see the image's tokens lose dropout."""
    import copy

    model = LoraMethod(lora_r=4, lora_dropout=0.1).prepare(copy.deepcopy(tiny_model), "tiny")  # the default: tokens
    dropout = _dropout_by_module(model)
    inputs = {}
    for name, module in model.named_modules():
        if name.removeprefix("base_model.model.mask_decoder.transformer.") in dropout and hasattr(module, "base_layer"):
            module.register_forward_hook(lambda m, args, out, n=name: inputs.update({n: args[0].shape[-2]}))
    segmenter = Sam2Segmenter(model)
    with torch.no_grad():
        segmenter(torch.zeros(1, dtype=torch.long), torch.randn(1, 3, 128, 128), points=torch.tensor([[[9.0, 9], [60, 70]]]),
                  point_labels=torch.tensor([[2, 3]]))  # fmt: skip
    image_tokens = (128 // 16) ** 2
    seen = {n.removeprefix("base_model.model.mask_decoder.transformer."): rows for n, rows in inputs.items()}
    assert len(seen) == len(dropout) == 28
    for name, rows in seen.items():
        assert dropout[name] == (rows < image_tokens), (name, rows)
    assert sum(dropout.values()) == 18

    everywhere = LoraMethod(lora_r=4, lora_dropout=0.1, lora_dropout_inputs="all").prepare(
        copy.deepcopy(tiny_model), "tiny"
    )
    assert all(_dropout_by_module(everywhere).values())
    with pytest.raises(ValueError, match="lora_dropout_inputs"):
        LoraMethod(lora_dropout_inputs="image")


def test_bits_dropout_is_dropout_with_p_rounded_to_a_32768th():
    torch.manual_seed(0)
    dropout = BitsDropout(0.1).train()
    x = torch.full((501, 999), 2.0, requires_grad=True)  # an odd count: the last int32 is half used
    y = dropout(x)
    dropped = y == 0
    keep_rate = 1 - dropout.threshold / 2**15
    assert abs(dropout.threshold / 2**15 - 0.1) < 2e-5
    for half in (dropped.flatten()[0::2], dropped.flatten()[1::2]):  # both 16-bit halves of each random word
        assert abs(half.float().mean().item() - 0.1) < 0.003
    torch.testing.assert_close(y[~dropped], torch.full_like(y[~dropped], 2.0 / keep_rate))
    assert abs(y.mean().item() - 2.0) < 0.01  # unbiased
    y.sum().backward()
    torch.testing.assert_close(x.grad, (~dropped).float() / keep_rate)
    assert not torch.equal(dropout(x) == 0, dropped)  # a fresh mask each call
    assert torch.equal(dropout.eval()(x), x) and torch.equal(BitsDropout(0.0).train()(x), x)
