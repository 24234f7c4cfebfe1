"""`sam2-peft` sharing commands end to end: train with --push-to-hub, eval, predict, push, merge."""

from __future__ import annotations

import json

import numpy as np
import pytest
from huggingface_hub import HfApi, ModelCard
from PIL import Image
from transformers import Sam2Model

from sam2_peft.cli import main
from sam2_peft.inference.predictor import Sam2PeftPredictor
from sam2_peft.models.loading import build_model_from_config, processor_for_image_size, tiny_config
from tests.adapter_helpers import non_square_images, save_images
from tests.conftest import write_folder_dataset


@pytest.fixture(scope="module")
def run(tmp_path_factory, hub_server):
    """One short training run through `sam2-peft train ... --push-to-hub`, with a separate validation folder."""
    root = tmp_path_factory.mktemp("cli-share")
    base = root / "base"
    build_model_from_config(tiny_config(128), seed=0).save_pretrained(base)
    processor_for_image_size(128).save_pretrained(base)
    train, val = write_folder_dataset(root / "train", 4), write_folder_dataset(root / "val", 2, seed=5)
    repo_id = f"{hub_server.user}/cli-run"
    out = root / "out"
    main(
        ["train", "lora_decoder", "--model", str(base), "--data", str(train), "--val-data", str(val)]
        + ["--output-dir", str(out), "--report-to", "none", "--max-steps", "2", "--batch-size", "2"]
        + ["--lora-r", "4", "--lr", "1e-3", "--num-panels", "1", "--push-to-hub", repo_id, "--hub-private"]
    )
    return {"out": out, "val": val, "repo_id": repo_id, "base": base}


def test_train_flag_pushed_the_run_with_its_numbers(run):
    api = HfApi()
    assert api.model_info(run["repo_id"]).private is True
    files = set(api.list_repo_files(run["repo_id"]))
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "comparison.png"} <= files
    assert "training_config.json" in files and not any(f.startswith("checkpoints") for f in files)
    metrics = json.loads((run["out"] / "metrics.json").read_text())
    card = ModelCard.load(run["repo_id"])
    iou = f"| IoU | {metrics['base']['iou']:.4f} | {metrics['fine_tuned']['iou']:.4f} |"
    assert iou in card.text and f"{metrics['trainable_parameters']:,}" in card.text


def test_eval_reproduces_the_trainers_validation_numbers(run, tmp_path):
    output = tmp_path / "metrics.json"
    main(["eval", "--adapter", str(run["out"]), "--data", str(run["val"]), "--output", str(output)])
    result = json.loads(output.read_text())
    expected = json.loads((run["out"] / "metrics.json").read_text())
    assert result["num_images"] == 2
    for name, value in expected["fine_tuned"].items():
        assert result["metrics"][name] == pytest.approx(value, abs=1e-6)
    main(["eval", "--model", str(run["base"]), "--data", str(run["val"]), "--output", str(output)])
    base = json.loads(output.read_text())["metrics"]
    assert base == pytest.approx(expected["base"], abs=1e-6)


def test_predict_writes_masks_and_overlays(run, tmp_path):
    images = non_square_images(2)
    folder = save_images(images, tmp_path / "images")
    boxes = {"img_0.png": [[30, 20, 90, 50], [5, 5, 40, 60]], "img_1": [[10, 15, 70, 60]]}
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    out = tmp_path / "pred"
    main(["predict", str(folder), str(out), "--adapter", str(run["out"]), "--boxes", str(tmp_path / "boxes.json")])

    predictor = Sam2PeftPredictor.from_pretrained(run["out"], device="cpu")
    scores = json.loads((out / "predictions.json").read_text())
    for index, key in enumerate(boxes):
        expected = predictor.predict(images[index], boxes=boxes[key])
        labels = np.asarray(Image.open(out / "masks" / f"img_{index}.png"))
        assert labels.shape == images[index].shape[:2]
        for k, mask in enumerate(expected.masks, start=1):
            assert np.array_equal(labels == k, mask & ~np.any(expected.masks[k:], axis=0))
        assert scores[f"img_{index}.png"]["scores"] == pytest.approx(expected.scores.tolist())
        overlay = np.asarray(Image.open(out / "overlays" / f"img_{index}.png"))
        assert overlay.shape == images[index].shape

    main(["predict", str(folder), str(tmp_path / "free"), "--adapter", str(run["out"])])  # prompt-free
    free = predictor.predict(images[1])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "free" / "masks" / "img_1.png")) == 1, free.masks[0])

    (tmp_path / "bad.json").write_text(json.dumps({"missing.png": [[0, 0, 4, 4]]}))
    with pytest.raises(SystemExit, match=r"names images not in .*\['missing.png'\]"):
        main(
            [
                "predict",
                str(folder),
                str(tmp_path / "x"),
                "--adapter",
                str(run["out"]),
                "--boxes",
                str(tmp_path / "bad.json"),
            ]
        )


def test_push_and_merge_commands(run, make_hub_repo_id, tmp_path):
    repo_id = make_hub_repo_id("cli")
    main(["push", str(run["out"]), repo_id, "--revision", "exp1", "--commit-message", "from the CLI"])
    assert "adapter_model.safetensors" in HfApi().list_repo_files(repo_id, revision="exp1")

    merged = tmp_path / "merged"
    main(["merge", repo_id, str(merged), "--revision", "exp1"])
    plain = Sam2PeftPredictor(Sam2Model.from_pretrained(merged), processor_for_image_size(128), device="cpu")
    adapted = Sam2PeftPredictor.from_pretrained(run["out"], device="cpu")
    image = non_square_images(1)[0]
    ours = adapted.predict(image, boxes=[[30, 20, 90, 50]], return_logits=True).logits
    theirs = plain.predict(image, boxes=[[30, 20, 90, 50]], return_logits=True).logits
    assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(ours).max()

    with pytest.raises(SystemExit, match="has no revision 'nope'"):
        main(["merge", repo_id, str(tmp_path / "m2"), "--revision", "nope"])
    with pytest.raises(SystemExit, match=r"error: No adapter in .*expected adapter_config.json"):
        main(["push", str(tmp_path), repo_id])


def test_help_lists_every_command(capsys):
    main(["--help"])
    text = capsys.readouterr().out
    assert all(name in text for name in ("train", "eval", "predict", "push", "merge", "convert-meta"))
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    assert "boxes file: JSON mapping image file names" in capsys.readouterr().out
