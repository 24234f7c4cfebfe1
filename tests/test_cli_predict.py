"""`sam2-peft predict`: the prompt-free warning for prompt-trained adapters, --max-image-pixels, the progress bar."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from sam2_peft.cli import main
from sam2_peft.data.sources import DEFAULT_MAX_IMAGE_PIXELS, set_max_image_pixels
from tests.adapter_helpers import make_adapter, non_square_images, save_images


@pytest.fixture(scope="module")
def adapter(saved_tiny_model, tmp_path_factory):
    return make_adapter("lora", saved_tiny_model, tmp_path_factory.mktemp("adapter") / "lora")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return save_images(non_square_images(2), tmp_path_factory.mktemp("images"))


@pytest.mark.parametrize("key", ["dataset", "data"])
def test_prompt_free_run_of_a_box_trained_adapter_warns_once(key, adapter, images, tmp_path, capsys):
    (adapter / "training_config.json").write_text(json.dumps({key: {"prompts": {"prompt": "box"}}}))
    main(["predict", str(images), str(tmp_path / "free"), "--adapter", str(adapter)])
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and "trained with box prompts" in warnings[0] and "pass --boxes" in warnings[0]

    (tmp_path / "boxes.json").write_text(json.dumps({"img_0.png": [[30, 20, 90, 50]]}))
    main(
        [
            "predict",
            str(images),
            str(tmp_path / "boxed"),
            "--adapter",
            str(adapter),
            "--boxes",
            str(tmp_path / "boxes.json"),
        ]
    )
    assert "warning:" not in capsys.readouterr().err


def test_prompt_free_adapter_and_progress_bar(adapter, images, tmp_path, capsys):
    (adapter / "training_config.json").write_text(json.dumps({"dataset": {"prompts": {"prompt": "none"}}}))
    main(["predict", str(images), str(tmp_path / "out"), "--adapter", str(adapter)])
    err = capsys.readouterr().err
    assert "warning:" not in err and "predict:" in err and "/2 [" in err  # one bar over the 2 images


@pytest.fixture
def default_pixel_limit_after():
    yield
    set_max_image_pixels(DEFAULT_MAX_IMAGE_PIXELS)  # the flag sets a process-wide limit


def test_max_image_pixels_is_a_predict_flag(adapter, images, tmp_path, default_pixel_limit_after):
    with pytest.raises(SystemExit, match=r"error: Image .*img_0.png.* over the limit of 1000 .*--max-image-pixels"):
        main(["predict", str(images), str(tmp_path / "small"), "--adapter", str(adapter), "--max-image-pixels", "1000"])
    main(["predict", str(images), str(tmp_path / "any"), "--adapter", str(adapter), "--max-image-pixels", "0"])
    assert len(list((tmp_path / "any" / "masks").glob("*.png"))) == 2


def _folder_with_a_shared_stem(folder):
    first, second = non_square_images(2)
    folder.mkdir()
    Image.fromarray(first).save(folder / "a.png")
    Image.fromarray(second).save(folder / "a.jpg")  # another picture, the same stem
    Image.fromarray(second).save(folder / "b.png")
    Image.fromarray(second).save(folder / os.fsdecode(b"c\xff.png"))  # Linux file names need not be UTF-8
    return folder


@pytest.mark.parametrize("command", ["predict", "segment-all"])
def test_images_sharing_a_stem_get_one_output_each(command, saved_tiny_model, tmp_path):
    images = _folder_with_a_shared_stem(tmp_path / "images")
    main([command, str(images), str(tmp_path / "out"), "--model", str(saved_tiny_model), *POINTS[command]])
    folder = tmp_path / "out" / ("masks" if command == "predict" else "labels")
    written = ["a.jpg.png", "a.png.png", "b.png", os.fsdecode(b"c\xff.png")]
    assert sorted(p.name for p in folder.iterdir()) == written
    assert sorted(p.name for p in (tmp_path / "out" / "overlays").iterdir()) == written
    shapes = {name: np.asarray(Image.open(folder / name)).shape for name in ("a.png.png", "a.jpg.png")}
    assert shapes == {"a.png.png": (72, 150), "a.jpg.png": (88, 120)}  # each image's own output


POINTS = {"predict": [], "segment-all": ["--points-per-side", "2"]}


@pytest.mark.parametrize("command", ["predict", "segment-all"])
def test_a_folder_holding_outputs_is_refused_unless_overwrite(command, saved_tiny_model, images, tmp_path):
    out = tmp_path / "out"
    argv = [command, str(images), str(out), "--model", str(saved_tiny_model), *POINTS[command]]
    main(argv)
    stale = out / "overlays" / "old_image.png"
    stale.write_bytes(b"from an earlier run")
    with pytest.raises(SystemExit, match=r"^error: OUT_DIR .*out' holds the outputs of an earlier run .*--overwrite"):
        main(argv)
    assert stale.exists()
    main([*argv, "--overwrite"])
    assert not stale.exists() and len(list((out / "overlays").iterdir())) == 2
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")  # a folder without outputs is fine, and kept
    main([command, str(images), str(tmp_path / "other"), "--model", str(saved_tiny_model), *POINTS[command]])
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("command", ["predict", "segment-all"])
def test_bad_images_stop_the_run_or_are_skipped_with_skip_bad_files(command, saved_tiny_model, tmp_path, capsys):
    images = save_images(non_square_images(2), tmp_path / "images")
    (images / "broken.png").write_bytes(b"not an image")  # unreadable header: found before the model loads
    png = (images / "img_0.png").read_bytes()
    (images / "cut.png").write_bytes(png[: len(png) // 2])  # header fine, pixels cut off
    argv = [command, str(images), str(tmp_path / "out"), "--model", str(saved_tiny_model), *POINTS[command]]
    with pytest.raises(SystemExit, match=r"^error: .*broken\.png.*--skip-bad-files"):
        main(argv)
    (images / "broken.png").unlink()
    with pytest.raises(SystemExit, match=r"^error: .*cut\.png.*--skip-bad-files"):
        main(argv)
    (images / "broken.png").write_bytes(b"not an image")
    main([*argv, "--skip-bad-files"])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: skipping")]
    assert len(warnings) == 2 and any("broken.png" in w for w in warnings) and any("cut.png" in w for w in warnings)
    outputs = tmp_path / "out" / ("masks" if command == "predict" else "labels")
    assert sorted(p.name for p in outputs.iterdir()) == ["img_0.png", "img_1.png"]


def test_boxes_keyed_by_a_stem_two_images_share_are_refused(saved_tiny_model, tmp_path):
    images = _folder_with_a_shared_stem(tmp_path / "images")
    (tmp_path / "boxes.json").write_text(json.dumps({"a": [[1, 1, 20, 20]]}))
    argv = ["predict", str(images), str(tmp_path / "out"), "--model", str(saved_tiny_model)]
    with pytest.raises(SystemExit, match=r"^error: .*boxes\.json' names 'a', the stem of a\.jpg, a\.png: name the"):
        main([*argv, "--boxes", str(tmp_path / "boxes.json")])
    (tmp_path / "boxes.json").write_text(json.dumps({"a.jpg": [[1, 1, 20, 20]]}))
    main([*argv, "--boxes", str(tmp_path / "boxes.json")])
    assert [p.name for p in (tmp_path / "out" / "masks").iterdir()] == ["a.jpg.png"]
