"""Model cards for adapters: YAML metadata the Hub indexes, the validation numbers, and how to use the adapter."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..adapters.files import PARTIAL_WEIGHTS_FILE, PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, AdapterLoadError
from ..adapters.resolve import trained_prompt
from ..io import atomic_write_text
from ..models.names import BUILTIN_ARCHITECTURES, FAMILIES

METRIC_NAMES = {
    "iou": "IoU",
    "dice": "Dice",
    "boundary_iou": "Boundary IoU",
    "pixel_accuracy": "Pixel accuracy",
    "mean_iou": "Mean IoU (classes)",
    "mean_dice": "Mean Dice (classes)",
    "fw_iou": "Frequency-weighted IoU",
}
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
PICTURE_NAME = "comparison.png"
"""Name under which the comparison picture is uploaded beside the card."""
CARD_FILE = "README.md"
FULL_WEIGHTS_FILE = "model.safetensors"
"""A full fine-tune saves a whole transformers model folder."""


def is_hub_id(name: str | None) -> bool:
    """Whether `name` looks like a Hub repo id (`org/name`) rather than a local path or a built-in architecture."""
    return bool(name) and bool(HUB_ID.match(name)) and not os.path.exists(name) and name not in BUILTIN_ARCHITECTURES


EXTREME_PANEL_PREFIXES = ("worst-dice-change-", "best-dice-change-")
"""Names of the trainer's panels of the images whose Dice fine-tuning changed most."""


def comparison_picture(output_dir: str | os.PathLike) -> Path | None:
    """The first final-evaluation panel of a training run (`panels/final/*.png`), if any: one of the images spread
    over the validation set rather than the best or worst Dice change, which would not be typical."""
    pictures = sorted((Path(output_dir) / "panels" / "final").glob("*.png"))
    typical = [p for p in pictures if not p.name.startswith(EXTREME_PANEL_PREFIXES)]
    return (typical or pictures)[0] if pictures else None


def dataset_name(data: str | None) -> str | None:
    """A readable name for the training data: a Hub dataset id as is, a local folder or file by its name."""
    if not data:
        return None
    if is_hub_id(data):
        return data
    path = Path(data)
    return path.stem if path.suffix == ".json" and path.parent.name else path.name or None


def metric_label(name: str, classes: Iterable[str] = ()) -> str:
    """A metric's readable name: `METRIC_NAMES`', or for a multi-class run's `dice_<class>` "Dice (<class>)"."""
    kind, _, label = name.partition("_")
    if name not in METRIC_NAMES and kind in METRIC_NAMES and label in classes:
        return f"{METRIC_NAMES[kind]} ({label})"
    return METRIC_NAMES.get(name, name)


def _metrics_table(base: dict, tuned: dict, classes: Iterable[str] = ()) -> str:
    names = [n for n in METRIC_NAMES if n in base or n in tuned] + sorted(
        n for n in {*base, *tuned} if n not in METRIC_NAMES
    )
    if not names:
        return "_No validation metrics were recorded for this run._"
    rows = ["| Metric | Base model | Fine-tuned |", "|---|---|---|"]
    for name in names:
        cells = [f"{m[name]:.4f}" if isinstance(m.get(name), (int, float)) else "-" for m in (base, tuned)]
        rows.append(f"| {metric_label(name, classes)} | {cells[0]} | {cells[1]} |")
    return "\n".join(rows)


def _below_base_warning(metrics: dict) -> list[str]:
    """A warning paragraph when the run recorded that the adapter scores below its base model (`below_base`)."""
    if not metrics.get("below_base"):
        return []
    metric = metrics.get("metric_for_best") or "dice"
    base, tuned = (metrics.get(key, {}).get(metric) for key in ("base", "fine_tuned"))
    scores = (
        f" ({METRIC_NAMES.get(metric, metric)} {tuned:.4f} against {base:.4f})" if None not in (base, tuned) else ""
    )
    return [
        f"> **Warning:** this adapter scores below the base model on its validation set{scores}: on data like it, "
        "the base model alone does better.",
        "",
    ]


def _size(num_bytes: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if num_bytes < 1000 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "bytes" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    raise AssertionError("unreachable")


def _library_name(output_dir: Path, method: str) -> str | None:
    """The library that loads the folder as is: peft for peft adapters (LoRA, PTSAM), transformers for a full
    fine-tune, none for a partial fine-tune (only sam2-peft loads it), so the Hub shows no wrong loading snippet."""
    if (output_dir / PEFT_CONFIG_FILE).exists():
        return "peft"
    if method == "full" or (output_dir / FULL_WEIGHTS_FILE).exists():
        return "transformers"
    return None


def _eval_results(tuned: dict, dataset: str | None, classes: Iterable[str] = ()) -> list[EvalResult] | None:
    """The fine-tuned validation numbers in the Hub's `model-index` form, which the Hub renders as a results table
    (a multi-class adapter's per class, named by class)."""
    results = [
        EvalResult(
            task_type="image-segmentation",
            task_name="Image segmentation",
            dataset_type=dataset or "custom",
            dataset_name=dataset or "validation set",
            dataset_split="validation",
            metric_type=name,
            metric_name=metric_label(name, classes),
            metric_value=float(value),
        )
        for name, value in tuned.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ]
    return results or None


def base_license(base_model: str | None) -> str | None:
    """The license of a base this package knows: Meta's SAM 2 / 2.1 checkpoints and the built-in models (shipped
    with this Apache-2.0 package) are Apache-2.0; None for any other base (the card then names no license)."""
    from ..models.loading import builtin_names

    if base_model and (base_model.startswith(("facebook/sam2-", "facebook/sam2.1-")) or base_model in builtin_names()):
        return "apache-2.0"
    return None


def build_model_card(
    output_dir: str | os.PathLike,
    repo_id: str | None = None,
    *,
    base_model: str | None = None,
    picture: str | None = None,
    license: str | None = None,
) -> ModelCard:
    """The model card (README.md) of a training run's adapter, from its `metrics.json` and adapter files.

    One builder for the card `push_adapter` uploads and the one `write_model_card` leaves in the run folder.

    Args:
        output_dir: the training run's output folder (adapter files, `metrics.json`, `sam2_peft.json`).
        repo_id: the repo the card is for (title and usage snippet); None: the local folder.
        base_model: the base model's Hub id when the run used a local copy; default the one recorded by the run.
        picture: path of the comparison picture relative to the card (e.g. `comparison.png`), or None.
        license: the adapter's license id; default the base model's where it is known (`base_license`).
    """
    output_dir = Path(output_dir)
    metrics = _read(output_dir / "metrics.json")
    sidecar = _read(output_dir / "sam2_peft.json")
    method = sidecar.get("method") or metrics.get("method") or "adapter"
    family = FAMILIES.get((sidecar.get("base_signature") or {}).get("family", "sam2"), FAMILIES["sam2"])
    base = base_model or metrics.get("base_model") or sidecar.get("base_model_name_or_path")
    data = dataset_name(metrics.get("data"))
    eval_data = dataset_name(metrics.get("val_data")) or data
    name = (repo_id or output_dir.resolve().name).split("/")[-1]
    library = _library_name(output_dir, method)
    tuned = metrics.get("fine_tuned") or {}
    hub_datasets = [d for d in dict.fromkeys((data, eval_data)) if d and is_hub_id(d)]
    classes = list((metrics.get("classes") or {}).values())
    eval_results = _eval_results(tuned, eval_data, classes)
    card_data = ModelCardData(
        base_model=base if is_hub_id(base) else None,
        library_name=library,
        license=license or base_license(base),
        pipeline_tag="mask-generation",
        tags=[
            *dict.fromkeys(["sam2", family.name.replace("_", "-"), "sam2-peft"]),
            *(["peft"] if library == "peft" else []),
            method,
            "image-segmentation",
        ],
        datasets=hub_datasets or None,
        metrics=[result.metric_type for result in eval_results] if eval_results else None,
        model_name=name if eval_results else None,
        eval_results=eval_results,
    )
    weights = [p for p in (PEFT_WEIGHTS_FILE, PARTIAL_WEIGHTS_FILE, FULL_WEIGHTS_FILE) if (output_dir / p).exists()]
    size = metrics.get("adapter_bytes") or sum((output_dir / p).stat().st_size for p in weights)
    prompt = trained_prompt(output_dir)
    facts = [
        f"- **Base model:** `{base or 'not recorded'}`"
        + ("" if is_hub_id(base) else " (not a Hub id: pass `base_model=` when loading)"),
        f"- **Method:** {method}",
        f"- **Training data:** {data or 'not recorded'}"
        + (f" (validation: {eval_data})" if eval_data and eval_data != data else ""),
    ]
    if prompt:
        facts.append(f"- **Prompts in training:** {prompt}")
    if "trainable_parameters" in metrics:
        total = metrics.get("total_parameters")
        facts.append(
            f"- **Trainable parameters:** {metrics['trainable_parameters']:,}" + (f" of {total:,}" if total else "")
        )
    facts.append(f"- **Adapter file size:** {_size(size)} ({', '.join(weights) or 'no weights found'})")
    if "steps" in metrics:
        kept = metrics.get("kept_step")
        best = METRIC_NAMES.get(metrics.get("metric_for_best"), metrics.get("metric_for_best"))
        facts.append(
            f"- **Training steps:** {metrics['steps']}"
            + (
                f" (the adapter is step {kept}'s, the best validation {best})"
                if kept not in (None, metrics["steps"])
                else ""
            )
        )
    where = repo_id or str(output_dir)
    body = [
        f"# {name}",
        "",
        f"A **{method}** adapter for {family.title} (`{base or 'base model'}`), trained with "
        "sam2-peft. It is small: it holds only what was trained and loads "
        "on top of the base model.",
        "",
        *facts,
        "",
        "## Validation metrics",
        "",
        *_below_base_warning(metrics),
        _metrics_table(metrics.get("base") or {}, tuned, classes),
        "",
    ]
    if picture:
        body += ["Image | ground truth | base model | fine-tuned:", "", f"![Base vs. fine-tuned]({picture})", ""]
    body += ["## Usage", "", _usage(where, method, prompt, family.classes[1]), ""]
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(body))


def write_model_card(
    output_dir: str | os.PathLike,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    license: str | None = None,
) -> Path:
    """Write the model card into a training run's folder as README.md, atomically, replacing peft's empty template.

    The same card `push_adapter` uploads, with the first final panel (`panels/final/*.png`) referenced in place.
    Call it after the run's last adapter save (a save brings peft's template back). Returns the card's path.
    """
    output_dir = Path(output_dir)
    picture = comparison_picture(output_dir)
    card = build_model_card(
        output_dir,
        repo_id,
        base_model=base_model,
        picture=picture.relative_to(output_dir).as_posix() if picture is not None else None,
        license=license,
    )
    path = output_dir / CARD_FILE
    atomic_write_text(path, str(card))  # replaces the link to peft's template, not the template in the version
    return path


def _usage(repo_id: str, method: str, prompt: str | None = None, model_class: str = "Sam2Model") -> str:
    lines = ["```python", "from PIL import Image", "from sam2_peft.inference.predictor import Sam2PeftPredictor"]
    if method == "full":
        lines += [
            "from sam2_peft.models.loading import load_base_model",
            "",
            f'model, processor = load_base_model("{repo_id}")',
            "predictor = Sam2PeftPredictor(model, processor)",
        ]
    else:
        lines += ["", f'predictor = Sam2PeftPredictor.from_pretrained("{repo_id}")']
    lines.append('image = Image.open("image.png")')
    if prompt == "none" or (prompt is None and method == "ptsam"):
        lines.append("prediction = predictor.predict(image)  # prompt-free")
    else:
        lines.append("prediction = predictor.predict(image, boxes=[[10, 20, 120, 140]])  # x0, y0, x1, y1 pixels")
    lines += ["prediction.masks  # (N, H, W) bool at the image's size; prediction.scores (N,)", "```"]
    if method not in ("partial", "full"):
        lines += [
            "",
            "With plain peft and transformers:",
            "",
            "```python",
            *(["import sam2_peft.tuners.ptsam  # registers the PTSAM peft type"] if method == "ptsam" else []),
            "from peft import PeftConfig, PeftModel",
            f"from transformers import {model_class}",
            "",
            f'config = PeftConfig.from_pretrained("{repo_id}")',
            f"base = {model_class}.from_pretrained(config.base_model_name_or_path)",
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
