"""Video folders: reading, sparse annotation, clip sampling, and clear errors for bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sam2_peft.data.prompts import PromptConfig
from sam2_peft.data.sources import DataError
from sam2_peft.data.video import VideoClipDataset, VideoDatasetConfig, open_video_folder, read_label_map
from sam2_peft.models.loading import processor_for_image_size

from .conftest import real_dataset


def write_video_folder(root: Path, name: str = "seq", frames: int = 6, size=(48, 64), palette: bool = True) -> Path:
    """A moving square (id 1) and a disc (id 2) that leaves the picture after frame 3; palette PNG labels."""
    (root / "JPEGImages" / name).mkdir(parents=True, exist_ok=True)
    (root / "Annotations" / name).mkdir(parents=True, exist_ok=True)
    height, width = size
    yy, xx = np.mgrid[:height, :width]
    for t in range(frames):
        labels = np.zeros(size, np.uint8)
        labels[10:22, 5 + 3 * t : 17 + 3 * t] = 1
        if t <= 3:
            labels[(yy - 32) ** 2 + (xx - 45) ** 2 <= 36] = 2
        image = np.where(labels[..., None] > 0, 220, 30).astype(np.uint8).repeat(3, axis=2)
        Image.fromarray(image).save(root / "JPEGImages" / name / f"{t:05d}.jpg")
        mask = Image.fromarray(labels if palette else (labels == 1).astype(np.uint8) * 255)
        if palette:
            mask = mask.convert("P")
            mask.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
        mask.save(root / "Annotations" / name / f"{t:05d}.png")
    return root


def test_open_folder_reads_palette_and_binary_labels(tmp_path):
    write_video_folder(tmp_path, "a")
    write_video_folder(tmp_path, "b", palette=False)
    sequences = open_video_folder(tmp_path)
    assert [s.name for s in sequences] == ["a", "b"]
    assert set(np.unique(sequences[0].load_labels(0))) == {0, 1, 2}
    assert set(np.unique(read_label_map(sequences[1].annotations[0]))) == {0, 1}  # 0/255 -> 0/1
    assert sequences[0].load_frame(2).shape == (48, 64, 3)


def test_sparse_annotation_keeps_every_kth_frame(tmp_path):
    write_video_folder(tmp_path, frames=7)
    assert open_video_folder(tmp_path, annotated_every=3)[0].annotated_frames == [0, 3, 6]


def test_clips_targets_prompts_and_absent_objects(tmp_path):
    write_video_folder(tmp_path, frames=6)
    sequences = open_video_folder(tmp_path, annotated_every=2)
    config = VideoDatasetConfig(clip_len=5, prompts=PromptConfig(prompt="box", box_jitter=0.0))
    dataset = VideoClipDataset(sequences, processor_for_image_size(128), config)
    assert len(dataset) == 3  # clips start at the annotated frames 0, 2, 4
    item = dataset[0]
    assert item["sample_id"] == "seq@0"
    assert item["pixel_values"].shape == (5, 3, 128, 128)
    assert item["target_masks"].shape == (5, 2, 128, 128)
    assert item["annotated"].tolist() == [True, False, True, False, True]
    assert item["object_ids"].tolist() == [1, 2]
    assert not item["target_masks"][1].any()  # unannotated frame
    assert item["target_masks"][2, 1].any() and not item["target_masks"][4, 1].any()  # the disc has left
    # tight box (inclusive corners 5,10 - 16,21) of the square on frame 0 in model pixels: x * 128/64, y * 128/48
    np.testing.assert_allclose(item["points"][0].flatten().numpy(), [10, 10 * 128 / 48, 32, 21 * 128 / 48], atol=1.5)
    assert item["point_labels"].tolist() == [[2, 3], [2, 3]]
    last = dataset[2]
    assert last["pixel_values"].shape[0] == 2  # frames 4 and 5: a shorter clip at the end
    assert last["object_ids"].tolist() == [1]


def test_missing_folders_are_named(tmp_path):
    with pytest.raises(DataError, match="Annotations"):
        (tmp_path / "JPEGImages").mkdir()
        open_video_folder(tmp_path)
    write_video_folder(tmp_path / "x")
    with pytest.raises(DataError, match="nope"):
        open_video_folder(tmp_path / "x", sequences=["nope"])


def test_sequence_without_annotation_is_named(tmp_path):
    write_video_folder(tmp_path)
    for path in (tmp_path / "Annotations" / "seq").iterdir():
        path.unlink()
    with pytest.raises(DataError, match="'seq' has no annotated frame"):
        open_video_folder(tmp_path)


def test_frame_and_mask_size_mismatch_names_the_file(tmp_path):
    write_video_folder(tmp_path)
    bad = tmp_path / "Annotations" / "seq" / "00002.png"
    Image.fromarray(np.zeros((40, 64), np.uint8)).save(bad)
    with pytest.raises(DataError, match="00002.png' is 64x40"):
        open_video_folder(tmp_path)


def test_annotation_without_frame_is_named(tmp_path):
    write_video_folder(tmp_path)
    Image.fromarray(np.zeros((48, 64), np.uint8)).save(tmp_path / "Annotations" / "seq" / "99999.png")
    with pytest.raises(DataError, match="99999.png' has no frame"):
        open_video_folder(tmp_path)


def test_davis_mini_opens():
    root = real_dataset("video-davis2016-mini")
    sequences = open_video_folder(root, annotated_every=5)
    assert {s.name for s in sequences} >= {"blackswan", "dog"}
    dog = next(s for s in sequences if s.name == "dog")
    assert dog.annotated_frames == list(range(0, len(dog.frames), 5))
    assert set(np.unique(dog.load_labels(0))) == {0, 1}
