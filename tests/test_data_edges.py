"""Data at the edges: EXIF orientation, noisy binary masks, bad COCO geometry, validation leaks, odd files."""

from __future__ import annotations

import argparse
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from sam2_peft.data import sources
from sam2_peft.data.sources import (
    DataError,
    coco_records,
    folder_records,
    hf_dataset_records,
    label_map_to_instances,
    read_image,
    split_records,
)
from sam2_peft.data.validation import ValidationConfig, validate_records
from sam2_peft.data.video import open_video_folder
from tests.recipe_helpers import datasets, parse_args

from .conftest import write_folder_dataset

ORIENTATION = 0x0112
VIEWER_ROTATION = {3: 2, 6: -1}
"""np.rot90 turns that show a raw pixel array as an image viewer shows it (3: 180 degrees, 6: 90 degrees clockwise)."""


def _gradient(height: int, width: int) -> np.ndarray:
    """An image whose every pixel differs, so any rotation or flip shows."""
    yy, xx = np.mgrid[:height, :width]
    return np.stack([yy * 255 // height, xx * 255 // width, (yy + xx) % 256], axis=-1).astype(np.uint8)


def _save_oriented_jpeg(path, pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Save `pixels` as a JPEG tagged with an EXIF orientation; return the decoded pixels as a viewer shows them."""
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    Image.fromarray(pixels).save(path, quality=100, exif=exif)
    with Image.open(path) as raw:
        return np.rot90(np.asarray(raw.convert("RGB")), VIEWER_ROTATION[orientation])


@pytest.mark.parametrize("orientation", [3, 6])
def test_images_are_read_in_viewer_orientation(tmp_path, orientation):
    expected = _save_oriented_jpeg(tmp_path / "photo.jpg", _gradient(40, 64), orientation)
    np.testing.assert_array_equal(read_image(tmp_path / "photo.jpg"), expected)


def _oriented_folder(root, orientation: int):
    """A folder dataset whose one image is a tagged JPEG and whose mask is drawn in viewer orientation."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    viewer = _save_oriented_jpeg(root / "images" / "photo.jpg", _gradient(40, 64), orientation)
    mask = np.zeros(viewer.shape[:2], np.uint8)
    mask[: viewer.shape[0] // 2, : viewer.shape[1] // 3] = 255  # the viewer's top-left corner
    Image.fromarray(mask).save(root / "masks" / "photo.png")
    return viewer, mask


@pytest.mark.parametrize("orientation", [3, 6])
def test_training_reads_rotated_photos_against_viewer_masks(tmp_path, orientation):
    viewer, mask = _oriented_folder(tmp_path / "data", orientation)
    kept, _ = validate_records(folder_records(tmp_path / "data"))  # orientation 6 used to be a size mismatch
    np.testing.assert_array_equal(kept[0].load_image(), viewer)
    np.testing.assert_array_equal(kept[0].load_instances()[0], mask > 0)


def test_video_frames_are_read_and_size_checked_in_viewer_orientation(tmp_path):
    frames, annotations = tmp_path / "JPEGImages" / "seq", tmp_path / "Annotations" / "seq"
    frames.mkdir(parents=True)
    annotations.mkdir(parents=True)
    viewer = _save_oriented_jpeg(frames / "00000.jpg", _gradient(40, 64), 6)
    labels = np.zeros(viewer.shape[:2], np.uint8)
    labels[5:20, 5:20] = 1
    Image.fromarray(labels).save(annotations / "00000.png")
    sequence = open_video_folder(tmp_path)[0]  # used to refuse the annotation as a different size
    np.testing.assert_array_equal(sequence.load_frame(0), viewer)


def test_predict_reads_boxes_and_writes_masks_in_viewer_orientation(tmp_path, saved_tiny_model):
    from sam2_peft.cli import main

    (tmp_path / "in").mkdir()
    viewer = _save_oriented_jpeg(tmp_path / "in" / "photo.jpg", _gradient(40, 64), 6)
    height, width = viewer.shape[:2]  # 64 x 40 as shown
    (tmp_path / "boxes.json").write_text(json.dumps({"photo.jpg": [[2, 30, 38, 62]]}))
    main(
        ["predict", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(saved_tiny_model), "--device", "cpu",
         "--boxes", str(tmp_path / "boxes.json")]
    )  # fmt: skip
    assert np.asarray(Image.open(tmp_path / "out" / "masks" / "photo.png")).shape == (height, width)
    assert np.asarray(Image.open(tmp_path / "out" / "overlays" / "photo.png")).shape == (height, width, 3)
    # The box is checked against the image as shown (40 wide, 64 high), not its raw 64x40 pixels: kept, not clipped.
    predictions = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert predictions["photo.jpg"]["boxes"] == [[2, 30, 38, 62]]


def _disc(size: int = 64, radius: float = 18.0, scale: int = 1) -> np.ndarray:
    yy, xx = (np.mgrid[: size * scale, : size * scale] + 0.5) / scale
    return (yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= radius**2


def _jpeg_noisy_mask(path) -> np.ndarray:
    """A 0/255 disc saved as JPEG and read back: grey levels near 0 and 255 around its edge."""
    Image.fromarray(_disc().astype(np.uint8) * 255).save(path, quality=75)
    with Image.open(path) as image:
        return np.asarray(image.convert("L"))


def test_jpeg_saved_and_anti_aliased_binary_masks_are_one_object(tmp_path):
    noisy = _jpeg_noisy_mask(tmp_path / "mask.jpg")
    assert len(np.unique(noisy)) > 3  # the noise this is about
    smooth = Image.fromarray(_disc(scale=4).astype(np.uint8) * 255).resize((64, 64), Image.Resampling.BOX)
    anti_aliased = np.asarray(smooth)
    assert len(np.unique(anti_aliased)) > 3
    for labels in (noisy, anti_aliased):
        objects = label_map_to_instances(labels, "mask.png")
        assert objects.shape == (1, 64, 64)
        assert (objects[0] ^ _disc()).sum() <= 0.05 * _disc().sum()


def _jpeg_round_trip(mask: np.ndarray, path, quality: int = 90) -> np.ndarray:
    Image.fromarray(mask.astype(np.uint8) * 255).save(path, quality=quality)
    with Image.open(path) as image:
        return np.asarray(image.convert("L"))


def _crack(size: int = 128, seed: int = 0) -> np.ndarray:
    """A thin crack: a wandering line two pixels wide on an empty background."""
    mask, x = np.zeros((size, size), bool), size // 4
    for y, step in enumerate(np.random.default_rng(seed).integers(-1, 2, size)):
        x = int(np.clip(x + step, 0, size - 2))
        mask[y, x : x + 2] = True
    return mask


@pytest.mark.parametrize("shape", ["crack", "disc", "large disc"])
def test_jpeg_binary_masks_with_noise_at_both_ends_are_one_object(tmp_path, shape):
    mask = {"crack": _crack(), "disc": _disc(), "large disc": _disc(512, 150.0)}[shape]
    labels = _jpeg_round_trip(mask, tmp_path / "mask.jpg")
    levels = np.unique(labels)
    assert len(levels) > 3 and levels[1] <= 8 and levels[-2] >= 247  # noise next to both 0 and 255
    objects = label_map_to_instances(labels, "mask.jpg")
    assert objects.shape == (1, *mask.shape)
    assert (objects[0] ^ mask).sum() <= 0.05 * mask.sum()


def test_instance_ids_next_to_white_are_instances():
    labels = np.zeros((96, 96), np.uint8)
    yy, xx = np.mgrid[:96, :96]
    for k, value in enumerate(range(250, 256)):  # six nuclei with ids 250..255
        labels[(yy - 15 - 30 * (k // 3)) ** 2 + (xx - 15 - 30 * (k % 3)) ** 2 <= 100] = value
    objects = label_map_to_instances(labels, "nuclei.png")
    assert objects.shape == (6, 96, 96)
    assert [int(labels[m][0]) for m in objects] == list(range(250, 256))


def test_ambiguous_mask_names_file_and_option_and_forced_types_decide(tmp_path):
    labels = np.zeros((64, 64), np.uint8)
    labels[:, 20:40], labels[:, 40:] = 128, 255  # a grey band as large as the white one: labels or soft mask?
    with pytest.raises(DataError, match=r"odd\.png.*--mask-type"):
        label_map_to_instances(labels, "odd.png")
    labels_and_void = np.zeros((64, 64), np.uint8)
    labels_and_void[:4] = 255  # a 255 border (void, or object 255?) around objects 1..9
    for k in range(1, 10):
        labels_and_void[6 * k : 6 * k + 4, 10:40] = k
    with pytest.raises(DataError, match=r"void\.png.*--mask-type"):
        label_map_to_instances(labels_and_void, "void.png")
    assert label_map_to_instances(labels, "odd.png", mask_type="instance").shape == (2, 64, 64)
    binary = label_map_to_instances(labels, "odd.png", mask_type="binary")
    np.testing.assert_array_equal(binary[0], labels > 127)
    instances = np.zeros((64, 64), np.uint8)
    instances[5:20, 5:20], instances[30:50, 30:50], instances[52:60, 2:60] = 1, 2, 3
    assert label_map_to_instances(instances, "labels.png").shape == (3, 64, 64)  # small integer labels


def test_folder_and_datasets_sources_take_the_mask_type_and_note_binary_once(tmp_path, caplog):
    import datasets

    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    masks = []
    for index in range(3):
        Image.fromarray(_gradient(64, 64)).save(root / "images" / f"im{index}.png")
        masks.append(_jpeg_noisy_mask(root / "masks" / f"im{index}.jpg"))
    with caplog.at_level(logging.INFO):
        kept, _ = validate_records(folder_records(root))
    assert [len(r.load_instances()) for r in kept] == [1, 1, 1]
    assert sum("--mask-type" in r.getMessage() for r in caplog.records) == 1  # once per dataset, not per image
    assert len(folder_records(root, mask_type="instance")[0].load_instances()) > 2
    table = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(_gradient(64, 64))], "mask": [Image.fromarray(masks[0])]},
        features=datasets.Features({"image": datasets.Image(), "mask": datasets.Image()}),
    )
    table.save_to_disk(tmp_path / "hf")
    assert len(hf_dataset_records(str(tmp_path / "hf"))[0].load_instances()) == 1
    assert len(hf_dataset_records(str(tmp_path / "hf"), mask_type="instance")[0].load_instances()) > 2


def _coco_with(tmp_path, segmentation) -> str:
    Image.fromarray(_gradient(40, 50)).save(tmp_path / "a.png")
    Image.fromarray(_gradient(40, 50)).save(tmp_path / "b.png")
    good = [[5, 5, 30, 5, 30, 30, 5, 30]]
    data = {
        "images": [
            {"id": 1, "file_name": "a.png", "height": 40, "width": 50},
            {"id": 2, "file_name": "b.png", "height": 40, "width": 50},
        ],
        "annotations": [
            {"id": 7, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": segmentation},
            {"id": 8, "image_id": 2, "category_id": 1, "iscrowd": 0, "segmentation": good},
        ],
        "categories": [{"id": 1}],
    }
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(data))  # json writes NaN as the literal NaN, which json.load reads back
    return path


@pytest.mark.parametrize(
    ("segmentation", "problem"),
    [
        ([[5.0, float("nan"), 30, 5, 30, 30]], "finite"),
        ([[5, 5]], "at least 3 points"),
        ([[5, 5, 30, 5, 30]], "even"),
        ([[5, 5, 30, 5, 1e12, 30]], "outside"),
        ({"size": [40, 50], "counts": [100, 5]}, "2000"),
        ({"size": [40, 50], "counts": "zz!"}, "counts"),
        ({"size": [40], "counts": [2000]}, "size"),
    ],
)
def test_bad_coco_geometry_is_named_before_pycocotools_sees_it(tmp_path, segmentation, problem):
    path = _coco_with(tmp_path, segmentation)
    with pytest.raises(DataError, match=rf"coco\.json.*annotation id 7.*{problem}"):
        validate_records(coco_records(path))
    kept, report = validate_records(coco_records(path), ValidationConfig(skip_bad_files=True))
    assert [r.sample_id for r in kept] == ["b"] and report.skipped["unreadable file"] == 1


def _hf_dict(tmp_path, folder_dataset):
    import datasets

    records = folder_records(folder_dataset)
    features = datasets.Features({"image": datasets.Image(), "mask": datasets.Image()})

    def split(part):
        return datasets.Dataset.from_dict(
            {
                "image": [Image.fromarray(r.load_image()) for r in part],
                "mask": [Image.open(folder_dataset / "masks" / f"{r.sample_id}.png") for r in part],
            },
            features=features,
        )

    datasets.DatasetDict({"train": split(records[:4]), "validation": split(records[4:])}).save_to_disk(tmp_path / "hf")
    return str(tmp_path / "hf")


def _args(*argv: str) -> argparse.Namespace:
    return parse_args(*argv)


def test_val_data_of_a_dataset_dict_uses_its_validation_split_and_refuses_training_rows(
    tmp_path, folder_dataset, tiny_processor
):
    hf = _hf_dict(tmp_path, folder_dataset)
    args = _args("--data", hf, "--split", "train", "--val-data", hf)
    train, val = datasets(args, tiny_processor)
    assert len(train) == 4 and len(val) == 2
    assert not {r.sample_id for r in train.records} & {r.sample_id for r in val.records}
    assert {r.sample_id for r in val.records} == {"validation-000000", "validation-000001"}
    by_split = _args("--data", hf, "--val-split", "validation")  # no --val-data: that split of --data
    assert len(datasets(by_split, tiny_processor)[1]) == 2
    leak = _args("--data", hf, "--split", "train", "--val-data", hf, "--val-split", "train")
    with pytest.raises(DataError, match=r"4 validation sample.*train-000000"):
        datasets(leak, tiny_processor)
    same_folder = _args("--data", str(folder_dataset), "--val-data", str(folder_dataset))
    with pytest.raises(DataError, match=r"6 validation sample.*img_000"):
        datasets(same_folder, tiny_processor)


def test_separate_folders_with_the_same_file_names_are_not_a_leak(tmp_path, tiny_processor):
    train_dir = write_folder_dataset(tmp_path / "train", num_images=3, seed=1)
    val_dir = write_folder_dataset(tmp_path / "val", num_images=2, seed=2)
    args = _args("--data", str(train_dir), "--val-data", str(val_dir))
    train, val = datasets(args, tiny_processor)
    assert len(train) == 3 and len(val) == 2


def test_missing_datasets_split_names_the_available_ones(tmp_path, folder_dataset):
    hf = _hf_dict(tmp_path, folder_dataset)
    with pytest.raises(DataError, match=r"'nope'.*train.*validation.*--split"):
        hf_dataset_records(hf, split="nope")


def test_image_column_of_relative_paths_is_loaded_from_the_dataset_folder(tmp_path, folder_dataset):
    import datasets

    records = folder_records(folder_dataset)[:2]
    target = tmp_path / "hf"
    (target / "files").mkdir(parents=True)
    for record in records:
        Image.fromarray(record.load_image()).save(target / "files" / f"{record.sample_id}.png")
    table = datasets.Dataset.from_dict(
        {
            "image": [f"files/{r.sample_id}.png" for r in records],
            "mask": [str(folder_dataset / "masks" / f"{r.sample_id}.png") for r in records],  # absolute
        }
    )
    table.save_to_disk(target)
    loaded = hf_dataset_records(str(target))
    np.testing.assert_array_equal(loaded[1].load_image(), records[1].load_image())
    np.testing.assert_array_equal(loaded[1].load_instances(), records[1].load_instances())


def test_image_over_the_pixel_limit_names_the_option_or_is_skipped(folder_dataset, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    monkeypatch.setattr(sources, "_max_image_pixels", sources._max_image_pixels, raising=False)
    args = _args("--data", str(folder_dataset), "--max-image-pixels", "1000")  # the images are 120 x 96
    sources.set_max_image_pixels(args.data.max_image_pixels)
    with pytest.raises(DataError, match=r"img_000\.png.*11520 pixels.*--max-image-pixels"):
        validate_records(folder_records(folder_dataset))
    with pytest.raises(DataError, match="No usable sample"):
        validate_records(folder_records(folder_dataset), ValidationConfig(skip_bad_files=True))
    sources.set_max_image_pixels(0)  # no limit
    assert len(validate_records(folder_records(folder_dataset))[0]) == 6


def test_pil_decompression_bomb_error_becomes_a_data_error(folder_dataset, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL refuses above twice this
    monkeypatch.setattr(sources, "_max_image_pixels", None, raising=False)
    with pytest.raises(DataError, match=r"img_000\.png.*--max-image-pixels"):
        read_image(folder_dataset / "images" / "img_000.png")


def test_file_names_that_are_not_utf8_work_with_a_readable_id(folder_dataset, tiny_processor):
    name = os.fsdecode(b"bad\xff.png")
    for folder in ("images", "masks"):
        os.rename(folder_dataset / folder / "img_000.png", folder_dataset / folder / name)
    records = folder_records(folder_dataset)
    ids = [r.sample_id for r in records]
    assert "bad\\xff" in ids
    for record in records:
        record.sample_id.encode("utf-8")  # cache keys, JSON and logs need valid text
        record.origin.encode("utf-8")
    split_records(records, 0.5)
    args = _args("--data", str(folder_dataset))
    train, val = datasets(args, tiny_processor)
    assert len(train) + len(val) == 6
    assert {item["sample_id"] for item in (*train, *val)} >= {"bad\\xff"}  # decoded, and the view keyed
    json.dumps(sorted(r.sample_id for r in train.records), ensure_ascii=False).encode("utf-8")


def test_edge_errors_end_in_one_error_line_from_the_command_line(tmp_path, folder_dataset, tiny_processor, monkeypatch):
    from sam2_peft.commandline import run_from_command_line

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    monkeypatch.setattr(sources, "_max_image_pixels", sources._max_image_pixels)
    coco = _coco_with(tmp_path, [[5, 5]])
    hf = _hf_dict(tmp_path, folder_dataset)
    cases = {
        ("--data", str(coco)): "annotation id 7",
        ("--data", hf, "--split", "nope"): "--split",
        ("--data", str(folder_dataset), "--max-image-pixels", "100"): "--max-image-pixels",
    }
    for argv, named in cases.items():
        args = _args(*argv)
        with pytest.raises(SystemExit) as exit_info:
            run_from_command_line(lambda a=args: datasets(a, tiny_processor))
        message = str(exit_info.value.code)
        assert message.startswith("error: ") and "\n" not in message and named in message


def _float_image_dataset(tmp_path, pixels: np.ndarray) -> str:
    import datasets

    mask = np.zeros(pixels.shape[:2], np.uint8)
    mask[8:24, 8:24] = 255
    table = datasets.Dataset.from_dict({"image": [pixels.tolist()], "mask": [mask.tolist()]})
    table.save_to_disk(tmp_path / "hf")
    return str(tmp_path / "hf")


def test_float_image_columns_in_0_1_are_scaled_and_other_ranges_refused(tmp_path):
    pixels = _gradient(32, 40).astype(np.float32) / 255  # floats in [0, 1], as many pipelines keep images
    record = hf_dataset_records(_float_image_dataset(tmp_path / "unit", pixels))[0]
    np.testing.assert_array_equal(record.load_image(), _gradient(32, 40))
    record = hf_dataset_records(_float_image_dataset(tmp_path / "bytes", pixels * 255))[0]
    np.testing.assert_array_equal(record.load_image(), _gradient(32, 40))  # floats holding 0..255 kept
    record = hf_dataset_records(_float_image_dataset(tmp_path / "signed", pixels * 2 - 1))[0]
    with pytest.raises(DataError, match=r"hf\[train\]\[0\].*-1.*\[0, 1\] or 0\.\.255"):
        record.load_image()


@pytest.mark.parametrize("suffix", ["_mask", "_masks", "_label", "_labels", "_gt", "_seg", "-mask"])
def test_masks_named_with_a_common_suffix_match_their_images(folder_dataset, suffix):
    for path in sorted((folder_dataset / "masks").iterdir())[:3]:  # half renamed: both namings in one folder
        path.rename(path.with_name(f"{path.stem}{suffix}.png"))
    records = folder_records(folder_dataset)
    assert [r.sample_id for r in records] == [f"img_{i:03d}" for i in range(6)]
    expected = label_map_to_instances(np.asarray(Image.open(folder_dataset / "masks" / f"img_000{suffix}.png")), "m")
    np.testing.assert_array_equal(records[0].load_instances(), expected)


def test_unmatched_image_names_the_masks_with_similar_names(folder_dataset):
    (folder_dataset / "masks" / "img_001.png").rename(folder_dataset / "masks" / "img_001-annotation.png")
    with pytest.raises(DataError, match=r"img_001\.png.*similar names: 'img_001-annotation\.png'"):
        folder_records(folder_dataset)
    (folder_dataset / "masks" / "img_001-annotation.png").rename(folder_dataset / "masks" / "img_001_gt.png")
    (folder_dataset / "masks" / "img_002.png").rename(folder_dataset / "masks" / "img_001_mask.png")
    with pytest.raises(DataError, match=r"img_001\.png.*two masks.*img_001_mask\.png.*img_001_gt\.png"):
        folder_records(folder_dataset)
