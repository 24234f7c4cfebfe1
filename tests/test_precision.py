"""Half-precision base with float32 adapters, bf16 autocast on CPU, SDPA attention, and the 4/8-bit QLoRA encoder."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate.state import AcceleratorState

from sam2_peft.adapters import LoraMethod
from sam2_peft.data.augment import AugmentationConfig
from sam2_peft.data.dataset import DatasetConfig, SegmentationDataset
from sam2_peft.data.sources import open_records
from sam2_peft.models.loading import build_model_from_config, tiny_config
from sam2_peft.models.segmenter import Sam2Segmenter
from sam2_peft.training.config import TrainingConfig
from sam2_peft.training.tasks import ImageSegmentationTask
from sam2_peft.training.trainer import Trainer


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Accelerate keeps one process-wide state; a run with another mixed precision needs it reset around it."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _trainer(folder, processor, tmp_path, model, method, mixed_precision: str) -> Trainer:
    records = open_records(str(folder))
    config = DatasetConfig(max_objects_per_image=2, augmentation=AugmentationConfig(augment=False))
    train = SegmentationDataset(records[:2], processor, config, train=True, seed=0)
    training = TrainingConfig(
        output_dir=str(tmp_path / "run"), max_steps=2, log_every=1, report_to="none", mixed_precision=mixed_precision
    )
    return Trainer(model, method, ImageSegmentationTask(train), training, "tiny")


def test_bf16_base_trains_fp32_adapters_under_bf16_autocast(folder_dataset, tiny_processor, tmp_path):
    model = build_model_from_config(tiny_config(128), seed=0).to(torch.bfloat16)
    trainer = _trainer(folder_dataset, tiny_processor, tmp_path, model, LoraMethod("decoder", lora_r=4), "bf16")
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    frozen = [p for p in trainer.model.parameters() if not p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    before = [p.detach().clone() for p in trainable]
    trainer.train()
    losses = [h["loss"] for h in trainer.state.history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert any(not torch.equal(b, p) for b, p in zip(before, trainable))
    assert trainer.cache.fingerprint["dtype"] == "torch.bfloat16"


def test_half_base_without_autocast_is_refused(folder_dataset, tiny_processor, tmp_path):
    model = build_model_from_config(tiny_config(128), seed=0).to(torch.bfloat16)
    with pytest.raises(ValueError, match="mixed_precision"):
        _trainer(folder_dataset, tiny_processor, tmp_path, model, LoraMethod("decoder", lora_r=4), "no")


def test_attention_uses_sdpa(tiny_model):
    config = tiny_model.config
    assert config._attn_implementation == "sdpa"
    assert config.vision_config._attn_implementation == "sdpa"
    assert config.mask_decoder_config._attn_implementation == "sdpa"


@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_quantized_encoder_saves_memory_and_trains_lora(mode, tiny_model):
    pytest.importorskip("bitsandbytes")
    from sam2_peft.models.quantization import quantize_image_encoder

    pixels = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    reference = Sam2Segmenter(tiny_model).vision_features(pixels)[2]
    report = quantize_image_encoder(tiny_model, mode)
    assert report.quantized, report.skipped
    assert report.bytes_after < report.bytes_before
    assert len(report.quantized) + len(report.skipped) == 23
    segmenter = Sam2Segmenter(LoraMethod("encoder", lora_r=2).prepare(tiny_model, "tiny"))
    quantized = segmenter.vision_features(pixels)[2]
    relative = ((quantized - reference).norm() / reference.norm()).item()
    assert relative < 0.6, f"quantized encoder output far from the float one ({relative:.2f})"
    quantized.square().mean().backward()
    grads = [p.grad for n, p in segmenter.named_parameters() if "lora_" in n and p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_unknown_quantization_mode_is_refused(tiny_model):
    from sam2_peft.models.quantization import quantize_image_encoder

    with pytest.raises(ValueError, match="4bit"):
        quantize_image_encoder(tiny_model, "2bit")
