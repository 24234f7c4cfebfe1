"""PTSAM through the foundation trainer and recipes: prompt-free and prompted runs, sizes, and the real nuclei data."""

import json

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from peft import PeftModel
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from transformers import Sam2Model

import sam2_peft  # noqa: F401
from sam2_peft.adapters import PtsamMethod, load_adapter
from sam2_peft.data.dataset import collate_segmentation
from sam2_peft.data.sources import open_records
from sam2_peft.evaluation.runner import evaluate_segmenter
from sam2_peft.inference.prompt_free import predict_prompt_free
from sam2_peft.models.loading import build_model_from_config, hiera_tiny_config, load_base_model
from sam2_peft.models.segmenter import Sam2Segmenter
from sam2_peft.recipes.ptsam import encoder_main as ptsam_encoder
from sam2_peft.recipes.ptsam import main as ptsam_decoder
from tests.recipe_helpers import datasets, parse_args

from .conftest import real_dataset


def _args(base, data, out, *extra: str) -> list[str]:
    return [
        "--model", str(base), "--data", str(data), "--output-dir", str(out), "--val-fraction", "0.34",
        "--report-to", "none", "--batch-size", "2", "--lr", "1e-2", "--num-panels", "1", "--log-every", "1", *extra,
    ]  # fmt: skip


def test_prompt_free_decoder_recipe_trains_only_tokens_and_reloads(saved_tiny_model, folder_dataset, tmp_path):
    out = tmp_path / "run"
    ptsam_decoder(_args(saved_tiny_model, folder_dataset, out, "--max-steps", "3", "--num-tokens", "4"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["trainable_parameters"] == 4 * 64 and metrics["steps"] == 3
    assert len(metrics["per_image"]) == 2 and 0 <= metrics["fine_tuned"]["dice"] <= 1
    tokens = load_file(str(out / "adapter_model.safetensors"))
    assert list(tokens) == ["base_model.model.prompt_encoder.ptsam_tokens"]
    base = Sam2Model.from_pretrained(saved_tiny_model)
    fresh = PtsamMethod(num_tokens=4).prepare(Sam2Model.from_pretrained(saved_tiny_model), None)
    assert not torch.equal(fresh.base_model.model.prompt_encoder.ptsam_tokens["default"], tokens[next(iter(tokens))])
    # Both loaders give the same prompt-free prediction; the sidecar records the method.
    by_peft = PeftModel.from_pretrained(base, out)
    by_foundation = load_adapter(Sam2Model.from_pretrained(saved_tiny_model), out)
    image = np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    _, processor = load_base_model(str(saved_tiny_model))
    (mask_a, score_a), (mask_b, score_b) = (
        predict_prompt_free(m, processor, [image])[0] for m in (by_peft, by_foundation)
    )
    assert np.array_equal(mask_a, mask_b) and score_a == score_b and mask_a.shape == (70, 90)
    assert json.loads((out / "sam2_peft.json").read_text())["method"] == "ptsam"


@pytest.mark.parametrize("recipe", [ptsam_decoder, ptsam_encoder])
def test_base_metrics_are_the_untouched_base_models(recipe, saved_tiny_model, folder_dataset, tmp_path):
    """ "base" in metrics.json is the base model's own prompt-free output, not the adapter with untrained tokens."""
    out = tmp_path / "run"
    argv = _args(saved_tiny_model, folder_dataset, out, "--max-steps", "1", "--encoder-prompts", "2")
    recipe(argv)
    metrics = json.loads((out / "metrics.json").read_text())
    with np.load(out / "base_predictions.npz") as saved:
        base_predictions = {k: saved[k] for k in saved.files}
    cut = argv.index("--encoder-prompts")
    args = parse_args(*argv[:cut], *argv[cut + 2 :], prompt="none")
    model, processor = load_base_model(str(saved_tiny_model))
    _, val_dataset = datasets(args, processor, "semantic")
    loader = DataLoader(val_dataset, batch_size=1, collate_fn=collate_segmentation)
    untouched = evaluate_segmenter(
        Sam2Segmenter(model), loader, processor, Accelerator(cpu=True), keep_ids=set(base_predictions)
    )
    assert metrics["base"] == pytest.approx(untouched.metrics, abs=1e-6)
    assert base_predictions and base_predictions.keys() == untouched.kept_predictions.keys()
    for sample_id, mask in base_predictions.items():
        assert np.array_equal(mask, untouched.kept_predictions[sample_id])


def test_encoder_recipe_and_prompted_mode_train(saved_tiny_model, folder_dataset, tmp_path):
    out = tmp_path / "enc"
    ptsam_encoder(_args(saved_tiny_model, folder_dataset, out, "--max-steps", "2", "--encoder-prompts", "2"))
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert sum(v.numel() for v in saved.values()) == 8 * 64 + 2 * (16 + 16 + 32 + 64 + 64)
    prompted = tmp_path / "boxes"
    ptsam_decoder(_args(saved_tiny_model, folder_dataset, prompted, "--max-steps", "2", "--prompt", "box"))
    history = json.loads((prompted / "metrics.json").read_text())["history"]
    assert [h["step"] for h in history if "loss" in h] == [1, 2]


def test_hiera_tiny_decoder_adapter_is_under_10_kb(tmp_path):
    model = build_model_from_config(hiera_tiny_config())
    PtsamMethod().save(PtsamMethod().prepare(model, "hiera-tiny-random"), tmp_path, "hiera-tiny-random")
    assert (tmp_path / "adapter_model.safetensors").stat().st_size < 10_000
    assert load_file(str(tmp_path / "adapter_model.safetensors"))[
        "base_model.model.prompt_encoder.ptsam_tokens"
    ].shape == (8, 256)


@pytest.mark.slow
@pytest.mark.real_data
def test_nuclei_16_images_prompt_free_runs_and_loss_falls(tmp_path):
    data = real_dataset("nuclei-coelho2009")
    records = open_records(str(data))
    out = tmp_path / "nuclei"
    # 97 images: 29 in the training split (its first 16 are used), 68 held out for evaluation. Without augmentation
    # every epoch (4 steps of 4 images, logged as one mean) sees the same 16 inputs, so epoch losses compare exactly.
    args = _args("tiny-random", data, out, "--max-steps", "12", "--train-images", "16", "--eval-every", "1000")
    ptsam_decoder(args + ["--val-fraction", "0.7", "--no-augment", "--batch-size", "4", "--log-every", "4"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(records) == 97 and len(metrics["per_image"]) >= 60
    for key in ("dice", "iou", "boundary_iou"):
        assert 0 <= metrics["fine_tuned"][key] <= 1
    epoch_losses = [h["loss"] for h in metrics["history"] if "loss" in h]
    assert len(epoch_losses) == 3 and epoch_losses[2] < epoch_losses[0]
