"""The GPU suite: training steps in fp32 / fp16 / bf16, QLoRA, hiera-large at batch 8 and predictor throughput, in
one command that stops within 8 minutes on one GPU and writes JSON.

Every measurement builds its model with random weights (speed and memory only; `train_speed.build_base`), trains or
predicts on synthetic inputs (random pixels, `--objects` box prompts per image with rectangle targets), and gets its
own time budget: timed steps stop when the budget is used (after at least one), a measurement still running at twice
its budget is interrupted, and one that cannot start before the total deadline is skipped, so the whole suite ends
within `--deadline` seconds (default 450: 7.5 minutes). Results are written after every measurement, so a suite
that is killed still leaves what it measured.

| measurement | what |
|---|---|
| `train-{fp32,fp16,bf16}` | decoder LoRA (r 16) training step through `Sam2Segmenter` + `sam2_loss` + AdamW, encoder frozen and re-run every step; fp16 with a gradient scaler, bf16 under autocast |
| `train-ptsam-bf16`, `train-partial-bf16` | the same step with PTSAM decoder tokens and with partial fine-tuning of the decoder |
| `lora-encoder-bf16` / `qlora-4bit-bf16` | LoRA on encoder + decoder, the encoder in its dtype / in 4-bit NF4 (`quantize_image_encoder`, bitsandbytes; CUDA only): step time and peak memory |
| `large-decoder-lora-b8-{fp32,bf16}` | hiera-large, decoder LoRA, batch 8: peak memory (`torch.cuda.max_memory_allocated`) and step time |
| `predictor-{fp32,fp16,bf16}` | `Sam2PeftPredictor.predict` on uint8 images with box prompts: images/s |

```bash
PYTHONPATH=. python benchmarks/gpu_suite.py                     # on a GPU: benchmarks/results/gpu_suite.json
PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/gpu_suite.py --device cpu --quick   # every non-CUDA code path
```

`--quick` uses the tiny built-in architecture (256 px) everywhere (hiera-large's row runs it at batch 8 too, as a
stand-in) and a few steps; on CPU, fp16 rows and QLoRA are skipped with the reason, and peak memory is the
process's peak RSS so far (not per measurement).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import signal
import statistics
import sys
import time
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import build_base  # noqa: E402  (the one builder of the benchmark architectures)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Settings:
    """What one suite run measures; `for_run` picks the full GPU settings or the quick ones."""

    device: str
    arch: str = "hiera-tiny"
    large_arch: str = "hiera-large"
    batch_size: int = 4
    large_batch_size: int = 8
    objects: int = 4
    steps: int = 10
    warmup: int = 2
    budget_s: float = 45.0
    large_budget_s: float = 75.0
    predictor_images: int = 16
    deadline_s: float = 450.0
    grace_s: float = 30.0
    """A measurement is interrupted at twice its budget plus this (model building and warm-up included)."""

    @classmethod
    def for_run(cls, device: str, quick: bool, deadline_s: float | None) -> Settings:
        if quick:
            settings = cls(
                device,
                arch="tiny-random",
                large_arch="tiny-random",
                batch_size=2,
                objects=2,
                steps=2,
                warmup=1,
                budget_s=20.0,
                large_budget_s=20.0,
                predictor_images=4,
                deadline_s=240.0,
            )
        else:
            settings = cls(device)
        if deadline_s is not None:
            settings.deadline_s = deadline_s
        return settings


@dataclass
class Measurement:
    name: str
    kind: str  # "train" or "predict"
    arch: str
    batch_size: int
    precision: str
    method: str = "lora-decoder"
    quantize: str | None = None
    budget_s: float = 45.0


def measurements(settings: Settings) -> list[Measurement]:
    s = settings
    train = [
        Measurement(f"train-{p}", "train", s.arch, s.batch_size, p, budget_s=s.budget_s)
        for p in ("fp32", "fp16", "bf16")
    ]
    train += [
        Measurement("train-ptsam-bf16", "train", s.arch, s.batch_size, "bf16", "ptsam", budget_s=s.budget_s),
        Measurement("train-partial-bf16", "train", s.arch, s.batch_size, "bf16", "partial", budget_s=s.budget_s),
        Measurement("lora-encoder-bf16", "train", s.arch, s.batch_size, "bf16", "lora-encoder", budget_s=s.budget_s),
        Measurement(
            "qlora-4bit-bf16", "train", s.arch, s.batch_size, "bf16", "lora-encoder", "4bit", budget_s=s.budget_s
        ),
    ]
    large = [
        Measurement(
            f"large-decoder-lora-b8-{p}", "train", s.large_arch, s.large_batch_size, p, budget_s=s.large_budget_s
        )
        for p in ("fp32", "bf16")
    ]
    predict = [
        Measurement(f"predictor-{p}", "predict", s.arch, 8, p, budget_s=s.budget_s) for p in ("fp32", "fp16", "bf16")
    ]
    return train + large + predict


def skip_reason(m: Measurement, device: str) -> str | None:
    """Why a measurement cannot run on `device` (None: it can)."""
    if device == "cuda":
        if m.precision == "bf16" and not torch.cuda.is_bf16_supported():
            return "this GPU has no bfloat16 support"
        return None
    if m.quantize:
        return (
            "QLoRA is measured on CUDA only (bitsandbytes' CPU 4-bit kernels are not what QLoRA users run); "
            "tests/test_gpu_suite.py runs this code path on CPU"
        )
    if m.precision == "fp16" and m.kind == "predict":
        return "fp16 autocast is a CUDA path; CPU mixed precision is bf16"
    if m.precision == "fp16":
        return "fp16 (autocast + gradient scaling) is a CUDA path, CPU mixed precision is bf16; tests run it on CPU"
    return None


class MeasurementTimeout(Exception):
    """A measurement ran past its hard limit."""


@contextmanager
def hard_limit(seconds: float):
    """Interrupt the block (between Python operations) after `seconds`."""

    def stop(_signum, _frame):
        raise MeasurementTimeout(f"interrupted after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def synthetic_batch(images: int, objects: int, size: int, device: torch.device, seed: int = 0) -> dict:
    """Random `(B, 3, S, S)` pixels, `objects` boxes per image as corner points, their rectangles as targets."""
    generator = torch.Generator().manual_seed(seed)
    corners = torch.rand(images * objects, 2, 2, generator=generator) * size
    low, high = corners.min(dim=1).values, corners.max(dim=1).values
    high = torch.maximum(high, low + size / 16).clamp(max=size - 1)
    points = torch.stack([low, high], dim=1)
    grid = torch.arange(size)
    inside_x = (grid[None] >= low[:, :1]) & (grid[None] <= high[:, :1])
    inside_y = (grid[None] >= low[:, 1:]) & (grid[None] <= high[:, 1:])
    targets = inside_y[:, :, None] & inside_x[:, None, :]
    return {
        "pixel_values": torch.randn(images, 3, size, size, generator=generator).to(device),
        "object_image_index": torch.arange(images).repeat_interleave(objects).to(device),
        "points": points.to(device),
        "point_labels": torch.tensor([[2, 3]]).expand(len(points), 2).to(device),
        "targets": targets.to(device),
    }


def method_for(name: str):
    from sam2_peft.adapters.methods import LoraMethod, PartialFinetuneMethod, PtsamMethod

    if name == "lora-decoder":
        return LoraMethod("decoder", lora_r=16, lora_alpha=32)
    if name == "lora-encoder":
        return LoraMethod("encoder+decoder", lora_r=16, lora_alpha=32)
    if name == "ptsam":
        return PtsamMethod(num_tokens=8)
    if name == "partial":
        return PartialFinetuneMethod(learning_rates={"mask_decoder": 1e-5, "prompt_encoder": 1e-5})
    raise ValueError(f"unknown method {name}")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_training(m: Measurement, settings: Settings, device: torch.device, started: float) -> dict:
    """Time training steps of `m.method` at `m.precision`; the first `settings.warmup` steps are not timed."""
    from sam2_peft.models.loading import model_image_size
    from sam2_peft.models.segmenter import Sam2Segmenter
    from sam2_peft.training.losses import sam2_loss

    model, _ = build_base(m.arch)
    extra: dict = {}
    if m.quantize:
        from sam2_peft.models.quantization import quantize_image_encoder

        report = quantize_image_encoder(model.to(device), m.quantize)
        extra["quantized_layers"] = len(report.quantized)
        extra["unquantized_layers"] = len(report.skipped)
        extra["encoder_mb"] = [report.bytes_before / 2**20, report.bytes_after / 2**20]
    method = method_for(m.method)
    model = method.prepare(model, m.arch).to(device).train()
    extra["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    segmenter = Sam2Segmenter(model)
    optimizer = torch.optim.AdamW(method.parameter_groups(model, lr=1e-4, weight_decay=0.0))
    scaler = torch.amp.GradScaler(device.type, enabled=m.precision == "fp16")
    batch = synthetic_batch(m.batch_size, settings.objects, model_image_size(model), device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for step in range(settings.warmup + settings.steps):
        synchronize(device)
        start = time.perf_counter()
        with autocast(device, m.precision):
            out = segmenter(
                batch["object_image_index"],
                pixel_values=batch["pixel_values"],
                points=batch["points"],
                point_labels=batch["point_labels"],
            )
        loss = sam2_loss(out.mask_logits, out.iou_scores, out.object_score_logits, batch["targets"]).loss
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        synchronize(device)
        losses.append(float(loss.detach()))
        if step >= settings.warmup:
            times.append(time.perf_counter() - start)
            if sum(times) > m.budget_s:
                break
    return {
        "seconds_per_step": statistics.median(times),
        "step_seconds": times,
        "images_per_second": m.batch_size / statistics.median(times),
        "prompts_per_step": m.batch_size * settings.objects,
        "losses_finite": bool(np.isfinite(losses).all()),
        "peak_memory_mb": peak_memory_mb(device),
        **extra,
    }


def run_predictor(m: Measurement, settings: Settings, device: torch.device, started: float) -> dict:
    """Images per second of `Sam2PeftPredictor.predict` (batch `m.batch_size`, `settings.objects` boxes each)."""
    from sam2_peft.inference.predictor import Sam2PeftPredictor

    model, processor = build_base(m.arch)
    dtype = None if m.precision == "fp32" else DTYPES[m.precision]
    predictor = Sam2PeftPredictor(model, processor, dtype=dtype, device=device, batch_size=m.batch_size)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (768, 1024, 3), dtype=np.uint8) for _ in range(settings.predictor_images)]
    boxes = []
    for _ in images:
        x0, y0 = rng.uniform(0, 600, 2)
        boxes.append(np.array([[x0, y0, x0 + 300, y0 + 150]] * settings.objects, np.float32))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    predictor.predict(images[: m.batch_size], boxes=boxes[: m.batch_size])  # warm-up
    times = []
    while not times or sum(times) < m.budget_s / 2:
        synchronize(device)
        start = time.perf_counter()
        predictions = predictor.predict(images, boxes=boxes)
        synchronize(device)
        times.append(time.perf_counter() - start)
        if len(times) >= 3:
            break
    assert len(predictions) == len(images) and predictions[0].masks.shape == (settings.objects, 768, 1024)
    return {
        "images_per_second": len(images) / statistics.median(times),
        "call_seconds": times,
        "images_per_call": len(images),
        "peak_memory_mb": peak_memory_mb(device),
    }


def run_one(m: Measurement, settings: Settings, device: torch.device, started: float) -> dict:
    """One measurement with its budget and the suite's deadline; never raises."""
    reason = skip_reason(m, device.type)
    if reason:
        return {"status": "skipped", "reason": reason}
    left = settings.deadline_s - (time.perf_counter() - started)
    if left < min(m.budget_s, 30.0):
        return {"status": "skipped", "reason": f"suite deadline: {left:.0f} s left of {settings.deadline_s:.0f}"}
    begin = time.perf_counter()
    try:
        with hard_limit(min(2 * m.budget_s + settings.grace_s, left)):
            runner = run_training if m.kind == "train" else run_predictor
            result = {"status": "measured", **runner(m, settings, device, started)}
    except MeasurementTimeout as err:
        result = {"status": "timed out", "reason": str(err)}
    except torch.cuda.OutOfMemoryError as err:
        result = {"status": "failed", "reason": f"out of memory: {str(err).splitlines()[0][:200]}"}
    except Exception as err:  # a suite records a broken row and goes on
        result = {
            "status": "failed",
            "reason": f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}",
            "traceback": traceback.format_exc()[-2000:],
        }
    result["wall_seconds"] = time.perf_counter() - begin
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def environment(device: torch.device) -> dict:
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
    }
    try:
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        info["bitsandbytes"] = None
    return info


def table(results: list[dict]) -> str:
    lines = [
        "| measurement | arch | batch | status | s / step | images / s | peak MB | note |",
        "|---|---|---:|---|---:|---:|---:|---|",
    ]
    for r in results:
        step = f"{r['seconds_per_step']:.3f}" if "seconds_per_step" in r else ""
        rate = f"{r['images_per_second']:.2f}" if "images_per_second" in r else ""
        peak = f"{r['peak_memory_mb']:.0f}" if "peak_memory_mb" in r else ""
        note = r.get("reason", "")
        if "losses_finite" in r and not r["losses_finite"]:
            note = "non-finite loss"
        if "quantized_layers" in r:
            note = f"{r['quantized_layers']} layers 4-bit, {r['unquantized_layers']} kept; encoder MB {r['encoder_mb']}"
        lines.append(
            f"| {r['name']} | {r['arch']} | {r['batch_size']} | {r['status']} | {step} | {rate} | {peak} | {note} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="Tiny architecture and few steps (any device).")
    parser.add_argument("--deadline", type=float, default=None, help="Total seconds (default 450, quick 240).")
    parser.add_argument("--only", nargs="+", default=None, help="Run only these measurements (names as listed).")
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/gpu_suite[...].json).")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: run with --device cpu --quick to check the code paths")
    device = torch.device(args.device)
    settings = Settings.for_run(args.device, args.quick, args.deadline)
    output = Path(
        args.output
        or f"benchmarks/results/gpu_suite{'' if args.device == 'cuda' else '_cpu'}{'_quick' * args.quick}.json"
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    todo = [m for m in measurements(settings) if args.only is None or m.name in args.only]
    report = {
        "command": " ".join(["python", "benchmarks/gpu_suite.py", *(argv if argv is not None else sys.argv[1:])]),
        "settings": asdict(settings),
        "environment": environment(device),
        "results": [],
    }
    for m in todo:
        result = {"name": m.name, "arch": m.arch, "batch_size": m.batch_size, "precision": m.precision}
        result.update(run_one(m, settings, device, started))
        report["results"].append(result)
        report["total_seconds"] = time.perf_counter() - started
        output.write_text(json.dumps(report, indent=2) + "\n")
        print(table([result]).splitlines()[-1], flush=True)
    print()
    print(table(report["results"]))
    print(f"\ntotal {report['total_seconds']:.0f} s (deadline {settings.deadline_s:.0f} s); written to {output}")
    return report


if __name__ == "__main__":
    main()
