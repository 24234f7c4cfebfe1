"""A newcomer's first hour with data: progress while checking, `--train-images` that counts usable images, a wrong
`--data` refused before any model loads, and `eval` taking the data options that training takes."""

from __future__ import annotations

import argparse
import logging

import numpy as np
import pytest
from PIL import Image

from sam2_peft import cli
from sam2_peft.data import sources
from sam2_peft.data.sources import DataError, folder_records
from sam2_peft.data.validation import ValidationConfig, validate_records
from tests.recipe_helpers import datasets, parse_args

from .conftest import write_folder_dataset


def _args(*argv: str) -> argparse.Namespace:
    return parse_args(*argv)


def _folder_with_bad_samples(root, num_images: int = 12):
    """`num_images` samples in which img_000's mask is empty and the last image is not an image file."""
    write_folder_dataset(root, num_images=num_images)
    Image.fromarray(np.zeros((96, 120), np.uint8)).save(root / "masks" / "img_000.png")
    (root / "images" / f"img_{num_images - 1:03d}.png").write_bytes(b"not a png")
    return root


def test_validation_shows_one_progress_bar_and_still_logs_the_summary(folder_dataset, capsys, caplog):
    with caplog.at_level(logging.INFO, logger="sam2_peft.data.validation"):
        validate_records(folder_records(folder_dataset))
    bar = capsys.readouterr().err
    assert "/6" in bar and "image" in bar  # tqdm's "n/6 images"
    assert "Data validation: 6 samples kept" in caplog.text
    validate_records(folder_records(folder_dataset), description="Checking validation images")
    assert "Checking validation images" in capsys.readouterr().err


def test_a_limit_checks_samples_in_order_only_until_enough_are_usable(tmp_path):
    records = folder_records(_folder_with_bad_samples(tmp_path / "data"))
    decoded = []
    for record in records:
        record.load_image = lambda load=record.load_image, name=record.sample_id: decoded.append(name) or load()
    kept, report = validate_records(records, ValidationConfig(num_threads=1), limit=3)
    assert [r.sample_id for r in kept] == ["img_001", "img_002", "img_003"]  # img_000 has no object
    assert decoded == ["img_000", "img_001", "img_002", "img_003"]  # the broken img_011 is never opened
    assert report.checked == 4 and report.kept == 3 and sum(report.skipped.values()) == 1
    threaded, _ = validate_records(records, ValidationConfig(num_threads=4), limit=3)
    assert [r.sample_id for r in threaded] == ["img_001", "img_002", "img_003"]


def test_train_images_counts_images_that_survive_the_filters_and_logs_it(tmp_path, tiny_processor, caplog):
    data = _folder_with_bad_samples(tmp_path / "data")
    val = write_folder_dataset(tmp_path / "val", num_images=2, seed=3)
    args = _args("--data", str(data), "--val-data", str(val), "--train-images", "3")
    with caplog.at_level(logging.INFO, logger="sam2_peft.recipes.runner"):
        train, _ = datasets(args, tiny_processor)  # img_011 is never read
    assert [r.sample_id for r in train.records] == ["img_001", "img_002", "img_003"]
    assert "Training on 3 of 12 training images (--train-images 3; 4 checked, 1 skipped: mask has no object" in (
        caplog.text
    )
    caplog.clear()
    more = _args("--data", str(data), "--val-data", str(val), "--train-images", "50", "--skip-bad-files")
    with caplog.at_level(logging.INFO, logger="sam2_peft.recipes.runner"):
        train, _ = datasets(more, tiny_processor)
    assert len(train) == 10
    assert "Training on 10 of 12 training images: --train-images 50 asked for more than the 10 usable" in caplog.text
    with pytest.raises(DataError, match="--train-images must be at least 1"):
        datasets(_args("--data", str(data), "--train-images", "0"), tiny_processor)


def test_wrong_data_path_names_it_and_what_data_accepts(tmp_path, folder_dataset, tiny_processor):
    check = sources.check_data_source
    missing = tmp_path / "no-such-folder"
    with pytest.raises(DataError, match=rf"--data '{missing}' does not exist.*images/ \+ masks/ folder.*COCO"):
        check(str(missing), "--data")
    with pytest.raises(DataError, match=rf"--val-data .*'{folder_dataset}'"):
        check(str(folder_dataset / "images"), "--val-data")
    with pytest.raises(DataError, match=rf"'{folder_dataset}'"):
        check(str(folder_dataset / "masks") + "/", "--data")
    with pytest.raises(DataError, match=r"does not exist"):
        check(str(tmp_path / "annotations.json"), "--data")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match=r"'.*plain' is a folder but not a data source.*--data takes"):
        check(str(tmp_path / "plain"), "--data")
    with pytest.raises(DataError, match="synthetic:N"):
        check("synthetic:many", "--data")
    for accepted in (str(folder_dataset), "synthetic:4", "some-org/some-dataset"):
        check(accepted, "--data")  # a Hub name is left for `datasets` to open
    args = _args("--data", str(missing))
    with pytest.raises(DataError, match="does not exist"):
        datasets(args, tiny_processor)
    args = _args("--data", "some-org/some-dataset", "--val-data", str(missing))  # before `datasets` asks the Hub
    with pytest.raises(DataError, match="--val-data"):
        datasets(args, tiny_processor)


def test_eval_refuses_a_wrong_data_path_before_loading_the_model(tmp_path, folder_dataset, monkeypatch):
    def no_model(args):
        raise AssertionError("the model was loaded before --data was checked")

    monkeypatch.setattr(cli, "_load_predictor", no_model)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "--model", "tiny-random", "--data", str(folder_dataset / "images")])
    message = str(exit_info.value.code)
    assert message.startswith("error: --data") and str(folder_dataset) in message and "\n" not in message


class _Parsed(Exception):
    """Carries the parsed eval arguments out of `sam2-peft eval` (raised where it would load the model)."""


def _eval_args(monkeypatch, *argv: str) -> argparse.Namespace:
    def capture(args):
        raise _Parsed(args)

    monkeypatch.setattr(cli, "_load_predictor", capture)
    with pytest.raises(_Parsed) as parsed:
        cli.main(["eval", "--model", "tiny-random", *argv])
    return parsed.value.args[0]


DATA_SELECTION = {
    "--split": "test",
    "--image-column": "picture",
    "--mask-column": "labels",
    "--mask-type": "binary",
    "--max-image-pixels": "5000",
    "--min-object-area": "7",
    "--closing-radius": "2",
}


def test_eval_takes_the_data_selection_options_of_training_with_their_defaults(folder_dataset, monkeypatch):
    data = str(folder_dataset)
    defaults = _eval_args(monkeypatch, "--data", data)
    parsed = _args("--data", data)
    training = {**vars(parsed.data), **vars(parsed.validation)}
    for flag in (*DATA_SELECTION, "--skip-bad-files"):
        dest = flag[2:].replace("-", "_")
        assert getattr(defaults, dest) == training[dest], flag
    given = [item for pair in DATA_SELECTION.items() for item in pair]
    chosen = _eval_args(monkeypatch, "--data", data, *given, "--skip-bad-files")
    for flag, value in DATA_SELECTION.items():
        assert str(getattr(chosen, flag[2:].replace("-", "_"))) == value, flag
    assert chosen.skip_bad_files


def test_eval_applies_the_minimum_object_area(folder_dataset):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "--model", "tiny-random", "--data", str(folder_dataset), "--min-object-area", "100000"])
    assert "No usable sample among 6" in str(exit_info.value.code)
