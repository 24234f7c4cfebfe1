"""The shipped test base `compact-synthetic`: what the file is, that it segments, that correction clicks help, and
that 16-image adapters improve on its zero-shot masks on real data."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from sam2_peft.data.dataset import DatasetConfig, SegmentationDataset, collate_segmentation
from sam2_peft.data.prompts import PromptConfig
from sam2_peft.data.sources import open_records
from sam2_peft.models.loading import BUILTIN_PRETRAINED, Sam2LoadError, is_random_weights, load_base_model
from sam2_peft.models.segmenter import Sam2Segmenter, select_best_mask
from sam2_peft.recipes.lora import main as lora_recipe
from sam2_peft.recipes.ptsam import main as ptsam_recipe
from sam2_peft.training.losses import mask_iou

from .conftest import real_dataset

BASE = "compact-synthetic"
REPORTED = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "compact_synthetic_bar.json"


def test_shipped_base_is_a_small_half_precision_trained_model():
    weights = BUILTIN_PRETRAINED[BASE] / "model.safetensors"
    assert weights.stat().st_size < 5_000_000
    with safe_open(str(weights), "pt") as stored:
        assert {stored.get_slice(key).get_dtype() for key in stored.keys()} == {"F16"}
    model, processor = load_base_model(BASE)
    assert next(model.parameters()).dtype == torch.float32 and not is_random_weights(model)
    assert model.config._name_or_path == BASE and processor.image_processor.size["height"] == 256
    torch.testing.assert_close(
        model.prompt_encoder.shared_embedding.positional_embedding, model.shared_image_embedding.positional_embedding
    )
    with pytest.raises(Sam2LoadError, match="images only"):
        load_base_model(BASE, video=True)


@pytest.mark.slow
def test_shipped_base_reproduces_its_reported_box_prompted_scores():
    from benchmarks.pretrained_base import SYNTHETIC_VALIDATION, score

    reported = json.loads(REPORTED.read_text())["results"]["synthetic validation"]
    measured = score(*load_base_model(BASE), SYNTHETIC_VALIDATION, None, batch_size=8)
    for key in ("iou", "dice", "boundary_iou"):
        assert measured["model"][key] == pytest.approx(reported["model"][key], abs=2e-3), key
        assert measured["mask_is_box"][key] == pytest.approx(reported["mask_is_box"][key], abs=1e-9), key
    assert measured["model"]["iou"] > measured["mask_is_box"]["iou"]


def test_correction_clicks_reduce_the_error_of_the_previous_round():
    model, processor = load_base_model(BASE)
    config = DatasetConfig(prompts=PromptConfig(prompt="point"))
    dataset = SegmentationDataset(open_records("synthetic:16:1000000"), processor, config, train=False)
    batch = collate_segmentation([dataset[i] for i in range(len(dataset))])
    targets = batch["target_masks"]
    with torch.no_grad():
        output = Sam2Segmenter(model)(
            batch["object_image_index"],
            pixel_values=batch["pixel_values"],
            points=batch["points"],
            point_labels=batch["point_labels"],
            multimask_output=True,
            correction_rounds=2,  # as the model was trained
            target_masks=targets,
        )
    ious = []
    for round_output in (output, *output.corrections):
        logits = F.interpolate(select_best_mask(round_output), size=targets.shape[-2:], mode="bilinear")
        ious.append(mask_iou(logits[:, 0], targets).mean().item())
    assert len(targets) > 100
    assert all(later > earlier for earlier, later in zip(ious, ious[1:])), ious
    assert ious[-1] > ious[0] + 0.1, ious


def _recipe_args(data: Path, out: Path, val_fraction: str, *extra: str) -> list[str]:
    return [
        "--model", BASE, "--data", str(data), "--train-images", "16", "--val-fraction", val_fraction,
        "--eval-every", "1000", "--batch-size", "2", "--output-dir", str(out), "--report-to", "none",
        "--num-panels", "1", "--log-every", "10", *extra,
    ]  # fmt: skip


REAL_DATA_SPLITS = {"nuclei-coelho2009": "0.05", "polyps-kvasir-seg": "0.03"}
"""Validation share per dataset: 5 nuclei images of 97 (each with dozens of nuclei), 30 polyp images of 998; training
uses 16 others."""


@pytest.mark.slow
@pytest.mark.real_data
@pytest.mark.parametrize("name", sorted(REAL_DATA_SPLITS))
def test_16_image_lora_decoder_improves_box_prompted_dice_over_zero_shot(name, tmp_path):
    data = real_dataset(name)
    args = _recipe_args(data, tmp_path, REAL_DATA_SPLITS[name], "--max-steps", "40", "--lr", "2e-3")
    metrics = lora_recipe(args + ["--prompt", "box", "--max-objects", "8"])
    assert metrics["fine_tuned"]["dice"] > metrics["base"]["dice"] + 0.05, (metrics["base"], metrics["fine_tuned"])


@pytest.mark.slow
@pytest.mark.real_data
@pytest.mark.parametrize("name", sorted(REAL_DATA_SPLITS))
def test_16_image_ptsam_decoder_against_the_base_models_own_prompt_free_dice(name, tmp_path):
    """On nuclei the tokens beat the base's own prompt-free output clearly; on polyps they do not (0.110 -> 0.113 at
    these settings, at most +0.03 in a small sweep of initialisation and learning rate), so there the test asserts
    only that they do not make it worse."""
    data = real_dataset(name)
    # The token init these numbers were measured with (the default before issue 24's grid made it padding).
    args = _recipe_args(data, tmp_path, REAL_DATA_SPLITS[name], "--max-steps", "80", "--lr", "2e-2")
    metrics = ptsam_recipe(args + ["--token-init", "normal"])
    margin = 0.05 if name == "nuclei-coelho2009" else -0.01
    assert metrics["fine_tuned"]["dice"] > metrics["base"]["dice"] + margin, (metrics["base"], metrics["fine_tuned"])
