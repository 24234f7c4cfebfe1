"""Bad input ends in a clear error, never in NaN results or a traceback: adapter files, prompts, JSON, OUT_DIR, push."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import HfApi, constants
from safetensors.torch import load_file, save_file

from sam2_peft.adapters import AdapterLoadError, load_adapter
from sam2_peft.adapters.merge import merge_adapter
from sam2_peft.cli import main
from sam2_peft.inference.predictor import PromptError, Sam2PeftPredictor
from sam2_peft.io import atomic_write_json
from sam2_peft.models.loading import load_base_model
from tests.adapter_helpers import make_adapter, non_square_images, save_images

BOX = [30, 20, 90, 50]


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, saved_tiny_model) -> Path:
    return make_adapter("lora", saved_tiny_model, tmp_path_factory.mktemp("lora"))


@pytest.fixture(scope="module")
def partial_dir(tmp_path_factory, saved_tiny_model) -> Path:
    return make_adapter("partial", saved_tiny_model, tmp_path_factory.mktemp("partial"))


@pytest.fixture(scope="module")
def predictor(lora_dir) -> Sam2PeftPredictor:
    return Sam2PeftPredictor.from_pretrained(lora_dir, device="cpu")


@pytest.fixture
def images(tmp_path) -> Path:
    return save_images(non_square_images(2), tmp_path / "images")


def copy_adapter(source: Path, target: Path) -> Path:
    """A plain copy of an adapter's files (links followed), without the run's other files."""
    target.mkdir(parents=True)
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "partial_config.json",
        "partial_model.safetensors",
    ):
        if (source / name).exists():
            shutil.copyfile(source / name, target / name)
    shutil.copyfile(source / "sam2_peft.json", target / "sam2_peft.json")
    return target


def poison(adapter: Path, value: float) -> str:
    """Put `value` (NaN or inf) into one weight of the adapter; returns that tensor's name."""
    weights = next(
        adapter / n for n in ("adapter_model.safetensors", "partial_model.safetensors") if (adapter / n).exists()
    )
    state = load_file(weights)
    name = sorted(state)[0]
    state[name].view(-1)[0] = value
    save_file(state, str(weights), metadata={"format": "pt"})
    return name


def error_of(argv: list[str]) -> str:
    """Run the CLI, expecting it to stop with one `error: ...` message; return that message."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


# ------------------------------------------------------------------------------------- non-finite adapter weights


@pytest.mark.parametrize("kind,value", [("lora", float("nan")), ("partial", float("inf"))])
def test_non_finite_weights_are_refused_on_every_load_path(
    kind, value, lora_dir, partial_dir, saved_tiny_model, tmp_path
):
    adapter = copy_adapter(lora_dir if kind == "lora" else partial_dir, tmp_path / "bad")
    tensor = poison(adapter, value)
    pattern = rf"safetensors': tensor '{tensor}' holds 1 NaN or infinite value"
    with pytest.raises(AdapterLoadError, match=pattern):
        load_adapter(load_base_model(str(saved_tiny_model))[0], adapter)
    with pytest.raises(AdapterLoadError, match=pattern):
        Sam2PeftPredictor.from_pretrained(adapter, device="cpu")
    with pytest.raises(AdapterLoadError, match=pattern):
        merge_adapter(adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists(), "no NaN model is written"
    assert tensor in error_of(["merge", str(adapter), str(tmp_path / "merged")])


def test_non_finite_weights_from_the_hub_are_refused(hub_server, hub_repo_id, lora_dir, tmp_path):
    adapter = copy_adapter(lora_dir, tmp_path / "bad")
    tensor = poison(adapter, float("nan"))
    api = HfApi()
    api.create_repo(hub_repo_id)
    api.upload_folder(repo_id=hub_repo_id, folder_path=adapter)  # past push_adapter, which refuses it too
    with pytest.raises(AdapterLoadError, match=rf"adapter_model.safetensors': tensor '{tensor}' holds 1 NaN"):
        Sam2PeftPredictor.from_pretrained(hub_repo_id, device="cpu")


# ---------------------------------------------------------------------------------------------------- prompts


@pytest.mark.parametrize(
    "box,problem",
    [
        ([30, 20, float("nan"), 50], "has a NaN or infinite coordinate"),
        ([30, 20, float("inf"), 50], "has a NaN or infinite coordinate"),
        ([90, 20, 30, 50], "is reversed"),
        ([30, 20, 30, 50], "has zero area"),
        ([200, 100, 260, 140], "lies entirely outside the 150x72 image"),
        ([-40, -30, -1, -2], "lies entirely outside"),
    ],
)
def test_predict_refuses_bad_boxes(box, problem, predictor):
    image = non_square_images(1)[0]
    with pytest.raises(PromptError, match=rf"^image: box 1 \[.*\] {problem}"):
        predictor.predict(image, boxes=[BOX, box])
    with pytest.raises(PromptError, match=rf"^image 1: box 0 .*{problem}"):
        predictor.predict([image, image], boxes=[[BOX], [box]])


def test_predict_clips_boxes_partly_outside_with_a_warning(predictor, caplog):
    image = non_square_images(1)[0]  # 72 x 150
    with caplog.at_level(logging.WARNING):
        clipped = predictor.predict(image, boxes=[[-10, 20, 200, 50]], return_logits=True)
    assert "box 0 [-10.0, 20.0, 200.0, 50.0] extends past the 150x72 image; clipped to [0.0, 20.0, 150.0, 50.0]" in (
        caplog.text
    )
    inside = predictor.predict(image, boxes=[[0, 20, 150, 50]], return_logits=True)
    np.testing.assert_array_equal(clipped.logits, inside.logits)


def test_predict_refuses_bad_points(predictor):
    image = non_square_images(1)[0]
    with pytest.raises(PromptError, match=r"point 0 of object 0 \[nan, 5.0\] is not a finite pixel"):
        predictor.predict(image, points=[[[float("nan"), 5]]])
    with pytest.raises(PromptError, match=r"point 1 of object 0 \[500.0, 5.0\] is not a finite pixel of the 150x72"):
        predictor.predict(image, points=[[[5, 5], [500, 5]]])


def test_cli_predict_checks_boxes_and_writes_strict_json(lora_dir, images, tmp_path, caplog):
    boxes_file = tmp_path / "boxes.json"
    for box, problem in [([5, 5, float("nan"), 40], "has a NaN"), ([40, 5, 5, 40], "is reversed")]:
        boxes_file.write_text(json.dumps({"img_0.png": [BOX], "img_1": [BOX, box]}))
        message = error_of(
            ["predict", str(images), str(tmp_path / "out"), "--adapter", str(lora_dir)] + ["--boxes", str(boxes_file)]
        )
        assert f"'{boxes_file}', image 'img_1': box 1 " in message and problem in message
    assert not (tmp_path / "out").exists()

    boxes_file.write_text(json.dumps({"img_0.png": [[-5, 10, 400, 50]]}))
    with caplog.at_level(logging.WARNING):
        main(["predict", str(images), str(tmp_path / "out"), "--adapter", str(lora_dir), "--boxes", str(boxes_file)])
    assert "image 'img_0.png': box 0 [-5.0, 10.0, 400.0, 50.0] extends past the 150x72 image" in caplog.text
    text = (tmp_path / "out" / "predictions.json").read_text()
    predictions = json.loads(text, parse_constant=lambda name: pytest.fail(f"bare {name} in predictions.json"))
    assert predictions["img_0.png"]["boxes"] == [[0.0, 10.0, 150.0, 50.0]]


@pytest.mark.parametrize(
    "content,expected",
    [({"img_0": []}, "image 'img_0': no boxes; give at least one"), ("[" * 100_000, "is nested too deeply to read")],
    ids=["no-boxes", "deep"],
)
def test_cli_predict_refuses_a_bad_boxes_file(content, expected, lora_dir, images, tmp_path):
    boxes = tmp_path / "boxes.json"
    boxes.write_text(content if isinstance(content, str) else json.dumps(content))
    message = error_of(
        ["predict", str(images), str(tmp_path / "out"), "--adapter", str(lora_dir), "--boxes", str(boxes)]
    )
    assert f"'{boxes}'" in message and expected in message


def test_atomic_write_json_writes_missing_numbers_as_null(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write_json(path, {"iou": float("nan"), "dice": [0.5, float("inf"), -math.inf], "n": np.float32("nan")})
    data = json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"bare {name} in the JSON"))
    assert data == {"iou": None, "dice": [0.5, None, None], "n": None}


# ---------------------------------------------------------------------------------- damaged adapter files (CLI)


def _truncate(path: Path, header_only: bool) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: 8 + int.from_bytes(data[:8], "little")] if header_only else data[: len(data) // 2])


@pytest.mark.parametrize("header_only", [False, True], ids=["truncated", "header-only"])
def test_cli_damaged_weights_file(header_only, lora_dir, images, tmp_path):
    adapter = copy_adapter(lora_dir, tmp_path / "bad")
    _truncate(adapter / "adapter_model.safetensors", header_only)
    message = error_of(["predict", str(images), str(tmp_path / "out"), "--adapter", str(adapter)])
    assert f"'{adapter / 'adapter_model.safetensors'}' is not a complete safetensors file" in message
    assert "Save the adapter again, or download it again" in message
    assert "is not a complete safetensors file" in error_of(["merge", str(adapter), str(tmp_path / "merged")])


@pytest.mark.parametrize(
    "change,expected",
    [
        ({"target_modules": ["no_such_module"]}, r"not found in the base model.*Check its target_modules"),
        ({"target_modules": None}, r"misses fields .*target_modules"),
        ({"peft_type": None}, r"has no 'peft_type' field"),
    ],
    ids=["matches-nothing", "no-target-modules", "no-peft-type"],
)
def test_cli_bad_adapter_config(change, expected, lora_dir, images, tmp_path):
    adapter = copy_adapter(lora_dir, tmp_path / "bad")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config = {k: v for k, v in {**config, **change}.items() if v is not None}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    for argv in (
        ["predict", str(images), str(tmp_path / "out"), "--adapter", str(adapter)],
        ["merge", str(adapter), str(tmp_path / "merged")],
    ):
        message = error_of(argv)
        assert str(adapter / "adapter_config.json") in message
        assert re.search(expected, message), message


@pytest.mark.parametrize("name", ["adapter_config.json", "sam2_peft.json"])
def test_cli_json_nested_too_deeply(name, lora_dir, images, tmp_path):
    adapter = copy_adapter(lora_dir, tmp_path / "bad")
    (adapter / name).write_text("[" * 100_000 + "]" * 100_000)
    message = error_of(["predict", str(images), str(tmp_path / "out"), "--adapter", str(adapter)])
    assert f"'{adapter / name}' is not an adapter's JSON (nested too deeply to read)" in message


def test_cli_edited_lora_rank(lora_dir, images, tmp_path):
    adapter = copy_adapter(lora_dir, tmp_path / "bad")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    message = error_of(["predict", str(images), str(tmp_path / "out"), "--adapter", str(adapter)])
    assert f"'{adapter / 'adapter_config.json'}' says r=8, but the LoRA weights beside it have rank 4" in message
    assert 'set "r": 4 again' in message


def test_cli_adapter_without_sidecar_into_another_base(lora_dir, images, tmp_path):
    adapter = copy_adapter(lora_dir, tmp_path / "bad")
    (adapter / "sam2_peft.json").unlink()
    argv = ["predict", str(images), str(tmp_path / "out"), "--adapter", str(adapter), "--base-model", "compact-random"]
    message = error_of(argv)
    assert f"The weights in '{adapter / 'adapter_model.safetensors'}' do not fit this base model" in message
    assert "size mismatch for" in message and "(--base-model / base_model=)" in message


def test_cli_refuses_pickled_weights(lora_dir, images, tmp_path, monkeypatch):
    import torch

    adapter = copy_adapter(lora_dir, tmp_path / "bad")
    weights = adapter / "adapter_model.safetensors"
    torch.save(load_file(weights), adapter / "adapter_model.bin")
    weights.unlink()
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickle was loaded"))
    for argv in (
        ["predict", str(images), str(tmp_path / "out"), "--adapter", str(adapter)],
        ["merge", str(adapter), str(tmp_path / "merged")],
    ):
        message = error_of(argv)
        assert f"'{adapter / 'adapter_model.bin'}' is a pickle" in message and "adapter_model.safetensors" in message


def test_cli_malformed_sidecar(lora_dir, images, tmp_path, hub_server, hub_repo_id):
    adapter = copy_adapter(lora_dir, tmp_path / "bad")
    for text in ("{not json", "[1, 2]"):
        (adapter / "sam2_peft.json").write_text(text)
        for argv in (
            ["predict", str(images), str(tmp_path / "out"), "--adapter", str(adapter)],
            ["merge", str(adapter), str(tmp_path / "merged")],
            ["push", str(adapter), hub_repo_id],
        ):
            message = error_of(argv)
            assert f"'{adapter / 'sam2_peft.json'}'" in message and "re-save the adapter" in message
    assert not HfApi().repo_exists(hub_repo_id)


def test_cli_damaged_weights_last_line_in_a_subprocess(lora_dir, images, tmp_path):
    adapter = copy_adapter(lora_dir, tmp_path / "bad")
    _truncate(adapter / "adapter_model.safetensors", header_only=False)
    result = subprocess.run(
        [sys.executable, "-m", "sam2_peft.cli", "predict", str(images), str(tmp_path / "o"), "--adapter", str(adapter)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: "), result.stderr
    assert "is not a complete safetensors file" in result.stderr.strip().splitlines()[-1]


# ----------------------------------------------------------------------------------------------- push offline


def test_push_offline_says_so(lora_dir, hub_server, hub_offline, hub_repo_id):
    with hub_offline():
        message = error_of(["push", str(lora_dir), hub_repo_id])
    assert "offline mode is on (HF_HUB_OFFLINE=1)" in message and "Unset HF_HUB_OFFLINE" in message


def test_push_to_an_unreachable_hub_says_so(lora_dir, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: connection refused
    message = error_of(["push", str(lora_dir), "someone/adapter", "--token", "hf_x"])
    assert "the Hub at http://127.0.0.1:9 is unreachable" in message and "you seem to be offline" in message


# ------------------------------------------------------------------------------------------------ bad OUT_DIR


@pytest.fixture
def read_only_dir(tmp_path, monkeypatch) -> Path:
    """A folder nobody may write in: chmod 555, and for root (whom permissions do not stop) `os.mkdir`/`os.open`
    inside it fail with EACCES as they would for anyone else."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    if os.geteuid() == 0:
        for name in ("mkdir", "open"):
            original = getattr(os, name)

            def refuse(path, *args, _original=original, **kwargs):
                if Path(os.fspath(path)).absolute().is_relative_to(folder) and Path(os.fspath(path)) != folder:
                    raise PermissionError(13, "Permission denied", os.fspath(path))
                return _original(path, *args, **kwargs)

            monkeypatch.setattr(os, name, refuse)
    yield folder
    folder.chmod(stat.S_IRWXU)


@pytest.mark.parametrize("where", ["file", "read-only", "inside-read-only"])
def test_cli_unwritable_out_dir(where, lora_dir, images, read_only_dir, tmp_path):
    if where == "file":
        out = tmp_path / "a-file"
        out.write_text("not a folder")
        expected = "is a file. Give a folder path"
    else:
        out = read_only_dir if where == "read-only" else read_only_dir / "new" / "out"
        expected = "is not writable: Permission denied). Choose a folder you can write to"
    for argv in (["predict", str(images), str(out), "--adapter", str(lora_dir)], ["merge", str(lora_dir), str(out)]):
        message = error_of(argv)
        assert f"OUT_DIR '{out}'" in message and expected in message, message


def test_atomic_writes_keep_the_usual_file_permissions(tmp_path):
    import os

    from sam2_peft.io import atomic_write_json

    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "metrics.json", {"dice": 0.5})
    finally:
        os.umask(old)
    assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == 0o644
