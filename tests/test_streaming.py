"""Training sets larger than memory: `--streaming` from a folder and from a saved `datasets` folder, end to end on
the tiny model; the check of a stream (and the up-front one) holds one sample at a time and builds no mask; workers
give a stream's batches unchanged; resume of a streamed run."""

from __future__ import annotations

import json
import shutil
import weakref

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from sam2_peft.data import sources
from sam2_peft.data.config import DatasetConfig, ValidationConfig
from sam2_peft.data.dataset import collate_segmentation
from sam2_peft.data.sources import LabelMap, folder_records
from sam2_peft.data.streaming import ListedStream, StreamingSegmentationDataset
from sam2_peft.data.validation import validate_records
from sam2_peft.recipes.lora import main as lora_recipe
from tests.conftest import write_folder_dataset
from tests.recipe_helpers import error_line, lora_args


def _stream_args(base, data, out, *extra):
    args = lora_args(base, data, out, "--streaming", *extra)
    args.remove("--val-fraction")
    args.remove("0.34")
    return args


def test_streaming_a_folder_trains_and_validates_on_val_data(saved_tiny_model, tmp_path):
    train, val = write_folder_dataset(tmp_path / "train", 5), write_folder_dataset(tmp_path / "val", 2, seed=1)
    out = tmp_path / "run"
    lora_recipe(
        _stream_args(saved_tiny_model, train, out, "--val-data", str(val), "--max-steps", "4", "--eval-every", "2")
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4 and len(metrics["per_image"]) == 2  # 4 steps of batch 2: past the end of 5 images
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]


def test_streaming_a_saved_datasets_folder_trains(saved_tiny_model, folder_dataset, tmp_path):
    datasets = pytest.importorskip("datasets")
    files = sorted((folder_dataset / "images").iterdir())
    rows = {"image": [str(p) for p in files], "mask": [str(folder_dataset / "masks" / p.name) for p in files]}
    datasets.Dataset.from_dict(rows).save_to_disk(tmp_path / "hf")
    out = tmp_path / "run"
    lora_recipe(_stream_args(saved_tiny_model, tmp_path / "hf", out, "--max-steps", "3", "--shuffle-buffer", "4"))
    assert json.loads((out / "metrics.json").read_text())["steps"] == 3
    assert (out / "adapter_model.safetensors").is_file()


def test_streaming_without_max_steps_is_a_one_line_error(saved_tiny_model, folder_dataset, tmp_path, capsys):
    message = error_line(capsys, _stream_args(saved_tiny_model, folder_dataset, tmp_path / "run"))
    assert "--streaming" in message and "--max-steps" in message


def _track_images(monkeypatch):
    """Count decoded images and the most alive at once, and the object masks built."""
    stats = {"decoded": 0, "alive": 0, "peak": 0, "masks": 0}
    read_image, masks = sources.read_image, LabelMap.masks

    class Tracked(np.ndarray):  # plain arrays cannot be weakly referenced
        pass

    def released():
        stats["alive"] -= 1

    def tracked(path):
        array = read_image(path).view(Tracked)
        weakref.finalize(array, released)
        stats["decoded"] += 1
        stats["alive"] += 1
        stats["peak"] = max(stats["peak"], stats["alive"])
        return array

    def counting(self, indices=None):
        out = masks(self, indices)
        stats["masks"] += len(out)
        return out

    monkeypatch.setattr(sources, "read_image", tracked)
    monkeypatch.setattr(LabelMap, "masks", counting)
    return stats


def test_the_up_front_check_holds_one_sample_per_thread_and_builds_no_mask(tmp_path, monkeypatch):
    records = folder_records(write_folder_dataset(tmp_path / "d", 12))
    stats = _track_images(monkeypatch)
    kept, _ = validate_records(records, ValidationConfig(num_threads=2))
    assert len(kept) == 12 and stats["decoded"] == 12
    assert stats["peak"] <= 3  # one per thread (and one being let go), never the whole set
    assert stats["masks"] == 0  # areas come from the label maps (before: every object's mask was built)


def test_a_stream_reads_only_what_its_batches_need(tmp_path, tiny_processor, monkeypatch):
    records = folder_records(write_folder_dataset(tmp_path / "d", 12))
    stats = _track_images(monkeypatch)
    stream = StreamingSegmentationDataset(ListedStream(records, seed=0), tiny_processor, DatasetConfig())
    stream.configure(batch_size=2, collate=collate_segmentation)
    batches = iter(stream)
    next(batches)
    assert stats["decoded"] == 2 and stats["peak"] <= 2  # checked and prepared as read, not the 12 up front
    for _ in range(8):  # past the end of a pass: the stream goes on, in a new order
        next(batches)
    assert stats["decoded"] == 18 and stats["peak"] <= 2


def _stream_batches(records, processor, workers, count=8):
    stream = StreamingSegmentationDataset(ListedStream(records, seed=5), processor, DatasetConfig(), seed=5)
    stream.configure(batch_size=2, collate=collate_segmentation)
    loader = DataLoader(stream, batch_size=None, num_workers=workers)
    out = []
    for batch in loader:
        out.append((batch["sample_ids"], batch["points"], batch["pixel_values"].sum()))
        if len(out) == count:
            return out


def test_a_streams_batches_do_not_depend_on_the_worker_count(tmp_path, tiny_processor):
    records = folder_records(write_folder_dataset(tmp_path / "d", 5))  # 3 batches per pass, the last one short
    alone, two = _stream_batches(records, tiny_processor, 0), _stream_batches(records, tiny_processor, 2)
    for (ids_a, points_a, pixels_a), (ids_b, points_b, pixels_b) in zip(alone, two, strict=True):
        assert ids_a == ids_b and torch.equal(points_a, points_b) and torch.equal(pixels_a, pixels_b)
    assert [len(ids) for ids, _, _ in alone[:6]] == [2, 2, 1, 2, 2, 1]
    assert alone[0][0] + alone[1][0] + alone[2][0] != alone[3][0] + alone[4][0] + alone[5][0]  # a new order per pass


@pytest.mark.slow  # two runs and a replay: about 40 s
def test_a_streamed_run_resumes_to_the_uninterrupted_result(saved_tiny_model, folder_dataset, tmp_path):
    flags = (
        "--val-data",
        str(write_folder_dataset(tmp_path / "val", 2, seed=1)),
        "--max-steps",
        "4",
        "--eval-every",
        "2",
    )
    full = tmp_path / "full"
    lora_recipe(_stream_args(saved_tiny_model, folder_dataset, full, *flags))
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-2", resumed / "checkpoints" / "step-2")
    shutil.copy(full / "base_predictions.npz", resumed / "base_predictions.npz")
    lora_recipe(_stream_args(saved_tiny_model, folder_dataset, resumed, *flags, "--resume"))
    expected = load_file(str(full / "adapter_model.safetensors"))
    got = load_file(str(resumed / "adapter_model.safetensors"))
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-7)
