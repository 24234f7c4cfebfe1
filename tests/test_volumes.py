"""3D volumes: NIfTI and TIFF sources, windowing, header round trips, bidirectional propagation, 3D metrics, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("nibabel")
pytest.importorskip("tifffile")
pytest.importorskip("av")

import av  # noqa: E402
import nibabel  # noqa: E402
from PIL import Image  # noqa: E402

from sam2_peft.data.sources import DataError  # noqa: E402
from sam2_peft.data.volumes import (  # noqa: E402
    WINDOW_PRESETS,
    open_volume,
    open_volume_folder,
    parse_window,
    read_volume,
    to_grey,
    write_label_volume,
)
from sam2_peft.inference.volumes import middle_slice_prompts, segment_volume  # noqa: E402

from .volume_helpers import SPACING, nifti_affine, synthetic_ct, write_nifti_folder, write_tiff_pair  # noqa: E402


def test_nifti_folder_slices_along_the_coarsest_axis_with_spacing_and_window(tmp_path):
    (volume, _) = open_volume_folder(write_nifti_folder(tmp_path), window=WINDOW_PRESETS["soft-tissue"])[:2]
    image, labels = synthetic_ct()
    assert volume.name == "case_a" and volume.slice_axis == 2 and len(volume.frames) == 12
    assert volume.spacing == pytest.approx((SPACING[2], SPACING[0], SPACING[1]))
    frame = volume.load_frame(5)
    assert frame.shape == (64, 56, 3) and frame.dtype == np.uint8
    # soft tissue window 40 +- 200 HU: air is black, the 160 HU organ at (160 + 160) / 400 of white
    organ = labels[..., 5] == 1
    assert frame[..., 0][~organ & (image[..., 5] < -500)].max() == 0
    assert abs(float(np.median(frame[..., 0][organ])) - 204) <= 8
    np.testing.assert_array_equal(volume.load_labels(5), labels[..., 5])
    assert volume.annotated_frames == list(range(12))


def test_decathlon_layout_sparse_annotation_and_explicit_axis(tmp_path):
    volumes = open_volume_folder(write_nifti_folder(tmp_path, decathlon=True), annotated_every=4, slice_axis=0)
    assert [v.name for v in volumes] == ["case_a", "case_b"]
    assert volumes[0].slice_axis == 0 and len(volumes[0].frames) == 64
    assert volumes[0].annotated_frames == list(range(0, 64, 4))
    assert volumes[0].load_frame(3).shape == (56, 12, 3)


def test_tiff_stack_spacing_from_imagej_metadata_and_resolution(tmp_path):
    (volume,) = open_volume_folder(write_tiff_pair(tmp_path))
    assert volume.slice_axis == 0 and len(volume.frames) == 12
    assert volume.spacing == pytest.approx((2.0, 0.5, 0.5))
    np.testing.assert_array_equal(volume.load_labels(7), synthetic_ct()[1][..., 7].T)


def test_percentile_normalisation_without_window():
    data = np.linspace(-1000, 1000, 2001).reshape(1, 1, -1)
    grey = to_grey(data)
    assert grey.min() == 0 and grey.max() == 255
    assert grey[0, 0, 4] == 0 and grey[0, 0, 1000] == 128  # below the 0.5th percentile: black; the median: mid-grey
    windowed = to_grey(data, parse_window("-600,1500"))
    # lung window -600 +- 750 HU: -1000 HU (index 0) at 350 / 1500 of white, 150 HU and above white
    assert windowed[0, 0, 0] == 60 and windowed[0, 0, 1000 + 150] == 255 and windowed[0, 0, 1000 - 600] == 128


@pytest.mark.parametrize("value", ["wide", "40", "40,-5", "a,b"])
def test_bad_window_is_one_clear_error(value):
    with pytest.raises(DataError, match="--window .* LEVEL,WIDTH"):
        parse_window(value)


def test_nifti_label_volume_keeps_the_affine_and_zooms(tmp_path):
    write_nifti_folder(tmp_path, names=("case",))
    source = read_volume(tmp_path / "images" / "case.nii.gz")
    labels = (synthetic_ct()[1] > 0).astype(np.uint8)
    write_label_volume(labels, source, tmp_path / "out.nii.gz")
    written = nibabel.load(str(tmp_path / "out.nii.gz"))
    np.testing.assert_array_equal(written.affine, source.header["affine"])
    np.testing.assert_allclose(written.affine, nifti_affine(), atol=1e-6)  # NIfTI stores the affine as float32
    assert written.header.get_zooms() == pytest.approx(SPACING)
    assert nibabel.aff2axcodes(written.affine) == ("L", "A", "S")
    np.testing.assert_array_equal(np.asarray(written.dataobj), labels)


def test_tiff_label_volume_keeps_resolution_and_z_spacing(tmp_path):
    write_tiff_pair(tmp_path)
    source = read_volume(tmp_path / "images" / "stack.tif")
    write_label_volume(source.data > 1000, source, tmp_path / "out.tif")
    written = read_volume(tmp_path / "out.tif")
    assert written.spacing == pytest.approx(source.spacing)
    assert written.spacing == pytest.approx((2.0, 0.5, 0.5))
    assert written.header["imagej"]["unit"] == "um"
    np.testing.assert_array_equal(written.data, source.data > 1000)


def test_bad_volumes_are_one_clear_error(tmp_path):
    root = write_nifti_folder(tmp_path / "ok", names=("case",))
    wrong = np.zeros((64, 56, 11), np.uint8)
    nibabel.save(nibabel.Nifti1Image(wrong, np.eye(4)), str(root / "labels" / "case.nii.gz"))
    with pytest.raises(DataError, match=r"Label volume '.*case.nii.gz' has shape \(64, 56, 11\) but its image"):
        open_volume_folder(root)
    (root / "labels" / "case.nii.gz").unlink()
    with pytest.raises(DataError, match=r"Volume '.*case.nii.gz' has no label volume"):
        open_volume_folder(root)
    (tmp_path / "broken.nii.gz").write_bytes(b"not a volume")
    with pytest.raises(DataError, match=r"Cannot read image volume '.*broken.nii.gz'"):
        open_volume(tmp_path / "broken.nii.gz")
    nibabel.save(nibabel.Nifti1Image(np.zeros((4, 4, 4, 2), np.int16), np.eye(4)), str(tmp_path / "four.nii.gz"))
    with pytest.raises(DataError, match=r"has shape \(4, 4, 4, 2\): a 3D volume"):
        open_volume(tmp_path / "four.nii.gz")
    with pytest.raises(DataError, match="is not a volume folder"):
        open_volume_folder(tmp_path)


class StillTracker:
    """A stand-in predictor whose 'tracking' repeats the prompt's region on every frame it is fed (positive logits
    inside), recording the order of the frames: it tests the propagation and merge logic, not SAM 2."""

    def __init__(self) -> None:
        self.passes: list[list[int]] = []

    def track(self, frames, boxes=None, masks=None, logits=False, **_):
        self.passes.append([])
        for frame in frames:
            self.passes[-1].append(int(frame[0, 0, 0]))
            region = np.zeros(frame.shape[:2], bool)
            if masks is not None:
                region = masks[0]
            else:
                x0, y0, x1, y1 = np.asarray(boxes[0]).astype(int)
                region[y0:y1, x0:x1] = True
            yield np.where(region, 1.0, -1.0)[None].astype(np.float32)


class NumberedSlices:
    """Slices whose top-left pixel is their index (for checking the order the tracker sees them in)."""

    def __init__(self, volume) -> None:
        self.volume = volume
        self.frames = volume.frames

    def load_frame(self, index: int) -> np.ndarray:
        frame = self.volume.load_frame(index).copy()
        frame[0, 0] = index
        return frame


def test_bidirectional_propagation_covers_both_sides_of_the_prompt_and_beats_forward_only(tmp_path):
    from sam2_peft.evaluation.volume_metrics import volume_metrics

    (volume, _) = open_volume_folder(write_nifti_folder(tmp_path))
    truth = volume.arrays()[1]
    prompts = middle_slice_prompts(truth, "mask")
    assert {i: p.slice for i, p in prompts.items()} == {1: 6, 2: 6}
    prompts[2].slice = 5  # off the middle: the passes still start on the prompted slice
    prompts[2].mask = truth[5] == 2
    tracker = StillTracker()
    both = segment_volume(tracker, NumberedSlices(volume), prompts, "both")
    assert tracker.passes == [list(range(6, 12)), list(range(6, -1, -1)), list(range(5, 12)), list(range(5, -1, -1))]
    forward = segment_volume(StillTracker(), NumberedSlices(volume), prompts, "forward")
    assert not forward[:5].any() and both[:5].any()
    np.testing.assert_array_equal(both[6:], forward[6:])
    scores = {d: volume_metrics(p, truth, volume.spacing, [1, 2]) for d, p in (("both", both), ("fwd", forward))}
    # the organ spans every slice: half of it is missed forward-only (the still tracker's lesion, repeated onto
    # slices where the lesion has ended, is no test of the merge)
    assert scores["both"]["1"]["dice"] > scores["fwd"]["1"]["dice"] + 0.05
    assert scores["both"]["1"]["nsd"] > scores["fwd"]["1"]["nsd"] + 0.05
    assert (both[2:5] == 2).any() and not (forward[:5] == 2).any()


def test_objects_are_combined_by_the_highest_logit():
    class Fixed:
        frames = range(2)

        def load_frame(self, index):
            return np.zeros((4, 4, 3), np.uint8)

    class TwoLevels:
        def track(self, frames, boxes=None, logits=False, **_):
            for _ in frames:  # each object strong (2) on its own half, weak but positive (0.5) on the other
                values = np.full((4, 4), 0.5, np.float32)
                (values[:, 2:] if boxes[0][0] == 2 else values[:, :2])[:] = 2.0
                yield values[None]

    from sam2_peft.inference.volumes import SlicePrompt

    prompts = {1: SlicePrompt(0, box=np.array([0, 0, 2, 2])), 2: SlicePrompt(1, box=np.array([2, 0, 4, 2]))}
    labels = segment_volume(TwoLevels(), Fixed(), prompts)
    assert (labels[:, :, :2] == 1).all() and (labels[:, :, 2:] == 2).all()


def test_surface_dice_uses_the_anisotropic_spacing():
    from sam2_peft.evaluation.volume_metrics import surface_dice, volume_metrics

    target = np.zeros((12, 20, 20), bool)
    target[2:8, 5:15, 5:15] = True
    pred = np.roll(target, 1, axis=0)  # one slice off: 3 mm apart with slices 3 mm apart
    assert surface_dice(pred, target, (1.0, 1.0, 1.0), 2.0) == pytest.approx(1.0)
    assert surface_dice(pred, target, (3.0, 1.0, 1.0), 3.5) == pytest.approx(1.0)
    partial = surface_dice(pred, target, (3.0, 1.0, 1.0), 2.0)
    assert 0.5 < partial < 0.95
    assert surface_dice(target, target, (3.0, 1.0, 1.0), 0.1) == pytest.approx(1.0)
    labels = pred.astype(np.uint8)
    scores = volume_metrics(labels, target.astype(np.uint8), (3.0, 1.0, 1.0), [1, 2], tolerance=2.0)
    assert scores["1"]["dice"] == pytest.approx(2 * 5 / 12) and scores["1"]["nsd"] == pytest.approx(partial)
    assert scores["2"] == {"dice": 1.0, "nsd": 1.0}  # absent from both
    assert surface_dice(pred, np.zeros_like(pred), (1.0, 1.0, 1.0)) == 0.0


def run_cli(*argv: str) -> None:
    from sam2_peft.cli import main

    main(list(argv))


@pytest.mark.slow  # about 13 s on a loaded 2-core machine (model load, tracking, two video encodes)
def test_predict_writes_an_aligned_nifti_label_volume(tmp_path, capsys):
    root = write_nifti_folder(tmp_path / "data", names=("case",))
    image = root / "images" / "case.nii.gz"
    out = tmp_path / "out"
    run_cli(
        "predict",
        "--model",
        "tiny-random",
        str(image),
        str(out),
        "--prompt-labels",
        str(root / "labels" / "case.nii.gz"),
        "--window",
        "soft-tissue",
        "--device",
        "cpu",
    )
    written = nibabel.load(str(out / "case.nii.gz"))
    np.testing.assert_array_equal(written.affine, nibabel.load(str(image)).affine)
    assert written.shape == (64, 56, 12)
    record = json.loads((out / "volumes.json").read_text())["case.nii.gz"]
    assert record["slice_axis"] == 2 and record["prompts"] == {"1": 6, "2": 6} and record["window"] == [40.0, 400.0]
    assert record["spacing"] == pytest.approx([3.0, 0.8, 0.7])
    # the mask video: one lossless frame per slice along the slicing axis, grey level = label id
    slices = np.moveaxis(np.asarray(written.dataobj), 2, 0)
    assert slices.any()
    with av.open(str(out / "case" / "masks.mkv")) as container:
        decoded = [frame.to_ndarray() for frame in container.decode(video=0)]
    np.testing.assert_array_equal(np.stack(decoded), slices)
    with av.open(str(out / "case" / "overlay.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == 12
    assert not (out / "case" / "masks").exists()  # PNGs only when --video-outputs asks for them


def test_predict_volume_writes_the_chosen_video_outputs(tmp_path):
    root = write_nifti_folder(tmp_path / "data", names=("case",))
    out = tmp_path / "out"
    labels = str(root / "labels" / "case.nii.gz")
    image = str(root / "images" / "case.nii.gz")
    run_cli("predict", "--model", "tiny-random", image, str(out), "--prompt-labels", labels, "--video-outputs", "pngs")
    assert sorted(p.name for p in (out / "case").iterdir()) == ["masks"]
    slices = np.moveaxis(np.asarray(nibabel.load(str(out / "case.nii.gz")).dataobj), 2, 0)
    pngs = sorted((out / "case" / "masks").glob("*.png"))
    assert [p.name for p in pngs] == [f"{t:05d}.png" for t in range(12)]
    np.testing.assert_array_equal(np.stack([np.asarray(Image.open(p)) for p in pngs]), slices)

    # a folder that holds this run: refused before the model loads, replaced (stale PNGs too) with --overwrite
    again = ("predict", "--model", "tiny-random", image, str(out), "--prompt-labels", labels)
    with pytest.raises(SystemExit) as exit_:
        run_cli(*again, "--video-outputs", "mask-video")
    assert "error: " in str(exit_.value.code) and "--overwrite" in str(exit_.value.code)
    run_cli(*again, "--video-outputs", "mask-video", "--overwrite")
    assert sorted(p.name for p in (out / "case").iterdir()) == ["masks.mkv"]


def test_eval_reports_dice_and_nsd_per_volume(tmp_path, capsys):
    root = write_nifti_folder(tmp_path / "data", names=("case",))
    run_cli(
        "eval",
        "--model",
        "tiny-random",
        "--data",
        str(root),
        "--output",
        str(tmp_path / "m.json"),
        "--nsd-tolerance",
        "1.5",
        "--volume-prompt",
        "mask",
        "--device",
        "cpu",
    )
    result = json.loads((tmp_path / "m.json").read_text())
    case = result["per_volume"]["case"]
    assert set(case["objects"]) == {"1", "2"} and 0 <= case["dice"] <= 1 and 0 <= case["nsd"] <= 1
    assert result["metrics"]["nsd_tolerance"] == 1.5
    assert json.loads(capsys.readouterr().out)["dice"] == pytest.approx(case["dice"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["predict", "--model", "tiny-random", "IMG", "OUT"], "Volumes need prompts"),
        (["predict", "--model", "tiny-random", "IMG", "OUT"], "this volume folder has labels: --prompt-labels"),
        (["predict", "--model", "tiny-random", "MISSING", "OUT", "--prompt-labels", "L"], "does not exist"),
        (
            ["predict", "--model", "tiny-random", "IMG", "OUT", "--slice-prompts", "p.json", "--volume-prompt", "mask"],
            "--volume-prompt applies with --prompt-labels only",
        ),
        (
            ["predict", "--model", "tiny-random", "IMG", "OUT", "--boxes", "b.json", "--prompt-labels", "L"],
            "--boxes does not apply to volumes",
        ),
        (
            ["eval", "--model", "tiny-random", "--data", "ROOT", "--max-images", "2"],
            "--max-images does not apply to volumes",
        ),
        (
            ["eval", "--model", "tiny-random", "--data", "IMAGES", "--nsd-tolerance", "2"],
            "--nsd-tolerance applies to volumes",
        ),
    ],
)
def test_volume_flags_act_or_are_refused(tmp_path, capsys, argv, message):
    root = write_nifti_folder(tmp_path / "data", names=("case",))
    (tmp_path / "images").mkdir()
    paths = {
        "IMG": str(root / "images" / "case.nii.gz"),
        "ROOT": str(root),
        "IMAGES": str(tmp_path / "images"),
        "OUT": str(tmp_path / "out"),
        "MISSING": str(tmp_path / "missing.nii.gz"),
    }
    with pytest.raises(SystemExit) as exit_:
        run_cli(*[paths.get(a, a) for a in argv])
    last = str(exit_.value.code) if exit_.value.code != 2 else capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: " in last and message in last


@pytest.mark.slow
def test_video_recipe_trains_on_sparsely_labelled_volumes(tmp_path):
    """Clips of adjacent slices from every 4th labelled slice of one volume; the other volume validates."""
    import torch
    from safetensors.torch import load_file

    from sam2_peft.recipes.video import main as video_recipe

    root = write_nifti_folder(tmp_path / "data")
    out = tmp_path / "run"
    argv = ["--model", "tiny-random", "--data", str(root), "--output-dir", str(out), "--window", "soft-tissue"]
    argv += ["--annotated-every", "4", "--clip-len", "5", "--val-sequences", "case_b", "--max-steps", "2"]
    video_recipe(argv)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and 0 <= metrics["fine_tuned"]["J&F"] <= 1
    saved = load_file(out / "adapter_model.safetensors")
    assert any("memory_attention" in name for name in saved) and all(torch.isfinite(w).all() for w in saved.values())


def test_volume_clips_start_on_annotated_slices_and_run_over_adjacent_ones(tmp_path):
    from sam2_peft.data.video import VideoClipDataset, VideoDatasetConfig
    from sam2_peft.models.loading import processor_for_image_size

    volumes = open_volume_folder(write_nifti_folder(tmp_path, names=("case",)), annotated_every=4)
    dataset = VideoClipDataset(volumes, processor_for_image_size(64), VideoDatasetConfig(clip_len=5))
    assert [start for _, start in dataset.starts] == [0, 4]  # from slice 8 the volume ends before a 2nd annotation
    item = dataset[1]
    assert item["sample_id"] == "case@4" and item["annotated"].tolist() == [True, False, False, False, True]
    assert item["target_masks"][1:4].sum() == 0 and item["target_masks"][4].sum() > 0


def test_predict_writes_a_tiff_for_a_tiff_from_slice_prompts(tmp_path):
    import tifffile

    root = write_tiff_pair(tmp_path / "data")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"stack": [{"id": 3, "slice": 4, "points": [[30, 24]], "labels": [1]}]}))
    run_cli(
        "predict",
        "--model",
        "tiny-random",
        str(root / "images" / "stack.tif"),
        str(tmp_path / "out"),
        "--slice-prompts",
        str(prompts),
        "--device",
        "cpu",
        "--directions",
        "forward",
    )
    written = read_volume(tmp_path / "out" / "stack.tif")
    assert written.data.shape == (12, 56, 64) and written.spacing == pytest.approx((2.0, 0.5, 0.5))
    assert set(np.unique(written.data).tolist()) <= {0, 3} and not written.data[:4].any()  # forward only
    assert tifffile.TiffFile(tmp_path / "out" / "stack.tif").is_imagej


def test_track_gives_logits_whose_sign_is_the_mask():
    from sam2_peft.inference.video import VideoPredictor
    from sam2_peft.models.loading import processor_for_image_size

    from .video_helpers import VIDEO_SIZE, tiny_video_model

    predictor = VideoPredictor(tiny_video_model(), processor_for_image_size(VIDEO_SIZE))
    frames = [np.full((40, 50, 3), 40 * i, np.uint8) for i in range(3)]
    box = np.array([[5, 5, 30, 25]])
    masks = list(predictor.track(frames, boxes=box))
    logits = list(predictor.track(frames, boxes=box, logits=True))
    for mask, logit in zip(masks, logits):
        assert logit.dtype == np.float32 and logit.shape == (1, 40, 50)
        np.testing.assert_array_equal(logit > 0, mask)
    assert any((x < 0).any() and (x > 0).any() for x in logits)


def test_image_recipes_read_labelled_slices_of_volumes(tmp_path):
    from sam2_peft.data.sources import open_records

    root = write_nifti_folder(tmp_path / "data")
    records = open_records(str(root))
    assert len(records) == 24 and records[0].sample_id == "case_a@0"  # the organ is on every slice of both
    lesion_slice = next(r for r in records if r.sample_id == "case_a@6")
    assert lesion_slice.load_image().shape == (64, 56, 3) and lesion_slice.load_instances().shape == (2, 64, 56)
    np.testing.assert_array_equal(lesion_slice.load_instances()[1], synthetic_ct()[1][..., 6] == 2)


def test_a_folder_of_2d_tiff_images_with_masks_is_not_a_volume_folder(tmp_path):
    from PIL import Image

    from sam2_peft.data.sources import check_data_source

    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / folder / "a.tif")
    assert check_data_source(str(tmp_path)) == "folder"
    (tmp_path / "labels").mkdir()
    assert check_data_source(str(tmp_path)) == "volumes"


@pytest.mark.slow
def test_lora_recipe_trains_on_volume_slices(tmp_path):
    from sam2_peft.cli import main

    root = write_nifti_folder(tmp_path / "data")
    out = tmp_path / "run"
    main(["train", "lora", "--model", "tiny-random", "--data", str(root), "--output-dir", str(out), "--max-steps", "2"])
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2


def test_video_recipe_refuses_volume_flags_for_frame_folders(tmp_path, capsys):
    from sam2_peft.recipes.video import main as video_recipe

    with pytest.raises(SystemExit):
        video_recipe(["--data", str(tmp_path), "--window", "lung"])
    assert "--window applies to a volume folder --data only" in capsys.readouterr().err.strip().splitlines()[-1]
