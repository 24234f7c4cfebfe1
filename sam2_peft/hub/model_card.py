"""Model cards for adapters: YAML metadata the Hub indexes, the validation numbers, and how to use the adapter."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from ..models.loading import BUILTIN_ARCHITECTURES
from ..tuners.methods import AdapterLoadError

METRIC_NAMES = {"iou": "IoU", "dice": "Dice", "boundary_iou": "Boundary IoU", "pixel_accuracy": "Pixel accuracy"}
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
PICTURE_NAME = "comparison.png"
"""Name under which the comparison picture is uploaded beside the card."""


def is_hub_id(name: str | None) -> bool:
    """Whether `name` looks like a Hub repo id (`org/name`) rather than a local path or a built-in architecture."""
    return bool(name) and bool(HUB_ID.match(name)) and not os.path.exists(name) and name not in BUILTIN_ARCHITECTURES


def comparison_picture(output_dir: str | os.PathLike) -> Path | None:
    """The first final-evaluation panel of a training run (`panels/final/*.png`), if any."""
    pictures = sorted((Path(output_dir) / "panels" / "final").glob("*.png"))
    return pictures[0] if pictures else None


def dataset_name(data: str | None) -> str | None:
    """A readable name for the training data: a Hub dataset id as is, a local folder or file by its name."""
    if not data:
        return None
    if is_hub_id(data):
        return data
    path = Path(data)
    return path.stem if path.suffix == ".json" and path.parent.name else path.name or None


def _metrics_table(base: dict, tuned: dict) -> str:
    names = [n for n in METRIC_NAMES if n in base or n in tuned] + sorted(
        n for n in {*base, *tuned} if n not in METRIC_NAMES
    )
    if not names:
        return "_No validation metrics were recorded for this run._"
    rows = ["| Metric | Base model | Fine-tuned |", "|---|---|---|"]
    for name in names:
        cells = [f"{m[name]:.4f}" if isinstance(m.get(name), (int, float)) else "-" for m in (base, tuned)]
        rows.append(f"| {METRIC_NAMES.get(name, name)} | {cells[0]} | {cells[1]} |")
    return "\n".join(rows)


def _size(num_bytes: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if num_bytes < 1000 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "bytes" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    raise AssertionError("unreachable")


def build_model_card(
    output_dir: str | os.PathLike,
    repo_id: str,
    *,
    base_model: str | None = None,
    picture: str | None = None,
) -> ModelCard:
    """The README.md of an adapter repo, from a training run's `metrics.json` and adapter files.

    Args:
        output_dir: the training run's output folder (adapter files, `metrics.json`, `sam2_peft.json`).
        repo_id: the repo the card is for (shown in the usage snippet).
        base_model: the base model's Hub id when the run used a local copy; default the one recorded by the run.
        picture: file name of a comparison picture uploaded beside the card, or None.
    """
    output_dir = Path(output_dir)
    metrics = _read(output_dir / "metrics.json")
    sidecar = _read(output_dir / "sam2_peft.json")
    method = sidecar.get("method") or metrics.get("method") or "adapter"
    base = base_model or metrics.get("base_model") or sidecar.get("base_model_name_or_path")
    data = dataset_name(metrics.get("data"))
    card_data = ModelCardData(
        base_model=base if is_hub_id(base) else None,
        library_name="peft",
        pipeline_tag="mask-generation",
        tags=["sam2", "peft", method, "image-segmentation"],
        datasets=[data] if data and is_hub_id(data) else None,
    )
    weights = [p for p in ("adapter_model.safetensors", "partial_model.safetensors") if (output_dir / p).exists()]
    size = metrics.get("adapter_bytes") or sum((output_dir / p).stat().st_size for p in weights)
    facts = [
        f"- **Base model:** `{base or 'not recorded'}`"
        + ("" if is_hub_id(base) else " (not a Hub id: pass `base_model=` when loading)"),
        f"- **Method:** {method}",
        f"- **Training data:** {data or 'not recorded'}",
    ]
    if "trainable_parameters" in metrics:
        facts.append(f"- **Trainable parameters:** {metrics['trainable_parameters']:,}")
    facts.append(f"- **Adapter file size:** {_size(size)} ({', '.join(weights) or 'no weights found'})")
    if "steps" in metrics:
        facts.append(f"- **Training steps:** {metrics['steps']}")
    body = [
        f"# {repo_id.split('/')[-1]}",
        "",
        f"A **{method}** adapter for SAM 2 (`{base or 'base model'}`), trained with "
        "sam2-peft. It is small: it holds only what was trained and loads "
        "on top of the base model.",
        "",
        *facts,
        "",
        "## Validation metrics",
        "",
        _metrics_table(metrics.get("base") or {}, metrics.get("fine_tuned") or {}),
        "",
    ]
    if picture:
        body += ["Image | ground truth | base model | fine-tuned:", "", f"![Base vs. fine-tuned]({picture})", ""]
    body += ["## Usage", "", _usage(repo_id, method), ""]
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(body))


def _usage(repo_id: str, method: str) -> str:
    lines = [
        "```python",
        "from PIL import Image",
        "from sam2_peft.inference.predictor import Sam2PeftPredictor",
        "",
        f'predictor = Sam2PeftPredictor.from_pretrained("{repo_id}")',
        'image = Image.open("image.png")',
    ]
    if method == "ptsam":
        lines.append("prediction = predictor.predict(image)  # prompt-free")
    else:
        lines.append("prediction = predictor.predict(image, boxes=[[10, 20, 120, 140]])  # x0, y0, x1, y1 pixels")
    lines += ["prediction.masks  # (N, H, W) bool at the image's size; prediction.scores (N,)", "```"]
    if method != "partial":
        lines += [
            "",
            "With plain peft and transformers:",
            "",
            "```python",
            *(["import sam2_peft.tuners.ptsam  # registers the PTSAM peft type"] if method == "ptsam" else []),
            "from peft import PeftConfig, PeftModel",
            "from transformers import Sam2Model",
            "",
            f'config = PeftConfig.from_pretrained("{repo_id}")',
            "base = Sam2Model.from_pretrained(config.base_model_name_or_path)",
            f'model = PeftModel.from_pretrained(base, "{repo_id}")',
            "```",
        ]
    return "\n".join(lines)


def _read(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterLoadError(
            f"'{path}' is not valid JSON ({err}): fix or delete it, then build the card again."
        ) from err
    if not isinstance(data, dict):
        raise AdapterLoadError(f"'{path}' must hold a JSON object: fix or delete it, then build the card again.")
    return data
