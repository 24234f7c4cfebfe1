"""`SegmentationDataset.__getitem__` before and after the data-pipeline changes, on real nuclei images at 1024 px.

"before" is the previous `__getitem__` (commit 2f27c0e) copied below verbatim as `legacy_item`, with the augmentation
of that commit (`legacy_augment`, one channel per mask): it builds and cleans every object's mask, then draws
`--max-objects`, and resizes images and targets even when they are at size. "after" is the dataset's own
`__getitem__`; "after, view cached" the same for views whose embedding-cache entry is held (no image decoded). Both run in this process, interleaved (A B A B ...), over several rounds of the same
images; every item of the two is checked equal first. Also times a loader with 0, 1 and 2 workers feeding a simulated
step (a fixed matrix product), interleaved too. Writes `benchmarks/results/data_pipeline.json` and prints tables.

    OMP_NUM_THREADS=1 python benchmarks/data_pipeline.py [--rounds 5] [--images 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2

from sam2_peft.data.config import DatasetConfig
from sam2_peft.data.dataset import SegmentationDataset, collate_segmentation, view_key
from sam2_peft.data.prompts import sample_prompts, to_model_coordinates
from sam2_peft.data.sources import folder_records
from sam2_peft.data.validation import clean_instances
from sam2_peft.models.loading import processor_for_image_size

NUCLEI = Path(os.environ.get("SAM2_PEFT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
NUCLEI = NUCLEI / "nuclei-coelho2009"
RESULTS = Path(__file__).resolve().parent / "results" / "data_pipeline.json"


def legacy_augment(
    transform: v2.Transform, image: torch.Tensor, masks: torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`augment` as of commit 2f27c0e: every mask is a channel of the transformed mask."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out_image, out_masks = transform(tv_tensors.Image(image), tv_tensors.Mask(masks.to(torch.uint8)))
    return out_image.as_subclass(torch.Tensor), out_masks.as_subclass(torch.Tensor).bool()


def legacy_item(self: SegmentationDataset, index: int) -> dict:
    """`SegmentationDataset.__getitem__` as of commit 2f27c0e (the "before")."""
    record = self.records[index]
    seed = self._sample_seed(index)
    generator = torch.Generator().manual_seed(seed)
    image = torch.from_numpy(np.array(record.load_image())).permute(2, 0, 1)
    masks = torch.from_numpy(clean_instances(record.load_instances(), self.config.validation))
    if self.config.target_mode != "semantic":
        if not self.train:
            masks = masks[: self.config.max_eval_objects]
        elif len(masks) > self.config.max_objects_per_image:
            keep = torch.randperm(len(masks), generator=generator)[: self.config.max_objects_per_image]
            masks = masks[keep.sort().values]
    if self.train:
        image = v2.functional.resize(image, [self.image_size, self.image_size], antialias=True)
        size = [self.image_size, self.image_size]
        masks = v2.functional.resize(masks.to(torch.uint8), size, InterpolationMode.NEAREST_EXACT).bool()
    view, augment_seed = self._augmentation_view(index, seed)
    if self.transform is not None:
        augmented_image, augmented_masks = legacy_augment(self.transform, image, masks, augment_seed)
        visible = augmented_masks.flatten(1).any(1)
        if visible.any():
            image, masks = augmented_image, augmented_masks[visible]
    original_size = tuple(image.shape[1:])
    if self.config.target_mode == "semantic":
        masks = masks.any(dim=0, keepdim=True)
    points, labels = sample_prompts(masks, self._prompt_config(masks), generator)
    size_2d = (self.image_size, self.image_size)
    pixel_values = self.processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
    item = {
        "sample_id": record.sample_id,
        "view": view,
        "pixel_values": pixel_values,
        "points": to_model_coordinates(points, original_size, self.image_size),
        "point_labels": labels,
        "target_masks": F.interpolate(masks[:, None].float(), size=size_2d, mode="nearest")[:, 0].bool(),
        "original_size": original_size,
    }
    if not self.train:
        item["original_masks"] = masks
    return item


def check_equal(a: dict, b: dict, skip: tuple[str, ...] = ()) -> None:
    for key in set(a) - set(skip):
        same = torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key]
        if not same:
            raise AssertionError(f"before and after differ in '{key}' of {a['sample_id']}")


def summary(values: list[float]) -> dict:
    return {
        "median_ms": 1e3 * statistics.median(values),
        "min_ms": 1e3 * min(values),
        "max_ms": 1e3 * max(values),
        "n": len(values),
    }


def time_items(datasets: dict[str, tuple], rounds: int, count: int) -> dict[str, list[float]]:
    """Per-item seconds of each variant, interleaved item by item (A B A B ...)."""
    times = {name: [] for name in datasets}
    for _ in range(rounds):
        for index in range(count):
            for name, (dataset, get) in datasets.items():
                start = time.perf_counter()
                get(dataset, index)
                times[name].append(time.perf_counter() - start)
    return times


def time_loader(dataset: SegmentationDataset, workers: list[int], rounds: int, step_ms: float) -> dict:
    """Seconds per batch of a loader (batch 1) feeding a simulated step of about `step_ms`, per worker count."""
    a = torch.randn(512, 512)
    start = time.perf_counter()
    for _ in range(20):
        a @ a
    reps = max(1, round(step_ms / (1e3 * (time.perf_counter() - start) / 20)))
    times = {w: [] for w in workers}
    for _ in range(rounds):
        for w in workers:
            loader = DataLoader(dataset, batch_size=1, shuffle=False, num_workers=w, collate_fn=collate_segmentation)
            start = time.perf_counter()
            for _batch in loader:
                for _ in range(reps):
                    a @ a
            times[w].append((time.perf_counter() - start) / len(dataset))
    return {f"num_workers={w}": summary(v) for w, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--loader-rounds", type=int, default=3)
    parser.add_argument("--step-ms", type=float, default=300.0, help="Simulated training step per batch.")
    args = parser.parse_args(argv)
    if not (NUCLEI / "images").is_dir():
        print(f"skipped: the nuclei data is not at {NUCLEI} (set SAM2_PEFT_DATA)")
        return
    torch.manual_seed(0)
    processor = processor_for_image_size(1024)
    records = folder_records(NUCLEI)[: args.images]
    config = DatasetConfig()
    train = SegmentationDataset(records, processor, config, train=True, seed=0)
    cached = SegmentationDataset(records, processor, config, train=True, seed=0)
    val = SegmentationDataset(records, processor, config, train=False, seed=0)
    for dataset in (train, cached):
        dataset.set_augmentation_views(4)  # as with the embedding cache
    held = {}
    for dataset in (train, val):
        for index in range(len(records)):
            item = dataset[index]
            check_equal(legacy_item(dataset, index), item, skip=("view_source",))
            held[view_key(item["sample_id"], item["view"])] = item["view_source"]
    cached.skip_cached_images(lambda key, source: held.get(key) == source)
    for index in range(len(records)):
        check_equal(train[index], cached[index], skip=("pixel_values",))
    variants = {
        "train before": (train, legacy_item),
        "train after": (train, SegmentationDataset.__getitem__),
        "train after, view cached": (cached, SegmentationDataset.__getitem__),
        "validation before": (val, legacy_item),
        "validation after": (val, SegmentationDataset.__getitem__),
    }
    load_before = os.getloadavg()
    times = time_items(variants, args.rounds, len(records))
    items = {name: summary(values) for name, values in times.items()}
    loader = time_loader(train, [0, 1, 2], args.loader_rounds, args.step_ms)
    result = {
        "images": len(records),
        "rounds": args.rounds,
        "objects_per_image": [len(r.objects()) for r in records],
        "max_objects": config.max_objects_per_image,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "getitem": items,
        "speedup_train": items["train before"]["median_ms"] / items["train after"]["median_ms"],
        "speedup_train_cached": items["train before"]["median_ms"] / items["train after, view cached"]["median_ms"],
        "speedup_validation": items["validation before"]["median_ms"] / items["validation after"]["median_ms"],
        "loader_simulated_step_ms": args.step_ms,
        "loader_seconds_per_batch": loader,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"nuclei, {len(records)} images, {args.rounds} rounds, load average {load_before} -> {os.getloadavg()}")
    print("\n| variant | median ms | min | max |\n|---|---:|---:|---:|")
    for name, s in items.items():
        print(f"| {name} | {s['median_ms']:.1f} | {s['min_ms']:.1f} | {s['max_ms']:.1f} |")
    print(
        f"\nspeed-up: train {result['speedup_train']:.2f}x ({result['speedup_train_cached']:.2f}x with the view cached), "
        f"validation {result['speedup_validation']:.2f}x"
    )
    print(f"\nloader + simulated {args.step_ms:.0f} ms step, ms per batch:\n\n| workers | median | min | max |")
    print("|---|---:|---:|---:|")
    for name, s in loader.items():
        print(f"| {name} | {s['median_ms']:.0f} | {s['min_ms']:.0f} | {s['max_ms']:.0f} |")


if __name__ == "__main__":
    main()
