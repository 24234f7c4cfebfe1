"""Video files (mp4, mkv, ...) as video data: lazy seekable decoding, sparse annotations by frame index, bounded
memory, one-line errors, and `predict` / `eval --protocol video` / `train video` on them."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from PIL import Image

from sam2_peft.cli import main
from sam2_peft.data.sources import DataError
from sam2_peft.data.video import open_video_folder

from .conftest import real_dataset
from .video_file_helpers import encode_variable_rate, encode_video, moving_square, write_video_file

av = pytest.importorskip("av", reason='video files need PyAV: pip install -e ".[video]"')

MODEL = ["--model", "tiny-random"]


def _error(capsys, argv: list[str]) -> str:
    """The one `error:` line a command ends with (and no traceback)."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    message = str(stop.value.code)
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in capsys.readouterr().err
    return message


def _refusal(capsys, argv: list[str]) -> str:
    """The usage error (status 2) that refuses a flag, as argparse prints it last."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_video_file_frames_and_sparse_annotations(tmp_path):
    """A folder of one mp4: its frames come back in order, near the encoded ones (H.264, mean error under 4 grey
    levels), the same whether read in order or by jumps (seeks); annotations `00000.png`, `4.png`, `8.png` are
    frames 0, 4 and 8."""
    root = write_video_file(tmp_path / "videos", frames=80, annotated=(0, 4, 8))
    (sequence,) = open_video_folder(root)
    assert sequence.name == "clip" and len(sequence.frames) == 80 and sequence.annotated_frames == [0, 4, 8]
    in_order = [sequence.load_frame(t).copy() for t in range(80)]
    for t in range(80):
        assert np.abs(in_order[t].astype(int) - moving_square(t)[0]).mean() < 4, t
    for t in (70, 3, 79, 0, 40, 41, 75, 12):
        np.testing.assert_array_equal(sequence.load_frame(t), in_order[t])
    assert (sequence.load_labels(4) == moving_square(4)[1]).all()
    assert open_video_folder(root, annotated_every=2)[0].annotated_frames == [0, 8]


def test_video_file_memory_does_not_grow_with_length(tmp_path):
    """Reading 1,200 frames of 320x240 (276 MB if held) one by one: resident memory grows by under 25 MB from
    frame 200 to frame 1,200, and the reader holds one decoded frame."""
    path = tmp_path / "long.mp4"
    frame = np.zeros((240, 320, 3), np.uint8)

    def frames():
        for t in range(1200):
            frame[:, :, 0] = t % 256
            yield frame

    encode_video(path, frames(), options={"preset": "ultrafast"})
    from sam2_peft.data.video_files import VideoFrames

    def rss_mb() -> float:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * 4096 / 2**20

    video = VideoFrames(path)
    assert len(video) == 1200
    for t in range(200):
        video[t]
    before = rss_mb()
    for t in range(200, 1200):
        assert video[t][0, 0, 0] in range((t % 256) - 3, (t % 256) + 4)
    assert rss_mb() - before < 25
    assert video._last[0] == 1199


def test_corrupt_container_is_one_error_naming_the_file(tmp_path, capsys):
    root = tmp_path / "videos"
    write_video_file(root)
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    (root / "broken").mkdir()
    message = _error(capsys, ["eval", "--protocol", "video", *MODEL, "--data", str(root)])
    assert "Cannot read the video file" in message and "broken.mp4" in message


def test_annotation_beyond_the_last_frame_names_both_numbers(tmp_path):
    root = write_video_file(tmp_path / "videos", frames=12, annotated=(0, 4))
    Image.fromarray(moving_square(0)[1]).save(root / "clip" / "00012.png")
    with pytest.raises(DataError, match=r"00012.png' is for frame 12, but .*clip.mp4' has 12 frames \(0 to 11\)"):
        open_video_folder(root)


def test_annotation_names_must_be_frame_indices(tmp_path):
    root = write_video_file(tmp_path / "videos", annotated=(0,))
    Image.fromarray(moving_square(0)[1]).save(root / "clip" / "frame_a.png")
    with pytest.raises(DataError, match="not named by a frame index"):
        open_video_folder(root)


def test_variable_frame_rate_says_which_frames_are_used(tmp_path):
    """Annotated VFR video: refused (frames are numbered in timestamp order, one per coded frame); `predict` only
    warns, with the same words."""
    root = tmp_path / "videos"
    root.mkdir()
    encode_variable_rate(root / "vfr.mkv")
    (root / "vfr").mkdir()
    Image.fromarray(moving_square(0)[1] * 255).save(root / "vfr" / "0.png")
    with pytest.raises(DataError, match=r"variable frame rate \(frame durations 40.0 to 80.0 ms\).*presentation-ti"):
        open_video_folder(root)


def test_missing_pyav_is_the_install_hint(tmp_path, monkeypatch):
    root = write_video_file(tmp_path / "videos")
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(DataError, match=r'pip install "sam2-peft\[video\]"'):
        open_video_folder(root)


def test_predict_on_a_video_writes_lossless_masks_pngs_and_overlay(tmp_path):
    """Boxes on frame 0: the FFV1 mask video decodes to exactly the per-frame PNGs, one per frame; the overlay video
    has every frame. Without boxes the annotation of NAME/ prompts, from its frame on (earlier frames empty)."""
    root = write_video_file(tmp_path / "videos", frames=8, annotated=(3,))
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"clip": [[4, 12, 20, 28]]}))
    out = tmp_path / "out"
    main(["predict", *MODEL, "--boxes", str(boxes), "--video-outputs", "mask-video,pngs,overlay", str(root), str(out)])
    with av.open(str(out / "clip" / "masks.mkv")) as container:
        assert container.streams.video[0].codec_context.name == "ffv1"
        decoded = [f.to_ndarray() for f in container.decode(video=0)]
    pngs = sorted((out / "clip" / "masks").glob("*.png"))
    assert [p.name for p in pngs] == [f"{t:05d}.png" for t in range(8)]
    for labels, png in zip(decoded, pngs, strict=True):
        np.testing.assert_array_equal(labels, np.asarray(Image.open(png)))
    assert decoded[0].max() == 1
    with av.open(str(out / "clip" / "overlay.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == 8
    assert json.loads((out / "predictions.json").read_text()) == {
        "clip.mp4": {"frames": 8, "prompt_frame": 0, "objects": 1}
    }

    main(["predict", *MODEL, "--video-outputs", "pngs", str(root / "clip.mp4"), str(tmp_path / "from-mask")])
    masks = [np.asarray(Image.open(p)) for p in sorted((tmp_path / "from-mask" / "clip" / "masks").glob("*.png"))]
    assert len(masks) == 8 and not any(m.any() for m in masks[:3])
    assert not (tmp_path / "from-mask" / "clip" / "masks.mkv").exists()


def test_predict_refuses_image_flags_on_videos(tmp_path, capsys):
    root = write_video_file(tmp_path / "videos")
    message = _refusal(capsys, ["predict", *MODEL, "--dtype", "bfloat16", str(root), str(tmp_path / "out")])
    assert "--dtype applies to images only" in message
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"other.mp4": [[4, 12, 20, 28]]}))
    message = _error(capsys, ["predict", *MODEL, "--boxes", str(boxes), str(root), str(tmp_path / "out")])
    assert "names videos not in" in message and "other.mp4" in message


def _frame_folder(root, frames: int, annotated) -> None:
    """The same moving square as PNG frames in a DAVIS-style folder (lossless, as the FFV1 video)."""
    (root / "JPEGImages" / "clip").mkdir(parents=True)
    (root / "Annotations" / "clip").mkdir(parents=True)
    for t in range(frames):
        image, labels = moving_square(t)
        Image.fromarray(image).save(root / "JPEGImages" / "clip" / f"{t:05d}.png")
        if t in annotated:
            Image.fromarray(labels * 255).save(root / "Annotations" / "clip" / f"{t:05d}.png")


def test_video_eval_on_a_lossless_video_equals_its_frame_folder(tmp_path, capsys):
    """`eval --protocol video` on an FFV1 .mkv gives the J&F of the same frames as a folder of PNGs."""
    annotated = (0, 3, 6, 9)
    write_video_file(tmp_path / "videos", frames=12, annotated=annotated, suffix=".mkv", codec="ffv1")
    _frame_folder(tmp_path / "frames", 12, annotated)
    video, folder = (open_video_folder(tmp_path / data)[0] for data in ("videos", "frames"))
    assert video.annotated_frames == folder.annotated_frames == list(annotated)
    for t in range(12):
        np.testing.assert_array_equal(video.load_frame(t), folder.load_frame(t))
    scores = []
    for data in ("videos", "frames"):
        output = tmp_path / f"{data}.json"
        main(["eval", "--protocol", "video", *MODEL, "--data", str(tmp_path / data), "--output", str(output)])
        scores.append(json.loads(output.read_text()))
    assert scores[0]["metrics"] == scores[1]["metrics"] and np.isfinite(scores[0]["metrics"]["J&F"])
    assert scores[0]["num_sequences"] == 1
    capsys.readouterr()
    message = _refusal(
        capsys, ["eval", "--protocol", "video", *MODEL, "--data", str(tmp_path / "videos"), "--split", "x"]
    )
    assert "--split applies to image data only" in message


@pytest.mark.slow
def test_train_video_recipe_on_an_mp4(tmp_path):
    """`train video --data` a folder of one mp4 with sparse annotations (every 4th frame) trains and saves."""
    root = write_video_file(tmp_path / "videos", frames=12, annotated=(0, 4, 8))
    out = tmp_path / "run"
    main(["train", "video", *MODEL, "--data", str(root), "--output-dir", str(out), "--max-steps", "2"])
    assert (out / "adapter_model.safetensors").is_file()


def test_one_video_file_as_video_data(tmp_path):
    """`--data clip.mp4` (annotations in clip/ beside it) is that one video, as `predict` takes it."""
    root = write_video_file(tmp_path / "videos", frames=12, annotated=(0, 4, 8))
    write_video_file(root, name="other", frames=6, annotated=(0,))
    (sequence,) = open_video_folder(root / "clip.mp4", annotated_every=2)
    assert sequence.name == "clip" and len(sequence.frames) == 12 and sequence.annotated_frames == [0, 8]
    with pytest.raises(DataError, match="is one video, 'clip': name no other sequence"):
        open_video_folder(root / "clip.mp4", sequences=["other"])


@pytest.mark.slow
def test_train_video_recipe_on_one_video_file(tmp_path):
    """`train video --data clip.mp4`: the one video trains and saves (slow: a training run)."""
    root = write_video_file(tmp_path / "videos", frames=12, annotated=(0, 4, 8))
    out = tmp_path / "run"
    main(["train", "video", *MODEL, "--data", str(root / "clip.mp4"), "--output-dir", str(out), "--max-steps", "1"])
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_davis_sequence_as_mp4_matches_its_frames(tmp_path):
    """A DAVIS sequence encoded to H.264 (crf 18, yuv420p): the same number of frames, each within a mean absolute
    error of 4 grey levels and a PSNR over 33 dB of its JPEG (measured: at most 3.06, at least 35.7 dB); video eval
    on the mp4 and on the frame folder within 0.02 J&F (the tests' tiny video model: no SAM 2 video weights exist
    offline, so this checks that both reach the tracker alike, not a score; measured 0.1046 vs 0.1047)."""
    davis = real_dataset("video-davis2016-mini")
    name = "blackswan"
    jpegs = sorted((davis / "JPEGImages" / name).glob("*.jpg"))
    root = tmp_path / "videos"
    root.mkdir()
    encode_video(root / f"{name}.mp4", (np.asarray(Image.open(p).convert("RGB")) for p in jpegs), options={"crf": "18"})
    (root / name).symlink_to(davis / "Annotations" / name)
    (sequence,) = open_video_folder(root)
    assert len(sequence.frames) == len(jpegs)
    for t, path in enumerate(jpegs):
        original = np.asarray(Image.open(path).convert("RGB")).astype(float)
        error = original - sequence.load_frame(t)
        assert np.abs(error).mean() < 4 and 10 * np.log10(255**2 / (error**2).mean()) > 33, t
    frames = tmp_path / "frames"
    for part in ("JPEGImages", "Annotations"):
        (frames / part).mkdir(parents=True)
        (frames / part / name).symlink_to(davis / part / name)
    from .video_helpers import tiny_video_model, video_processor

    model = tmp_path / "tiny-video"  # random, but its memory and masks carry signal (J&F about 0.1, not 0)
    tiny_video_model().save_pretrained(model)
    video_processor().save_pretrained(model)
    scores = []
    for data in (root, frames):
        output = tmp_path / f"{data.name}.json"
        main(["eval", "--protocol", "video", "--model", str(model), "--data", str(data), "--output", str(output)])
        scores.append(json.loads(output.read_text())["metrics"])
    assert scores[1]["J&F"] > 0.05 and abs(scores[0]["J&F"] - scores[1]["J&F"]) < 0.02, scores


@pytest.mark.parametrize("rotation", [-90, 180])
def test_phone_video_frames_come_out_upright_and_stored_orientation_annotations_are_refused(tmp_path, rotation):
    """A phone records in the sensor's orientation and sets a display matrix that players apply: frames are read as
    players show them, and annotations must be of that upright size."""
    from sam2_peft.data.video_files import VideoFrames, open_video_file

    if not hasattr(av.video.stream.VideoStream, "set_display_rotation"):
        pytest.skip("writing a display matrix needs PyAV >= 18.1")
    stored = [moving_square(t) for t in range(3)]
    path = encode_video(tmp_path / "phone.mp4", (image for image, _ in stored), rotation=rotation)
    video = VideoFrames(path)
    upright = np.rot90(stored[1][0], rotation // 90)  # np.rot90 turns counter-clockwise, as the display matrix does
    assert video.rotation == rotation % 360 and (video.height, video.width) == upright.shape[:2]
    assert np.abs(video[1].astype(int) - upright).mean() < 3
    labels = np.rot90(stored[0][1], rotation // 90) * 255
    (tmp_path / "phone").mkdir()
    Image.fromarray(labels).save(tmp_path / "phone" / "00000.png")
    assert open_video_file(path, tmp_path / "phone").annotated_frames == [0]
    if rotation % 180:
        Image.fromarray(stored[0][1] * 255).save(tmp_path / "phone" / "00000.png")  # annotated as stored
        with pytest.raises(DataError, match="stored size of .* turned 270 degrees .* annotate the upright frames"):
            open_video_file(path, tmp_path / "phone")


def test_mirrored_display_matrix_is_refused(tmp_path, capsys):
    """A display matrix that mirrors (rare; PyAV reads it back as a rotation) is one error line, not a wrong turn."""
    if not hasattr(av.video.stream.VideoStream, "set_display_rotation"):
        pytest.skip("writing a display matrix needs PyAV >= 18.1")
    path = tmp_path / "selfie.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.height, stream.width, stream.pix_fmt = 48, 64, "yuv420p"
        stream.set_display_rotation(0, hflip=True)  # read back as a rotation of -180 degrees
        for packet in [
            *stream.encode(av.VideoFrame.from_ndarray(moving_square(0)[0], format="rgb24")),
            *stream.encode(),
        ]:
            container.mux(packet)
    (tmp_path / "boxes.json").write_text(json.dumps({"selfie": [[4, 4, 20, 20]]}))
    message = _error(
        capsys, ["predict", *MODEL, "--boxes", str(tmp_path / "boxes.json"), str(path), str(tmp_path / "o")]
    )
    assert "selfie.mp4' is shown mirrored (its display matrix flips it): re-encode it" in message
