"""Tracking through video files: prompts from a boxes file or an annotation, masks written as a lossless video,
per-frame PNGs and an overlay video, one frame at a time (memory does not grow with the video's length)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from contextlib import ExitStack
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.sources import DataError, printable
from ..data.video import read_label_map
from ..data.video_files import VideoFrames, import_av, read_annotations, variable_rate_message
from ..evaluation.panels import overlay
from .video import VideoPredictor

VIDEO_OUTPUTS = ("mask-video", "pngs", "overlay")
MASK_VIDEO = "masks.mkv"
"""The label video: FFV1 (lossless) in Matroska, grey levels = object numbers (0 background, k = k-th object)."""
OVERLAY_VIDEO = "overlay.mp4"
"""The overlay for people to look at: H.264 (lossy) in MP4, which browsers and players open."""
MASKS_DIR = "masks"
MAX_OBJECTS = 255
"""Objects per video: the label frames are 8-bit."""


def parse_video_outputs(value: str) -> tuple[str, ...]:
    """`mask-video,pngs,overlay` (any non-empty subset, comma-separated) as a tuple; DataError otherwise."""
    chosen = tuple(dict.fromkeys(part.strip() for part in value.split(",") if part.strip()))
    unknown = [part for part in chosen if part not in VIDEO_OUTPUTS]
    if unknown or not chosen:
        raise DataError(f"--video-outputs '{value}': give one or more of {', '.join(VIDEO_OUTPUTS)}, comma-separated.")
    return chosen


class VideoWriter:
    """Frames appended one at a time to a video file with PyAV; `codec` `ffv1` writes `gray` label frames losslessly,
    `libx264` RGB frames (padded to even sizes, as its 4:2:0 sampling needs)."""

    def __init__(self, path: Path, codec: str, size: tuple[int, int], rate: Fraction, pixel_format: str) -> None:
        av = import_av()
        self.container = av.open(str(path), "w")
        self.stream = self.container.add_stream(codec, rate=rate)
        height, width = size
        even = codec == "libx264"
        self.stream.height, self.stream.width = height + (height % 2 if even else 0), width + (width % 2 if even else 0)
        self.stream.pix_fmt = "yuv420p" if even else pixel_format
        self.format = pixel_format

    def write(self, frame: np.ndarray) -> None:
        av = import_av()
        pad = [(0, self.stream.height - frame.shape[0]), (0, self.stream.width - frame.shape[1])]
        frame = np.pad(frame, pad + [(0, 0)] * (frame.ndim - 2), mode="edge")
        for packet in self.stream.encode(av.VideoFrame.from_ndarray(frame, format=self.format)):
            self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()


class MaskOutputs:
    """The chosen `outputs` of one sequence of frames (video frames or volume slices), written to `out_dir` one frame
    at a time: `masks.mkv` (the label frames, FFV1: 8-bit grey, or 16-bit when `wide`), `masks/00000.png` ... and
    `overlay.mp4`. A context manager: the videos are finished on leaving it."""

    def __init__(
        self, out_dir: Path, outputs: Iterable[str], size: tuple[int, int], rate: Fraction, wide: bool = False
    ) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.out_dir, self.pngs, self.writers = out_dir, "pngs" in outputs, []
        self.stack = ExitStack()
        if "mask-video" in outputs:
            grey = "gray16le" if wide else "gray"
            self.writers.append(("labels", VideoWriter(out_dir / MASK_VIDEO, "ffv1", size, rate, grey)))
        if "overlay" in outputs:
            self.writers.append(("overlay", VideoWriter(out_dir / OVERLAY_VIDEO, "libx264", size, rate, "rgb24")))
        for _, writer in self.writers:
            self.stack.callback(writer.close)
        if self.pngs:
            (out_dir / MASKS_DIR).mkdir(exist_ok=True)

    def write(self, index: int, image: np.ndarray, labels: np.ndarray, masks: np.ndarray) -> None:
        """Frame `index`: its `(H, W, 3)` uint8 `image`, `(H, W)` `labels` and the `(N, H, W)` bool `masks` the
        overlay paints (one colour per object)."""
        for kind, writer in self.writers:
            writer.write(labels if kind == "labels" else overlay(image, masks))
        if self.pngs:
            Image.fromarray(labels).save(self.out_dir / MASKS_DIR / f"{index:05d}.png")

    def __enter__(self) -> MaskOutputs:
        return self

    def __exit__(self, *exc) -> None:
        self.stack.close()


def video_prompt(frames: VideoFrames, annotation_dir: Path, boxes: list | None) -> tuple[int, dict]:
    """The frame to prompt and the `track` prompt: `boxes` on frame 0, else the objects of the first annotated frame
    with any in `annotation_dir` (as masks); DataError when there is neither."""
    if boxes is not None:
        if len(boxes) > MAX_OBJECTS:
            raise DataError(
                f"{len(boxes)} boxes for '{printable(frames.path)}': a mask video holds at most {MAX_OBJECTS}."
            )
        return 0, {"boxes": np.asarray(boxes, dtype=np.float32)}
    for index, png in sorted(read_annotations(frames, annotation_dir).items()):
        labels = read_label_map(png)
        ids = np.unique(labels[labels > 0])
        if len(ids) > MAX_OBJECTS:
            raise DataError(f"'{printable(png)}' has {len(ids)} objects: a mask video holds at most {MAX_OBJECTS}.")
        if len(ids):
            return index, {"masks": labels[None] == ids[:, None, None]}
    raise DataError(
        f"No prompt for '{printable(frames.path)}': list it in --boxes (boxes on frame 0) or put a mask of its "
        f"objects in '{printable(annotation_dir)}' (a PNG named by frame index, e.g. 00000.png)."
    )


def predict_video_file(
    predictor: VideoPredictor, frames: VideoFrames, out_dir: Path, outputs: Iterable[str], boxes: list | None = None
) -> dict:
    """Track the objects prompted in the video `frames` (see `video_prompt`) and write `outputs` to `out_dir`:
    `masks.mkv` (lossless labels), `masks/00000.png` ... and `overlay.mp4`. Frames before the prompted one get
    empty masks. Returns the video's summary (frames, prompted frame, objects)."""
    path = frames.path
    if frames.variable_rate():
        print(f"warning: {variable_rate_message(frames)}; the output videos have the mean frame rate.", file=sys.stderr)
    start, prompt = video_prompt(frames, path.parent / path.stem, boxes)
    av = import_av()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or Fraction(25)
    size = (frames.height, frames.width)
    count = 0
    with MaskOutputs(out_dir, outputs, size, rate) as written:
        tracked = predictor.track((frames[t] for t in range(start, len(frames))), **prompt)
        for t in range(len(frames)):
            masks = next(tracked) if t >= start else np.zeros((0, *size), bool)
            labels = np.zeros(size, np.uint8)
            for number, mask in enumerate(masks, start=1):
                labels[mask] = number
            written.write(t, frames[t], labels, masks)
            count = max(count, len(masks))
    return {"frames": len(frames), "prompt_frame": start, "objects": count}


def load_video_predictor(args) -> VideoPredictor:
    """The `VideoPredictor` of a command's model flags: `--adapter` (at `--revision`, with `--token`, into
    `--base-model` or the base it records) or `--model` (at `--revision`), on `--device` (auto: cuda if available)."""
    import torch

    from ..adapters.resolve import load_adapted_model
    from ..models.loading import load_base_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.adapter is None:
        model, processor = load_base_model(args.model, video=True, revision=args.revision)
    else:
        model, processor, _ = load_adapted_model(
            args.adapter, revision=args.revision, base_model=args.base_model, token=args.token, video=True
        )
    return VideoPredictor(model, processor, device)
