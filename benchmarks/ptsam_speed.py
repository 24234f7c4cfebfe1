"""PTSAM adapter size, trainable parameters and training-step time (model only, no data loading) on this machine.

```bash
PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/ptsam_speed.py --steps 3
```
One prompt-free step = encoder + decoder forward on `--batch` random images, the foundation loss on a random
semantic target, backward and an AdamW step, exactly as the trainer runs it.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

import sam2_peft  # noqa: F401
from sam2_peft.models.loading import BUILTIN_ARCHITECTURES, build_model_from_config, builtin_config
from sam2_peft.models.segmenter import Sam2Segmenter
from sam2_peft.training.losses import LossConfig, sam2_loss
from sam2_peft.tuners.ptsam import PtsamMethod

SETTINGS = {"decoder": PtsamMethod(), "decoder+encoder": PtsamMethod(encoder_prompts=8)}


def measure(arch: str, method: PtsamMethod, steps: int, batch: int) -> dict:
    spec = BUILTIN_ARCHITECTURES[arch]
    model = method.prepare(build_model_from_config(builtin_config(spec.name)), arch).train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with tempfile.TemporaryDirectory() as folder:
        method.save(model, folder, arch)
        adapter_bytes = (Path(folder) / "adapter_model.safetensors").stat().st_size
    segmenter = Sam2Segmenter(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    pixels = torch.randn(batch, 3, spec.image_size, spec.image_size)
    target = torch.rand(batch, spec.image_size, spec.image_size) > 0.5
    index = torch.arange(batch)
    durations = []
    for _ in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        output = segmenter(index, pixel_values=pixels)
        loss = sam2_loss(output.mask_logits, output.iou_scores, output.object_score_logits, target, LossConfig())
        loss.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        durations.append(time.perf_counter() - start)
    return {
        "architecture": arch,
        "setting": "decoder tokens" if not method.encoder_prompts else f"+ {method.encoder_prompts} encoder prompts",
        "trainable_parameters": trainable,
        "adapter_bytes": adapter_bytes,
        "seconds_per_step": sorted(durations[1:])[len(durations[1:]) // 2],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1, help="Images per step.")
    parser.add_argument("--json", default=None, help="Also write the rows to this file.")
    args = parser.parse_args()
    rows = [measure(a, m, args.steps, args.batch) for a in BUILTIN_ARCHITECTURES for m in SETTINGS.values()]
    print(f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, batch {args.batch}")
    print("| architecture | setting | trainable | adapter file | s / step |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['architecture']} | {r['setting']} | {r['trainable_parameters']:,} | "
            f"{r['adapter_bytes']:,} B | {r['seconds_per_step']:.3f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
