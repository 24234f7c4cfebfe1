"""Every recipe and every command at its defaults: given only the model, the data and the output, each runs end to end
through the real command line (`sam2-peft ...`, in this process; `serve` as its own process) on tiny data, and its
outputs are checked. Flags beyond those three appear only where a default cannot run on tiny data (named at the
case)."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi
from PIL import Image
from safetensors.torch import load_file
from transformers import Sam2Model

from sam2_peft.cli import main

from .conftest import write_folder_dataset
from .serve_helpers import free_port
from .video_helpers import write_video_folder

MODEL = ["--model", "tiny-random"]
EDGETAM = pytest.param(
    "edgetam-tiny-random",
    marks=pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="EdgeTAM needs timm (the edgetam extra)"),
)
METRICS = {"iou", "dice", "boundary_iou", "pixel_accuracy"}
"""The prompted evaluation's metrics (validation during training, `eval --protocol prompted`)."""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """2 images with 3 instances each: the default 20% validation split keeps 1 (at least one), leaving one batch per
    epoch, 10 steps in the default 10 epochs."""
    return write_folder_dataset(tmp_path_factory.mktemp("matrix") / "data", num_images=2)


@pytest.fixture(scope="module")
def lora_run(data, tmp_path_factory):
    """`sam2-peft train lora` at its defaults: the adapter the commands below use."""
    out = tmp_path_factory.mktemp("matrix") / "lora"
    main(["train", "lora", *MODEL, "--data", str(data), "--output-dir", str(out)])
    return out


def _metrics(out) -> dict:
    return json.loads((out / "metrics.json").read_text())


def test_train_lora(lora_run):
    metrics = _metrics(lora_run)
    assert metrics["steps"] == 10
    assert set(metrics["base"]) == set(metrics["fine_tuned"]) == METRICS
    (val_id,) = metrics["per_image"]
    assert (lora_run / "README.md").is_file() and (lora_run / "panels" / "final" / f"{val_id}.png").is_file()
    weights = load_file(lora_run / "adapter_model.safetensors")
    assert weights and all(torch.isfinite(w).all() for w in weights.values())
    assert any("lora_A" in name for name in weights) and any("mask_decoder" in name for name in weights)


@pytest.mark.parametrize(
    ("recipe", "weights_file", "weights", "encoder_prompts"),
    [
        ("partial", "partial_model.safetensors", "mask_decoder", None),
        ("ptsam_decoder", "adapter_model.safetensors", "prompt", 0),
        pytest.param(  # deep encoder prompts: the encoder runs at every step (no embedding cache)
            "ptsam_encoder", "adapter_model.safetensors", "prompt", 8, marks=pytest.mark.slow, id="ptsam_encoder"
        ),
    ],
    ids=["partial", "ptsam_decoder", "ptsam_encoder"],
)
def test_train_image_recipes(recipe, weights_file, weights, encoder_prompts, data, tmp_path):
    out = tmp_path / recipe
    main(["train", recipe, *MODEL, "--data", str(data), "--output-dir", str(out)])
    metrics = _metrics(out)
    assert metrics["steps"] == 10 and set(metrics["fine_tuned"]) == METRICS
    saved = load_file(out / weights_file)
    assert any(weights in name for name in saved) and all(torch.isfinite(w).all() for w in saved.values())
    if encoder_prompts is not None:
        assert json.loads((out / "sam2_peft.json").read_text())["ptsam"]["encoder_prompts"] == encoder_prompts


def test_train_ptsam_multiclass(tmp_path):
    """`train ptsam --mask-type semantic` (the flag that names the data's kind) on class maps: every class of
    classes.json in one adapter, with the multi-class defaults (tuned upscaling, class weights), scored per class."""
    from .test_multiclass import CLASSES, write_class_folder

    data, out = write_class_folder(tmp_path / "classes", scenes=5), tmp_path / "ptsam"
    main(["train", "ptsam", *MODEL, "--data", str(data), "--mask-type", "semantic", "--output-dir", str(out)])
    metrics = _metrics(out)
    assert metrics["steps"] == 20  # 4 training scenes: two batches in each of the 10 epochs
    assert {f"dice_{name}" for name in CLASSES} | {"mean_dice"} <= set(metrics["fine_tuned"])
    assert len(metrics["class_weights"]) == len(CLASSES)
    saved = load_file(out / "adapter_model.safetensors")
    assert any("ptsam_delta_weight" in name for name in saved) and all(torch.isfinite(w).all() for w in saved.values())
    (tokens,) = [w for name, w in saved.items() if "ptsam_tokens" in name]
    assert tokens.shape[0] == len(CLASSES)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-random", EDGETAM, "sam3-tracker-tiny-random"])
def test_train_video(model, tmp_path):
    """A 3-frame sequence: 2 clips (a clip starts on an annotated frame and holds another), one batch of 2 per epoch;
    no validation set at the defaults. On each family's tiny base (EdgeTAM's memory through its spatial perceiver)."""
    data = write_video_folder(tmp_path / "video", "seq", frames=3)
    out = tmp_path / "video-run"
    main(["train", "video", "--model", model, "--data", str(data), "--output-dir", str(out)])
    metrics = _metrics(out)
    assert metrics["steps"] == 10 and metrics["method"] == "lora"
    saved = load_file(out / "adapter_model.safetensors")
    assert any("memory_attention" in name for name in saved) and any("mask_decoder" in name for name in saved)


@pytest.mark.slow
def test_video_file_train_predict_eval(tmp_path):
    """A folder of one mp4 (3 frames, all annotated, as `test_train_video`): `train video`, then `predict` (prompted by
    the annotation beside it; a mask video and an overlay at the defaults) and `eval --protocol video` with its
    adapter."""
    pytest.importorskip("av", reason='video files need PyAV: pip install -e ".[video]"')
    from .video_file_helpers import write_video_file

    data = write_video_file(tmp_path / "videos", frames=3, annotated=(0, 1, 2))
    run = tmp_path / "video-run"
    main(["train", "video", *MODEL, "--data", str(data), "--output-dir", str(run)])
    assert _metrics(run)["steps"] == 10
    out = tmp_path / "tracked"
    main(["predict", "--adapter", str(run), str(data), str(out)])
    assert {p.name for p in (out / "clip").iterdir()} == {"masks.mkv", "overlay.mp4"}
    output = tmp_path / "jf.json"
    main(["eval", "--protocol", "video", "--adapter", str(run), "--data", str(data), "--output", str(output)])
    assert set(json.loads(output.read_text())["metrics"]) == {"J", "F", "J&F"}


@pytest.mark.slow
def test_train_pretrain(data, tmp_path):
    """`--max-steps 2`: the default is 20000 steps (validation on 64 synthetic scenes, its default, at the end)."""
    out = tmp_path / "pretrain"
    main(["train", "pretrain", *MODEL, "--data", str(data), "--output-dir", str(out), "--max-steps", "2"])
    metrics = _metrics(out)
    assert metrics["steps"] == 2 and set(metrics["fine_tuned"]) == METRICS
    assert len(metrics["per_image"]) == 64
    model = Sam2Model.from_pretrained(out)
    assert model.config.vision_config.backbone_config.image_size == [256, 256]


@pytest.mark.parametrize(
    "protocol",
    # the automatic protocol's default 32 x 32 point grid and the interactive one's 20 clicks per object take time
    [
        "prompted",
        pytest.param("automatic", marks=pytest.mark.slow),
        pytest.param("interactive", marks=pytest.mark.slow),
    ],
)
def test_eval(protocol, lora_run, data, tmp_path):
    output = tmp_path / "metrics.json"
    main(["eval", "--protocol", protocol, "--adapter", str(lora_run), "--data", str(data), "--output", str(output)])
    report = json.loads(output.read_text())
    if protocol == "prompted":
        assert set(report["metrics"]) == METRICS and len(report["per_image"]) == 2
        return
    names = {"base", "adapter"} if protocol == "interactive" else {"base (grid)", "adapter (grid)"}
    assert set(report["results"]) == names
    assert all(result for result in report["results"].values())
    if protocol == "automatic":
        assert all("overall" in result for result in report["results"].values())
    assert report["num_images"] == 2
    if protocol == "interactive":
        assert output.with_suffix(".png").is_file()


def test_predict(lora_run, data, tmp_path, capsys):
    out = tmp_path / "predictions"
    main(["predict", "--adapter", str(lora_run), str(data / "images"), str(out)])
    assert "warning: this adapter was trained with box prompts" in capsys.readouterr().err
    predictions = json.loads((out / "predictions.json").read_text())
    assert len(predictions) == 2
    for name in predictions:
        stem = name.rsplit(".", 1)[0]
        mask = np.asarray(Image.open(out / "masks" / f"{stem}.png"))
        assert mask.shape == (96, 120) and set(np.unique(mask)) <= {0, 1}
        assert Image.open(out / "overlays" / f"{stem}.png").size == (120, 96)


def test_segment_all(lora_run, data, tmp_path):
    out = tmp_path / "instances"
    main(["segment-all", "--adapter", str(lora_run), str(data / "images"), str(out)])
    labels = sorted((out / "labels").iterdir())
    assert len(labels) == 2 and all(np.asarray(Image.open(p)).shape == (96, 120) for p in labels)
    assert len(list((out / "overlays").iterdir())) == 2
    coco = json.loads((out / "instances.json").read_text())
    assert len(coco["images"]) == 2 and {"annotations", "categories"} <= set(coco)


def test_merge(lora_run, tmp_path):
    out = tmp_path / "merged"
    main(["merge", str(lora_run), str(out)])
    merged = Sam2Model.from_pretrained(out)
    assert not any("lora" in name for name in merged.state_dict())
    assert merged.config.vision_config.backbone_config.image_size == [256, 256]


def test_push(lora_run, make_hub_repo_id):
    repo_id = make_hub_repo_id("matrix")
    main(["push", str(lora_run), repo_id])
    files = set(HfApi().list_repo_files(repo_id))
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= files


def test_convert_meta(tmp_path):
    """The one required flag is the checkpoint's architecture (`--config`)."""
    from .test_meta_checkpoint import SHAPES_FILE

    shapes = json.loads(SHAPES_FILE.read_text())
    checkpoint = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": {key: torch.zeros(shape) for key, shape in shapes.items()}}, checkpoint)
    with pytest.raises(SystemExit) as exit_info:
        main(["convert-meta", str(checkpoint), "--config", "sam2.1_hiera_t", str(tmp_path / "hf")])
    assert exit_info.value.code == 0
    model = Sam2Model.from_pretrained(tmp_path / "hf")
    assert model.config.vision_config.backbone_config.image_size == [1024, 1024]


def test_serve_answers_a_request(lora_run, data):
    """`sam2-peft serve` as its own process (as a user starts it), with the trained adapter; one segment request."""
    for module in ("fastapi", "uvicorn", "multipart", "prometheus_client"):  # the serve extra
        pytest.importorskip(module)
    port = free_port()
    command = [sys.executable, "-m", "sam2_peft.cli", "serve", *MODEL, "--adapter", f"lora={lora_run}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    server = subprocess.Popen([*command, "--port", str(port)], env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=5)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"serve did not start: {server.stderr.read() if server.poll() is not None else ''}")
                time.sleep(0.2)
        answer = _segment(url, data / "images" / "img_000.png")
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert answer["adapter"] == "lora" and len(answer["masks"]) == 1


def _segment(url: str, image) -> dict:
    """`POST /v1/segment`: the image (base64) with one box, through adapter `lora`."""
    body = {"image": base64.b64encode(image.read_bytes()).decode(), "adapter": "lora", "boxes": [[10, 10, 60, 50]]}
    request = urllib.request.Request(
        f"{url}/v1/segment", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())
