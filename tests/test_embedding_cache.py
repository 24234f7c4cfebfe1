"""Embedding cache: keys, tiers, stale/foreign detection, augmentation views, and exactness against uncached training."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from sam2_peft.adapters import LoraMethod, PartialFinetuneMethod
from sam2_peft.data.augment import AugmentationConfig
from sam2_peft.data.dataset import DatasetConfig, SegmentationDataset
from sam2_peft.data.sources import open_records
from sam2_peft.models.loading import build_model_from_config, processor_for_image_size, tiny_config
from sam2_peft.models.segmenter import Sam2Segmenter
from sam2_peft.training.config import TrainingConfig
from sam2_peft.training.embedding_cache import (
    MANIFEST_FILE,
    EmbeddingCache,
    ForeignCacheError,
    encoder_fingerprint,
    plan_embedding_cache,
)
from sam2_peft.training.tasks import ImageSegmentationTask
from sam2_peft.training.trainer import Trainer

SIZE = 128


class CountingEncoder:
    """The tiny model's `vision_features`, counting how many images it encoded."""

    def __init__(self, model) -> None:
        self.segmenter = Sam2Segmenter(model)
        self.images = 0

    def __call__(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        self.images += len(pixel_values)
        return self.segmenter.vision_features(pixel_values)


@pytest.fixture
def encoder(tiny_model) -> CountingEncoder:
    return CountingEncoder(tiny_model)


@pytest.fixture
def fingerprint(tiny_model, tiny_processor) -> dict:
    return encoder_fingerprint(tiny_model, tiny_processor, "tiny")


def pixels(seed: int, count: int = 2) -> torch.Tensor:
    return torch.randn(count, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def test_memory_cache_encodes_once_and_matches_encoder(encoder, fingerprint):
    cache = EmbeddingCache(encoder, fingerprint, memory_budget_bytes=10**9)
    images = pixels(0)
    first = cache.get_or_compute(["a", "b"], images)
    second = cache.get_or_compute(["b", "a"], images.flip(0))
    direct = encoder.segmenter.vision_features(images)
    assert encoder.images == 2 and cache.stats.hits == 2 and cache.stats.misses == 2
    assert [f.shape for f in first] == [(2, 64, 32, 32), (2, 64, 16, 16), (2, 64, 8, 8)]
    for cached, swapped, reference in zip(first, second, direct):
        torch.testing.assert_close(cached, reference, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(swapped, reference.flip(0))


def test_entries_are_stored_contiguous(encoder, fingerprint):
    """The decoder's convs give channels-last maps on CPU; an entry kept strided made every hit's `torch.stack` a
    strided copy."""
    cache = EmbeddingCache(
        lambda px: [f.to(memory_format=torch.channels_last) for f in encoder(px)],
        fingerprint,
        memory_budget_bytes=10**9,
    )
    images = pixels(0)
    first = cache.get_or_compute(["a", "b"], images)
    assert all(f.is_contiguous() for _, features in cache._memory.values() for f in features)
    for cached, reference in zip(first, encoder.segmenter.vision_features(images)):
        torch.testing.assert_close(cached, reference, rtol=1e-5, atol=1e-6)


def test_changed_pixels_are_re_encoded_not_served_stale(encoder, fingerprint, caplog):
    cache = EmbeddingCache(encoder, fingerprint, memory_budget_bytes=10**9)
    cache.get_or_compute(["a"], pixels(0, 1))
    with caplog.at_level(logging.WARNING):
        features = cache.get_or_compute(["a"], pixels(1, 1))
    assert cache.stats.stale == 1 and encoder.images == 2
    assert "pixels of 'a' changed" in caplog.text
    torch.testing.assert_close(features[2], encoder.segmenter.vision_features(pixels(1, 1))[2])


def test_budget_exceeded_without_folder_re_encodes_and_warns(encoder, fingerprint, caplog):
    cache = EmbeddingCache(encoder, fingerprint, memory_budget_bytes=1000)
    with caplog.at_level(logging.WARNING):
        cache.get_or_compute(["a"], pixels(0, 1))
        cache.get_or_compute(["a"], pixels(0, 1))
    assert encoder.images == 2 and cache.stats.memory_entries == 0
    assert "memory budget" in caplog.text


def test_disk_cache_persists_between_instances_memory_mapped(encoder, fingerprint, tmp_path):
    folder = tmp_path / "cache"
    first = EmbeddingCache(encoder, fingerprint, memory_budget_bytes=0, directory=folder)
    expected = first.get_or_compute(["a", "b"], pixels(0))
    assert json.loads((folder / MANIFEST_FILE).read_text())["fingerprint"] == fingerprint
    files = sorted(folder.glob("*.safetensors"))
    assert len(files) == 2 and set(load_file(files[0])) == {"level_0", "level_1", "level_2"}
    reopened = EmbeddingCache(encoder, fingerprint, memory_budget_bytes=0, directory=folder)
    again = reopened.get_or_compute(["a", "b"], pixels(0))
    assert encoder.images == 2 and reopened.stats.hits == 2
    for a, b in zip(expected, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_foreign_cache_is_rebuilt_or_refused(encoder, fingerprint, tmp_path, caplog):
    folder = tmp_path / "cache"
    EmbeddingCache(encoder, fingerprint, 0, folder).get_or_compute(["a"], pixels(0, 1))
    other = {**fingerprint, "encoder_weights_xxh3": "0" * 32}
    with pytest.raises(ForeignCacheError, match="encoder_weights_xxh3"):
        EmbeddingCache(encoder, other, 0, folder, rebuild_foreign=False)
    with caplog.at_level(logging.WARNING):
        rebuilt = EmbeddingCache(encoder, other, 0, folder)
    assert "stale" in caplog.text and not list(folder.glob("*.safetensors"))
    rebuilt.get_or_compute(["a"], pixels(0, 1))
    assert encoder.images == 2


def test_non_cache_folder_is_refused(encoder, fingerprint, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ForeignCacheError, match="not an embedding cache"):
        EmbeddingCache(encoder, fingerprint, 0, tmp_path)


def test_fingerprint_covers_weights_and_preprocessing(tiny_model, tiny_processor):
    base = encoder_fingerprint(tiny_model, tiny_processor, "tiny")
    assert encoder_fingerprint(build_model_from_config(tiny_config(SIZE), seed=0), tiny_processor, "tiny") == base
    assert encoder_fingerprint(build_model_from_config(tiny_config(SIZE), seed=1), tiny_processor, "tiny") != base
    other_norm = processor_for_image_size(SIZE)
    other_norm.image_processor.image_mean = [0.5, 0.5, 0.5]
    assert encoder_fingerprint(tiny_model, other_norm, "tiny")["preprocessing_xxh3"] != base["preprocessing_xxh3"]
    after = encoder_fingerprint(tiny_model, tiny_processor, "tiny", stage="image_embeddings")
    assert after != base, "a folder of pre-projection features is never read as decoder inputs"
    with torch.no_grad():
        tiny_model.mask_decoder.conv_s0.weight.add_(1.0)
    assert encoder_fingerprint(tiny_model, tiny_processor, "tiny") == base, "decoder layers are not part of the key"
    changed = encoder_fingerprint(tiny_model, tiny_processor, "tiny", stage="image_embeddings")
    assert changed["encoder_weights_xxh3"] != after["encoder_weights_xxh3"], "... unless they are cached through"
    stored_half = encoder_fingerprint(tiny_model, tiny_processor, "tiny", storage_dtype=torch.bfloat16)
    assert stored_half != base


def test_plan_never_drops_augmentation():
    assert not plan_embedding_cache(False, False, True, 4).enabled
    assert not plan_embedding_cache(True, True, False, 4).enabled
    assert plan_embedding_cache(True, False, False, 4).views == 1
    plan = plan_embedding_cache(True, False, True, 3)
    assert plan.enabled and plan.views == 3 and "3 fixed augmented views" in plan.reason


def test_augmentation_views_are_fixed_per_image(folder_dataset, tiny_processor):
    records = open_records(str(folder_dataset))
    dataset = SegmentationDataset(records, tiny_processor, DatasetConfig(), train=True, seed=0)
    dataset.set_augmentation_views(2)
    seen: dict[int, torch.Tensor] = {}
    for epoch in range(8):
        dataset.set_epoch(epoch)
        item = dataset[0]
        if item["view"] in seen:
            torch.testing.assert_close(item["pixel_values"], seen[item["view"]], rtol=0, atol=0)
        seen[item["view"]] = item["pixel_values"]
    assert set(seen) == {0, 1} and not torch.equal(seen[0], seen[1])


def _train(folder, tmp_path, name: str, method=None, **overrides) -> tuple[Trainer, dict]:
    records = open_records(str(folder))
    processor = processor_for_image_size(SIZE)
    data_config = DatasetConfig(max_objects_per_image=3, augmentation=AugmentationConfig(augment=False))
    train = SegmentationDataset(records[:4], processor, data_config, train=True, seed=0)
    val = SegmentationDataset(records[4:], processor, data_config, train=False, seed=0)
    config = TrainingConfig(  # the last weights (not the best evaluation's): those the adapters compared are
        output_dir=str(tmp_path / name), max_steps=4, batch_size=2, lr=1e-3, log_every=1, report_to="none",
        load_best=False,
    )  # fmt: skip
    for key, value in overrides.items():
        setattr(config, key, value)
    model = build_model_from_config(tiny_config(SIZE), seed=0)
    # No dropout: its masks are drawn per prompt chunk, and only the cached run decodes in chunks.
    method = method or LoraMethod("decoder", lora_r=4, lora_alpha=8, lora_dropout=0.0)
    trainer = Trainer(model, method, ImageSegmentationTask(train, val), config, "tiny")
    return trainer, trainer.train()


def test_cached_training_matches_uncached(folder_dataset, tmp_path):
    cached, cached_metrics = _train(folder_dataset, tmp_path, "cached")
    plain, plain_metrics = _train(folder_dataset, tmp_path, "plain", cache_embeddings=False)
    assert cached.cache is not None and plain.cache is None
    assert cached.cache.stats.misses == 4 + 2, "4 training images and 2 validation images, each encoded once"
    assert cached.cache.stats.hits > 0
    losses = [[h["loss"] for h in t.state.history if "loss" in h] for t in (cached, plain)]
    assert len(losses[0]) == 4
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-5, atol=1e-6)
    weights = [load_file(tmp_path / n / "adapter_model.safetensors") for n in ("cached", "plain")]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=1e-5, atol=1e-6)
    for key in plain_metrics["fine_tuned"]:
        assert cached_metrics["fine_tuned"][key] == pytest.approx(plain_metrics["fine_tuned"][key], abs=1e-5)


def _entry_channels(cache: EmbeddingCache) -> list[int]:
    features = next(iter(cache._memory.values()))[1]
    return [level.shape[0] for level in features]


@pytest.mark.slow
def test_frozen_projections_cache_the_decoder_inputs(folder_dataset, tmp_path, caplog):
    """Decoder LoRA leaves conv_s0/conv_s1 frozen: entries are the decoder's inputs (5.25x smaller at SAM 2's widths:
    32 + 64 channels at 1/4 and 1/8 instead of 256 + 256); training them matches training on uncached images."""
    with caplog.at_level(logging.INFO, logger="sam2_peft.training.embedding_cache"):
        lora, _ = _train(folder_dataset, tmp_path, "lora")
    conv_s0, conv_s1 = lora.segmenter.base.mask_decoder.conv_s0, lora.segmenter.base.mask_decoder.conv_s1
    assert lora.cache.stage == "image_embeddings" and lora.run_info["embedding_cache"]["stage"] == "image_embeddings"
    assert _entry_channels(lora.cache)[:2] == [conv_s0.out_channels, conv_s1.out_channels]
    assert "holds" in caplog.text and "of the 6 this run needs" in caplog.text
    partial, _ = _train(
        folder_dataset, tmp_path, "partial", PartialFinetuneMethod(learning_rates={"mask_decoder": 1e-4})
    )
    assert partial.cache.stage == "vision_features", "conv_s0/conv_s1 train: cache before them"
    assert partial.config.lr is None, "the method's own per-component rates train: the lr given is not recorded"
    assert _entry_channels(partial.cache)[:2] == [conv_s0.in_channels, conv_s1.in_channels]


def test_how_many_views_fit_is_logged_once(encoder, fingerprint, tmp_path, caplog):
    """Also when the memory tier holds nothing (every entry goes to the folder)."""
    cache = EmbeddingCache(encoder, fingerprint, memory_budget_bytes=0, directory=tmp_path, expected_entries=3)
    with caplog.at_level(logging.INFO, logger="sam2_peft.training.embedding_cache"):
        for seed in range(3):
            cache.get_or_compute([f"k{seed}"], pixels(seed, 1))
    assert caplog.text.count("memory budget holds 0 views of the 3 this run needs") == 1, caplog.text


def test_bfloat16_storage_halves_entries_and_returns_float32(folder_dataset, tmp_path):
    full, _ = _train(folder_dataset, tmp_path, "full")
    half, _ = _train(folder_dataset, tmp_path, "half", cache_dtype="bfloat16")
    assert half.cache.stats.memory_bytes * 2 == full.cache.stats.memory_bytes
    assert next(iter(half.cache._memory.values()))[1][0].dtype == torch.bfloat16
    batch = torch.randn(1, 3, SIZE, SIZE)
    returned = half.cache.get_or_compute(["new"], batch)
    assert all(level.dtype == torch.float32 for level in returned)
    exact = full.cache.get_or_compute(["new"], batch)
    for got, want in zip(returned, exact):
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


def test_encoder_lora_turns_cache_off(folder_dataset, tiny_processor, tmp_path, caplog):
    records = open_records(str(folder_dataset))
    train = SegmentationDataset(records[:2], tiny_processor, DatasetConfig(), train=True, seed=0)
    config = TrainingConfig(output_dir=str(tmp_path / "enc"), max_steps=1, report_to="none")
    model = build_model_from_config(tiny_config(SIZE), seed=0)
    with caplog.at_level(logging.INFO):
        trainer = Trainer(model, LoraMethod("encoder", lora_r=2), ImageSegmentationTask(train), config, "tiny")
    assert trainer.cache is None and train.augmentation_views is None
    assert "trains the image encoder" in caplog.text


def _damage(path, how: str) -> None:
    """Zero the tensor payload, fill it with NaN (header kept), or cut the file in half."""
    data = bytearray(path.read_bytes())
    payload = 8 + int.from_bytes(data[:8], "little")
    if how == "zeroed":
        data[payload:] = bytes(len(data) - payload)
    elif how == "nan":
        data[payload:] = torch.full(((len(data) - payload) // 4,), float("nan")).numpy().tobytes()
    else:
        del data[len(data) // 2 :]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["zeroed", "nan", "truncated"])
def test_damaged_entry_is_rebuilt_with_a_warning(how, encoder, fingerprint, tmp_path, caplog):
    folder = tmp_path / "cache"
    expected = EmbeddingCache(encoder, fingerprint, 0, folder).get_or_compute(["a", "b"], pixels(0))
    entry = EmbeddingCache(encoder, fingerprint, 0, folder)._path("a")
    _damage(entry, how)
    reopened = EmbeddingCache(encoder, fingerprint, 0, folder)
    with caplog.at_level(logging.WARNING):
        features = reopened.get_or_compute(["a", "b"], pixels(0))
    assert str(entry) in caplog.text and "damaged" in caplog.text
    assert reopened.stats.damaged == 1 and encoder.images == 3, "only the damaged entry is re-encoded"
    for got, want in zip(features, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    healed = EmbeddingCache(encoder, fingerprint, 0, folder)
    healed.get_or_compute(["a"], pixels(0)[:1])
    assert healed.stats.hits == 1 and healed.stats.damaged == 0 and encoder.images == 3, "the entry was rewritten"
