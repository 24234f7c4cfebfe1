"""The data pipeline's cost cuts keep its items: objects chosen before their masks are built, no resize of what is
already at size, DataLoader workers (kept alive between epochs) that give the same batches as none."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from sam2_peft.data import dataset as dataset_module
from sam2_peft.data.config import AugmentationConfig, DatasetConfig, ValidationConfig
from sam2_peft.data.dataset import SegmentationDataset, collate_segmentation
from sam2_peft.data.sources import LabelMap, MaskStack, folder_records
from sam2_peft.data.validation import build_masks, clean_instances, kept_objects
from sam2_peft.recipes.lora import main as lora_recipe
from sam2_peft.training.config import default_num_workers
from tests.recipe_helpers import lora_args


def _write_grid(root, size=(128, 128), objects=30, small=3):
    """One image with `objects` 8x8 squares (the last `small` of them 5x5, below the default minimum area)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    labels = np.zeros(size, np.uint8)
    for n in range(objects):
        y, x = 4 + 12 * (n // 8), 4 + 12 * (n % 8)
        side = 5 if n >= objects - small else 8
        labels[y : y + side, x : x + side] = n + 1
    image = np.where(labels[..., None] > 0, 200, 30).astype(np.uint8).repeat(3, axis=-1)
    Image.fromarray(image).save(root / "images" / "a.png")
    Image.fromarray(labels).save(root / "masks" / "a.png")
    return root


def _config(**overrides) -> DatasetConfig:
    return DatasetConfig(augmentation=AugmentationConfig(augment=False), **overrides)


def test_only_the_chosen_objects_masks_are_built_and_the_draw_is_unchanged(tmp_path, tiny_processor, monkeypatch):
    records = folder_records(_write_grid(tmp_path / "d"))
    built = []
    masks = LabelMap.masks

    def counting(self, indices=None):
        out = masks(self, indices)
        built.append(len(out))
        return out

    monkeypatch.setattr(LabelMap, "masks", counting)
    train = SegmentationDataset(records, tiny_processor, _config(max_objects_per_image=5), train=True, seed=3)
    item = train[0]
    assert built == [5]  # before: all 30 built (and cleaned), then 5 drawn
    # The same draw as before: a seeded subset of the objects cleaning keeps (27 of 30), in their order.
    everything = clean_instances(records[0].load_instances(), ValidationConfig())
    generator = torch.Generator().manual_seed(train._sample_seed(0))
    keep = torch.randperm(len(everything), generator=generator)[:5].sort().values
    assert torch.equal(item["target_masks"], torch.from_numpy(everything[keep.numpy()]))
    built.clear()
    val = SegmentationDataset(records, tiny_processor, _config(max_eval_objects=4), train=False)
    assert val[0]["original_masks"].shape[0] == 4 and built == [4]
    np.testing.assert_array_equal(val.evaluated_masks("a"), everything[:4])


@pytest.mark.parametrize("radius", [1, 3])
def test_closings_on_crops_equal_closings_of_full_masks(radius):
    rng = np.random.default_rng(radius)
    labels = np.zeros((60, 70), np.uint16)
    for n in range(1, 12):  # ragged blobs, some touching the border, some split by gaps the closing fills
        y, x = rng.integers(0, 55), rng.integers(0, 65)
        labels[y : y + rng.integers(2, 14), x : x + rng.integers(2, 14)] = n
        labels[rng.integers(0, 60, 20), rng.integers(0, 70, 20)] = 0
    config = ValidationConfig(min_object_area=20, closing_radius=radius)
    objects = LabelMap.from_labels(labels)
    expected = clean_instances(objects.masks(), config)
    kept = kept_objects(objects, config)
    np.testing.assert_array_equal(build_masks(objects, kept, config), expected)
    stack = MaskStack(objects.masks())  # sources without a label map (COCO) take the same path
    np.testing.assert_array_equal(build_masks(stack, kept_objects(stack, config), config), expected)


def test_nothing_is_resized_when_already_at_the_models_size(tmp_path, tiny_processor, monkeypatch):
    records = folder_records(_write_grid(tmp_path / "d"))  # 128 x 128, the tiny model's size
    image = torch.from_numpy(records[0].load_image()).permute(2, 0, 1)
    expected = tiny_processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0]  # with resize
    calls = []
    resize, interpolate = tiny_processor.image_processor.resize, torch.nn.functional.interpolate
    monkeypatch.setattr(
        tiny_processor.image_processor, "resize", lambda *a, **k: calls.append("processor") or resize(*a, **k)
    )
    monkeypatch.setattr(
        dataset_module.F, "interpolate", lambda *a, **k: calls.append("targets") or interpolate(*a, **k)
    )
    monkeypatch.setattr(dataset_module.v2.functional, "resize", lambda *a, **k: calls.append("input"))
    for train in (True, False):
        item = SegmentationDataset(records, tiny_processor, _config(), train=train)[0]
        assert calls == []
        assert torch.equal(item["pixel_values"], expected)  # the processor's own (no-op) resize gives these pixels


def test_other_sizes_are_still_resized(folder_dataset, tiny_processor):
    item = SegmentationDataset(folder_records(folder_dataset), tiny_processor, _config(), train=True)[0]  # 96 x 120
    assert item["pixel_values"].shape == (3, 128, 128) and item["target_masks"].shape[1:] == (128, 128)


def test_default_workers_follow_the_core_count():
    assert [default_num_workers(n) for n in (1, 2, 3, 4, 8, 32)] == [0, 0, 1, 2, 4, 4]


def _draws(dataset, workers: int, epochs: int = 2) -> list:
    loader = DataLoader(dataset, batch_size=2, num_workers=workers, persistent_workers=workers > 0,
                        collate_fn=collate_segmentation)  # fmt: skip
    draws = []
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        draws += [(b["sample_ids"], b["points"], b["pixel_values"].sum()) for b in loader]
    return draws


def test_persistent_workers_see_each_new_epoch(folder_dataset, tiny_processor):
    dataset = SegmentationDataset(folder_records(folder_dataset), tiny_processor, DatasetConfig(), train=True)
    alone, workers = _draws(dataset, 0), _draws(dataset, 2)
    assert len(alone) == len(workers) == 6
    for (ids_a, points_a, pixels_a), (ids_w, points_w, pixels_w) in zip(alone, workers):
        assert ids_a == ids_w and torch.equal(points_a, points_w) and torch.equal(pixels_a, pixels_w)
    assert not torch.equal(alone[0][1], alone[3][1])  # epochs differ (augmentation, boxes)


def test_training_with_workers_gives_the_adapter_of_training_without(saved_tiny_model, folder_dataset, tmp_path):
    from safetensors.torch import load_file

    adapters = []
    for workers in ("0", "2"):
        out = tmp_path / f"w{workers}"
        flags = ("--max-steps", "4", "--num-workers", workers, "--log-every", "1")  # 2 epochs of 2 steps
        lora_recipe(lora_args(saved_tiny_model, folder_dataset, out, *flags))
        adapters.append(load_file(str(out / "adapter_model.safetensors")))
    assert adapters[0].keys() == adapters[1].keys()
    for key in adapters[0]:
        assert torch.equal(adapters[0][key], adapters[1][key]), key


@pytest.mark.parametrize("count", [0, 1, 8, 9, 17])
def test_masks_augmented_packed_in_bit_planes_equal_masks_augmented_one_by_one(count):
    from torchvision import tv_tensors

    from sam2_peft.data.augment import augment, build_augmentation, pack_masks, unpack_masks

    generator = torch.Generator().manual_seed(count)
    masks = torch.rand(count, 48, 40, generator=generator) > 0.7
    assert torch.equal(unpack_masks(pack_masks(masks), count), masks)
    image = torch.randint(0, 256, (3, 48, 40), dtype=torch.uint8, generator=generator)
    transform = build_augmentation(AugmentationConfig(affine=1.0, horizontal_flip=0.5, vertical_flip=0.5, blur=0.5))
    moved = 0
    for seed in range(12):
        augmented_image, augmented = augment(transform, image, masks, seed)
        with torch.random.fork_rng(devices=[]):  # what augment did before packing: every mask a channel
            torch.manual_seed(seed)
            expected_image, expected = transform(tv_tensors.Image(image), tv_tensors.Mask(masks.to(torch.uint8)))
        assert torch.equal(augmented_image, expected_image.as_subclass(torch.Tensor))
        assert augmented.dtype == torch.bool and torch.equal(augmented, expected.as_subclass(torch.Tensor).bool())
        moved += int(not torch.equal(augmented, masks))
    assert count == 0 or moved >= 6  # the transform really moved the masks


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int32", "int64", "float32", "bool", "empty"])
def test_value_counts_equal_numpys_unique(dtype):
    from sam2_peft.data.sources import value_counts

    rng = np.random.default_rng(0)
    labels = {
        "uint8": rng.integers(0, 40, (64, 48)).astype(np.uint8),
        "uint16": rng.integers(0, 3000, (64, 48)).astype(np.uint16),
        "int32": rng.integers(-5, 40, (64, 48)).astype(np.int32),  # negative: counted by sorting
        "int64": rng.integers(0, 2**20, (64, 48)),  # past 2^16: by sorting
        "float32": rng.integers(0, 4, (64, 48)).astype(np.float32),
        "bool": rng.random((64, 48)) > 0.5,
        "empty": np.zeros((0, 48), np.uint8),
    }[dtype]
    values, counts = value_counts(labels)
    expected_values, expected_counts = np.unique(labels, return_counts=True)
    assert values.dtype == expected_values.dtype
    np.testing.assert_array_equal(values, expected_values)
    np.testing.assert_array_equal(counts, expected_counts)
