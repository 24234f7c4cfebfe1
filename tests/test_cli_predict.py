"""`sam2-peft predict`: the prompt-free warning for prompt-trained adapters, --max-image-pixels, the progress bar."""

from __future__ import annotations

import json

import pytest

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
