"""Export to ONNX with the adapter inside (`onnx_export`), the graphs it traces (`graphs`), and running an export with
onnxruntime behind the predictor (`runtime`). Needs the `export` extra (onnx, onnxruntime)."""

from .onnx_export import ExportError, ExportOptions, export_model
from .runtime import OnnxSam2Model, load_onnx_predictor

__all__ = ["ExportError", "ExportOptions", "OnnxSam2Model", "export_model", "load_onnx_predictor"]
