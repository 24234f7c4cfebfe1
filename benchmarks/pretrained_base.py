"""Does a base model segment? Tight-box IoU against the trivial "mask = the box" baseline, on the synthetic
validation scenes and on the real datasets of the shared folder (skipped when absent).

This is the bar of the shipped test base `compact-synthetic`; it scores any `--model` the recipes accept:

```bash
PYTHONPATH=. python benchmarks/pretrained_base.py --model compact-synthetic \
    --json benchmarks/results/compact_synthetic_bar.json
```
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import Sam2Model, Sam2Processor

from sam2_peft.data.config import SAMPLE_DATA
from sam2_peft.data.dataset import DatasetConfig, SegmentationDataset, collate_segmentation
from sam2_peft.data.prompts import PromptConfig
from sam2_peft.data.sources import open_records
from sam2_peft.data.validation import ValidationConfig, validate_records
from sam2_peft.evaluation.runner import box_baseline_metrics, evaluate_segmenter
from sam2_peft.models.loading import load_base_model
from sam2_peft.models.segmenter import Sam2Segmenter

SHARED_DATA = Path(os.environ.get("SAM2_PEFT_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
SYNTHETIC_VALIDATION = "synthetic:32:1000000"
"""The pre-training recipe's held-out scenes (seed 1000000; training uses seeds 0 and 1)."""


def sources(polyp_images: int) -> dict[str, tuple[str, int | None]]:
    found = {"synthetic validation": (SYNTHETIC_VALIDATION, None), "bundled sample": (str(SAMPLE_DATA), None)}
    for name, limit in (("nuclei-coelho2009", None), ("polyps-kvasir-seg", polyp_images)):
        if (SHARED_DATA / name).is_dir():
            found[name] = (str(SHARED_DATA / name), limit)
        else:
            print(f"skipped {name}: not found at {SHARED_DATA / name} (set SAM2_PEFT_DATA)")
    return found


def score(model: Sam2Model, processor: Sam2Processor, spec: str, limit: int | None, batch_size: int) -> dict:
    """Box-prompted metrics of the model and of the box itself, on the same objects."""
    records, _ = validate_records(open_records(spec)[:limit], ValidationConfig())
    dataset = SegmentationDataset(records, processor, DatasetConfig(prompts=PromptConfig(prompt="box")), train=False)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_segmentation)
    model_metrics = evaluate_segmenter(Sam2Segmenter(model), loader, processor, Accelerator(cpu=True)).metrics
    return {"images": len(records), "model": model_metrics, "mask_is_box": box_baseline_metrics(dataset)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="compact-synthetic")
    parser.add_argument("--polyp-images", type=int, default=200, help="Score the first N polyp images (of 998).")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--json", default=None, help="Also write the results here.")
    args = parser.parse_args(argv)
    model, processor = load_base_model(args.model)
    results = {
        name: score(model, processor, spec, limit, args.batch_size)
        for name, (spec, limit) in sources(args.polyp_images).items()
    }
    print(f"\n{args.model}: tight box prompts, mean over images of the mean over objects")
    print("| data | images | model IoU | mask = box IoU | model Dice | mask = box Dice | beats the box |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, row in results.items():
        model, box = row["model"], row["mask_is_box"]
        print(
            f"| {name} | {row['images']} | {model['iou']:.3f} | {box['iou']:.3f} | {model['dice']:.3f} | "
            f"{box['dice']:.3f} | {'yes' if model['iou'] > box['iou'] else 'no'} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
