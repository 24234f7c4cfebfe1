"""Recipe defaults measured on real data (nuclei, polyps), several seeds, compact-synthetic base: learning rate and
PTSAM token init per method (`--grid lr`), or decoder LoRA's loss resolution and dropout (`--grid loss`).

Every run is a subprocess of a recipe script; train and validation images are fixed across runs (validation: the last
32 ids in sorted order, written to a split file; training: the first N other images). Writes
benchmarks/results/method_defaults.json and prints a markdown table of fine-tuned Dice / boundary IoU per setting.

    OMP_NUM_THREADS=1 python benchmarks/method_defaults.py [--quick]
    OMP_NUM_THREADS=1 python benchmarks/method_defaults.py --grid loss --output benchmarks/results/loss_defaults.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SAM2_PEFT_DATA", "/work/shared/data"))
DATASETS = {"nuclei": ("nuclei-coelho2009", ".png", 16), "polyps": ("polyps-kvasir-seg", ".jpg", 32)}
VAL_IMAGES = 32


def loss_settings(quick: bool) -> list[tuple[str, str, list[str]]]:
    """Decoder LoRA at its default lr, one knob at a time from SAM 2's loss with dropout 0.1 on every target: where
    the mask loss is computed (full, native, points), LoRA dropout 0, and dropout 0.1 on the prompt tokens only."""
    points = [("full", "0.1", "all"), ("full", "0", "all"), ("native", "0.1", "all"), ("points", "0.1", "all"),
              ("full", "0.1", "tokens")]  # fmt: skip
    grid = [("lora_decoder", f"loss {resolution}, dropout {dropout}{' on tokens' if inputs == 'tokens' else ''}",
             ["--loss-resolution", resolution, "--lora-dropout", dropout, "--lora-dropout-inputs", inputs])
            for resolution, dropout, inputs in points]  # fmt: skip
    return grid[:2] if quick else grid


def settings(quick: bool) -> list[tuple[str, str, list[str]]]:
    """(method, setting label, recipe flags) of every grid point."""
    lora = ["2e-4", "2e-3", "2e-2"]
    partial = ["5e-6", "5e-5", "5e-4"]
    ptsam_lrs = ["1e-3", "1e-2", "1e-1"]
    inits = [("normal std 1", ["--token-init", "normal", "--token-init-std", "1.0"]),
             ("normal std 0.02", ["--token-init", "normal", "--token-init-std", "0.02"]),
             ("box", ["--token-init", "box"]), ("point", ["--token-init", "point"]),
             ("padding", ["--token-init", "padding"]),
             ("padding, 2 tokens", ["--token-init", "padding", "--num-tokens", "2"])]  # fmt: skip
    if quick:
        lora, partial, ptsam_lrs, inits = lora[1:2], partial[1:2], ptsam_lrs[1:2], inits[4:5]
    grid = [("lora_decoder", f"lr {lr}", ["--lr", lr]) for lr in lora]
    grid += [("partial_finetune", f"lr {lr}", ["--component-lr", f"mask_decoder={lr}", f"prompt_encoder={lr}"])
             for lr in partial]  # fmt: skip
    grid += [("ptsam_decoder", f"{name}, lr {lr}", [*flags, "--lr", lr]) for name, flags in inits for lr in ptsam_lrs]
    return grid


def split_file(name: str, folder: Path) -> Path:
    """A validation id list for `name`: its last VAL_IMAGES ids (sorted file stems)."""
    source, suffix, _ = DATASETS[name]
    ids = sorted(p.name.removesuffix(suffix) for p in (DATA / source / "images").iterdir())
    path = folder / f"{name}_val.txt"
    path.write_text("\n".join(ids[-VAL_IMAGES:]) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="One setting per method, one seed (a smoke run).")
    parser.add_argument("--grid", choices=("lr", "loss"), default="lr", help="Which defaults to measure.")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--only", default="", help="Run only settings whose 'method setting' label contains this.")
    parser.add_argument("--work-dir", default="/tmp/method_defaults")
    parser.add_argument("--reuse", action="store_true", help="Keep finished runs found in --work-dir.")
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results/method_defaults.json"))
    args = parser.parse_args()
    seeds = args.seeds[:1] if args.quick else args.seeds
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    runs, started = [], time.time()
    for dataset in args.datasets:
        source, _, train_images = DATASETS[dataset]
        val_file = split_file(dataset, work)
        for method, label, flags in (loss_settings if args.grid == "loss" else settings)(args.quick):
            if args.only not in f"{method} {label}":
                continue
            for seed in seeds:
                out = work / f"{dataset}-{method}-{label.replace(' ', '_').replace(',', '')}-s{seed}"
                command = [sys.executable, str(ROOT / "recipes" / f"{method}.py"), "--model", "compact-synthetic",
                           "--data", str(DATA / source), "--val-split-file", str(val_file),
                           "--train-images", str(train_images), "--max-steps", str(args.steps), "--eval-every", "100000",
                           "--seed", str(seed), "--output-dir", str(out), "--report-to", "none", "--num-panels", "0",
                           "--overwrite", *flags]  # fmt: skip
                t0 = time.time()
                if args.reuse and (out / "metrics.json").exists():
                    done = subprocess.CompletedProcess(command, 0)
                else:
                    done = subprocess.run(command, env=env, capture_output=True, text=True)
                record = {
                    "dataset": dataset,
                    "method": method,
                    "setting": label,
                    "seed": seed,
                    "seconds": time.time() - t0,
                }
                if done.returncode:
                    record["error"] = done.stderr[-500:]
                else:
                    metrics = json.loads((out / "metrics.json").read_text())
                    record.update(base=metrics["base"], fine_tuned=metrics["fine_tuned"])
                runs.append(record)
                print(f"{dataset} {method} {label} seed {seed}: {record.get('fine_tuned', {}).get('dice', 'ERROR')}",
                      file=sys.stderr, flush=True)  # fmt: skip
    result = {
        "command": " ".join(sys.argv), "grid": args.grid, "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "steps": args.steps, "seeds": seeds, "train_images": {k: v[2] for k, v in DATASETS.items()},
        "validation": f"last {VAL_IMAGES} sorted ids of each dataset", "seconds": time.time() - started, "runs": runs,
    }  # fmt: skip
    Path(args.output).write_text(json.dumps(result, indent=1))
    print(table(runs))


def table(runs: list[dict]) -> str:
    """Markdown: per method x setting and dataset, mean (min..max over seeds) of fine-tuned Dice and boundary IoU."""
    rows = ["| method | setting | dataset | base Dice | Dice mean (min..max) | boundary IoU mean (min..max) |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    keys = sorted({(r["method"], r["setting"], r["dataset"]) for r in runs}, key=lambda k: (k[0], k[2], k[1]))
    for method, setting, dataset in keys:
        group = [r for r in runs if (r["method"], r["setting"], r["dataset"]) == (method, setting, dataset)]
        ok = [r for r in group if "fine_tuned" in r]
        if not ok:
            rows.append(f"| {method} | {setting} | {dataset} | - | failed | failed |")
            continue
        cells = []
        for key in ("dice", "boundary_iou"):
            values = [r["fine_tuned"][key] for r in ok]
            cells.append(f"{sum(values) / len(values):.3f} ({min(values):.3f}..{max(values):.3f})")
        rows.append(f"| {method} | {setting} | {dataset} | {ok[0]['base']['dice']:.3f} | {cells[0]} | {cells[1]} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
