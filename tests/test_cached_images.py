"""Images whose embedding-cache entries are held are not decoded again: the dataset asks the cache by a fingerprint
of the file and the view, and builds the same masks and prompts without the pixels."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sam2_peft.data import sources as sources_module
from sam2_peft.data.config import AugmentationConfig, DatasetConfig
from sam2_peft.data.dataset import SegmentationDataset, collate_segmentation, view_key
from sam2_peft.data.sources import folder_records
from sam2_peft.recipes.lora import main as lora_recipe
from sam2_peft.training.embedding_cache import EmbeddingCache
from tests.recipe_helpers import lora_args

PER_OBJECT = ("points", "point_labels", "target_masks")


def _dataset(root, tiny_processor, augment: bool = True) -> SegmentationDataset:
    config = DatasetConfig(augmentation=AugmentationConfig(augment=augment, affine=1.0 if augment else 0.0))
    dataset = SegmentationDataset(folder_records(root), tiny_processor, config, train=True, seed=3)
    dataset.set_augmentation_views(2)
    return dataset


@pytest.mark.parametrize("augment", [True, False], ids=["augmented", "plain"])
def test_a_held_view_is_built_without_its_image_and_with_the_same_masks_and_prompts(
    folder_dataset, tiny_processor, monkeypatch, augment
):
    dataset = _dataset(folder_dataset, tiny_processor, augment)
    built = [dataset[i] for i in range(len(dataset))]
    held = {view_key(item["sample_id"], item["view"]): item["view_source"] for item in built}
    assert all(held.values())
    dataset.skip_cached_images(lambda key, source: held.get(key) == source)

    def no_decoding(path):
        raise AssertionError(f"decoded {path}")

    monkeypatch.setattr(sources_module, "read_image", no_decoding)
    for index, expected in enumerate(built):
        item = dataset[index]
        assert item["view"] == expected["view"] and item["view_source"] == expected["view_source"]
        assert item["original_size"] == expected["original_size"]
        for key in PER_OBJECT:
            assert torch.equal(item[key], expected[key]), key
        assert torch.equal(item["pixel_values"], torch.zeros_like(expected["pixel_values"]))


def test_the_view_source_follows_the_file_the_view_and_the_augmentation(folder_dataset, tiny_processor):
    dataset = _dataset(folder_dataset, tiny_processor)
    record = dataset.records[0]
    sources = {dataset._view_source(record, seed) for seed in (1, 2)}
    assert len(sources) == 2  # one per augmented view
    before = dataset._view_source(record, 1)
    stat = os.stat(record.image_file)
    os.utime(record.image_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file was rewritten
    assert dataset._view_source(record, 1) != before
    other = _dataset(folder_dataset, tiny_processor)
    other.config.augmentation.color_jitter = 0.1
    assert other._view_source(record, 1) != dataset._view_source(record, 1)
    plain = _dataset(folder_dataset, tiny_processor, augment=False)
    assert plain._view_source(record, 1) == plain._view_source(record, 2)  # without augmentation: one view


def test_a_vanished_image_file_fails_as_reading_it_does(folder_dataset, tiny_processor):
    from sam2_peft.data.sources import DataError

    dataset = _dataset(folder_dataset, tiny_processor)
    dataset.skip_cached_images(lambda key, source: True)
    os.remove(dataset.records[0].image_file)
    assert dataset.records[0].image_fingerprint() is None
    with pytest.raises(DataError, match="Cannot read image"):
        dataset[0]


def test_an_image_without_a_file_is_always_built(folder_dataset, tiny_processor):
    dataset = _dataset(folder_dataset, tiny_processor)
    for record in dataset.records:
        record.image_file = None
    dataset.skip_cached_images(lambda key, source: True)
    item = dataset[0]
    assert item["view_source"] is None and item["pixel_values"].abs().sum() > 0


def test_the_cache_serves_held_entries_for_placeholder_pixels_and_checks_the_rest(folder_dataset, tiny_processor):
    calls = []

    def encode(pixel_values):
        calls.append(len(pixel_values))
        return [pixel_values.mean(dim=(2, 3), keepdim=True) + level for level in range(3)]

    cache = EmbeddingCache(encode, {}, memory_budget_bytes=10**9)
    dataset = _dataset(folder_dataset, tiny_processor)
    batch = collate_segmentation([dataset[0], dataset[1]])
    keys = [view_key(i, v) for i, v in zip(batch["sample_ids"], batch["views"])]
    assert not any(cache.holds(k, s) for k, s in zip(keys, batch["view_sources"]))
    first = cache.get_or_compute(keys, batch["pixel_values"], batch["view_sources"])
    assert calls == [2] and all(cache.holds(k, s) for k, s in zip(keys, batch["view_sources"]))

    placeholders = torch.zeros_like(batch["pixel_values"])
    again = cache.get_or_compute(keys, placeholders, batch["view_sources"])
    assert calls == [2] and all(torch.equal(a, b) for a, b in zip(first, again))
    # Without a source (or with another one) the pixels decide: zeros are not the cached image, so re-encoded.
    cache.get_or_compute(keys, placeholders, ["other", None])
    assert calls == [2, 2] and not cache.holds(keys[0], batch["view_sources"][0])


def _read_image_calls(monkeypatch) -> list[str]:
    calls, real = [], sources_module.read_image
    monkeypatch.setattr(sources_module, "read_image", lambda path: calls.append(str(path)) or real(path))
    return calls


def test_training_skips_decoding_held_views_and_trains_the_same_adapter(
    saved_tiny_model, folder_dataset, tmp_path, monkeypatch
):
    def run(name: str, *flags: str) -> tuple[dict, int]:
        calls = _read_image_calls(monkeypatch)
        out = tmp_path / name
        lora_recipe(lora_args(saved_tiny_model, folder_dataset, out, "--epochs", "3", *flags))
        return load_file(str(out / "adapter_model.safetensors")), len(calls)

    skipping, skipping_reads = run("skip", "--no-augment")
    monkeypatch.setattr(SegmentationDataset, "skip_cached_images", lambda self, is_cached: None)
    building, building_reads = run("build", "--no-augment")
    train_images = 4  # of the 6, a third are held out for validation
    assert building_reads - skipping_reads == 2 * train_images  # epochs 2 and 3 decode no training image
    for key in building:
        assert torch.equal(skipping[key], building[key]), key

    monkeypatch.undo()
    augmented, augmented_reads = run("skip-augmented", "--cache-views", "1")
    monkeypatch.setattr(SegmentationDataset, "skip_cached_images", lambda self, is_cached: None)
    augmented_built, augmented_built_reads = run("build-augmented", "--cache-views", "1")
    assert augmented_built_reads - augmented_reads == 2 * train_images
    for key in augmented:
        assert torch.equal(augmented[key], augmented_built[key]), key
    assert not np.array_equal(augmented[key].numpy(), skipping[key].numpy())  # the augmentation really ran
