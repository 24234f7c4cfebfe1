"""Recipe defaults measured on real data (nuclei, polyps) and a synthetic domain-shift set, several seeds,
compact-synthetic base: learning rate and PTSAM token init per method (`--grid lr`), or decoder LoRA's loss resolution
and dropout (`--grid loss`).

Every run is a subprocess of a recipe script; train and validation images are fixed across runs and seeds
(validation: the last 32 ids in sorted order, written to a split file; training: the first N other images), so a seed
changes only the random draws of training: the adapter's initialisation (LoRA's A, PTSAM's tokens and encoder
prompts), the order of the training images, their augmentation, the objects and prompts drawn per image, and dropout.
Evaluation (tight boxes, or prompt-free for PTSAM) does not depend on it, so the base's score is one per dataset.

The domain-shift set is generated into the work folder at run time (`SHIFT_STYLE`, never committed). The JSON is
rewritten after every run, so a stopped grid keeps what it measured; the markdown summary (gain over the base: mean,
worst, runs ending below it) is printed at the end, or from a JSON alone with `--summarize`.

    OMP_NUM_THREADS=1 python benchmarks/method_defaults.py [--quick]
    OMP_NUM_THREADS=1 python benchmarks/method_defaults.py --grid loss --output benchmarks/results/loss_defaults.json
    python benchmarks/method_defaults.py --summarize benchmarks/results/method_defaults.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SAM2_PEFT_DATA", "/work/shared/data"))
SHIFT = "synthetic-shift"
DATASETS = {"nuclei": ("nuclei-coelho2009", ".png", 16), "polyps": ("polyps-kvasir-seg", ".jpg", 32),
            "shift": (SHIFT, ".png", 32)}  # fmt: skip
VAL_IMAGES = 32
SHIFT_SCENES, SHIFT_SEED = 64, 7
SHIFT_STYLE = {
    "grey_probability": 1.0, "shape_kinds": ("blob", "ellipse"), "object_radius": (0.03, 0.08), "min_objects": 8,
    "max_objects": 25, "min_object_area": 24, "texture_kinds": ("noise",), "background_kinds": ("noise",),
    "noise_probability": 1.0, "noise_std": 60.0, "blur_sigma": 3.0, "illumination_strength": 0.9,
}  # fmt: skip
"""Away from the base's pre-training scenes (colour, 3-15 objects of radius 6-24 % in five shapes and four textures,
noise std <= 4 levels on half the scenes, blur <= 1 px): grey only, 8-25 small blobs and ellipses (radius 3-8 %),
mottled objects on a mottled background, noise std up to 60 levels on every scene, blur up to 3 px, and a lighting
ramp up to 90 %. compact-synthetic's tight-box Dice there is 0.645 against 0.834 for "mask = box" (16 scenes), while
it beats the box on its own scenes (0.785 vs 0.701)."""


def loss_settings(quick: bool) -> list[tuple[str, str, list[str]]]:
    """Decoder LoRA at its default lr, one knob at a time from SAM 2's loss with dropout 0.1 on every target: where
    the mask loss is computed (full, native, points), LoRA dropout 0, and dropout 0.1 on the prompt tokens only."""
    points = [("full", "0.1", "all"), ("full", "0", "all"), ("native", "0.1", "all"), ("points", "0.1", "all"),
              ("full", "0.1", "tokens")]  # fmt: skip
    grid = [("lora_decoder", f"loss {resolution}, dropout {dropout}{' on tokens' if inputs == 'tokens' else ''}",
             ["--loss-resolution", resolution, "--lora-dropout", dropout, "--lora-dropout-inputs", inputs])
            for resolution, dropout, inputs in points]  # fmt: skip
    return grid[:2] if quick else grid


TOKEN_INITS = {"normal std 1": ["--token-init", "normal", "--token-init-std", "1.0"], "box": ["--token-init", "box"],
               "point": ["--token-init", "point"], "padding": ["--token-init", "padding"]}  # fmt: skip


def settings(quick: bool) -> list[tuple[str, str, list[str]]]:
    """(method, setting label, recipe flags) of every grid point, most telling first (a grid stopped early keeps
    those): decoder LoRA's rates, PTSAM decoder's with the padding init and its default now, partial fine-tuning's,
    PTSAM encoder's; then the other rates and token inits."""
    lora = [("lora_decoder", f"lr {lr}", ["--lr", lr]) for lr in ("1e-4", "5e-4", "2e-3")]
    ptsam = [("ptsam_decoder", f"{init}, lr {lr}", [*TOKEN_INITS[init], "--lr", lr])
             for init, lr in (("padding", "1e-2"), ("padding", "1e-3"), ("normal std 1", "1e-3"), ("padding", "3e-3"),
                              ("box", "1e-2"), ("point", "1e-2"), ("normal std 1", "1e-2"))]  # fmt: skip
    partial = [("partial_finetune", f"lr {lr}", ["--component-lr", f"mask_decoder={lr}", f"prompt_encoder={lr}"])
               for lr in ("1e-4", "3e-5", "1e-5")]  # fmt: skip
    encoder = [("ptsam_encoder", f"padding, lr {lr}", [*TOKEN_INITS["padding"], "--lr", lr])
               for lr in ("1e-2", "1e-3", "3e-3")]  # fmt: skip
    if quick:
        return [lora[2], ptsam[0], partial[0], encoder[0]]
    return [*lora, *ptsam[:4], *partial[:2], *encoder[:2], *ptsam[4:], partial[2], encoder[2]]


def dataset_folder(name: str, work: Path) -> Path:
    """Where `name`'s images/ and masks/ are: the shared data, or the shift set generated into `work`."""
    if name != "shift":
        return DATA / DATASETS[name][0]
    from sam2_peft.data.synthetic import SyntheticSceneConfig, write_scene_folder

    return write_scene_folder(work / SHIFT, SHIFT_SCENES, SHIFT_SEED, SyntheticSceneConfig(**SHIFT_STYLE))


def split_file(name: str, folder: Path, work: Path) -> Path:
    """A validation id list for `name`: its last VAL_IMAGES ids (sorted file stems)."""
    suffix = DATASETS[name][1]
    ids = sorted(p.name.removesuffix(suffix) for p in (folder / "images").iterdir())
    path = work / f"{name}_val.txt"
    path.write_text("\n".join(ids[-VAL_IMAGES:]) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="One setting per method, one seed (a smoke run).")
    parser.add_argument("--grid", choices=("lr", "loss"), default="lr", help="Which defaults to measure.")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--only", default="", help="Run only settings whose 'method setting' label contains this.")
    parser.add_argument("--work-dir", default="/tmp/method_defaults")
    parser.add_argument("--reuse", action="store_true", help="Keep finished runs found in --work-dir.")
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results/method_defaults.json"))
    parser.add_argument("--summarize", metavar="JSON", nargs="+", help="Only print the summary of results files.")
    args = parser.parse_args()
    if args.summarize:
        results = [json.loads(Path(path).read_text()) for path in args.summarize]
        for result in results:
            print(f"`python {result['command']}`: {len(result['runs'])} runs of {result['steps']} steps in "
                  f"{result['seconds'] / 60:.0f} min; at the end `{result['uptime']}`\n")  # fmt: skip
        runs = [run for result in results for run in result["runs"]]
        print(f"{summary(runs)}\n\n{table(runs)}")
        return
    seeds = args.seeds[:1] if args.quick else args.seeds
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    grid = [s for s in (loss_settings if args.grid == "loss" else settings)(args.quick)
            if args.only in f"{s[0]} {s[1]}"]  # fmt: skip
    folders = {name: dataset_folder(name, work) for name in args.datasets}
    val_files = {name: split_file(name, folder, work) for name, folder in folders.items()}
    result = {
        "command": shlex.join(sys.argv), "grid": args.grid, "steps": args.steps, "seeds": seeds,
        "train_images": {name: DATASETS[name][2] for name in args.datasets}, "shift_style": SHIFT_STYLE,
        "validation": f"last {VAL_IMAGES} sorted ids of each dataset", "runs": [],
    }  # fmt: skip
    started = time.time()
    # Method by method, every dataset and seed of a setting before the next, so a grid stopped early has whole rows.
    for method, label, flags in grid:
        for seed in seeds:
            for dataset in args.datasets:
                result["runs"].append(run(method, label, flags, dataset, seed, folders[dataset], val_files[dataset],
                                          work, args, env))  # fmt: skip
                result.update(seconds=time.time() - started, uptime=uptime())
                Path(args.output).write_text(json.dumps(result, indent=1))
    print(table(result["runs"]))
    print(summary(result["runs"]))


def run(method: str, label: str, flags: list[str], dataset: str, seed: int, folder: Path, val_file: Path, work: Path,
        args: argparse.Namespace, env: dict) -> dict:  # fmt: skip
    """One recipe run; its record with the base's and the fine-tuned metrics (or the error's last lines)."""
    out = work / f"{dataset}-{method}-{label.replace(' ', '_').replace(',', '')}-s{seed}"
    command = [sys.executable, str(ROOT / "recipes" / f"{method}.py"), "--model", "compact-synthetic",
               "--data", str(folder), "--val-split-file", str(val_file), "--train-images", str(DATASETS[dataset][2]),
               "--max-steps", str(args.steps), "--eval-every", "100000", "--seed", str(seed), "--output-dir", str(out),
               "--report-to", "none", "--num-panels", "0", "--overwrite", *flags]  # fmt: skip
    t0 = time.time()
    if args.reuse and (out / "metrics.json").exists():
        done = subprocess.CompletedProcess(command, 0)
    else:
        done = subprocess.run(command, env=env, capture_output=True, text=True)
    record = {"dataset": dataset, "method": method, "setting": label, "seed": seed, "seconds": time.time() - t0}
    if done.returncode:
        record["error"] = done.stderr[-500:]
    else:
        metrics = json.loads((out / "metrics.json").read_text())
        record.update(base=metrics["base"], fine_tuned=metrics["fine_tuned"])
    dice = record.get("fine_tuned", {}).get("dice", "ERROR")
    print(f"{dataset} {method} {label} seed {seed}: {dice} ({record['seconds']:.0f} s)", file=sys.stderr, flush=True)
    return record


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


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


def summary(runs: list[dict]) -> str:
    """Markdown: per method x setting, Dice gain over the base (fine-tuned minus base) over datasets x seeds: mean,
    worst, runs ending below the base, and each dataset's mean; * marks the setting the selection rule picks among
    those with all their runs: the fewest runs below the base (none, where a setting has none), then the best mean
    gain."""
    datasets = sorted({r["dataset"] for r in runs})
    rows = [f"| method | setting | runs | mean gain | worst gain | below base | {' | '.join(datasets)} |",
            "|---|---|---:|---:|---:|---:|" + "---:|" * len(datasets)]  # fmt: skip
    for method in sorted({r["method"] for r in runs}):
        stats = {}
        for setting in dict.fromkeys(r["setting"] for r in runs if r["method"] == method):
            ok = [r for r in runs if (r["method"], r["setting"]) == (method, setting) and "fine_tuned" in r]
            gains = [r["fine_tuned"]["dice"] - r["base"]["dice"] for r in ok]
            per_dataset = [[g for g, r in zip(gains, ok) if r["dataset"] == d] for d in datasets]
            failed = sum((r["method"], r["setting"]) == (method, setting) and "fine_tuned" not in r for r in runs)
            stats[setting] = (gains, per_dataset, failed)
        most = max(len(gains) for gains, _, _ in stats.values())  # settings with fewer runs are unfinished: no pick
        scored = {s: v for s, v in stats.items() if len(v[0]) == most and not v[2]}
        pick = min(scored, key=lambda s: (sum(g < 0 for g in scored[s][0]), -sum(scored[s][0])), default=None)
        for setting, (gains, per_dataset, failed) in stats.items():
            if not gains:
                rows.append(f"| {method} | {setting} | {failed} failed | | | |" + " |" * len(datasets))
                continue
            cells = [f"{sum(g) / len(g):+.3f} (n={len(g)})" if g else "-" for g in per_dataset]
            mark = " *" if setting == pick else ""
            runs_cell = f"{len(gains)}" + (f" + {failed} failed" if failed else "")
            rows.append(f"| {method} | {setting}{mark} | {runs_cell} | {sum(gains) / len(gains):+.3f} | "
                        f"{min(gains):+.3f} | {sum(g < 0 for g in gains)} | {' | '.join(cells)} |")  # fmt: skip
    return "\n".join(rows)


if __name__ == "__main__":
    main()
