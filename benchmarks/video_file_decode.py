"""Video files read with `sam2_peft.data.video_files`: fidelity of DAVIS sequences encoded to H.264, and memory as a
long video is read.

- fidelity: each DAVIS sequence's JPEGs encoded with PyAV (libx264, crf 18, yuv420p), read back; frame counts, the
  largest per-frame mean absolute error (grey levels) and the smallest per-frame PSNR against the JPEGs.
- memory: a synthetic 320x240 H.264 video of `--frames` frames (a square moving over a dark background) read in
  order; the process's RSS after 100 frames and after the last (276 MB per 1,200 frames if frames were held).
- tracking memory (`--track MODEL`, a built-in architecture such as `tiny-random`): `VideoPredictor.track` through
  the same video, read lazily from the file, one box on frame 0, with random weights made to use their memory and
  keep the object (`tests/video_helpers.py::enliven`); current and peak RSS after 100 frames and after the last,
  written as JSON to `--output`.

```bash
PYTHONPATH=. python benchmarks/video_file_decode.py --davis ../shared/data/video-davis2016-mini --frames 1000
PYTHONPATH=. python benchmarks/video_file_decode.py --frames 1000 --track tiny-random
```
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from sam2_peft.data.video_files import VideoFrames
from tests.video_file_helpers import encode_video


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20


def fidelity(davis: Path, folder: Path) -> None:
    for sequence in sorted(p.name for p in (davis / "JPEGImages").iterdir()):
        jpegs = sorted((davis / "JPEGImages" / sequence).glob("*.jpg"))
        path = folder / f"{sequence}.mp4"
        encode_video(path, (np.asarray(Image.open(p).convert("RGB")) for p in jpegs), options={"crf": "18"})
        video = VideoFrames(path)
        errors = [np.asarray(Image.open(p).convert("RGB")).astype(float) - video[t] for t, p in enumerate(jpegs)]
        mae = max(np.abs(e).mean() for e in errors)
        psnr = min(10 * np.log10(255**2 / (e**2).mean()) for e in errors)
        print(f"{sequence}: {len(jpegs)} JPEGs, {len(video)} decoded; max MAE {mae:.2f}, min PSNR {psnr:.1f} dB")


BOX = [40, 60, 120, 140]
"""The square's box on frame 0; it moves one pixel right per frame, back and forth over 120 pixels."""


def square_frame(t: int) -> np.ndarray:
    frame = np.full((240, 320, 3), 30, np.uint8)
    frame[:, :, 0] = t % 256
    shift = abs(t % 240 - 120)
    frame[BOX[1] : BOX[3], BOX[0] + shift : BOX[2] + shift] = 220
    return frame


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory(frames: int, folder: Path) -> Path:
    path = encode_video(folder / "long.mp4", map(square_frame, range(frames)), options={"preset": "ultrafast"})
    video = VideoFrames(path)
    for t in range(len(video)):
        video[t]
        if t + 1 in (100, len(video)):
            print(f"RSS after {t + 1} frames: {rss_mb():.1f} MB")
    return path


def track(model: str, path: Path, output: Path) -> None:
    """Track the square through the video file with `VideoPredictor`, recording RSS after 100 frames and the last."""
    from sam2_peft.inference.video import VideoPredictor
    from sam2_peft.models.loading import load_base_model

    video = VideoFrames(path)
    from tests.video_helpers import enliven

    network, processor = load_base_model(model, video=True)
    predictor = VideoPredictor(enliven(network), processor, "cpu")  # memory matters, the object is kept
    checkpoints, start = {}, time.perf_counter()
    for t, masks in enumerate(predictor.track((video[t] for t in range(len(video))), boxes=[BOX])):
        if t + 1 in (100, len(video)):
            checkpoints[t + 1] = {"rss_mb": rss_mb(), "peak_rss_mb": peak_rss_mb(), "mask_pixels": int(masks.sum())}
            print(f"tracking, after {t + 1} frames: RSS {rss_mb():.1f} MB, peak {peak_rss_mb():.1f} MB", flush=True)
    report = {
        "command": " ".join(["python", *sys.argv]),
        "model": f"{model}, random weights made to use their memory (tests/video_helpers.py::enliven)",
        "video": f"{len(video)} frames, 320x240 H.264, read lazily with VideoFrames",
        "seconds_per_frame": (time.perf_counter() - start) / len(video),
        "torch_threads": __import__("torch").get_num_threads(),
        "load_average_end": os.getloadavg(),
        "after_frames": checkpoints,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {output}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--davis", type=Path, default=None, help="the DAVIS folder (JPEGImages/SEQ/*.jpg)")
    parser.add_argument("--frames", type=int, default=1000, help="frames of the synthetic video")
    parser.add_argument("--track", default=None, metavar="MODEL", help="also track through it with this architecture")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/video_file_memory.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        if args.davis:
            fidelity(args.davis, Path(folder))
        path = memory(args.frames, Path(folder))
        if args.track:
            track(args.track, path, args.output)


if __name__ == "__main__":
    main()
