"""Share an adapter and use it downstream: train briefly, push with a model card, load it back, predict.

Offline (default): trains on the bundled sample with a local random base and pushes to a local folder standing in
for the Hub (what `from_pretrained` accepts as a path), so it runs anywhere in a few minutes on a CPU:

    python examples/share_and_use.py --workdir /tmp/share-demo

With the real Hugging Face Hub (log in first with `hf auth login`, or export HF_TOKEN=hf_...):

    python examples/share_and_use.py --model facebook/sam2.1-hiera-tiny --repo-id my-name/sam2-sample-lora --private

Everything here is also a command: `sam2-peft train lora_decoder ... --push-to-hub ID`, `sam2-peft predict`.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

from sam2_peft.data.config import SAMPLE_DATA
from sam2_peft.data.sources import folder_records
from sam2_peft.evaluation.panels import overlay
from sam2_peft.hub.model_card import build_model_card
from sam2_peft.inference.predictor import Sam2PeftPredictor
from sam2_peft.models.loading import load_base_model
from sam2_peft.recipes.lora import main as train_lora


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="outputs/share-demo", help="where the run and predictions go")
    parser.add_argument(
        "--model", default=None, help="base model (Hub id or folder); default: a local tiny-random copy"
    )
    parser.add_argument("--repo-id", default=None, help="push to this Hub repo; default: a local folder, no network")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument("--max-steps", type=int, default=20)
    args = parser.parse_args()
    work = Path(args.workdir)

    # 1. A base model. Offline we save the built-in random architecture to a folder, so that the adapter records a
    #    path that resolves later (a real run uses a Hub id such as facebook/sam2.1-hiera-tiny).
    base = args.model
    if base is None:
        base = str(work / "base")
        model, processor = load_base_model("tiny-random")
        model.save_pretrained(base)
        processor.save_pretrained(base)

    # 2. Train briefly on the bundled sample; --push-to-hub uploads the adapter and its model card at the end.
    run_dir = work / "run"
    flags = ["--model", base, "--data", str(SAMPLE_DATA), "--output-dir", str(run_dir), "--report-to", "none"]
    flags += ["--max-steps", str(args.max_steps), "--lora-r", "8", "--lr", "1e-3", "--num-panels", "2"]
    if args.repo_id:
        flags += ["--push-to-hub", args.repo_id] + (["--hub-private"] if args.private else [])
    start = time.perf_counter()
    train_lora(flags)
    print(f"trained in {time.perf_counter() - start:.0f} s -> {run_dir}")

    # 3. "Push" offline: the adapter files and the model card a push uploads, in a folder that from_pretrained reads like a repo.
    source = args.repo_id
    if source is None:
        source = str(work / "repo")
        shutil.rmtree(source, ignore_errors=True)
        Path(source).mkdir(parents=True)
        for name in ("adapter_config.json", "adapter_model.safetensors", "sam2_peft.json"):
            shutil.copy2(run_dir / name, Path(source) / name)
        build_model_card(run_dir, "my-name/sam2-sample-lora").save(Path(source) / "README.md")
        print(f"repo folder with its model card: {source}")

    # 4. Downstream: one line to load (base resolved from the adapter config), one to predict.
    predictor = Sam2PeftPredictor.from_pretrained(source)
    record = folder_records(SAMPLE_DATA)[0]
    image, objects = record.load_image(), record.load_instances()
    boxes = [[x.min(), y.min(), x.max(), y.max()] for y, x in (np.nonzero(mask) for mask in objects)]
    prediction = predictor.predict(image, boxes=boxes)
    print(
        f"{record.sample_id}: {len(boxes)} boxes -> masks {prediction.masks.shape}, scores {prediction.scores.round(3)}"
    )
    out = work / f"{record.sample_id}_overlay.png"
    Image.fromarray(overlay(image, prediction.masks)).save(out)
    print(f"overlay written to {out}")


if __name__ == "__main__":
    main()
