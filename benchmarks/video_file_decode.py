"""Video files read with `sam2_peft.data.video_files`: fidelity of DAVIS sequences encoded to H.264, and memory as a
long video is read.

- fidelity: each DAVIS sequence's JPEGs encoded with PyAV (libx264, crf 18, yuv420p), read back; frame counts, the
  largest per-frame mean absolute error (grey levels) and the smallest per-frame PSNR against the JPEGs.
- memory: a synthetic 320x240 H.264 video of `--frames` frames read in order; the process's RSS after 100 frames and
  after the last (276 MB per 1,200 frames if frames were held).

```bash
PYTHONPATH=. python benchmarks/video_file_decode.py --davis ../shared/data/video-davis2016-mini --frames 1000
```
"""

from __future__ import annotations

import argparse
import tempfile
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


def memory(frames: int, folder: Path) -> None:
    frame = np.zeros((240, 320, 3), np.uint8)

    def synthetic():
        for t in range(frames):
            frame[:, :, 0] = t % 256
            yield frame

    path = encode_video(folder / "long.mp4", synthetic(), options={"preset": "ultrafast"})
    video = VideoFrames(path)
    for t in range(len(video)):
        video[t]
        if t + 1 in (100, len(video)):
            print(f"RSS after {t + 1} frames: {rss_mb():.1f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--davis", type=Path, default=None, help="the DAVIS folder (JPEGImages/SEQ/*.jpg)")
    parser.add_argument("--frames", type=int, default=1000, help="frames of the synthetic video")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        if args.davis:
            fidelity(args.davis, Path(folder))
        memory(args.frames, Path(folder))


if __name__ == "__main__":
    main()
