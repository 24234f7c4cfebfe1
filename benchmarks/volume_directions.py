"""Bidirectional propagation from the middle frame against forward propagation from the first, DAVIS frames as slices.

Each DAVIS 2016 sequence is treated as a volume (frames as slices). `forward`: a box from the ground truth on frame 0,
propagated forward (`sam2_peft.inference.volumes.segment_volume(..., "forward")`). `both`: a box on the middle frame,
propagated both ways (`"both"`). J, F and J&F (the DAVIS definitions of `evaluation/video_metrics.py`) are scored on the
same frames for both: every frame but the two prompted ones and the last.

The base is a random `tiny-random` video model (256 px) whose zero-initialised memory parts are made non-zero, as in
the video tests, so that memory carries signal (no SAM 2 weights are available offline, and `compact-synthetic` has no
trained video memory): the figures check the propagation paths, not SAM 2's accuracy.

```bash
PYTHONPATH=. python benchmarks/volume_directions.py --output benchmarks/results/volume_directions.json
```
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from benchmarks.video_speed import make_memory_matter
from sam2_peft.data.video import open_video_folder
from sam2_peft.evaluation.video_metrics import VideoMetricAccumulator
from sam2_peft.inference.video import VideoPredictor
from sam2_peft.inference.volumes import SlicePrompt, segment_volume
from sam2_peft.models.loading import load_base_model

DAVIS = Path(os.environ.get("SAM2_PEFT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
DAVIS = DAVIS / "video-davis2016-mini"


def box_prompt(labels: np.ndarray, frame: int) -> SlicePrompt:
    ys, xs = np.nonzero(labels > 0)
    return SlicePrompt(frame, box=np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    if not DAVIS.is_dir():
        sys.exit(f"skipped: the DAVIS subset is not at {DAVIS} (set SAM2_PEFT_DATA to the shared data folder)")
    torch.manual_seed(0)
    model, processor = load_base_model(args.model, video=True)
    make_memory_matter(model)
    predictor = VideoPredictor(model.eval(), processor)
    scores = {d: VideoMetricAccumulator() for d in ("forward", "both")}
    for sequence in open_video_folder(DAVIS):
        count = len(sequence.frames)
        middle = count // 2
        starts = {"forward": 0, "both": middle}
        scored = [t for t in sequence.annotated_frames if t not in (0, middle, count - 1)]
        for direction, start in starts.items():
            prompt = box_prompt(sequence.load_labels(start), start)
            labels = segment_volume(predictor, sequence, {1: prompt}, direction)
            for t in scored:
                truth = sequence.load_labels(t) > 0
                scores[direction].update(sequence.name, [1], labels[t][None] == 1, truth[None])
        print(sequence.name, {d: round(s.per_sequence()[sequence.name]["J&F"], 4) for d, s in scores.items()})
    result = {
        "model": args.model,
        "data": str(DAVIS),
        "per_sequence": {d: s.per_sequence() for d, s in scores.items()},
        "mean": {d: s.compute() for d, s in scores.items()},
    }
    print(json.dumps(result["mean"], indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
