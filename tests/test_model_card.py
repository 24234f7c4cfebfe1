"""The model card a training run leaves in its folder (and push uploads): metrics, model-index, library label."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import ModelCard
from peft import PeftModel
from transformers import Sam2Model

from sam2_peft.adapters.methods import FullMethod, PtsamMethod
from sam2_peft.adapters.resolve import trained_prompt
from sam2_peft.hub.model_card import build_model_card, comparison_picture, write_model_card
from sam2_peft.models.loading import load_base_model
from sam2_peft.recipes.lora import main as lora_recipe
from tests.adapter_helpers import METRICS, make_adapter
from tests.recipe_helpers import lora_args

PEFT_TEMPLATE = "# Model Card for Model ID"


def test_run_folder_gets_the_pushed_card_with_model_index(saved_tiny_model, folder_dataset, tmp_path):
    out = tmp_path / "run"
    lora_recipe(lora_args(saved_tiny_model, folder_dataset, out, "--max-steps", "2"))
    left = ModelCard.load(out / "README.md")  # every run leaves the card in its folder, not peft's template
    assert PEFT_TEMPLATE not in left.text and left.data.eval_results
    assert trained_prompt(out) == "box"  # recorded for `predict`'s prompt warning

    path = write_model_card(out, base_model="facebook/sam2.1-hiera-tiny", license="apache-2.0")
    assert path == out / "README.md" and path.is_file() and not path.is_symlink()
    assert not list(out.glob(".README.md.*"))  # the temporary file of the atomic write is gone
    card = ModelCard.load(path)
    metrics = json.loads((out / "metrics.json").read_text())
    assert PEFT_TEMPLATE not in card.text
    assert f"| Dice | {metrics['base']['dice']:.4f} | {metrics['fine_tuned']['dice']:.4f} |" in card.text
    assert f"{metrics['trainable_parameters']:,}" in card.text and folder_dataset.name in card.text
    assert "Sam2PeftPredictor.from_pretrained" in card.text
    picture = comparison_picture(out).relative_to(out).as_posix()
    assert not picture.startswith(("panels/final/worst", "panels/final/best"))
    assert f"![Base vs. fine-tuned]({picture})" in card.text

    data = card.data
    assert data.base_model == "facebook/sam2.1-hiera-tiny" and data.license == "apache-2.0"
    assert data.library_name == "peft" and data.model_name == "run"
    results = {result.metric_type: result for result in data.eval_results}
    assert {name: result.metric_value for name, result in results.items()} == metrics["fine_tuned"]
    assert all(r.task_type == "image-segmentation" and r.dataset_name == folder_dataset.name for r in results.values())
    assert set(data.metrics) == set(metrics["fine_tuned"])

    # The adapter beside the card still loads with plain peft (the card replaced a link, not the adapter's files).
    PeftModel.from_pretrained(Sam2Model.from_pretrained(saved_tiny_model), out)


@pytest.mark.parametrize("kind", ["lora", "ptsam", "partial", "full"])
def test_only_peft_adapters_are_labelled_peft(kind, saved_tiny_model, tmp_path):
    folder = tmp_path / kind
    if kind in ("lora", "partial"):
        make_adapter(kind, saved_tiny_model, folder)
    else:
        model, _ = load_base_model(str(saved_tiny_model))
        method = PtsamMethod() if kind == "ptsam" else FullMethod()
        model = method.prepare(model, str(saved_tiny_model))
        method.save(model, folder, str(saved_tiny_model))
        (folder / "metrics.json").write_text(json.dumps({**METRICS, "method": method.name}))
    data = build_model_card(folder, "org/name").data
    expected = {"lora": "peft", "ptsam": "peft", "partial": None, "full": "transformers"}[kind]
    assert data.library_name == expected
    assert ("peft" in data.tags) == (expected == "peft")
    assert [r.metric_value for r in data.eval_results] == [METRICS["fine_tuned"][k] for k in METRICS["fine_tuned"]]
    if kind == "full":  # the usage snippet loads the whole model, not an adapter
        assert 'load_base_model("org/name")' in build_model_card(folder, "org/name").text


@pytest.mark.parametrize(
    ("base", "license"),
    [("facebook/sam2.1-hiera-small", "apache-2.0"), ("compact-synthetic", "apache-2.0"), ("someone/sam2-x", None)],
)
def test_the_card_names_the_license_of_a_known_base(base, license, saved_tiny_model, tmp_path):
    make_adapter("lora", saved_tiny_model, tmp_path / "lora")
    (tmp_path / "lora" / "metrics.json").write_text(json.dumps({"fine_tuned": METRICS, "base_model": base}))
    assert build_model_card(tmp_path / "lora").data.license == license
    assert build_model_card(tmp_path / "lora", license="mit").data.license == "mit"
