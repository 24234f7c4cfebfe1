"""Data sources, up-front validation, prompt sampling, the dataset and the collator."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sam2_peft.data.augment import AugmentationConfig, augment, build_augmentation
from sam2_peft.data.config import SAMPLE_DATA
from sam2_peft.data.dataset import DatasetConfig, SegmentationDataset, collate_segmentation
from sam2_peft.data.prompts import PromptConfig, mask_to_boxes, sample_prompts, to_model_coordinates
from sam2_peft.data.sources import (
    DataError,
    coco_records,
    folder_records,
    hf_dataset_records,
    open_records,
    read_mask,
    split_records,
)
from sam2_peft.data.validation import ValidationConfig, validate_records


def test_folder_source_reads_instance_and_binary_masks(folder_dataset, tmp_path):
    records = folder_records(folder_dataset)
    assert [r.sample_id for r in records] == [f"img_{i:03d}" for i in range(6)]
    image, instances = records[0].load_image(), records[0].load_instances()
    assert image.shape == (96, 120, 3) and image.dtype == np.uint8
    labels = np.asarray(Image.open(folder_dataset / "masks" / "img_000.png"))
    assert len(instances) == len(np.unique(labels)) - 1
    np.testing.assert_array_equal(instances.any(0), labels > 0)
    binary = tmp_path / "binary.png"
    Image.fromarray(((labels > 0) * 255).astype(np.uint8)).save(binary)
    assert read_mask(binary).shape == (1, 96, 120)


def test_bundled_sample_data_is_a_valid_folder_source():
    records = folder_records(SAMPLE_DATA)
    kept, report = validate_records(records)
    assert len(records) == 24 and report.kept == 24


def _coco_file(tmp_path, folder_dataset):
    from pycocotools import mask as mask_utils

    images, annotations = [], []
    for image_id, record in enumerate(folder_records(folder_dataset)[:2], start=1):
        instances = record.load_instances()
        images.append({"id": image_id, "file_name": f"{record.sample_id}.png", "height": 96, "width": 120})
        for k, mask in enumerate(instances):
            if k == 0:  # polygon: the mask's bounding rectangle outline, as COCO polygons are drawn
                ys, xs = np.nonzero(mask)
                x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
                segmentation = [[x0, y0, x1, y0, x1, y1, x0, y1]]
            else:
                rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                segmentation = {"size": rle["size"], "counts": rle["counts"].decode()}
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "iscrowd": 0,
                    "segmentation": segmentation,
                    "area": int(mask.sum()),
                    "bbox": [0, 0, 1, 1],
                }
            )
    path = folder_dataset / "images" / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1}]}))
    return path


def test_coco_source_polygons_and_rle(tmp_path, folder_dataset):
    path = _coco_file(tmp_path, folder_dataset)
    records = open_records(str(path))
    assert [r.sample_id for r in records] == ["img_000", "img_001"]
    expected = folder_records(folder_dataset)[0].load_instances()
    got = records[0].load_instances()
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got[1:], expected[1:])  # RLE objects are exact
    ys, xs = np.nonzero(expected[0])
    assert got[0].sum() >= expected[0].sum() and got[0][ys, xs].all()  # the polygon covers its object
    assert records[0].load_image().shape == (96, 120, 3)


def test_coco_file_without_annotations_field_is_an_error(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="annotations"):
        coco_records(path)


def test_hf_datasets_source_from_disk(tmp_path, folder_dataset):
    import datasets

    records = folder_records(folder_dataset)[:3]
    labels = [Image.open(folder_dataset / "masks" / f"{r.sample_id}.png") for r in records]
    table = datasets.Dataset.from_dict(
        {"pixels": [Image.fromarray(r.load_image()) for r in records], "label": labels},
        features=datasets.Features({"pixels": datasets.Image(), "label": datasets.Image()}),
    )
    table.save_to_disk(tmp_path / "hf")
    loaded = hf_dataset_records(str(tmp_path / "hf"), image_column="pixels", mask_column="label")
    assert len(loaded) == 3
    np.testing.assert_array_equal(loaded[1].load_image(), records[1].load_image())
    np.testing.assert_array_equal(loaded[1].load_instances(), records[1].load_instances())
    with pytest.raises(DataError, match="no column 'mask'"):
        hf_dataset_records(str(tmp_path / "hf"), image_column="pixels")


def test_split_is_deterministic_and_accepts_explicit_ids(folder_dataset):
    records = folder_records(folder_dataset)
    train_a, val_a = split_records(records, 0.34, seed=1)
    train_b, val_b = split_records(list(reversed(records)), 0.34, seed=1)
    assert {r.sample_id for r in val_a} == {r.sample_id for r in val_b} and len(val_a) == 2
    assert not {r.sample_id for r in train_a} & {r.sample_id for r in val_a}
    _, val = split_records(records, val_ids=["img_004"])
    assert [r.sample_id for r in val] == ["img_004"]
    with pytest.raises(DataError, match="img_999"):
        split_records(records, val_ids=["img_999"])


def test_corrupt_image_is_named_or_skipped(folder_dataset):
    (folder_dataset / "images" / "img_002.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="img_002.png"):
        validate_records(folder_records(folder_dataset))
    kept, report = validate_records(folder_records(folder_dataset), ValidationConfig(skip_bad_files=True))
    assert len(kept) == 5 and report.skipped["unreadable file"] == 1


def test_mask_of_wrong_size_is_named(folder_dataset):
    Image.fromarray(np.ones((50, 50), dtype=np.uint8)).save(folder_dataset / "masks" / "img_001.png")
    with pytest.raises(DataError, match=r"img_001.png.*50x50"):
        validate_records(folder_records(folder_dataset))
    kept, report = validate_records(folder_records(folder_dataset), ValidationConfig(skip_bad_files=True))
    assert len(kept) == 5 and report.skipped == {"mask size differs from image": 1}


def test_empty_masks_and_small_objects_are_counted(folder_dataset):
    Image.fromarray(np.zeros((96, 120), dtype=np.uint8)).save(folder_dataset / "masks" / "img_000.png")
    tiny = np.zeros((96, 120), dtype=np.uint8)
    tiny[5:8, 5:8] = 1
    Image.fromarray(tiny).save(folder_dataset / "masks" / "img_001.png")
    kept, report = validate_records(folder_records(folder_dataset), ValidationConfig(min_object_area=50))
    assert len(kept) == 4
    assert report.skipped["mask has no object"] == 1
    assert report.skipped["every object below 50 px"] == 1
    assert "img_000" in report.summary()


def test_missing_masks_folder_and_unmatched_image(folder_dataset):
    (folder_dataset / "images" / "extra.png").write_bytes(b"")
    with pytest.raises(DataError, match="extra.png"):
        folder_records(folder_dataset)
    with pytest.raises(DataError, match="masks"):
        folder_records(folder_dataset / "images")


def test_boxes_points_and_jitter():
    masks = torch.zeros(2, 40, 50, dtype=torch.bool)
    masks[0, 5:15, 10:30] = True
    masks[1, 20:38, 2:9] = True
    torch.testing.assert_close(mask_to_boxes(masks), torch.tensor([[10.0, 5, 29, 14], [2, 20, 8, 37]]))
    generator = torch.Generator().manual_seed(0)
    points, labels = sample_prompts(masks, PromptConfig(prompt="box", box_jitter=0.0), generator)
    torch.testing.assert_close(points.reshape(2, 4), mask_to_boxes(masks))
    assert labels.tolist() == [[2, 3], [2, 3]]
    jittered, _ = sample_prompts(masks, PromptConfig(prompt="box", box_jitter=0.2, max_box_jitter_px=3), generator)
    assert (jittered.reshape(2, 4) - mask_to_boxes(masks)).abs().max() <= 3
    config = PromptConfig(prompt="point", num_positive_points=3, num_negative_points=2)
    points, labels = sample_prompts(masks, config, generator)
    assert labels.tolist() == [[1, 1, 1, 0, 0]] * 2
    for obj in range(2):
        xs, ys = points[obj, :, 0].long(), points[obj, :, 1].long()
        assert masks[obj, ys[:3], xs[:3]].all() and not masks[obj, ys[3:], xs[3:]].any()


def test_model_coordinates_match_the_processor(tiny_processor):
    boxes = torch.tensor([[[10.0, 20.0, 200.0, 90.0]]])
    image = np.zeros((100, 300, 3), dtype=np.uint8)
    expected = tiny_processor(images=image, input_boxes=boxes.tolist(), return_tensors="pt")["input_boxes"]
    got = to_model_coordinates(boxes.view(1, 2, 2), (100, 300), 128).view(1, 1, 4)
    torch.testing.assert_close(got, expected.float())


def test_dataset_items_and_collation(folder_dataset, tiny_processor):
    records = folder_records(folder_dataset)
    config = DatasetConfig(max_objects_per_image=2)
    train = SegmentationDataset(records, tiny_processor, config, train=True, seed=0)
    item = train[0]
    assert item["pixel_values"].shape == (3, 128, 128)
    assert item["target_masks"].shape == (2, 128, 128) and item["target_masks"].dtype == torch.bool
    assert item["points"].shape == (2, 2, 2)
    again = train[0]
    torch.testing.assert_close(again["pixel_values"], item["pixel_values"], rtol=0, atol=0)  # deterministic
    train.set_epoch(1)
    assert not torch.equal(train[0]["pixel_values"], item["pixel_values"])  # new draws each epoch

    val = SegmentationDataset(records, tiny_processor, DatasetConfig(), train=False)
    val_item = val[1]
    assert val_item["original_masks"].shape == (3, 96, 120)
    batch = collate_segmentation([item, val_item])
    assert batch["pixel_values"].shape == (2, 3, 128, 128)
    assert batch["object_image_index"].tolist() == [0, 0, 1, 1, 1]
    assert batch["points"].shape == (5, 2, 2) and batch["target_masks"].shape == (5, 128, 128)


def test_semantic_mode_merges_instances_and_has_no_prompt(folder_dataset, tiny_processor):
    records = folder_records(folder_dataset)
    dataset = SegmentationDataset(
        records, tiny_processor, DatasetConfig(target_mode="semantic", prompts=PromptConfig(prompt="none")), train=False
    )
    item = dataset[0]
    assert item["original_masks"].shape == (1, 96, 120)
    np.testing.assert_array_equal(item["original_masks"][0].numpy(), records[0].load_instances().any(0))
    assert collate_segmentation([item])["points"] is None


def test_augmentation_moves_masks_with_the_image_and_jitter_strength_reaches_dim_images():
    image = torch.full((3, 32, 32), 40, dtype=torch.uint8)
    mask = torch.zeros(1, 32, 32, dtype=torch.bool)
    mask[0, 4:12, 4:20] = True
    image[:, mask[0]] = 200
    off = dict(horizontal_flip=0.0, vertical_flip=0.0, color_jitter=0.0, blur=0.0, affine=0.0)
    flip = build_augmentation(AugmentationConfig(**{**off, "horizontal_flip": 1.0}))
    flipped_image, flipped_mask = augment(flip, image, mask, seed=0)
    assert torch.equal(flipped_image, image.flip(-1)) and torch.equal(flipped_mask, mask.flip(-1))

    def darkest(strength: float) -> float:
        jitter = build_augmentation(AugmentationConfig(**{**off, "color_jitter": 1.0}, color_jitter_strength=strength))
        return min(augment(jitter, image, mask, seed)[0].float().mean().item() for seed in range(40))

    mean = image.float().mean().item()
    assert darkest(0.8) < 0.4 * mean < 0.7 * mean < darkest(0.2)
