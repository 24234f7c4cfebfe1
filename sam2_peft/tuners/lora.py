"""LoRA for SAM 2: target presets scoped by module path (so that `q_proj` in one component does not catch another)
and the peft config built from `LoraOptions`."""

from __future__ import annotations

import re

from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from torch import nn

from .options import IMAGE_TOKEN_INPUTS, LORA_PRESETS, LoraOptions, preset_regex

__all__ = ["LORA_PRESETS", "LoraOptions", "keep_dropout_on_prompt_tokens", "preset_regex", "sam2_lora_config"]


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


def keep_dropout_on_prompt_tokens(model: nn.Module) -> list[str]:
    """Replace the LoRA dropout of every layer that does not take prompt tokens (`takes_prompt_tokens`) by the
    identity, in place: dropout masks over image tokens cost a full pass over `N x 4096 x 256` per projection. Returns
    the names of the layers that keep their dropout."""
    kept = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        base_name = name.removeprefix("base_model.model.")
        if takes_prompt_tokens(base_name):
            kept.append(base_name)
            continue
        for adapter in module.lora_dropout:
            module.lora_dropout[adapter] = nn.Identity()
    return kept
