"""Single-process speed of the synthetic scene generator.

Run from the repository root with the package importable (installed, or
`PYTHONPATH=.`); one BLAS/OpenMP thread keeps figures comparable:

```bash
PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/synthetic_speed.py
```
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from sam2_peft.data.synthetic import SyntheticSceneConfig, SyntheticSceneDataset


def measure(image_size: int, num_scenes: int, seed: int) -> dict[str, float]:
    """Generate `num_scenes` scenes after one warm-up scene; return timing figures."""
    dataset = SyntheticSceneDataset(num_scenes + 1, seed, SyntheticSceneConfig(image_size=image_size))
    dataset[num_scenes]
    durations = []
    for index in range(num_scenes):
        start = time.perf_counter()
        dataset[index]
        durations.append(time.perf_counter() - start)
    total = sum(durations)
    return {
        "image_size": image_size,
        "num_scenes": num_scenes,
        "scenes_per_second": num_scenes / total,
        "median_ms": 1000 * float(np.median(durations)),
        "max_ms": 1000 * max(durations),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--num-scenes", type=int, nargs="+", default=[200, 20])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("outputs/synthetic_speed.json"))
    args = parser.parse_args()
    if len(args.num_scenes) != len(args.sizes):
        parser.error("--num-scenes needs one value per --sizes value")

    rows = [measure(size, n, args.seed) for size, n in zip(args.sizes, args.num_scenes)]
    print(f"{'size':>6} {'scenes':>7} {'scenes/s':>9} {'median ms':>10} {'max ms':>8}")
    for row in rows:
        print(
            f"{row['image_size']:>6} {row['num_scenes']:>7} "
            f"{row['scenes_per_second']:>9.1f} {row['median_ms']:>10.1f} "
            f"{row['max_ms']:>8.1f}"
        )
    report = {
        "benchmark": "synthetic_speed",
        "processes": 1,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "results": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
