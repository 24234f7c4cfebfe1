"""Decoding time of `Sam2PeftPredictor` with a decoder LoRA merged into the base (the default of `from_pretrained`)
and kept as a separate peft branch (`merge=False`), in one process, interleaved, several rounds, medians.

The image is encoded once; each timed call decodes N box prompts against it and scales the masks back to the
original size, as `predict` does for every image after its encoding.

    OMP_NUM_THREADS=1 python benchmarks/predictor_speed.py
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from results_md import update_section
from train_speed import build_base

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="hiera-tiny")
    parser.add_argument("--boxes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results/predictor_speed.json"))
    parser.add_argument("--no-results-md", action="store_true")
    args = parser.parse_args()
    from sam2_peft.adapters.methods import LoraMethod
    from sam2_peft.inference.predictor import Sam2PeftPredictor

    torch.manual_seed(0)
    base, processor = build_base(args.arch)
    peft_model = LoraMethod("decoder").prepare(base, args.arch).eval()
    with torch.no_grad():  # a trained adapter: non-zero B matrices (a fresh one starts at zero)
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    merged = copy.deepcopy(peft_model).merge_and_unload().eval()
    predictors = {"merged": Sam2PeftPredictor(merged, processor, device="cpu"),
                  "unmerged": Sam2PeftPredictor(peft_model, processor, device="cpu")}  # fmt: skip
    size = int(base.config.prompt_encoder_config.image_size)
    image = np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)
    with torch.no_grad():
        pixels = processor(images=image, return_tensors="pt")["pixel_values"]
        embeddings = merged.get_image_embeddings(pixels)
    report = {"command": "python benchmarks/predictor_speed.py " + " ".join(os.sys.argv[1:]), "arch": args.arch,
              "torch_threads": torch.get_num_threads(), "rounds": args.rounds,
              "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()), "rows": []}  # fmt: skip
    rng = np.random.default_rng(1)
    for count in args.boxes:
        corners = rng.integers(0, size // 2, (count, 2))
        boxes = np.concatenate([corners, corners + rng.integers(16, size // 2, (count, 2))], axis=1).astype(float)
        outputs, times = {}, {name: [] for name in predictors}
        for round_ in range(args.rounds + 1):  # round 0 warms up
            for name, predictor in predictors.items():
                start = time.perf_counter()
                with torch.no_grad():
                    outputs[name] = predictor._decode(embeddings, [size, size], boxes, None, None, False, True)
                if round_:
                    times[name].append(time.perf_counter() - start)
        difference = float(np.abs(outputs["merged"].logits - outputs["unmerged"].logits).max())
        medians = {name: statistics.median(t) for name, t in times.items()}
        report["rows"].append({"boxes": count, "times_s": times, "medians_s": medians,
                               "unmerged_over_merged": medians["unmerged"] / medians["merged"],
                               "max_logit_difference": difference})  # fmt: skip
        print(report["rows"][-1]["medians_s"], flush=True)
    report["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
    lines = [f"Command: `{report['command']}`. {args.arch} architecture, {size} px, CPU, {report['torch_threads']} "
             f"thread(s), {args.rounds} interleaved rounds; load average {report['load_before']} before, "
             f"{report['load_after']} after.", "",
             "| boxes | merged, median ms (min..max) | unmerged, median ms (min..max) | unmerged / merged | max logit difference |",
             "|---:|---:|---:|---:|---:|"]  # fmt: skip
    for row in report["rows"]:
        cells = [f"{1e3 * row['medians_s'][n]:.0f} ({1e3 * min(row['times_s'][n]):.0f}..{1e3 * max(row['times_s'][n]):.0f})"
                 for n in ("merged", "unmerged")]  # fmt: skip
        lines.append(f"| {row['boxes']} | {cells[0]} | {cells[1]} | {row['unmerged_over_merged']:.2f}x | "
                     f"{row['max_logit_difference']:.1e} |")  # fmt: skip
    table = "\n".join(lines)
    print(table)
    if not args.no_results_md:
        update_section("predictor_speed", "Inference: LoRA merged on load vs kept as a branch", table)


if __name__ == "__main__":
    main()
