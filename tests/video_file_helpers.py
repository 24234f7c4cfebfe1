"""Helpers for the video-file tests: small synthetic videos encoded with PyAV, with sparse PNG annotations."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image


def moving_square(t: int, size=(48, 64)) -> tuple[np.ndarray, np.ndarray]:
    """Frame `t` (`(H, W, 3)` uint8) and its labels: a bright square (id 1) moving right over a dark background."""
    labels = np.zeros(size, np.uint8)
    left = 4 + (2 * t) % (size[1] - 20)
    labels[12:28, left : left + 16] = 1
    image = np.where(labels[..., None] > 0, 220, 30).astype(np.uint8).repeat(3, axis=2)
    image[..., 0] = np.uint8(40 + t % 100)  # a little change in every frame
    return image, labels


def encode_video(
    path: Path, frames, rate: int = 25, codec: str = "libx264", options: dict | None = None, rotation: int = 0
) -> Path:
    """Write `(H, W, 3)` uint8 frames to `path` with PyAV: H.264 (yuv420p, lossy) or FFV1 (lossless RGB, .mkv);
    `rotation` (degrees counter-clockwise) sets the display matrix that players apply, as phones do."""
    import av

    with av.open(str(path), "w") as container:
        stream = None
        for frame in frames:
            if stream is None:
                stream = container.add_stream(codec, rate=rate, options=options or {})
                stream.height, stream.width = frame.shape[:2]
                stream.pix_fmt = "yuv420p" if codec == "libx264" else "bgr0"
                if rotation:
                    stream.set_display_rotation(rotation)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_video_file(
    root: Path, name: str = "clip", frames: int = 12, annotated=(0, 4, 8), suffix: str = ".mp4", codec="libx264"
) -> Path:
    """`root/name.mp4` of the moving square and its annotations `root/name/<t>.png` for the `annotated` frames (the
    first named `00000.png`, the others unpadded, as both namings are accepted)."""
    root.mkdir(parents=True, exist_ok=True)
    encode_video(root / f"{name}{suffix}", (moving_square(t)[0] for t in range(frames)), codec=codec)
    (root / name).mkdir(exist_ok=True)
    for t in annotated:
        Image.fromarray(moving_square(t)[1] * 255).save(root / name / (f"{t:05d}.png" if t == 0 else f"{t}.png"))
    return root


def encode_variable_rate(path: Path, frames: int = 10) -> Path:
    """A Matroska video whose frames last 40 ms, then 80 ms (timestamps set by hand): a variable frame rate."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=25)
        stream.height, stream.width, stream.pix_fmt = 48, 64, "bgr0"
        stream.codec_context.time_base = Fraction(1, 1000)
        for t in range(frames):
            frame = av.VideoFrame.from_ndarray(moving_square(t)[0], format="rgb24")
            frame.pts, frame.time_base = (
                (40 * t if t < frames // 2 else 40 * t + 40 * (t - frames // 2)),
                Fraction(1, 1000),
            )
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
