"""onnxruntime (fp32 and int8) against PyTorch on the CPU for an exported SAM 2 with a merged decoder LoRA: the image
encoder per image and the prompt encoder + mask decoder per call at 1 and 16 box prompts, interleaved rounds, medians;
and the peak resident memory of a fresh process that loads each variant and runs it once (encoder, 16 boxes).

Random weights (the speed does not depend on them); the hiera-tiny architecture (transformers' `Sam2Config()`
defaults, 1024 px). Each timed call is the model alone (no image resizing or mask post-processing); torch and
onnxruntime get the same number of threads.

    OMP_NUM_THREADS=1 python benchmarks/export_speed.py
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from train_speed import build_base

ROOT = Path(__file__).resolve().parents[1]


def timed(calls: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each entry of `calls`, interleaved A B C A B C ... (one warm-up round first)."""
    times = {name: [] for name in calls}
    for round_ in range(rounds + 1):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if round_:
                times[name].append(time.perf_counter() - start)
    return times


def peak_rss(variant: str, folder: Path, torch_dir: Path, threads: int, boxes: torch.Tensor, queue) -> None:
    """In a fresh process: load `variant` ("torch", "fp32", "int8", or "none": imports alone), run the encoder once
    and the decoder once on `boxes`, and put the process's peak resident memory (MiB), its resident memory after
    the imports, and the difference on `queue`."""
    from transformers import Sam2Model

    from sam2_peft.export import OnnxSam2Model

    torch.set_num_threads(threads)
    before = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    if variant != "none":
        model = Sam2Model.from_pretrained(torch_dir).eval() if variant == "torch" else None
        model = model or OnnxSam2Model(folder, variant, threads=threads)
        size = int(json.loads((folder / "export.json").read_text())["image_size"])
        with torch.no_grad():
            embeddings = model.get_image_embeddings(torch.zeros(1, 3, size, size))
            model(image_embeddings=embeddings, input_boxes=boxes, multimask_output=False)
    # VmHWM, not getrusage's ru_maxrss: that one keeps the parent's peak across the fork + exec of a spawn
    peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024
    queue.put({"peak": peak, "after_imports": before, "added": peak - before})


def measure_memory(folder: Path, torch_dir: Path, threads: int, boxes: torch.Tensor) -> dict[str, dict]:
    """Peak RSS (MiB) of each variant, each in its own spawned process (so one's memory is not another's)."""
    context = multiprocessing.get_context("spawn")
    peaks = {}
    for variant in ("none", "torch", "fp32", "int8"):
        queue = context.Queue()
        process = context.Process(target=peak_rss, args=(variant, folder, torch_dir, threads, boxes, queue))
        process.start()
        peaks[variant] = queue.get()
        process.join()
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="hiera-tiny")
    parser.add_argument("--prompts", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 1)))
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results/export_speed.json"))
    args = parser.parse_args()
    from sam2_peft.adapters.methods import LoraMethod
    from sam2_peft.export import ExportOptions, OnnxSam2Model, export_model

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    base, processor = build_base(args.arch)
    model = LoraMethod("decoder").prepare(base, args.arch).eval()
    with torch.no_grad():  # a trained adapter: non-zero B matrices
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    model = model.merge_and_unload().eval()
    folder = Path(tempfile.mkdtemp(prefix="export-speed-"))
    torch_dir = Path(tempfile.mkdtemp(prefix="export-speed-torch-"))
    model.save_pretrained(torch_dir)  # for the memory of the PyTorch variant, loaded in its own process
    start = time.perf_counter()
    record = export_model(
        model, processor, folder, ExportOptions(quantize="int8", overwrite=True), {"model": args.arch}
    )
    export_s = time.perf_counter() - start
    runtimes = {variant: OnnxSam2Model(folder, variant, threads=args.threads) for variant in ("fp32", "int8")}
    size = int(base.config.prompt_encoder_config.image_size)
    image = np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        embeddings = model.get_image_embeddings(pixels)
    report = {"command": "python benchmarks/export_speed.py " + " ".join(os.sys.argv[1:]), "arch": args.arch,
              "threads": args.threads, "rounds": args.rounds, "export_s": export_s, "parity": record["parity"],
              "graph_mb": {v: {g: (folder / f).stat().st_size / 2**20 for g, f in graphs.items()}
                           for v, graphs in record["graphs"].items()},
              "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()), "rows": []}  # fmt: skip

    def encode_torch():
        with torch.no_grad():
            model.get_image_embeddings(pixels)

    calls = {"torch": encode_torch, **{v: (lambda r=r: r.get_image_embeddings(pixels)) for v, r in runtimes.items()}}
    times = timed(calls, args.rounds)
    report["rows"].append({"part": "encoder", "prompts": None, "times_s": times})
    rng = np.random.default_rng(1)
    for count in args.prompts:
        corners = rng.integers(0, size // 2, (count, 2))
        boxes = np.concatenate([corners, corners + rng.integers(16, size // 2, (count, 2))], axis=1)
        boxes = torch.tensor(boxes[None], dtype=torch.float32)

        def decode_torch():
            with torch.no_grad():
                model(image_embeddings=embeddings, input_boxes=boxes, multimask_output=False)

        calls = {"torch": decode_torch}
        calls |= {v: (lambda r=r: r(image_embeddings=embeddings, input_boxes=boxes)) for v, r in runtimes.items()}
        report["rows"].append({"part": "decoder", "prompts": count, "times_s": timed(calls, args.rounds)})
    for row in report["rows"]:
        row["medians_ms"] = {name: 1e3 * statistics.median(t) for name, t in row["times_s"].items()}
        print(row["part"], row["prompts"], {k: round(v, 1) for k, v in row["medians_ms"].items()}, flush=True)
    report["peak_rss_mib"] = measure_memory(folder, torch_dir, args.threads, boxes)
    print("peak RSS MiB", {k: {n: round(x) for n, x in v.items()} for k, v in report["peak_rss_mib"].items()})
    report["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
