"""Training speed and peak memory of sam2-peft's methods against the usual SAM 2 fine-tuning recipe, side by side.

Every row trains on the same images and box prompts (the bundled synthetic sample, augmentation off, batch 2,
`--objects` boxes per image). Each row runs in its own process so that peak memory is its own: CPU peak RSS
(`resource`), and on CUDA `torch.cuda.max_memory_allocated`. Warm-up steps are excluded from the timing; for the
cached rows the warm-up is the first epoch (every image encoded once), so their figure is the steady state of
epochs 2 and later.

"Usual recipe" re-implements the published Hugging Face SAM 2 fine-tuning notebook: every step runs
`model(pixel_values=..., input_boxes=..., multimask_output=False)` (the full image encoder included), a Dice + BCE
loss on `pred_masks` against the masks resized to the low-resolution output, Adam on the mask decoder only
(vision and prompt encoders frozen).

```bash
PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/train_speed.py --output benchmarks/results_cpu.json
PYTHONPATH=. python benchmarks/train_speed.py --device cuda --archs hiera-tiny hiera-small hiera-base-plus hiera-large
```
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

ROWS = (
    "usual-recipe",
    "lora-decoder-uncached",
    "lora-decoder-cached",
    "ptsam-decoder",
    "ptsam-encoder",
    "partial-decoder",
    "qlora-encoder",
    "video-clip",
)
CPU_ARCHS = ("tiny-random", "hiera-tiny-random")
CLIP_LEN = 4
"""Frames per clip in the video row (its images/s counts frames)."""
GPU_ARCHS = ("hiera-tiny", "hiera-small", "hiera-base-plus", "hiera-large")

# Backbone settings of Meta's sam2.1 configs (random weights here: speed and memory only).
_HIERA = {
    "hiera-tiny": dict(hidden_size=96, blocks_per_stage=[1, 2, 7, 2], num_attention_heads_per_stage=[1, 2, 4, 8],
                       global_attention_blocks=[5, 7, 9], window_positional_embedding_background_size=[7, 7]),
    "hiera-small": dict(hidden_size=96, blocks_per_stage=[1, 2, 11, 2], num_attention_heads_per_stage=[1, 2, 4, 8],
                        global_attention_blocks=[7, 10, 13], window_positional_embedding_background_size=[7, 7]),
    "hiera-base-plus": dict(hidden_size=112, blocks_per_stage=[2, 3, 16, 3],
                            num_attention_heads_per_stage=[2, 4, 8, 16], global_attention_blocks=[12, 16, 20],
                            window_positional_embedding_background_size=[14, 14]),
    "hiera-large": dict(hidden_size=144, blocks_per_stage=[2, 6, 36, 4], num_attention_heads_per_stage=[2, 4, 8, 16],
                        global_attention_blocks=[23, 33, 43], window_positional_embedding_background_size=[7, 7],
                        window_size_per_stage=[8, 4, 16, 8]),
}  # fmt: skip


def build_base(arch: str):
    """(model, processor) for a built-in random architecture or a 1024 px Hiera size with random weights."""
    from transformers import Sam2Config

    from sam2_peft.models.loading import (
        BUILTIN_ARCHITECTURES,
        build_model_from_config,
        load_base_model,
        processor_for_image_size,
    )

    if arch in BUILTIN_ARCHITECTURES:
        return load_base_model(arch)
    backbone = dict(_HIERA[arch])
    width = backbone["hidden_size"]
    backbone["embed_dim_per_stage"] = [width * 2**i for i in range(4)]
    config = Sam2Config(
        vision_config=dict(
            backbone_config=dict(model_type="sam2_hiera_det_model", **backbone),
            backbone_channel_list=[width * 2**i for i in range(4)][::-1],
        )
    )
    model = build_model_from_config(config)
    model.config._name_or_path = arch
    return model, processor_for_image_size(1024)


def method_for(row: str):
    """The tuning method of a row, or a string saying why it cannot run here."""
    from sam2_peft.adapters.methods import LoraMethod, PartialFinetuneMethod, PtsamMethod

    if row.startswith("lora-decoder"):
        return LoraMethod("decoder", lora_r=16, lora_alpha=32)
    if row == "partial-decoder":
        return PartialFinetuneMethod(learning_rates={"mask_decoder": 1e-5, "prompt_encoder": 1e-5})
    if row.startswith("ptsam"):
        return PtsamMethod(num_tokens=8, encoder_prompts=8 if row == "ptsam-encoder" else 0)
    if row == "qlora-encoder":
        return LoraMethod("encoder+decoder", lora_r=16, lora_alpha=32)
    if row == "video-clip":
        return LoraMethod("decoder+memory", lora_r=16, lora_alpha=32)
    raise ValueError(f"Unknown row {row}")


def video_clip(arch: str, method, dataset, args) -> list[float]:
    """Decoder + memory LoRA trained through `Sam2VideoTracker` on clips of `CLIP_LEN` frames, loss on the last."""
    from sam2_peft.models.loading import load_base_model
    from sam2_peft.models.video_forward import ClipPrompt, Sam2VideoTracker
    from sam2_peft.training.losses import sam2_loss

    if arch not in ("tiny-random", "hiera-tiny-random"):
        raise ValueError("video rows use the built-in architectures")
    model, _ = load_base_model(arch, video=True)
    model = method.prepare(model, arch).to(args.device).train()
    tracker = Sam2VideoTracker(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    items = [dataset[i] for i in range(CLIP_LEN)]
    frames = torch.stack([item["pixel_values"] for item in items]).to(args.device)
    prompt = ClipPrompt(points=items[0]["points"][:1].to(args.device), point_labels=items[0]["point_labels"][:1])
    target = items[0]["target_masks"][:1].to(args.device)
    times: list[float] = []
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        last = tracker(frames, prompt)[-1]
        loss = sam2_loss(last.mask_logits, last.iou_scores, last.object_score_logits, target).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times[args.warmup :]


def datasets(processor, images: int, objects: int):
    from sam2_peft.data.augment import AugmentationConfig
    from sam2_peft.data.config import SAMPLE_DATA
    from sam2_peft.data.dataset import DatasetConfig, SegmentationDataset
    from sam2_peft.data.sources import open_records
    from sam2_peft.data.validation import ValidationConfig, clean_instances

    config = DatasetConfig(max_objects_per_image=objects, augmentation=AugmentationConfig(enabled=False))
    records = [
        r
        for r in open_records(str(SAMPLE_DATA))
        if len(clean_instances(r.load_instances(), ValidationConfig())) >= objects
    ][:images]
    return SegmentationDataset(records, processor, config, train=True, seed=0)


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def usual_recipe(model, dataset, args) -> list[float]:
    """The notebook's loop: full forward with input_boxes every step, Dice + BCE on pred_masks, decoder-only Adam."""
    device = torch.device(args.device)
    model = model.to(device).train()
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("mask_decoder."))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0)
    from sam2_peft.data.dataset import collate_segmentation

    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, collate_fn=collate_segmentation)
    times: list[float] = []
    while len(times) < args.warmup + args.steps:
        start = time.perf_counter()
        for batch in loader:
            images = len(batch["sample_ids"])
            boxes = batch["points"].reshape(images, -1, 4).to(device)
            outputs = model(pixel_values=batch["pixel_values"].to(device), input_boxes=boxes, multimask_output=False)
            logits = outputs.pred_masks[:, :, 0]
            targets = F.interpolate(batch["target_masks"].float()[:, None], size=logits.shape[-2:], mode="nearest")
            targets = targets.reshape(logits.shape).to(device)
            probs = logits.sigmoid()
            dice = 1 - (2 * (probs * targets).sum((-2, -1)) + 1e-5) / (
                (probs**2).sum((-2, -1)) + (targets**2).sum((-2, -1)) + 1e-5
            )
            loss = dice.mean() + F.binary_cross_entropy_with_logits(logits, targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            start = time.perf_counter()
            if len(times) >= args.warmup + args.steps:
                break
    return times[args.warmup :]


def toolkit(row: str, method, model, processor, dataset, args) -> list[float]:
    """sam2-peft's own Trainer (cache on or off), timing each optimizer step from the trainer's history."""
    from sam2_peft.training.config import TrainingConfig
    from sam2_peft.training.tasks import ImageSegmentationTask
    from sam2_peft.training.trainer import Trainer

    cached = row != "lora-decoder-uncached"
    warmup = args.warmup + (-(-len(dataset) // args.batch_size) if cached else 0)
    with tempfile.TemporaryDirectory() as output:
        config = TrainingConfig(
            output_dir=output,
            max_steps=warmup + args.steps,
            batch_size=args.batch_size,
            log_every=1,
            eval_every=10**9,
            report_to="none",
            cache_embeddings=cached,
            mixed_precision=args.mixed_precision,
        )
        trainer = Trainer(model.to(args.device), method, ImageSegmentationTask(dataset), config, base_name=row)
        trainer.train()
        times = [h["seconds_per_step"] for h in trainer.state.history if "seconds_per_step" in h]
    return times[warmup:]


def worker(args) -> dict:
    """Measure one (architecture, row) in this process and return its figures."""
    torch.manual_seed(0)
    method = None if args.row == "usual-recipe" else method_for(args.row)
    if isinstance(method, str):
        return {"status": "skipped", "reason": method}
    if args.row == "qlora-encoder" and args.device != "cuda":
        return {"status": "skipped", "reason": "GPU only"}
    model, processor = build_base(args.arch)
    if args.row == "qlora-encoder":
        from sam2_peft.models.quantization import quantize_image_encoder

        quantize_image_encoder(model.to(args.device), "4bit")
    dataset = datasets(processor, args.images, args.objects)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    images_per_step = args.batch_size
    if args.row == "usual-recipe":
        times = usual_recipe(model, dataset, args)
    elif args.row == "video-clip":
        times, images_per_step = video_clip(args.arch, method, dataset, args), CLIP_LEN
    else:
        times = toolkit(args.row, method, model, processor, dataset, args)
    return {
        "status": "measured",
        "images_per_second": images_per_step * len(times) / sum(times),
        "seconds_per_step": sum(times) / len(times),
        "peak_memory_mb": peak_memory_mb(args.device),
        "steps_timed": len(times),
    }


def run_row(arch: str, row: str, args) -> dict:
    command = [sys.executable, __file__, "--worker", arch, row, *_shared_flags(args)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"status": "failed", "reason": (done.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(lines[-1])


def _shared_flags(args) -> list[str]:
    return [
        f"--device={args.device}",
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--images={args.images}",
        f"--objects={args.objects}",
        f"--batch-size={args.batch_size}",
        f"--mixed-precision={args.mixed_precision}",
    ]


def table(results: list[dict]) -> str:
    header = f"{'arch':<18} {'row':<22} {'img/s':>8} {'peak MB':>9} {'speed x':>8} {'mem ratio':>9}  note"
    lines = [header, "-" * len(header)]
    for r in results:
        if r["status"] == "measured":
            speed = f"{r['speed_ratio']:.1f}" if "speed_ratio" in r else ""
            memory = f"{r['memory_ratio']:.2f}" if "memory_ratio" in r else ""
            lines.append(
                f"{r['arch']:<18} {r['row']:<22} {r['images_per_second']:>8.2f} {r['peak_memory_mb']:>9.0f} "
                f"{speed:>8} {memory:>9}"
            )
        else:
            lines.append(
                f"{r['arch']:<18} {r['row']:<22} {'-':>8} {'-':>9} {'':>8} {'':>9}  {r['status']}: {r['reason']}"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("ARCH", "ROW"), help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--archs", nargs="+", default=None, help=f"CPU: {CPU_ARCHS}; CUDA: {GPU_ARCHS}.")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--steps", type=int, default=6, help="Timed optimizer steps per row.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed steps (plus the first epoch when cached).")
    parser.add_argument("--images", type=int, default=4, help="Training images (the cache holds all of them).")
    parser.add_argument("--objects", type=int, default=4, help="Box prompts per image.")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    parser.add_argument("--output", default="benchmarks/train_speed.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.worker:
        args.arch, args.row = args.worker
        print(json.dumps(worker(args)))
        return
    archs = args.archs or (GPU_ARCHS if args.device == "cuda" else CPU_ARCHS)
    results = []
    for arch in archs:
        reference = None
        for row in args.rows:
            result = {"arch": arch, "row": row, **run_row(arch, row, args)}
            if row == "usual-recipe" and result["status"] == "measured":
                reference = result
            elif reference is not None and result["status"] == "measured":
                result["speed_ratio"] = result["images_per_second"] / reference["images_per_second"]
                result["memory_ratio"] = result["peak_memory_mb"] / reference["peak_memory_mb"]
            results.append(result)
            print(table([result]).splitlines()[-1], flush=True)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or 'cpu'}"
    report = {
        "device": device,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "settings": {k: v for k, v in vars(args).items() if k not in ("worker",)},
        "results": results,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(table(results))
    print(f"\nwritten to {args.output}")


if __name__ == "__main__":
    main()
