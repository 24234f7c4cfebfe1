"""`sam2-peft export`: a base model, or a base with its adapter folded in, as ONNX graphs in the layout transformers.js
and Optimum use for SAM 2, with the processor config, a model card, and a parity check against PyTorch."""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from .. import __version__
from ..data.sources import DataError
from ..io import atomic_write_dir, atomic_write_json, atomic_write_text, check_output_dir
from .graphs import (
    EMBEDDING_NAMES,
    MASK_INPUT_NAME,
    OUTPUT_NAMES,
    PROMPT_NAMES,
    PromptDecoderGraph,
    PromptFreeDecoderGraph,
    VisionEncoderGraph,
)

MIN_OPSET = 17
"""LayerNormalization, which SAM 2's encoder and decoder use, is a single operator from opset 17."""
MAX_OPSET = 20
"""The newest opset torch's TorchScript-based exporter writes."""
EXPORT_FILE = "export.json"
"""What an export folder holds: graphs per variant, opset, the source adapter, and the measured parity."""
ONNX_DIR = "onnx"
MASK_DECODER = "prompt_encoder_mask_decoder_with_mask"
"""The decoder graph that also takes a previous mask (`--mask-input`)."""
SUFFIXES = {"fp32": "", "fp16": "_fp16", "int8": "_quantized"}
"""File name suffix of each variant: transformers.js' names for its dtypes `fp32`, `fp16` and `q8`."""
EXPORT_EXTRA = ("onnx", "onnxruntime")
SAMPLE_IMAGE = Path(__file__).resolve().parents[1] / "data" / "sample" / "images" / "scene_0000.png"
"""The image of the parity check (shipped with the package)."""


class ExportError(DataError):
    """An export that cannot be made as asked: the message says why and what to do."""


def require_export_extra() -> None:
    """`ExportError` with the install line when onnx or onnxruntime is missing."""
    missing = []
    for module in EXPORT_EXTRA:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ExportError(
            f"ONNX export and running exported models need the export extra (missing {', '.join(missing)}): "
            'pip install "sam2-peft[export]"'
        )


@dataclass
class ExportOptions:
    """How to export (the `sam2-peft export` flags)."""

    opset: int = MIN_OPSET
    dtype: str = "fp32"
    quantize: str | None = None
    overwrite: bool = False
    multimask: bool = False
    mask_input: bool = False

    def check(self) -> None:
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            age = "too old" if self.opset < MIN_OPSET else "newer than torch's exporter writes"
            raise ExportError(
                f"--opset {self.opset} is {age}: SAM 2 exports with opsets {MIN_OPSET} to {MAX_OPSET} (LayerNormalization "
                f"needs {MIN_OPSET}); give --opset {MIN_OPSET}."
            )
        if self.dtype not in ("fp32", "fp16"):
            raise ExportError(f"--dtype {self.dtype}: choose fp32 or fp16.")
        if self.quantize not in (None, "int8"):
            raise ExportError(f"--quantize {self.quantize}: only int8 (dynamic quantisation) is supported.")
        if self.quantize and self.dtype != "fp32":
            raise ExportError("--quantize int8 quantises the fp32 graphs: drop --dtype fp16 (or --quantize).")


def export_model(
    model: nn.Module,
    processor,
    out_dir: str | os.PathLike,
    options: ExportOptions,
    source: dict,
) -> dict:
    """Write `model` (a `Sam2Model`, a merged one, or a PTSAM `PeftModel`) as ONNX into `out_dir`; return the record
    written to `export.json` (graph files per variant, parity against PyTorch)."""
    from ..inference.prompt_free import has_active_ptsam

    options.check()
    require_export_extra()
    out_dir = Path(out_dir)
    if (out_dir / EXPORT_FILE).exists() and not options.overwrite:
        raise ExportError(f"'{out_dir}' already holds an export ({EXPORT_FILE}): give another folder, or --overwrite.")
    check_output_dir(out_dir, "OUT")
    model = model.eval().float()
    prompt_free = has_active_ptsam(model)
    sam = _unwrap(model)
    record = {
        "format": "onnx",
        "layout": "transformers.js / Optimum SAM 2: vision_encoder + prompt_encoder_mask_decoder",
        "opset": options.opset,
        "dtype": options.dtype,
        "quantize": options.quantize,
        "multimask_output": options.multimask,
        "mask_input": options.mask_input,
        "prompt_free": prompt_free,
        "image_size": int(sam.config.prompt_encoder_config.image_size),
        "source": source,
        "sam2_peft_version": __version__,
        "graphs": {},
    }
    with atomic_write_dir(out_dir) as staging:
        (staging / ONNX_DIR).mkdir()
        variant = options.dtype
        exported = model.half() if variant == "fp16" else model
        record["graphs"][variant] = _write_graphs(exported, staging, variant, options, prompt_free)
        model.float()
        if options.quantize:
            record["graphs"]["int8"] = _quantize(staging, record["graphs"][variant])
        sam.config.save_pretrained(staging)
        processor.save_pretrained(staging)
        write_preprocessor_config(processor, staging)
        atomic_write_json(staging / EXPORT_FILE, record)  # the runtime reads it for the parity check
        record["parity"] = parity(model, processor, staging, record)
        atomic_write_json(staging / EXPORT_FILE, record)
        atomic_write_text(staging / "README.md", model_card(record))
        if options.overwrite:  # no graph of the previous export lingers beside the new ones
            shutil.rmtree(out_dir / ONNX_DIR, ignore_errors=True)
    return record


EXPORTABLE_PEFT_TYPES = {"LORA": "merged into the weights", "PTSAM": "its tokens become constants of the graphs"}


def export_source(
    out_dir: str | os.PathLike,
    options: ExportOptions,
    *,
    adapter: str | None = None,
    model: str | None = None,
    revision: str | None = None,
    base_model: str | None = None,
    token: str | bool | None = None,
) -> dict:
    """Load an adapter onto its base (or a base `model` alone), fold the adapter in, and `export_model` it."""
    from ..adapters.resolve import load_adapted_model
    from ..models.loading import load_base_model

    options.check()
    require_export_extra()
    if (Path(out_dir) / EXPORT_FILE).exists() and not options.overwrite:  # checked before the model loads too
        raise ExportError(f"'{out_dir}' already holds an export ({EXPORT_FILE}): give another folder, or --overwrite.")
    if adapter is None:
        sam, processor = load_base_model(model, revision=revision)
        return export_model(sam, processor, out_dir, options, {"model": model})
    sam, processor, info = load_adapted_model(adapter, revision=revision, base_model=base_model, token=token)
    if info.kind == "peft" and info.peft_type not in EXPORTABLE_PEFT_TYPES:
        raise ExportError(
            f"'{adapter}' is a peft {info.peft_type} adapter, which sam2-peft cannot fold into the graphs (it exports LoRA, "
            "merged; PTSAM, tokens as constants; and partial fine-tunes): merge it into its base yourself "
            "(peft's merge_and_unload, then save_pretrained) and export that folder with --model."
        )
    if info.peft_type == "LORA":
        sam = sam.merge_and_unload()
    method = "partial" if info.kind == "partial" else info.peft_type.lower()
    source = {"adapter": str(adapter), "method": method, "base_model": base_model or info.base_model}
    return export_model(sam, processor, out_dir, options, source)


def write_preprocessor_config(processor, folder: Path) -> None:
    """`preprocessor_config.json` as transformers.js reads it: the image processor's settings and `processor_class`
    (which makes its `AutoProcessor` a `Sam2Processor`, with the prompt and mask post-processing methods)."""
    processor.image_processor.save_pretrained(folder)
    path = folder / "preprocessor_config.json"
    config = json.loads(path.read_text())
    atomic_write_json(path, {**config, "processor_class": type(processor).__name__})


def _unwrap(model: nn.Module) -> nn.Module:
    from ..models.segmenter import unwrap_sam

    return unwrap_sam(model)


def _write_graphs(
    model: nn.Module, folder: Path, variant: str, options: ExportOptions, prompt_free: bool
) -> dict[str, str]:
    """Export the encoder and decoder graphs of one variant (with the prompt-free decoder of a PTSAM model, and the
    decoder with a mask input for `--mask-input`)."""
    dtype = torch.float16 if variant == "fp16" else torch.float32
    sam = _unwrap(model)
    size = int(sam.config.prompt_encoder_config.image_size)
    pixels = torch.zeros(1, 3, size, size, dtype=dtype)
    with torch.no_grad():
        embeddings = tuple(sam.get_image_embeddings(pixels))
    batch = {0: "batch"}
    prompts = {
        "input_points": torch.tensor([[[[size / 4, size / 4], [size / 2, size / 2]]]], dtype=dtype),
        "input_labels": torch.tensor([[[1, 0]]]),
        "input_boxes": torch.tensor([[[size / 8, size / 8, size * 3 / 4, size * 3 / 4]]], dtype=dtype),
    }
    outputs = {name: {0: "batch", 1: "prompts"} for name in OUTPUT_NAMES}
    decoder_axes = {
        **dict.fromkeys(EMBEDDING_NAMES, batch),
        "input_points": {0: "batch", 1: "prompts", 2: "points"},
        "input_labels": {0: "batch", 1: "prompts", 2: "points"},
        "input_boxes": {0: "batch", 1: "boxes"},
        **outputs,
    }
    decoder = PromptDecoderGraph(model, options.multimask)
    graphs = {
        "vision_encoder": (
            VisionEncoderGraph(model),
            (pixels,),
            {"pixel_values": batch, **dict.fromkeys(EMBEDDING_NAMES, batch)},
        ),
        "prompt_encoder_mask_decoder": (decoder, (*embeddings, *prompts.values()), decoder_axes),
    }
    if options.mask_input:  # a graph of its own: transformers.js' Sam2Model sends no mask to its decoder
        masks = torch.zeros(1, 1, size // 4, size // 4, dtype=dtype)
        graphs[MASK_DECODER] = (
            decoder,
            (*embeddings, *prompts.values(), masks),
            {**decoder_axes, MASK_INPUT_NAME: batch},
        )
    if prompt_free:
        graphs["prompt_free_mask_decoder"] = (
            PromptFreeDecoderGraph(model, options.multimask),
            embeddings,
            {**dict.fromkeys(EMBEDDING_NAMES, batch), **outputs},
        )
    files = {}
    for name, (graph, inputs, axes) in graphs.items():
        graph_inputs = [*EMBEDDING_NAMES, *PROMPT_NAMES, MASK_INPUT_NAME][: len(inputs)]
        input_names = ["pixel_values"] if name == "vision_encoder" else graph_inputs
        output_names = list(EMBEDDING_NAMES if name == "vision_encoder" else OUTPUT_NAMES)
        files[name] = f"{ONNX_DIR}/{name}{SUFFIXES[variant]}.onnx"
        torch.onnx.export(
            graph, inputs, str(folder / files[name]), input_names=input_names, output_names=output_names,
            opset_version=options.opset, dynamic_axes=axes, dynamo=False,
        )  # fmt: skip
    return files


def _quantize(folder: Path, graphs: dict[str, str]) -> dict[str, str]:
    """int8 dynamic quantisation (weights int8, activations quantised on the fly) of each fp32 graph."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    files = {}
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its notes on shape inference go to the root logger; the result is checked below
    try:
        for name, file in graphs.items():
            files[name] = file.replace(".onnx", f"{SUFFIXES['int8']}.onnx")
            quantize_dynamic(folder / file, folder / files[name], weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    return files


def parity(model: nn.Module, processor, folder: Path, record: dict) -> dict:
    """Masks of PyTorch and of each exported variant on the sample image, with a box and a click (and prompt-free
    for PTSAM): the largest logit difference and the mask IoU against PyTorch."""
    from ..inference.predictor import Sam2PeftPredictor
    from .runtime import OnnxSam2Model

    image = np.asarray(Image.open(SAMPLE_IMAGE).convert("RGB"))
    height, width = image.shape[:2]
    prompts = {
        "box": {"boxes": [[width * 0.2, height * 0.2, width * 0.7, height * 0.8]]},
        "click": {"points": [[[width * 0.45, height * 0.5]]]},
    }
    if record["prompt_free"]:
        prompts["prompt-free"] = {}
    reference = Sam2PeftPredictor(model, processor, device="cpu")
    multimask = record["multimask_output"]
    expected = {
        name: reference.predict(image, return_logits=True, multimask_output=multimask, **p)
        for name, p in prompts.items()
    }
    report = {}
    for variant in record["graphs"]:
        onnx = Sam2PeftPredictor(OnnxSam2Model(folder, variant), processor, device="cpu")
        report[variant] = {}
        for name, p in prompts.items():
            got = onnx.predict(image, return_logits=True, multimask_output=multimask, **p)
            want = expected[name]
            union = (got.masks | want.masks).sum()
            report[variant][name] = {
                "max_abs_logit_diff": float(np.abs(got.logits - want.logits).max()),
                "mask_iou": float((got.masks & want.masks).sum() / union) if union else 1.0,
            }
    return report


def model_card(record: dict) -> str:
    """The export's README: what the files are, how to run them, and how closely they match PyTorch."""
    source = record["source"]
    origin = f"adapter `{source['adapter']}` ({source['method']})" if source.get("adapter") else f"`{source['model']}`"
    rows = "\n".join(
        f"| {variant} | {name} | `{file}` |"
        for variant, graphs in record["graphs"].items()
        for name, file in graphs.items()
    )
    parity_rows = "\n".join(
        f"| {variant} | {prompt} | {r['max_abs_logit_diff']:.2e} | {r['mask_iou']:.4f} |"
        for variant, prompts in record["parity"].items()
        for prompt, r in prompts.items()
    )
    size = record["image_size"]
    prompt_free = (
        "\n`prompt_free_mask_decoder` takes the three embeddings alone: the PTSAM adapter's learned tokens are its "
        "prompt (one mask per image).\n"
        if record["prompt_free"]
        else ""
    )
    masks = 3 if record["multimask_output"] else 1
    mask_input = (
        f"\n`{MASK_DECODER}` takes the same inputs and `input_masks` `(B, 1, {size // 4}, {size // 4})`, a previous "
        "mask's logits per image.\n"
        if record.get("mask_input")
        else ""
    )
    return f"""---
library_name: onnxruntime
tags: [sam2, segment-anything, onnx, sam2-peft]
---

# SAM 2 as ONNX: {origin}

Exported by sam2-peft {record["sam2_peft_version"]} (`sam2-peft export`, opset {record["opset"]}), with any adapter
folded in: LoRA merged into the weights, PTSAM tokens as constants, partial fine-tunes as trained. The layout is
the one transformers.js and Optimum use for SAM 2: `config.json`, `preprocessor_config.json`, and graphs in `onnx/`.

| variant | graph | file |
|---|---|---|
{rows}

## Inputs and outputs

`vision_encoder`: `pixel_values` `(B, 3, {size}, {size})` float (the processor's resized, normalised image) ->
`image_embeddings.0`, `image_embeddings.1` (high-resolution features) and `image_embeddings.2` (image embedding).

`prompt_encoder_mask_decoder`: the three embeddings, `input_points` `(B, P, N, 2)` float (x, y in the
{size} x {size} model input), `input_labels` `(B, P, N)` int64 (1 object, 0 background), `input_boxes` `(B, P, 4)`
float (x0, y0, x1, y1), or `(B, 0, 4)` for points alone; for boxes alone give `input_points` `(B, P, 0, 2)` ->
`iou_scores` `(B, P, {masks})`, `pred_masks` `(B, P, {masks}, {size // 4}, {size // 4})` mask logits,
`object_score_logits` `(B, P, 1)`. P prompts ({masks} mask(s) each), N points per prompt: both any number.
{prompt_free}{mask_input}
## Run it

```bash
pip install "sam2-peft[export]"
sam2-peft predict --onnx THIS_FOLDER --boxes boxes.json images/ predictions/
```

```python
from sam2_peft.export import load_onnx_predictor

predictor = load_onnx_predictor("THIS_FOLDER")  # onnxruntime on the CPU, the processor of this folder
prediction = predictor.predict(image, boxes=[[x0, y0, x1, y1]])  # masks at the image's size, as in PyTorch
```

## Parity with PyTorch

On the sample image, against the PyTorch model with the adapter (logits at the image's size):

| variant | prompt | max abs logit difference | mask IoU |
|---|---|---|---|
{parity_rows}
"""
