"""Run an exported folder with onnxruntime behind the `Sam2Model` calls `Sam2PeftPredictor` makes, so that the
exported graphs give masks through the same prompt checks, coordinate scaling and post-processing as PyTorch."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from .graphs import EMBEDDING_NAMES, MASK_INPUT_NAME, OUTPUT_NAMES
from .onnx_export import EXPORT_FILE, MASK_DECODER, ExportError, require_export_extra


class OnnxSam2Model(nn.Module):
    """The graphs of an export folder (`sam2-peft export`) with the two `Sam2Model` methods the predictor calls:
    `get_image_embeddings(pixel_values)` and `forward(image_embeddings=..., input_points=..., ...)`.

    Args:
        folder: the export folder (holds `export.json`).
        variant: `"fp32"`, `"fp16"` or `"int8"` (the `--quantize int8` graphs); default the exported dtype.
        threads: onnxruntime intra-op threads (0: its default).
    """

    def __init__(self, folder: str | os.PathLike, variant: str | None = None, threads: int = 0) -> None:
        super().__init__()
        require_export_extra()
        import onnxruntime as ort

        self.folder = Path(folder)
        self.record = read_export_record(self.folder)
        variant = variant or self.record["dtype"]
        graphs = self.record["graphs"].get(variant)
        if graphs is None:
            raise ExportError(
                f"'{self.folder}' holds no {variant} graphs (it has {', '.join(self.record['graphs'])}); export "
                f"again with {'--quantize int8' if variant == 'int8' else f'--dtype {variant}'}."
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3  # errors only: fp16 graphs draw warnings about CPU kernels for constant folding
        self.sessions = {
            name: ort.InferenceSession(str(self.folder / file), options, providers=["CPUExecutionProvider"])
            for name, file in graphs.items()
        }
        self.input_dtype = np.float16 if variant == "fp16" else np.float32

    def _run(self, name: str, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        feed = {
            k: v.cpu().numpy().astype(self.input_dtype if v.is_floating_point() else np.int64)
            for k, v in inputs.items()
        }
        return [torch.from_numpy(np.asarray(o, np.float32)) for o in self.sessions[name].run(None, feed)]

    def get_image_embeddings(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        return self._run("vision_encoder", {"pixel_values": pixel_values})

    def forward(
        self,
        image_embeddings: list[torch.Tensor],
        input_points: torch.Tensor | None = None,
        input_labels: torch.Tensor | None = None,
        input_boxes: torch.Tensor | None = None,
        input_masks: torch.Tensor | None = None,
        multimask_output: bool = False,
    ) -> SimpleNamespace:
        if input_masks is not None and MASK_DECODER not in self.sessions:
            raise ExportError(f"'{self.folder}' takes no mask input: export again with --mask-input.")
        if multimask_output != self.record["multimask_output"]:
            raise ExportError(f"This export gives multimask_output={self.record['multimask_output']} masks only.")
        embeddings = dict(zip(EMBEDDING_NAMES, image_embeddings))
        if input_points is None and input_boxes is None and input_masks is None:
            if "prompt_free_mask_decoder" not in self.sessions:
                raise ExportError(
                    f"'{self.folder}' was exported without a prompt-free decoder (only PTSAM adapters have one): "
                    "give boxes or points."
                )
            outputs = self._run("prompt_free_mask_decoder", embeddings)
        else:
            batch = image_embeddings[0].shape[0]
            if input_points is None and input_boxes is None:  # a mask alone: SAM 2 pads one not-a-point
                input_points = torch.zeros(batch, 1, 1, 2)
                input_labels = -torch.ones(batch, 1, 1, dtype=torch.long)
            if input_points is None:  # boxes alone: one prompt per box, no points
                input_points = torch.zeros(batch, input_boxes.shape[1], 0, 2)
                input_labels = torch.zeros(batch, input_boxes.shape[1], 0, dtype=torch.long)
            if input_boxes is None:
                input_boxes = torch.zeros(batch, 0, 4)
            prompts = {"input_points": input_points, "input_labels": input_labels, "input_boxes": input_boxes}
            if input_masks is None:
                outputs = self._run("prompt_encoder_mask_decoder", {**embeddings, **prompts})
            else:
                outputs = self._run(MASK_DECODER, {**embeddings, **prompts, MASK_INPUT_NAME: input_masks})
        return SimpleNamespace(**dict(zip(OUTPUT_NAMES, outputs)))


def is_export(folder: str | os.PathLike) -> bool:
    """Whether `folder` is a `sam2-peft export` folder (it holds `export.json`)."""
    return (Path(folder) / EXPORT_FILE).is_file()


def read_export_record(folder: str | os.PathLike) -> dict:
    """The `export.json` of an export folder; `ExportError` when the folder holds no export."""
    path = Path(folder) / EXPORT_FILE
    if not path.is_file():
        raise ExportError(f"No export in '{folder}': expected {EXPORT_FILE} (write one with sam2-peft export).")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ExportError(f"'{path}' is not valid JSON ({err}): export again with --overwrite.") from err


def load_onnx_predictor(folder: str | os.PathLike, variant: str | None = None, threads: int = 0):
    """A `Sam2PeftPredictor` that runs the exported graphs of `folder` on the CPU (same `predict`, same outputs)."""
    from transformers import Sam2Processor

    from ..inference.predictor import Sam2PeftPredictor

    model = OnnxSam2Model(folder, variant, threads)
    return Sam2PeftPredictor(model, Sam2Processor.from_pretrained(str(folder)), device="cpu")
