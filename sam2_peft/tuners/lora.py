"""LoRA for SAM 2: target presets scoped by module path (so that `q_proj` in one component does not catch another)
and the peft config built from `LoraOptions`."""

from __future__ import annotations

import re

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from torch import nn

from .options import IMAGE_TOKEN_INPUTS, LORA_PRESETS, LoraOptions, preset_regex

__all__ = [
    "LORA_PRESETS",
    "BitsDropout",
    "LoraOptions",
    "install_lora_dropout",
    "preset_regex",
    "sam2_lora_config",
]


def sam2_lora_config(options: LoraOptions | None = None, base_model_name_or_path: str | None = None) -> LoraConfig:
    """A peft `LoraConfig` for SAM 2 from `options` (default: rank 16 on the mask decoder's 28 attention projections;
    a `LoraMethod` is a `LoraOptions` too).

    `base_model_name_or_path` is recorded in `adapter_config.json` so the adapter names its base model. The task type
    stays unset: peft has no mask-generation task, and `FEATURE_EXTRACTION` breaks SAM 2's forward.
    """
    options = options or LoraOptions()
    return LoraConfig(
        r=options.lora_r,
        lora_alpha=options.lora_alpha,
        lora_dropout=options.lora_dropout,
        target_modules=options.target_modules,
        base_model_name_or_path=base_model_name_or_path,
    )


def takes_prompt_tokens(module_name: str) -> bool:
    """Whether a module of SAM 2 (its name in the base model) is a mask-decoder projection of the prompt tokens."""
    return module_name.startswith("mask_decoder.") and re.fullmatch(IMAGE_TOKEN_INPUTS, module_name) is None


class BitsDropout(nn.Module):
    """`nn.Dropout(p)` with its mask drawn from random integer bits: each element is kept when 15 random bits are at
    least `round(p * 2^15)` (p rounded to 1/32768) and scaled by the inverse of the exact keep rate. The same
    Bernoulli mask as `nn.Dropout`'s, 1.26x faster forward + backward on CPU (`benchmarks/dropout_speed.py`; peft's
    dropout was 11 % of a cached LoRA step there), keeping only a bool mask for the backward pass; identity in eval
    mode."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.threshold = round(p * 2**15)
        self.scale = 2**15 / (2**15 - self.threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        # Every int32 from random_() has 31 uniform bits: its two 16-bit halves each give 15.
        words = torch.empty((x.numel() + 1) // 2, dtype=torch.int32, device=x.device).random_()
        halves = words.view(torch.int16)[: x.numel()].view(x.shape)
        keep = (halves & 0x7FFF) >= self.threshold
        return torch.where(keep, x * self.scale, 0.0)  # saves the bool mask for the backward pass

    def extra_repr(self) -> str:
        return f"p={self.p}"


def install_lora_dropout(model: nn.Module, p: float, inputs: str = "all") -> list[str]:
    """Give every LoRA layer of `model` a `BitsDropout(p)` in place of peft's dropout, or with `inputs` "tokens" only
    the mask decoder's projections of the prompt tokens (`takes_prompt_tokens`; the others get the identity: their
    dropout masks cover `N x 4096 x 256` image-token inputs). Returns the names of the layers with dropout."""
    kept = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        base_name = name.removeprefix("base_model.model.")
        on = p > 0 and (inputs == "all" or takes_prompt_tokens(base_name))
        for adapter in module.lora_dropout:
            module.lora_dropout[adapter] = BitsDropout(p) if on else nn.Identity()
        if on:
            kept.append(base_name)
    return kept
