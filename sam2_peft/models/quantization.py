"""QLoRA base: the Hiera image encoder's Linear layers in 4-bit (NF4) or 8-bit with bitsandbytes (extra `quant`).

Only the image encoder is quantized (it holds 26.8 M of hiera-tiny's 31.4 M parameters as Linear weights); the
decoder and prompt encoder stay in their dtype. Each layer is checked on the input it really receives (recorded from
one forward of the unquantized encoder), in evaluation and in training mode; a layer the kernels cannot run on this
device  is kept unquantized and reported. LoRA on quantized layers is then peft's usual bitsandbytes path.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from .loading import Sam2LoadError, family_of
from .names import QUANTIZATION_MODES
from .segmenter import unwrap_sam

logger = logging.getLogger(__name__)


@dataclass
class QuantizationReport:
    """Which encoder Linear layers were quantized, which were kept (with the kernel's error), and the bytes saved."""

    mode: str
    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    bytes_before: int = 0
    bytes_after: int = 0


@functools.cache
def _flat_linear8bit_class() -> type:
    import bitsandbytes as bnb

    class FlatLinear8bit(bnb.nn.Linear8bitLt):
        """`Linear8bitLt` on `(..., in)` inputs flattened to 2-D: its no-grad CPU path fails on Hiera's 4-D inputs."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)

    return FlatLinear8bit


def _quantized_linear(linear: nn.Linear, mode: str) -> nn.Module:
    import bitsandbytes as bnb

    weight = linear.weight.data.float().clone()
    if mode == "4bit":
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=linear.weight.dtype,
            quant_type="nf4",
        )
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
        # bitsandbytes' CPU inference path repacks the weight in place on the first no-grad call, after which
        # training forwards fail; keep the standard path, which serves both.
        layer.support_avx512bf16_for_cpu = False
    else:
        layer = _flat_linear8bit_class()(
            linear.in_features, linear.out_features, bias=linear.bias is not None, has_fp16_weights=False
        )
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return layer.to(linear.weight.device)


def _probe(layer: nn.Module, example: torch.Tensor) -> None:
    """Run `layer` as evaluation (no grad: CPU kernels may repack the weight) and as training (grad to the input)."""
    layer.eval()
    with torch.no_grad():
        layer(example)
    layer.train()
    example = example.clone().requires_grad_(True)
    layer(example).sum().backward()


def _module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def quantize_image_encoder(model: nn.Module, mode: str, probe_pixels: torch.Tensor | None = None) -> QuantizationReport:
    """Replace the image encoder's Linear layers by bitsandbytes ones in place; return what was done.

    Args:
        model: a `Sam2Model` / `Sam2VideoModel` or another family's (before adapters are added); a base whose
            encoder has no Linear layers (EdgeTAM's RepViT) raises `Sam2LoadError`.
        mode: `4bit` (NF4) or `8bit` (LLM.int8).
        probe_pixels: `(1, 3, S, S)` image used to record each layer's real input; random by default.
    """
    if mode not in QUANTIZATION_MODES:
        raise ValueError(f"quantize mode must be one of {QUANTIZATION_MODES}, got '{mode}'.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ImportError("Quantizing the encoder needs bitsandbytes: pip install 'sam2-peft[quant]'.") from err
    sam = unwrap_sam(model)
    encoder = sam.vision_encoder
    report = QuantizationReport(mode=mode, bytes_before=_module_bytes(encoder))
    linears = {name: m for name, m in encoder.named_modules() if isinstance(m, nn.Linear)}
    if not linears:
        family = family_of(sam)
        raise Sam2LoadError(
            f"--quantize-encoder: this {family.title} base's {family.encoder} image encoder is convolutional, with no "
            "Linear layers to quantize (QLoRA quantizes those); train without --quantize-encoder."
        )
    inputs: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(_module: nn.Module, args: tuple, _output: torch.Tensor) -> None:
            inputs.setdefault(name, args[0].detach().clone())

        return hook

    hooks = [m.register_forward_hook(record(name)) for name, m in linears.items()]
    size = int(sam.config.prompt_encoder_config.image_size)
    weight = next(encoder.parameters())
    if probe_pixels is None:
        probe_pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        encoder(probe_pixels.to(weight.device, weight.dtype))
    for hook in hooks:
        hook.remove()
    for name, linear in linears.items():
        candidate = _quantized_linear(linear, mode)
        try:
            _probe(candidate, inputs[name])
        except (AssertionError, RuntimeError, NotImplementedError, ValueError) as err:
            report.skipped[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(encoder.get_submodule(parent_name) if parent_name else encoder, child, candidate)
        report.quantized.append(name)
    report.bytes_after = _module_bytes(encoder)
    logger.info(
        "Image encoder quantized to %s: %d Linear layers (%.1f MB -> %.1f MB); %d kept unquantized%s",
        mode,
        len(report.quantized),
        report.bytes_before / 1e6,
        report.bytes_after / 1e6,
        len(report.skipped),
        f" (the kernels failed on them: {sorted(report.skipped)[:4]}...)" if report.skipped else "",
    )
    return report
