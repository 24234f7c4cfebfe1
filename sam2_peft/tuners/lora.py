"""LoRA for SAM 2: target presets scoped by module path (so that `q_proj` in one component does not catch another)
and the peft config built from `LoraOptions`."""

from __future__ import annotations

from peft import LoraConfig

from .options import LORA_PRESETS, LoraOptions, preset_regex

__all__ = ["LORA_PRESETS", "LoraOptions", "preset_regex", "sam2_lora_config"]


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
