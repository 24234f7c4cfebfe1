"""Training-step time of decoder LoRA, in one process, variants interleaved, against the usual recipe and the limit.

Rows: boxes per image (1, 4, 16, 64 on a synthetic 1024 px image; and a real nuclei image with the recipe's 16
objects when ../shared/data is there). Variants, each timed for `--steps` steps per round, in the order A B C ...
A B C ... for `--rounds` rounds (so that a change of machine load hits all of them alike):

- usual: the Hugging Face SAM 2 fine-tuning notebook's step (the whole model on the pixels every step, Dice + BCE
  on the low-resolution masks, Adam on the mask decoder);
- before: sam2-peft as released before #15: cached encoder features before the decoder's projections, loss on logits
  upsampled to 1024 px all at once, LoRA dropout 0.1;
- after: sam2-peft's defaults now (cache after the projections, `LossConfig()`, `LoraOptions()`, the CPU's prompt
  chunk: the prompts decoded and back-propagated 4 at a time);
- one knob at a time (`SETTINGS`): the cache after the projections, then the loss at full resolution chunked, at the
  native resolution, at points, LoRA dropout 0 or on every target, and prompt chunks of 1, 2, 8 or all prompts at
  once;
- limit: the decoder's own forward + backward + AdamW on precomputed decoder inputs already on the device, with a
  plain BCE at the decoder's resolution, in the same prompt chunks as `after`: nothing a training loop could skip.

Each step is the real code path: `ImageSegmentationTask.loss_parts` with `EmbeddingCache.segmenter_inputs` (a cache
hit, pixel hashing included), `backward` of each part, `AdamW.step`. Reports the median step time and its spread (min..max) per
variant, ratios of medians, the cache bytes per view, and the load average before and after; JSON under
benchmarks/results/ and a markdown table (also written into benchmarks/RESULTS.md).

    OMP_NUM_THREADS=1 python benchmarks/step_speed.py                 # hiera-tiny architecture, 1024 px, CPU
    OMP_NUM_THREADS=1 python benchmarks/step_speed.py --boxes 4 --rounds 2 --steps 1 --arch tiny-random  # smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from results_md import update_section
from train_speed import build_base

from sam2_peft.training.config import default_prompt_chunk

ROOT = Path(__file__).resolve().parents[1]
NUCLEI = Path(os.environ.get("SAM2_PEFT_DATA", ROOT.parent / "shared" / "data")) / "nuclei-coelho2009"
FULL, DROPOUT = dict(loss_resolution="full", loss_chunk=0), dict(lora_dropout=0.1, lora_dropout_inputs="all")
CHUNK = default_prompt_chunk("cpu")
SETTINGS = {
    "before": dict(stage="vision_features", loss=FULL, lora=DROPOUT, prompt_chunk=0),
    "after": dict(stage="image_embeddings", loss=None, lora=None, prompt_chunk=CHUNK),
    "cache after convs": dict(stage="image_embeddings", loss=FULL, lora=DROPOUT),
    "+ loss full chunked": dict(
        stage="image_embeddings", loss=dict(loss_resolution="full", loss_chunk=4), lora=DROPOUT
    ),
    "+ loss native": dict(stage="image_embeddings", loss=dict(loss_resolution="native"), lora=DROPOUT),
    "+ loss points": dict(stage="image_embeddings", loss=dict(loss_resolution="points"), lora=DROPOUT),
    "+ loss native, dropout 0": dict(
        stage="image_embeddings", loss=dict(loss_resolution="native"), lora=dict(lora_dropout=0.0)
    ),
    "+ loss points, dropout 0": dict(
        stage="image_embeddings", loss=dict(loss_resolution="points"), lora=dict(lora_dropout=0.0)
    ),
    "after, dropout 0": dict(stage="image_embeddings", loss=None, lora=dict(lora_dropout=0.0), prompt_chunk=CHUNK),
    "after, loss native": dict(
        stage="image_embeddings", loss=dict(loss_resolution="native"), lora=None, prompt_chunk=CHUNK
    ),
    "after, dropout 0.1 on all": dict(stage="image_embeddings", loss=None, lora=DROPOUT, prompt_chunk=CHUNK),
    **{
        f"after, prompt chunk {chunk or 'off'}": dict(
            stage="image_embeddings", loss=None, lora=None, prompt_chunk=chunk
        )
        for chunk in (0, 1, 2, 8)
    },
}
"""Variants besides `usual` and `limit`: where the cache holds (stage), the `LossConfig` and `LoraOptions` changes
(None: the defaults), and the prompts per decoder chunk (0: all at once)."""


def synthetic_batch(boxes: int, size: int, seed: int = 0) -> dict:
    """One image of random pixels and `boxes` rectangular objects, collated as the training data is."""
    generator = torch.Generator().manual_seed(seed)
    targets = torch.zeros(boxes, size, size, dtype=torch.bool)
    corners = []
    for index in range(boxes):
        x0, y0 = torch.randint(0, size * 3 // 4, (2,), generator=generator).tolist()
        w, h = torch.randint(size // 16, size // 4, (2,), generator=generator).tolist()
        x1, y1 = min(x0 + w, size - 1), min(y0 + h, size - 1)
        targets[index, y0:y1, x0:x1] = True
        corners.append([[x0, y0], [x1, y1]])
    return {
        "sample_ids": [f"synthetic-{boxes}"],
        "views": [0],
        "pixel_values": torch.randn(1, 3, size, size, generator=generator),
        "object_image_index": torch.zeros(boxes, dtype=torch.long),
        "points": torch.tensor(corners, dtype=torch.float32),
        "point_labels": torch.tensor([[2, 3]] * boxes),
        "target_masks": targets,
    }


def nuclei_batch(processor, objects: int) -> dict | None:
    """The first nuclei image through the recipe's own data pipeline (box prompts, `objects` nuclei)."""
    if not NUCLEI.is_dir():
        return None
    from sam2_peft.data.config import AugmentationConfig, DatasetConfig
    from sam2_peft.data.dataset import SegmentationDataset, collate_segmentation
    from sam2_peft.data.sources import open_records

    records = open_records(str(NUCLEI))[:1]
    config = DatasetConfig(max_objects_per_image=objects, augmentation=AugmentationConfig(augment=False))
    return collate_segmentation([SegmentationDataset(records, processor, config, train=True, seed=0)[0]])


class Variant:
    """A model, optimizer and step function of one variant, kept for the whole benchmark."""

    def __init__(
        self,
        name: str,
        base,
        processor,
        batch: dict,
        stage: str = "",
        loss: dict | None = None,
        lora: dict | None = None,
        prompt_chunk: int = 0,
    ):
        from sam2_peft.adapters.methods import LoraMethod
        from sam2_peft.data.config import DatasetConfig
        from sam2_peft.models.segmenter import Sam2Segmenter
        from sam2_peft.training.config import LossConfig
        from sam2_peft.training.embedding_cache import EmbeddingCache
        from sam2_peft.training.tasks import ImageSegmentationTask

        self.name, self.batch, self.prompt_chunk = name, batch, prompt_chunk
        model = copy.deepcopy(base)
        if name == "usual":
            for key, param in model.named_parameters():
                param.requires_grad_(key.startswith("mask_decoder."))
            self.model = model.train()
            self.optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)
            return
        self.model = LoraMethod("decoder", **(lora or {})).prepare(model, "benchmark").train()
        self.segmenter = Sam2Segmenter(self.model)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        if name == "limit":
            with torch.no_grad():
                features = self.segmenter.vision_features(batch["pixel_values"])
                # contiguous, as the cache returns them (the convs give channels-last maps, slower to decode)
                self.embeddings = [e.detach().contiguous() for e in self.segmenter.image_embeddings(features)]
            size = 4 * self.embeddings[-1].shape[-1]  # the decoder's masks (not image / 4 on the SAM 3 tracker)
            self.native = F.interpolate(batch["target_masks"].float()[:, None], size=(size, size), mode="area")
            return

        def encode(pixel_values):
            with torch.no_grad():
                features = self.segmenter.vision_features(pixel_values)
                return features if stage == "vision_features" else self.segmenter.image_embeddings(features)

        self.cache = EmbeddingCache(encode, {}, memory_budget_bytes=10**10, stage=stage)
        self.cache.segmenter_inputs(["train/x/view-0"], batch["pixel_values"])  # filled once, as in epoch 1
        data = SimpleNamespace(processor=processor, config=DatasetConfig())
        self.task = ImageSegmentationTask(data, loss=LossConfig(**(loss or {})))

    def cache_bytes(self) -> int | None:
        return self.cache.stats.memory_bytes if hasattr(self, "cache") else None

    def step(self) -> None:
        self.optimizer.zero_grad()
        {"usual": self._usual_backward, "limit": self._limit_backward}.get(self.name, self._toolkit_backward)()
        self.optimizer.step()

    def _usual_backward(self) -> None:
        batch = self.batch
        boxes = batch["points"].reshape(1, -1, 4)
        outputs = self.model(pixel_values=batch["pixel_values"], input_boxes=boxes, multimask_output=False)
        logits = outputs.pred_masks[0, :, 0]
        targets = F.interpolate(batch["target_masks"].float()[:, None], size=logits.shape[-2:], mode="nearest")
        targets = targets[:, 0]
        probs = logits.sigmoid()
        dice = 1 - (2 * (probs * targets).sum((-2, -1)) + 1e-5) / (
            (probs**2).sum((-2, -1)) + (targets**2).sum((-2, -1)) + 1e-5
        )
        (dice.mean() + F.binary_cross_entropy_with_logits(logits, targets)).backward()

    def _limit_backward(self) -> None:
        count = len(self.native)
        size = CHUNK or count
        for start in range(0, count, size):
            chunk = slice(start, start + size)
            output = self.segmenter(
                self.batch["object_image_index"][chunk],
                image_embeddings=self.embeddings,
                points=self.batch["points"][chunk],
                point_labels=self.batch["point_labels"][chunk],
            )
            native = self.native[chunk]
            (F.binary_cross_entropy_with_logits(output.mask_logits, native) * (len(native) / count)).backward()

    def _toolkit_backward(self) -> None:
        cpu = torch.device("cpu")
        for part in self.task.loss_parts(self.segmenter, self.batch, cpu, self._encode, self.prompt_chunk):
            part(nullcontext).loss.backward()

    def _encode(self, keys, pixel_values, sources=None):
        return self.cache.segmenter_inputs(keys, pixel_values, sources)


def variants_for(names: list[str], base, processor, batch: dict) -> list[Variant]:
    return [Variant(name, base, processor, batch, **SETTINGS.get(name, {})) for name in names]


def measure(variants: list[Variant], rounds: int, steps: int) -> dict[str, list[float]]:
    """Per-step seconds of each variant: one untimed warm-up step each, then rounds of A B C ... interleaved."""
    for variant in variants:
        variant.step()
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for _ in range(rounds):
        for variant in variants:
            for _ in range(steps):
                start = time.perf_counter()
                variant.step()
                times[variant.name].append(time.perf_counter() - start)
    return times


def summarise(times: dict[str, list[float]]) -> dict[str, dict]:
    medians = {name: statistics.median(values) for name, values in times.items()}
    summary = {}
    for name, values in times.items():
        summary[name] = {
            "median_s": medians[name],
            "min_s": min(values),
            "max_s": max(values),
            "steps": len(values),
            "usual_over_this": medians["usual"] / medians[name] if "usual" in medians else None,
            "this_over_limit": medians[name] / medians["limit"] if "limit" in medians else None,
        }
    return summary


def markdown(report: dict) -> str:
    names = report["variants"]
    lines = [
        f"Command: `{report['command']}`. {report['arch']} architecture, {report['image_size']} px, CPU, batch 1, "
        f"{report['torch_threads']} thread(s); {report['rounds']} rounds x {report['steps']} step(s) per variant, "
        f"interleaved; load average {report['load_before']} before, {report['load_after']} after.",
        "",
        "Median seconds per step (min..max); in brackets: usual / this, and this / limit.",
        "",
        "| boxes per image | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for row in report["rows"]:
        cells = []
        for name in names:
            s = row["summary"][name]
            ratios = []
            if s["usual_over_this"] is not None and name != "usual":
                ratios.append(f"{s['usual_over_this']:.2f}x")
            if s["this_over_limit"] is not None and name != "limit":
                ratios.append(f"{s['this_over_limit']:.2f}x lim")
            extra = f" [{', '.join(ratios)}]" if ratios else ""
            cells.append(f"{s['median_s']:.3f} ({s['min_s']:.3f}..{s['max_s']:.3f}){extra}")
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    cache = report["cache_mib_per_view"]
    lines += [
        "",
        "Cache memory per view (MiB, measured entry bytes): "
        + ", ".join(f"{name} {mib:.2f}" for name, mib in cache.items())
        + ".",
    ]
    return "\n".join(lines)


def cache_sizes(base, processor, size: int) -> dict[str, float]:
    """Bytes of one cached view at each stage and storage dtype, from real entries."""
    from sam2_peft.models.segmenter import Sam2Segmenter
    from sam2_peft.training.embedding_cache import EmbeddingCache

    segmenter = Sam2Segmenter(base)
    pixels = torch.randn(1, 3, size, size)
    sizes = {}
    for stage in ("vision_features", "image_embeddings"):
        for dtype in (None, torch.bfloat16):

            def encode(pixel_values, stage=stage):
                with torch.no_grad():
                    features = segmenter.vision_features(pixel_values)
                    return features if stage == "vision_features" else segmenter.image_embeddings(features)

            cache = EmbeddingCache(encode, {}, 10**10, stage=stage, storage_dtype=dtype)
            cache.get_or_compute(["k"], pixels)
            sizes[f"{stage} {'bfloat16' if dtype else 'float32'}"] = cache.stats.memory_bytes / 2**20
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="hiera-tiny", help="hiera-tiny (1024 px, random weights) or a built-in")
    parser.add_argument("--boxes", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--nuclei", type=int, default=16, help="objects of the real nuclei row (0: no such row)")
    parser.add_argument(
        "--variants", nargs="+", default=["usual", "before", "after", "limit"], choices=["usual", *SETTINGS, "limit"]
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results/step_speed.json"))
    parser.add_argument("--no-results-md", action="store_true", help="do not update benchmarks/RESULTS.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    base, processor = build_base(args.arch)
    size = int(base.config.prompt_encoder_config.image_size)
    names = args.variants
    report = {
        "command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python benchmarks/step_speed.py "
        + shlex.join(os.sys.argv[1:]),
        "arch": args.arch,
        "image_size": size,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "rounds": args.rounds,
        "steps": args.steps,
        "variants": names,
        "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "rows": [],
    }
    batches = [(f"{n}", synthetic_batch(n, size)) for n in args.boxes]
    if args.nuclei:
        real = nuclei_batch(processor, args.nuclei)
        if real is None:
            print(f"skipping the nuclei row: no {NUCLEI}")
        elif real["pixel_values"].shape[-1] != size:
            print(f"skipping the nuclei row: the model takes {size} px")
        else:
            batches.append((f"nuclei image, {len(real['target_masks'])} boxes", real))
    for label, batch in batches:
        variants = variants_for(names, base, processor, batch)
        times = measure(variants, args.rounds, args.steps)
        report["rows"].append({"label": label, "times_s": times, "summary": summarise(times)})
        print(label, {k: round(v["median_s"], 3) for k, v in report["rows"][-1]["summary"].items()}, flush=True)
        del variants
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=1) + "\n")  # a killed run keeps its finished rows
    report["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    report["cache_mib_per_view"] = cache_sizes(base, processor, size)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
    table = markdown(report)
    print(table)
    if not args.no_results_md:
        update_section("step_speed", "Training step: interleaved, against the usual recipe and the limit", table)


if __name__ == "__main__":
    main()
