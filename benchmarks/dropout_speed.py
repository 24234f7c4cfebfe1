"""LoRA dropout on one image-token input of the mask decoder (`prompts x 4096 x 256`, 1024 px): `nn.Dropout` against
`BitsDropout`, forward + backward, in one process, interleaved (A B A B ...), several rounds. Prints a table, writes
benchmarks/results/dropout_speed.json.

    OMP_NUM_THREADS=1 python benchmarks/dropout_speed.py [--prompts 4] [--rounds 7] [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from sam2_peft.tuners.lora import BitsDropout

RESULTS = Path(__file__).resolve().parent / "results" / "dropout_speed.json"


def time_once(module: nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Milliseconds per forward + backward, averaged over `repeats` calls."""
    start = time.perf_counter()
    for _ in range(repeats):
        module(x).sum().backward()
    return 1e3 * (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    x = torch.randn(args.prompts, 1, 4096, 256, requires_grad=True)
    variants = {"nn.Dropout(0.1)": nn.Dropout(0.1).train(), "BitsDropout(0.1)": BitsDropout(0.1).train()}
    load_before = os.getloadavg()
    for module in variants.values():
        time_once(module, x, 2)
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, module in variants.items():
            times[name].append(time_once(module, x, args.repeats))
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "input_shape": list(x.shape),
        "rounds": args.rounds,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "ms": {name: {"median": medians[name], "min": min(v), "max": max(v)} for name, v in times.items()},
        "speedup": medians["nn.Dropout(0.1)"] / medians["BitsDropout(0.1)"],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"input {tuple(x.shape)}, {args.rounds} rounds, load average {load_before} -> {os.getloadavg()}")
    print("\n| dropout | ms per forward + backward, median (min..max) |\n|---|---:|")
    for name, values in times.items():
        print(f"| {name} | {medians[name]:.1f} ({min(values):.1f}..{max(values):.1f}) |")
    print(f"\nBitsDropout is {result['speedup']:.2f}x faster")


if __name__ == "__main__":
    main()
