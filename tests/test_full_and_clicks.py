"""Full training, synthetic data as a source, and correction clicks."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from sam2_peft.adapters import FullMethod
from sam2_peft.data.prompts import NEGATIVE, POSITIVE
from sam2_peft.data.sources import DataError, open_records, parse_synthetic_spec
from sam2_peft.models.clicks import add_correction_clicks, correction_click
from sam2_peft.models.loading import is_random_weights, load_base_model


def test_synthetic_source_spec_and_records():
    assert parse_synthetic_spec("synthetic:5") == (5, 0, 256)
    assert parse_synthetic_spec("synthetic:5:7:128") == (5, 7, 128)
    assert parse_synthetic_spec("path/to/folder") is None
    with pytest.raises(DataError, match="synthetic:N"):
        parse_synthetic_spec("synthetic:many")
    records = open_records("synthetic:3:1:128")
    image, instances = records[2].load_image(), records[2].load_instances()
    assert image.shape == (128, 128, 3) and instances.shape[1:] == (128, 128)
    assert 3 <= len(instances) <= 15 and instances.reshape(len(instances), -1).any(1).all()
    np.testing.assert_array_equal(open_records("synthetic:3:1:128")[2].load_image(), image)  # deterministic


def test_full_method_trains_every_parameter_and_saves_a_model(tmp_path, tiny_model):
    method = FullMethod()
    model = method.prepare(tiny_model.requires_grad_(False), "tiny")
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        model.mask_decoder.iou_token.weight.add_(1)
    method.save(model, tmp_path, "tiny")
    reloaded, _ = load_base_model(str(tmp_path))
    torch.testing.assert_close(reloaded.mask_decoder.iou_token.weight, model.mask_decoder.iou_token.weight)
    assert not is_random_weights(reloaded)  # trained: the saved config no longer says random


def test_full_method_saves_half_precision_without_touching_the_trained_model(tmp_path, tiny_model):
    trained = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    FullMethod(save_dtype="float16").save(tiny_model, tmp_path, "tiny")
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as stored:
        assert {stored.get_slice(key).get_dtype() for key in stored.keys()} == {"F16"}
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in trained.items())
    assert next(tiny_model.parameters()).dtype == torch.float32
    reloaded, _ = load_base_model(str(tmp_path))
    assert next(reloaded.parameters()).dtype == torch.float32
    for key, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, trained[key].half().float(), rtol=0, atol=0)


def test_correction_click_goes_to_the_centre_of_the_largest_error():
    target = np.zeros((20, 30), dtype=bool)
    target[2:12, 2:12] = True
    predicted = target.copy()
    predicted[2:12, 2:7] = False  # missed the left half: 50 px
    predicted[15:17, 20:22] = True  # small false positive: 4 px
    (x, y), label = correction_click(predicted, target)
    assert label == POSITIVE and 2 <= x <= 6 and 4 <= y <= 9
    (x, y), label = correction_click(target | (np.arange(30) >= 25)[None, :], target)
    assert label == NEGATIVE and x >= 25
    assert correction_click(target, target) is None


def test_add_correction_clicks_appends_and_pads():
    targets = torch.zeros(2, 16, 16, dtype=torch.bool)
    targets[:, 4:12, 4:12] = True
    logits = torch.full((2, 1, 16, 16), -5.0)  # nothing predicted for object 0
    logits[1, 0] = torch.where(targets[1], 5.0, -5.0)  # object 1 exactly right
    points, labels = add_correction_clicks(torch.zeros(2, 2, 2), torch.tensor([[2, 3], [2, 3]]), logits, targets)
    assert points.shape == (2, 3, 2) and labels[:, :2].tolist() == [[2, 3], [2, 3]]
    assert labels[0, 2] == POSITIVE and targets[0, int(points[0, 2, 1]), int(points[0, 2, 0])]
    assert labels[1, 2] == -10
    points, labels = add_correction_clicks(None, None, logits, targets)
    assert points.shape == (2, 1, 2)


def test_segmenter_correction_rounds_share_one_encoding(tiny_model, monkeypatch):
    from sam2_peft.models.segmenter import Sam2Segmenter

    segmenter = Sam2Segmenter(tiny_model)
    calls = {"encoder": 0}
    original = segmenter.vision_features

    def counting(pixels):
        calls["encoder"] += 1
        return original(pixels)

    monkeypatch.setattr(segmenter, "vision_features", counting)
    targets = torch.zeros(2, 128, 128, dtype=torch.bool)
    targets[:, 30:70, 40:90] = True
    output = segmenter(
        torch.tensor([0, 0]),
        pixel_values=torch.randn(1, 3, 128, 128),
        points=torch.tensor([[[60.0, 50.0]], [[45.0, 35.0]]]),
        point_labels=torch.ones(2, 1, dtype=torch.long),
        multimask_output=True,
        correction_rounds=2,
        target_masks=targets,
    )
    assert calls["encoder"] == 1 and len(output.corrections) == 2
    assert output.mask_logits.shape == (2, 3, 32, 32)
    assert all(c.mask_logits.shape == (2, 1, 32, 32) for c in output.corrections)
    with pytest.raises(ValueError, match="target_masks"):
        segmenter(torch.tensor([0]), pixel_values=torch.randn(1, 3, 128, 128), correction_rounds=1)


def test_pretrain_recipe_from_a_config_file_on_synthetic_scenes(tmp_path):
    from sam2_peft.models.loading import tiny_config
    from sam2_peft.recipes.pretrain import main as pretrain

    config = tmp_path / "config.json"
    tiny_config(128).to_json_file(config)
    out = tmp_path / "pretrained"
    result = pretrain([
        "--model", str(config), "--data", "synthetic:6:0:128", "--val-data", "synthetic:2:99:128",
        "--max-steps", "2", "--batch-size", "2", "--correction-rounds", "1", "--report-to", "none",
        "--output-dir", str(out), "--num-panels", "1", "--log-every", "1",
    ])  # fmt: skip
    assert set(result) == {"base", "fine_tuned", "kept_step"}
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert "train_iou_last_round" in history[0]
    model, _ = load_base_model(str(out))
    assert (
        sum(p.numel() for p in model.parameters())
        == json.loads((out / "metrics.json").read_text())["trainable_parameters"]
    )


def test_generated_records_are_not_decoded_up_front():
    from sam2_peft.data.validation import validate_records

    records = open_records("synthetic:100000")
    kept, report = validate_records(records)  # would take an hour if every scene were generated
    assert len(kept) == 100000 and report.kept == 100000
