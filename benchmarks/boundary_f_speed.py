"""DAVIS boundary F per frame: the reference `davis2017-evaluation` (`davis2017/metrics.py` `f_measure`, which
dilates with `cv2.dilate`) against sam2-peft's `boundary_f_measure` (`dilate_disk`) and the scipy
`ndimage.binary_dilation` version it replaces, in one process, interleaved (A B C A B C ...), several rounds, on real
480 x 854 DAVIS masks (truth: frame i, prediction: frame i + 1's mask, a realistic near miss). Every variant's F must
equal the reference's exactly on every pair. Prints a table with the load average, writes
benchmarks/results/boundary_f_speed.json.

The reference is imported from a davis2017-evaluation checkout (`--reference DIR`, the folder holding `davis2017/`;
it needs opencv and scikit-image). Where it cannot be imported but cv2 can, a re-implementation of its `f_measure`
written here (the same steps: `_seg2bmap`, `cv2.dilate` by the disk, the same counts) is timed instead, and the
table says so; without cv2 the reference row is left out.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/boundary_f_speed.py --reference ../davis2017-evaluation
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from sam2_peft.evaluation.video_metrics import BOUNDARY_THRESHOLD, boundary_f_measure, disk, seg2bmap

RESULTS = Path(__file__).resolve().parent / "results" / "boundary_f_speed.json"
DATA = Path(os.environ.get("SAM2_PEFT_DATA", "/work/shared/data")) / "video-davis2016-mini"


def _f_from_dilation(pred: np.ndarray, target: np.ndarray, dilate: Callable[[np.ndarray, int], np.ndarray]) -> float:
    """The reference's `f_measure` steps with a given dilation (`dilate(boundary, radius)` -> bool)."""
    radius = int(math.ceil(BOUNDARY_THRESHOLD * math.hypot(*target.shape)))
    pred_boundary, true_boundary = seg2bmap(pred), seg2bmap(target)
    n_pred, n_true = pred_boundary.sum(), true_boundary.sum()
    if n_pred == 0 or n_true == 0:
        precision, recall = (1.0 if n_pred == 0 else 0.0), (1.0 if n_true == 0 else 0.0)
    else:
        precision = (pred_boundary & dilate(true_boundary, radius)).sum() / float(n_pred)
        recall = (true_boundary & dilate(pred_boundary, radius)).sum() / float(n_true)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def scipy_f(pred: np.ndarray, target: np.ndarray) -> float:
    """Before: the dilations by `ndimage.binary_dilation`."""
    return _f_from_dilation(pred, target, lambda b, r: ndimage.binary_dilation(b, structure=disk(r)))


def reference_f(reference_dir: str | None) -> tuple[str, Callable | None]:
    """The reference's `f_measure` (imported) or a re-implementation on `cv2.dilate`, and what it is."""
    if reference_dir:
        sys.path.insert(0, str(reference_dir))
    try:
        metrics = importlib.import_module("davis2017.metrics")
        importlib.import_module("skimage.morphology")
        return "davis2017.metrics.f_measure (imported)", lambda p, t: float(metrics.f_measure(p, t))
    except ImportError:
        pass
    try:
        import cv2
    except ImportError:
        return "reference not importable, cv2 absent: not timed", None

    def dilate(boundary: np.ndarray, radius: int) -> np.ndarray:
        return cv2.dilate(boundary.astype(np.uint8), disk(radius).astype(np.uint8)).astype(bool)

    return "re-implementation of f_measure with cv2.dilate (reference not importable)", (
        lambda p, t: _f_from_dilation(p, t, dilate)
    )


def mask_pairs(count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """`(prediction, truth)` pairs: frame i + 1's and frame i's masks, spread over the sequences."""
    sequences = sorted(p for p in (DATA / "Annotations").iterdir() if p.is_dir())
    pairs = []
    for index in range(count):
        frames = sorted((sequences[index % len(sequences)]).glob("*.png"))
        i = (index // len(sequences)) * 7 % (len(frames) - 1)
        truth, pred = (np.asarray(Image.open(frames[j])) > 0 for j in (i, i + 1))
        pairs.append((pred, truth))
    return pairs


def time_once(f: Callable, pairs: list) -> float:
    """Milliseconds per frame pair."""
    start = time.perf_counter()
    for pred, truth in pairs:
        f(pred, truth)
    return 1e3 * (time.perf_counter() - start) / len(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", default=os.environ.get("DAVIS2017_EVALUATION"), help="davis2017-evaluation dir")
    parser.add_argument("--pairs", type=int, default=10, help="frame pairs timed per round")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    if not DATA.is_dir():
        print(f"skipped: the DAVIS masks are not at {DATA} (set SAM2_PEFT_DATA)")
        return
    reference_name, reference = reference_f(args.reference)
    variants = {
        "reference": reference,
        "before (scipy binary_dilation)": scipy_f,
        "ours (dilate_disk)": boundary_f_measure,
    }
    variants = {name: f for name, f in variants.items() if f is not None}
    pairs = mask_pairs(args.pairs)
    values = {name: [f(p, t) for p, t in pairs] for name, f in variants.items()}  # also the warm-up
    baseline = values.get("reference", values["before (scipy binary_dilation)"])
    identical = {name: v == baseline for name, v in values.items()}
    load_before = os.getloadavg()
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, f in variants.items():
            times[name].append(time_once(f, pairs))
    load_after = os.getloadavg()
    summary = {name: {"median": statistics.median(v), "min": min(v), "max": max(v)} for name, v in times.items()}
    result = {
        "command": "OMP_NUM_THREADS=1 python benchmarks/boundary_f_speed.py " + " ".join(sys.argv[1:]),
        "reference": reference_name,
        "frame_size": list(pairs[0][0].shape),
        "pairs": args.pairs,
        "rounds": args.rounds,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "f_equal_to_reference": identical,
        "ms_per_frame": summary,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"reference: {reference_name}")
    print(f"{args.rounds} rounds of {args.pairs} frame pairs, {pairs[0][0].shape}, load average {load_before} -> "
          f"{load_after}")  # fmt: skip
    base = summary["reference"]["median"] if "reference" in summary else None
    print("\n| variant | ms per frame, median (min..max) | x reference | F equal to reference |\n|---|---:|---:|---|")
    for name, s in summary.items():
        ratio = f"{s['median'] / base:.2f}x" if base else "n/a"
        print(f"| {name} | {s['median']:.1f} ({s['min']:.1f}..{s['max']:.1f}) | {ratio} | {identical[name]} |")


if __name__ == "__main__":
    main()
