"""Predictor, merge and bad-input errors on local adapter folders."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import Sam2Model

from sam2_peft.adapters import AdapterLoadError, AdapterMismatchError, load_adapter
from sam2_peft.adapters.merge import merge_adapter
from sam2_peft.inference.predictor import Sam2PeftPredictor
from sam2_peft.models.loading import build_model_from_config, load_base_model, tiny_config
from tests.adapter_helpers import make_adapter, non_square_images


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, saved_tiny_model):
    return make_adapter("lora", saved_tiny_model, tmp_path_factory.mktemp("lora"))


@pytest.fixture(scope="module")
def partial_dir(tmp_path_factory, saved_tiny_model):
    return make_adapter("partial", saved_tiny_model, tmp_path_factory.mktemp("partial"))


def reference(model, processor, image, **prompts):
    """The model's own forward on the processor's inputs, post-processed by the processor: `(N, M, H, W)` logits."""
    inputs = processor(images=image, return_tensors="pt", **prompts)
    with torch.no_grad():
        outputs = model(**inputs, multimask_output=False)
    logits = processor.post_process_masks(outputs.pred_masks, inputs["original_sizes"], binarize=False)[0]
    return logits[:, 0], outputs.iou_scores[0, :, 0]


def assert_same(actual, expected, rel: float = 1e-5) -> None:
    """Equal up to `rel` of the largest magnitude (random tiny models give logits of ~1e-4)."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    scale = expected.abs().max().item()
    assert scale > 0 and (actual - expected).abs().max().item() <= rel * scale


def differs(a, b, rel: float = 0.05) -> bool:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return (a - b).abs().max().item() > rel * b.abs().max().item()


def test_predictor_matches_peft_forward_at_original_size_batched(lora_dir, saved_tiny_model):
    predictor = Sam2PeftPredictor.from_pretrained(lora_dir, device="cpu")
    base, processor = load_base_model(str(saved_tiny_model))
    peft_model = PeftModel.from_pretrained(base, str(lora_dir)).eval()
    images = non_square_images(2)
    boxes = [[[30, 20, 90, 50], [5, 5, 40, 60]], [[10, 15, 70, 60]]]
    points = [[[[60, 35]], [[20, 30]]], [[[40, 40]]]]
    predictions = predictor.predict(images, boxes=boxes, points=points, labels=[[[1], [1]], [[1]]], return_logits=True)

    assert len(predictions) == 2
    for image, image_boxes, image_points, prediction in zip(images, boxes, points, predictions):
        height, width = image.shape[:2]
        assert prediction.masks.shape == (len(image_boxes), height, width) and prediction.masks.dtype == bool
        assert prediction.scores.shape == (len(image_boxes),)
        labels = [[[1] * len(p) for p in image_points]]
        expected, scores = reference(
            peft_model, processor, image, input_boxes=[image_boxes], input_points=[image_points], input_labels=labels
        )
        assert_same(prediction.logits, expected)
        np.testing.assert_array_equal(prediction.masks, (expected > 0).numpy())
        assert_same(prediction.scores, scores)
    # The adapter changes the result: the same prediction with the bare base differs.
    bare, _ = reference(load_base_model(str(saved_tiny_model))[0], processor, images[1], input_boxes=[boxes[1]])
    assert differs(bare, predictions[1].logits)


def test_lora_is_merged_on_load_unless_asked_not_to(lora_dir):
    from peft.tuners.lora import LoraLayer

    merged = Sam2PeftPredictor.from_pretrained(lora_dir, device="cpu")
    kept = Sam2PeftPredictor.from_pretrained(lora_dir, device="cpu", merge=False)
    assert isinstance(merged.model, Sam2Model) and not any(isinstance(m, LoraLayer) for m in merged.model.modules())
    assert isinstance(kept.model, PeftModel) and any(isinstance(m, LoraLayer) for m in kept.model.modules())
    image = non_square_images(1)[0]
    boxes = [[30, 20, 90, 50], [5, 5, 40, 60]]
    got, want = (p.predict(image, boxes=boxes, return_logits=True) for p in (merged, kept))
    assert_same(got.logits, want.logits, rel=1e-4)
    assert_same(got.scores, want.scores, rel=1e-4)


def test_prompt_free_and_single_image(lora_dir, saved_tiny_model):
    predictor = Sam2PeftPredictor.from_pretrained(lora_dir, device="cpu")
    image = non_square_images(1)[0]
    prediction = predictor.predict(image, return_logits=True)
    assert prediction.masks.shape == (1, *image.shape[:2])
    expected, scores = reference(predictor.model, predictor.processor, image)
    assert_same(prediction.logits, expected)
    multi = predictor.predict(image, boxes=[[30, 20, 90, 50]], multimask_output=True)
    assert multi.masks.shape == (1, 3, *image.shape[:2]) and multi.scores.shape == (1, 3)
    with pytest.raises(ValueError, match="one entry per image: 2 images, 1 entries"):
        predictor.predict([image, image], boxes=[[[0, 0, 5, 5]]])
    with pytest.raises(ValueError, match=r"labels must be \(N, P\)"):
        predictor.predict(image, points=[[[5, 5]]], labels=[[1, 1]])


def test_predictor_partial_adapter(partial_dir, saved_tiny_model):
    predictor = Sam2PeftPredictor.from_pretrained(partial_dir, device="cpu")
    base, processor = load_base_model(str(saved_tiny_model))
    tuned = load_adapter(base, partial_dir)
    image = non_square_images(1)[0]
    prediction = predictor.predict(image, boxes=[[30, 20, 90, 50]], return_logits=True)
    expected, _ = reference(tuned, processor, image, input_boxes=[[[30, 20, 90, 50]]])
    assert_same(prediction.logits, expected)


@pytest.mark.parametrize("kind", ["lora", "partial"])
def test_merge_loads_in_plain_transformers_with_same_outputs(kind, lora_dir, partial_dir, saved_tiny_model, tmp_path):
    adapter = lora_dir if kind == "lora" else partial_dir
    out = merge_adapter(adapter, tmp_path / "merged")
    merged = Sam2Model.from_pretrained(out).eval()
    assert not any("lora_" in name for name in merged.state_dict())
    adapted = Sam2PeftPredictor.from_pretrained(adapter, device="cpu")
    plain = Sam2PeftPredictor(merged, adapted.processor, device="cpu")
    image = non_square_images(1)[0]
    ours = adapted.predict(image, boxes=[[30, 20, 90, 50]], return_logits=True).logits
    theirs = plain.predict(image, boxes=[[30, 20, 90, 50]], return_logits=True).logits
    assert_same(theirs, ours)
    base = Sam2PeftPredictor(*load_base_model(str(saved_tiny_model)), device="cpu")
    assert differs(base.predict(image, boxes=[[30, 20, 90, 50]], return_logits=True).logits, ours)


def test_bad_adapters_raise_clear_errors(lora_dir, tmp_path):
    with pytest.raises(AdapterLoadError, match=r"expected adapter_config.json .* found nothing"):
        Sam2PeftPredictor.from_pretrained(tmp_path)

    no_weights = tmp_path / "no-weights"
    shutil.copytree(lora_dir, no_weights)
    (no_weights / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterLoadError, match="has adapter_config.json but no weights"):
        Sam2PeftPredictor.from_pretrained(no_weights)

    unknown = tmp_path / "unknown"
    shutil.copytree(lora_dir, unknown)
    config = json.loads((unknown / "adapter_config.json").read_text())
    (unknown / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "SPARKLES"}))
    with pytest.raises(AdapterLoadError, match="Unknown peft_type 'SPARKLES'.*expected one of peft's types"):
        Sam2PeftPredictor.from_pretrained(unknown)

    anonymous = tmp_path / "anonymous"
    shutil.copytree(lora_dir, anonymous)
    (anonymous / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    with pytest.raises(AdapterLoadError, match="does not record its base model"):
        Sam2PeftPredictor.from_pretrained(anonymous)

    with pytest.raises(AdapterLoadError, match="Expected an adapter folder or a Hub repo id"):
        Sam2PeftPredictor.from_pretrained("./not/a/folder/anywhere")


def test_adapter_for_another_architecture_is_refused(lora_dir, tmp_path):
    other = tmp_path / "base256"
    build_model_from_config(tiny_config(256), seed=0).save_pretrained(other)
    with pytest.raises(AdapterMismatchError, match="image_size: adapter expects 128, base model has 256"):
        Sam2PeftPredictor.from_pretrained(lora_dir, base_model=str(other))
    with pytest.raises(AdapterMismatchError, match="image_size: adapter expects 128"):
        merge_adapter(lora_dir, tmp_path / "merged", base_model=str(other))
    assert not (tmp_path / "merged").exists()


def test_bfloat16_autocast_keeps_float32_outputs(lora_dir):
    full = Sam2PeftPredictor.from_pretrained(lora_dir, device="cpu")
    half = Sam2PeftPredictor.from_pretrained(lora_dir, device="cpu", dtype="bfloat16")
    image = non_square_images(1)[0]
    ours = half.predict(image, boxes=[[30, 20, 90, 50]], return_logits=True)
    reference_ = full.predict(image, boxes=[[30, 20, 90, 50]], return_logits=True)
    assert ours.logits.dtype == np.float32 and ours.masks.shape == reference_.masks.shape
    assert not np.array_equal(ours.logits, reference_.logits)  # autocast did run in bfloat16
    assert np.abs(ours.scores - reference_.scores).max() < 0.02
