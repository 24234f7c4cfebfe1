"""Small trained-looking adapters for the sharing tests: LoRA and partial fine-tunes of a saved tiny base."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sam2_peft.adapters import LoraMethod, PartialFinetuneMethod, PtsamMethod, TuningMethod
from sam2_peft.evaluation.panels import comparison_panel
from sam2_peft.models.loading import load_base_model

METHODS = {
    "lora": lambda: LoraMethod("decoder", lora_r=4),
    "partial": lambda: PartialFinetuneMethod({"mask_decoder": 1e-5}),
    "ptsam": lambda: PtsamMethod(num_tokens=4),
    "ptsam-encoder": lambda: PtsamMethod(num_tokens=4, encoder_prompts=2),
    "ptsam-classes": lambda: PtsamMethod(num_tokens=4, id2label={"3": "scratch", "7": "dent"}),
    "ptsam-upscaling": lambda: PtsamMethod(num_tokens=4, tune_upscaling=True),
}
"""The adapters `make_adapter` can save: decoder LoRA, a partial fine-tune, PTSAM decoder tokens (and encoder prompts;
or two classes, ids 3 and 7; or the decoder's upscaling layers tuned)."""

METRICS = {
    "base": {"iou": 0.41, "dice": 0.55, "boundary_iou": 0.2, "pixel_accuracy": 0.81},
    "fine_tuned": {"iou": 0.72, "dice": 0.83, "boundary_iou": 0.5, "pixel_accuracy": 0.95},
    "trainable_parameters": 12345,
    "steps": 4,
}


def make_adapter(
    kind: str, base_path: Path, out_dir: Path, seed: int = 1, data: str = "/data/nuclei-coelho2009"
) -> Path:
    """Save a `kind` (a key of `METHODS`) adapter for the base saved at `base_path`, with random non-zero weights.

    Also writes a `metrics.json` like a training run's and one final comparison panel.
    """
    model, _ = load_base_model(str(base_path))
    method: TuningMethod = METHODS[kind]()
    model = method.prepare(model, str(base_path))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    method.save(model, out_dir, str(base_path))
    metrics = {**METRICS, "method": method.name, "base_model": str(base_path), "data": data}
    metrics["adapter_bytes"] = sum(f.stat().st_size for f in out_dir.glob("*.safetensors"))
    (out_dir / "metrics.json").write_text(json.dumps(metrics))
    image = np.full((40, 60, 3), 90, np.uint8)
    masks = np.zeros((1, 40, 60), bool)
    masks[0, 10:30, 20:40] = True
    (out_dir / "panels" / "final").mkdir(parents=True)
    comparison_panel(image, {"fine-tuned": masks}).save(out_dir / "panels" / "final" / "img_000.png")
    return out_dir


def non_square_images(count: int = 2, seed: int = 0) -> list[np.ndarray]:
    """Random `(H, W, 3)` uint8 images of different non-square sizes with a bright rectangle each."""
    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        height, width = 72 + 16 * index, 150 - 30 * index
        image = rng.integers(0, 80, (height, width, 3), dtype=np.uint8)
        image[20:50, 30:90] = 220
        images.append(image)
    return images


def save_images(images: list[np.ndarray], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        Image.fromarray(image).save(folder / f"img_{index}.png")
    return folder
