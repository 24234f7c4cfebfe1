"""SAM 2's full-resolution mask terms of one prompt (logits 256^2 upsampled to 1024^2, focal + dice + true IoU),
forward + backward: `F.interpolate` and torchvision's focal loss through autograd (as before) against
`BilinearUpsample4x` and `FocalDiceOnBinaryTargets` (now), in one process, interleaved (A B A B ...), several
rounds. Prints a table, writes benchmarks/results/loss_speed.json.

    OMP_NUM_THREADS=1 python benchmarks/loss_speed.py [--masks 1 3] [--rounds 7] [--repeats 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sam2_peft.training.losses import (
    PIXEL_BLOCK,
    FocalDiceOnBinaryTargets,
    dice_loss,
    focal_loss,
    mask_iou,
    upsample_logits,
)

RESULTS = Path(__file__).resolve().parent / "results" / "loss_speed.json"
ALPHA, GAMMA = 0.25, 2.0


def autograd_terms(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    upsampled = F.interpolate(logits, size=targets.shape[-2:], mode="bilinear", align_corners=False)
    targets = targets.float()[:, None].expand_as(upsampled)
    with torch.no_grad():
        mask_iou(upsampled, targets)
    return focal_loss(upsampled, targets, ALPHA, GAMMA), dice_loss(upsampled, targets)


def one_pass_terms(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    upsampled = upsample_logits(logits, targets.shape[-2:]).flatten(-2)
    focal, dice, _ = FocalDiceOnBinaryTargets.apply(
        upsampled, targets.float()[:, None].flatten(-2), ALPHA, GAMMA, PIXEL_BLOCK
    )
    return focal, dice


VARIANTS = {
    "F.interpolate + torchvision focal + dice, autograd": autograd_terms,
    "BilinearUpsample4x + FocalDiceOnBinaryTargets": one_pass_terms,
}


def time_once(terms, logits: torch.Tensor, targets: torch.Tensor, repeats: int) -> float:
    """Milliseconds per forward + backward of the mask terms, averaged over `repeats` calls."""
    start = time.perf_counter()
    for _ in range(repeats):
        focal, dice = terms(logits, targets)
        (focal.sum() + dice.sum()).backward()
    return 1e3 * (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--masks", type=int, nargs="+", default=[1, 3], help="candidate masks per prompt")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    load_before = os.getloadavg()
    target = torch.zeros(1, 1024, 1024, dtype=torch.bool)
    target[:, 300:700, 200:600] = True
    rows = []
    for masks in args.masks:
        logits = torch.randn(1, masks, 256, 256, requires_grad=True)
        for terms in VARIANTS.values():
            time_once(terms, logits, target, 2)
        times = {name: [] for name in VARIANTS}
        for _ in range(args.rounds):
            for name, terms in VARIANTS.items():
                times[name].append(time_once(terms, logits, target, args.repeats))
        summary = {name: {"median": statistics.median(v), "min": min(v), "max": max(v)} for name, v in times.items()}
        rows.append({"masks": masks, "ms": summary})
    result = {
        "command": "OMP_NUM_THREADS=1 python benchmarks/loss_speed.py " + " ".join(os.sys.argv[1:]),
        "rounds": args.rounds,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "rows": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.rounds} rounds, load average {load_before} -> {os.getloadavg()}")
    names = list(VARIANTS)
    print(f"\n| masks per prompt | {' | '.join(names)} | speed-up |\n|---:|" + "---:|" * (len(names) + 1))
    for row in rows:
        cells = [f"{row['ms'][n]['median']:.1f} ({row['ms'][n]['min']:.1f}..{row['ms'][n]['max']:.1f})" for n in names]
        speedup = row["ms"][names[0]]["median"] / row["ms"][names[1]]["median"]
        print(f"| {row['masks']} | {' | '.join(cells)} | {speedup:.2f}x |")


if __name__ == "__main__":
    main()
