"""Video folders: reading, sparse annotation, clip sampling, and clear errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sam2_peft.data.prompts import PromptConfig
from sam2_peft.data.sources import DataError
from sam2_peft.data.video import VideoClipDataset, VideoDatasetConfig, open_video_folder, read_label_map
from sam2_peft.models.loading import processor_for_image_size

from .conftest import real_dataset
from .video_helpers import write_video_folder


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
    write_video_folder(tmp_path, frames=7)
    sequences = open_video_folder(tmp_path, annotated_every=2)
    config = VideoDatasetConfig(clip_len=5, prompts=PromptConfig(prompt="box", box_jitter=0.0))
    dataset = VideoClipDataset(sequences, processor_for_image_size(128), config)
    assert len(dataset) == 3  # clips start at the annotated frames 0, 2, 4 (not 6: no second annotated frame)
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
    assert last["pixel_values"].shape[0] == 3  # frames 4 to 6: a shorter clip at the end
    assert last["object_ids"].tolist() == [1]


def test_clips_too_short_to_reach_a_second_annotation_are_refused(tmp_path):
    write_video_folder(tmp_path, frames=7)
    sequences = open_video_folder(tmp_path, annotated_every=3)
    with pytest.raises(DataError, match="raise clip_len"):
        VideoClipDataset(sequences, processor_for_image_size(128), VideoDatasetConfig(clip_len=3))
    assert len(VideoClipDataset(sequences, processor_for_image_size(128), VideoDatasetConfig(clip_len=1))) == 3


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


@pytest.mark.real_data
def test_davis_mini_opens():
    root = real_dataset("video-davis2016-mini")
    sequences = open_video_folder(root, annotated_every=5)
    assert {s.name for s in sequences} >= {"blackswan", "dog"}
    dog = next(s for s in sequences if s.name == "dog")
    assert dog.annotated_frames == list(range(0, len(dog.frames), 5))
    assert set(np.unique(dog.load_labels(0))) == {0, 1}


def test_unpadded_frame_numbers_are_in_numeric_order(tmp_path):
    write_video_folder(tmp_path, frames=12)
    for folder, suffix in (("JPEGImages", ".jpg"), ("Annotations", ".png")):
        for t in range(12):
            path = tmp_path / folder / "seq" / f"{t:05d}{suffix}"
            path.rename(path.with_name(f"{t}{suffix}"))  # 0, 1, ..., 11: as text 10 and 11 come before 2
    sequence = open_video_folder(tmp_path)[0]
    assert [p.stem for p in sequence.frames] == [str(t) for t in range(12)]
    assert sequence.annotations[2].name == "2.png"
    np.testing.assert_array_equal(sequence.load_labels(11) == 1, read_label_map(sequence.annotations[11]) == 1)


def test_frame_numbers_that_differ_only_in_zero_padding_are_refused(tmp_path):
    write_video_folder(tmp_path, frames=3)
    (tmp_path / "JPEGImages" / "seq" / "00001.jpg").rename(tmp_path / "JPEGImages" / "seq" / "1.jpg")
    (tmp_path / "JPEGImages" / "seq" / "00002.jpg").rename(tmp_path / "JPEGImages" / "seq" / "001.jpg")
    with pytest.raises(DataError, match=r"'001\.jpg' and '1\.jpg'.*rename"):
        open_video_folder(tmp_path)
