"""Video tracking speed per frame: sam2-peft's tracker against transformers' own inference session, in one process.

Both trackers run on the same frames, interleaved (A B C D A B C D ...), several rounds, on the hiera-tiny
architecture at 1024 px (or another built-in architecture, `--model`) with random weights (speed only; the parts random init zeroes are made non-zero, as in the
tests, so that memory and object pointers carry signal and the masks can be compared):

- `transformers`: `Sam2VideoInferenceSession` on the preprocessed frames, the box added with
  `Sam2VideoProcessor.add_inputs_to_inference_session`, `Sam2VideoModel.propagate_in_video_iterator`.
- `tracker`: `Sam2VideoTracker` on the same preprocessed frames, memories rounded to bfloat16 as transformers does,
  the clip length known (same object-pointer positions), under `torch.no_grad` as the predictor runs it.
- `predictor`: `VideoPredictor.track` end to end (uint8 frames in, preprocessing per frame, masks at the original
  size out, streaming: clip length unknown).
- `transformers-e2e`: the same end to end with transformers (`init_video_session(video=...)` preprocessing, then
  propagation and `post_process_masks` per frame).
- `tracker-with-grad` (opt-in): the tracker without `torch.no_grad`, as a caller who forgets it runs it: autograd
  keeps every frame's activations (about 3 GB per 1024 px frame on hiera-tiny), so time and memory per frame grow.

Per-frame times are the tracked frames (every frame after the prompted first one; the first is reported apart).
The whole clip's time (first frame included) compares the end-to-end variants fairly: `transformers-e2e`
preprocesses every frame when its session is made (inside its first frame's time), the predictor each frame as it
arrives (inside each tracked frame's time).
The masks of `tracker` and `transformers` are compared frame by frame (max |logit difference| and IoU of the
binary masks). Memory: the process's RSS after each frame (its growth over the clip) and the peak RSS.

```bash
PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/video_speed.py --frames 8 --rounds 3
PYTHONPATH=. SAM2_PEFT_DATA=../shared/data heavy python benchmarks/video_speed.py --model compact-random --frames 24 \
    --rounds 5 --output benchmarks/results/video_speed_compact.json
```
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

DAVIS = Path(os.environ.get("SAM2_PEFT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
DAVIS = DAVIS / "video-davis2016-mini"
VARIANTS = ("transformers", "tracker", "predictor", "transformers-e2e", "tracker-with-grad")
DEFAULT_VARIANTS = VARIANTS[:4]


def rss_mb() -> float:
    """The process's current resident set size."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_frames(sequence: str, count: int) -> tuple[list[np.ndarray], np.ndarray, str]:
    """`count` uint8 `(H, W, 3)` frames and a box `(4,)` around the first frame's object; DAVIS or synthetic."""
    folder = DAVIS / "JPEGImages" / sequence
    if folder.is_dir():
        from PIL import Image

        paths = sorted(folder.glob("*.jpg"))[:count]
        frames = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
        mask = np.asarray(Image.open(DAVIS / "Annotations" / sequence / (paths[0].stem + ".png"))) > 0
        ys, xs = np.nonzero(mask)
        return frames, np.array([xs.min(), ys.min(), xs.max(), ys.max()], np.float32), f"DAVIS {sequence}"
    print(f"DAVIS frames not found at {folder} (set SAM2_PEFT_DATA): using synthetic frames", file=sys.stderr)
    rng = np.random.default_rng(0)
    frames = []
    for t in range(count):
        frame = rng.integers(0, 60, (480, 854, 3), dtype=np.uint8)
        frame[150:330, 200 + 10 * t : 420 + 10 * t] = 220
        frames.append(frame)
    return frames, np.array([200, 150, 420, 330], np.float32), "synthetic 854x480"


def make_memory_matter(model) -> None:
    """Give the parameters random init zeroes (memory fuser scale, temporal encodings, ...) small values and bias
    the object score positive, so that memory conditions the masks (as tests/video_helpers.py does)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.abs().max() == 0 and "bias" not in name and "layer_norm" not in name:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
        model.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(3.0)


def build(name: str):
    from transformers import Sam2VideoProcessor
    from transformers.models.sam2_video.video_processing_sam2_video import Sam2VideoVideoProcessor

    from sam2_peft.models.loading import build_model_from_config, builtin_config, processor_for_image_size

    model = build_model_from_config(builtin_config(name, video=True))
    make_memory_matter(model)
    processor = processor_for_image_size(model.config.image_size)
    size = model.config.image_size
    video_processor = Sam2VideoProcessor(
        image_processor=processor.image_processor,
        video_processor=Sam2VideoVideoProcessor(size={"height": size, "width": size}),
        target_size=size,
    )
    return model.eval(), processor, video_processor


def timed(iterator):
    """Consume `iterator`, returning (items, seconds each item took to produce)."""
    items, seconds = [], []
    start = time.perf_counter()
    for item in iterator:
        seconds.append(time.perf_counter() - start)
        items.append(item)
        start = time.perf_counter()
    return items, seconds


memory_tokens: list[int] = []
"""Length of the memory (spatial memory tokens + object-pointer tokens) that memory attention read, per call."""


def count_memory_tokens(module, args, kwargs) -> None:
    memory_tokens.append(int(kwargs["memory"].shape[0]))


def run_variant(name, model, processor, video_processor, frames, pixel_values, box):
    """One pass over the clip: (low-res mask logits per frame or None, seconds per frame, RSS MB per frame)."""
    from transformers import Sam2VideoInferenceSession

    from sam2_peft.inference.video import VideoPredictor
    from sam2_peft.models.video_forward import ClipPrompt, Sam2VideoTracker

    height, width = frames[0].shape[:2]
    rss: list[float] = []
    memory_tokens.clear()

    def record(outputs):
        for out in outputs:
            rss.append(rss_mb())
            yield out

    if name == "transformers":
        session = Sam2VideoInferenceSession(
            video=pixel_values, video_height=height, video_width=width, dtype=torch.float32
        )
        video_processor.add_inputs_to_inference_session(session, frame_idx=0, obj_ids=[1], input_boxes=[[box.tolist()]])
        outputs, seconds = timed(record(model.propagate_in_video_iterator(session, start_frame_idx=0)))
        return [o.pred_masks.float() for o in outputs], seconds, rss
    if name in ("tracker", "tracker-with-grad"):
        from sam2_peft.data.prompts import to_model_coordinates

        size = model.config.image_size
        corners = to_model_coordinates(torch.as_tensor(box).view(1, 2, 2), (height, width), size)
        prompt = ClipPrompt(points=corners, point_labels=torch.tensor([[2, 3]]))
        tracker = Sam2VideoTracker(model, memory_dtype=torch.bfloat16).eval()

        def run():
            with torch.set_grad_enabled(name == "tracker-with-grad"):
                yield from tracker.track(iter(pixel_values), prompt, num_frames=len(pixel_values))

        outputs, seconds = timed(record(run()))
        return [o.pred_masks.detach().float() for o in outputs], seconds, rss
    if name == "predictor":
        predictor = VideoPredictor(model, processor)
        _, seconds = timed(record(predictor.track(iter(frames), boxes=box[None])))
        return None, seconds, rss
    if name == "transformers-e2e":
        start = time.perf_counter()
        session = video_processor.init_video_session(video=frames, dtype=torch.float32)
        video_processor.add_inputs_to_inference_session(session, frame_idx=0, obj_ids=[1], input_boxes=[[box.tolist()]])

        def run():
            for out in model.propagate_in_video_iterator(session, start_frame_idx=0):
                yield video_processor.post_process_masks([out.pred_masks], [[height, width]], binarize=True)[0]

        outputs, seconds = timed(record(run()))
        seconds[0] += time.perf_counter() - start - sum(seconds)  # the up-front preprocessing counts to frame 0
        return None, seconds, rss
    raise ValueError(name)


def compare(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> dict:
    diffs, ious = [], []
    for a, b in zip(ours, theirs):
        diffs.append(float((a - b).abs().max()))
        pa, pb = a > 0, b > 0
        union = (pa | pb).sum().item()
        ious.append(1.0 if union == 0 else (pa & pb).sum().item() / union)
    foreground = [float((m > 0).float().mean()) for m in theirs]
    return {
        "max_abs_logit_diff": max(diffs),
        "min_mask_iou": min(ious),
        "foreground_fraction_per_frame": foreground,
    }


def summarize(seconds_per_round: list[list[float]], rss_per_round: list[list[float]]) -> dict:
    tracked = [s for r in seconds_per_round for s in r[1:]]
    per_round = [statistics.median(r[1:]) for r in seconds_per_round]
    rss_last = rss_per_round[-1]
    return {
        "tracked_frame_median_s": statistics.median(tracked),
        "tracked_frame_min_s": min(tracked),
        "tracked_frame_max_s": max(tracked),
        "round_medians_s": per_round,
        "first_frame_median_s": statistics.median(r[0] for r in seconds_per_round),
        "clip_median_s": statistics.median(sum(r) for r in seconds_per_round),
        "rss_mb_first_frame": rss_last[0],
        "rss_mb_last_frame": rss_last[-1],
        "seconds": seconds_per_round,
    }


def table(report: dict) -> str:
    rows = report["results"]
    reference = rows.get("transformers", {}).get("tracked_frame_median_s")
    lines = [
        "| variant | s / tracked frame (median) | min-max | first frame s | whole clip s | vs transformers | RSS growth MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        ratio = f"{r['tracked_frame_median_s'] / reference:.2f}x" if reference else ""
        if name == "predictor" and "transformers-e2e" in rows:
            ratio += f" ({r['tracked_frame_median_s'] / rows['transformers-e2e']['tracked_frame_median_s']:.2f}x e2e)"
        lines.append(
            f"| {name} | {r['tracked_frame_median_s']:.3f} | {r['tracked_frame_min_s']:.3f}-"
            f"{r['tracked_frame_max_s']:.3f} | {r['first_frame_median_s']:.2f} | {r['clip_median_s']:.2f} | {ratio} | "
            f"{r['rss_mb_last_frame'] - r['rss_mb_first_frame']:+.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sequence", default="blackswan")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=VARIANTS)
    parser.add_argument(
        "--model",
        default="hiera-tiny-random",
        help="built-in architecture, random weights (hiera-tiny-random: 1024 px; compact-random, tiny-random: 256)",
    )
    parser.add_argument("--output", default="benchmarks/results/video_speed.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, processor, video_processor = build(args.model)
    model.memory_attention.register_forward_pre_hook(count_memory_tokens, with_kwargs=True)
    frames, box, source = load_frames(args.sequence, args.frames)
    pixel_values = processor.image_processor(images=frames, return_tensors="pt")["pixel_values"]
    load_start = os.getloadavg()
    seconds = {name: [] for name in args.variants}
    rss = {name: [] for name in args.variants}
    masks, tokens = {}, {}
    for round_index in range(args.rounds):
        for name in args.variants:
            out, s, r = run_variant(name, model, processor, video_processor, frames, pixel_values, box)
            seconds[name].append(s)
            rss[name].append(r)
            tokens[name] = list(memory_tokens)
            if out is not None:
                masks[name] = out
            print(f"round {round_index} {name}: {statistics.median(s[1:]):.3f} s / tracked frame", flush=True)
    results = {
        name: {**summarize(seconds[name], rss[name]), "memory_tokens_per_frame": tokens[name]} for name in args.variants
    }
    report = {
        "command": " ".join(["python", *sys.argv]),
        "architecture": f"{args.model}, {model.config.image_size} px, random weights",
        "frames": f"{args.frames} frames of {source}, one box on the first frame",
        "rounds": args.rounds,
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "peak_rss_mb": peak_rss_mb(),
        "results": results,
    }
    if "tracker" in masks and "transformers" in masks:
        report["tracker_vs_transformers_masks"] = compare(masks["tracker"], masks["transformers"])
        report["tracker_vs_transformers_masks"]["same_memory_tokens"] = tokens["tracker"] == tokens["transformers"]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(table(report))
    print(f"\nload average {load_start} -> {report['load_average_end']}, peak RSS {report['peak_rss_mb']:.0f} MB")
    if "tracker_vs_transformers_masks" in report:
        print("tracker vs transformers masks:", json.dumps(report["tracker_vs_transformers_masks"]))
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
