"""Peak memory of data checking + dataset building + a few training steps, at 1k and 10k synthetic images.

Writes N small synthetic images (128 x 128 PNG, 3-6 instance-labelled discs each) to a temporary folder, then runs the
LoRA recipe on the tiny model in a fresh subprocess per row, so that each peak RSS is its own:

- `listed`: today's path, every sample listed and checked up front (decoded once), then trained on;
- `streaming (folder)`: `--streaming` over the same folder (nothing checked up front, samples checked as read);
- `streaming (datasets)`: `--streaming` over a saved `datasets` folder of file paths (`to_iterable_dataset`).

Each child trains 3 steps of batch 2, no validation, one process, `--num-workers 0` (workers would have RSS of their
own). Prints a markdown table and writes `benchmarks/results/large_datasets.json`.

    OMP_NUM_THREADS=1 python benchmarks/large_datasets.py [--sizes 1000 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "large_datasets.json"
MODES = ("listed", "streaming (folder)", "streaming (datasets)")


def write_images(root: Path, count: int, size: int = 128, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    yy, xx = np.mgrid[:size, :size]
    for index in range(count):
        image = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        labels = np.zeros((size, size), np.uint8)
        for label in range(1, int(rng.integers(3, 7))):
            cy, cx, radius = *rng.integers(16, size - 16, 2), int(rng.integers(6, 14))
            region = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
            labels[region] = label
            image[region] = rng.integers(150, 255, 3)
        Image.fromarray(image).save(root / "images" / f"s{index:06d}.png", compress_level=1)
        Image.fromarray(labels).save(root / "masks" / f"s{index:06d}.png", compress_level=1)
    return root


def save_as_datasets(folder: Path, target: Path) -> Path:
    import datasets

    files = sorted((folder / "images").iterdir())
    rows = {"image": [str(p) for p in files], "mask": [str(folder / "masks" / p.name) for p in files]}
    datasets.Dataset.from_dict(rows).save_to_disk(target)
    return target


def child(mode: str, data: str, base: str, out: str) -> None:
    """One run in this process; prints a JSON line of its peaks."""
    from sam2_peft.recipes import runner
    from sam2_peft.recipes.lora import main as lora_recipe

    marks = {}
    build = runner.build_datasets

    def timed_build(*args, **kwargs):
        start = time.perf_counter()
        result = build(*args, **kwargs)
        marks["data_seconds"] = time.perf_counter() - start
        marks["peak_rss_after_data_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return result

    runner.build_datasets = timed_build
    flags = ["--model", base, "--data", data, "--output-dir", out, "--report-to", "none", "--batch-size", "2",
             "--lora-r", "4", "--max-steps", "3", "--num-workers", "0", "--num-panels", "0", "--log-every", "1"]  # fmt: skip
    flags += ["--val-fraction", "0"] if mode == "listed" else ["--streaming"]
    marks["rss_before_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    lora_recipe(flags)
    marks["total_seconds"] = time.perf_counter() - start
    marks["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(marks))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--child", nargs=4, metavar=("MODE", "DATA", "BASE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
        return
    from sam2_peft.models.loading import build_model_from_config, processor_for_image_size, tiny_config

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = tmp / "base"
        build_model_from_config(tiny_config(128), seed=0).save_pretrained(base)
        processor_for_image_size(128).save_pretrained(base)
        sources = {}
        for size in args.sizes:
            start = time.perf_counter()
            folder = write_images(tmp / f"folder{size}", size)
            sources[size] = {"folder": folder, "datasets": save_as_datasets(folder, tmp / f"hf{size}")}
            print(f"wrote {size} images in {time.perf_counter() - start:.0f} s", flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TQDM_DISABLE": "1"}
        for mode in MODES:
            for size in args.sizes:  # sizes alternate within a mode, so that a load change hits both
                data = sources[size]["datasets" if "datasets" in mode else "folder"]
                out = tmp / f"run-{len(rows)}"
                load = os.getloadavg()
                done = subprocess.run(
                    [sys.executable, __file__, "--child", mode, str(data), str(base), str(out)],
                    capture_output=True, text=True, env=env,
                )  # fmt: skip
                lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
                if done.returncode or not lines:
                    raise SystemExit(f"{mode} at {size} failed:\n{done.stderr[-3000:]}")
                rows.append({"mode": mode, "images": size, "load_average": load, **json.loads(lines[-1][7:])})
                print(json.dumps(rows[-1]), flush=True)
    result = {
        "rows": rows,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "cpu_count": os.cpu_count(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print("\n| source | images | peak RSS after data (MiB) | peak RSS after 3 steps (MiB) | data s | total s | load |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for row in rows:
        print(
            f"| {row['mode']} | {row['images']} | {row['peak_rss_after_data_mib']:.0f} | {row['peak_rss_mib']:.0f} | "
            f"{row['data_seconds']:.1f} | {row['total_seconds']:.1f} | {row['load_average'][0]:.2f} |"
        )


if __name__ == "__main__":
    main()
