"""LoRA presets for SAM 2, scoped by module path so that `q_proj` in one component does not catch another."""

from __future__ import annotations

from peft import LoraConfig

_ATTENTION = r"(q_proj|k_proj|v_proj|o_proj)"

LORA_PRESETS: dict[str, list[str]] = {
    "decoder": [rf"mask_decoder\.transformer\..*\.{_ATTENTION}"],
    "encoder": [r"vision_encoder\.backbone\.blocks\.\d+\.attn\.(qkv|proj)"],
    "memory": [rf"memory_attention\.layers\.\d+\.(self_attn|cross_attn_image)\.{_ATTENTION}"],
    "memory-encoder": [
        r"memory_encoder\.(memory_fuser\.layers\.\d+\.pointwise_conv[12]|feature_projection|projection)"
    ],
    "object-pointer": [r"object_pointer_proj\.(proj_in|proj_out|layers\.\d+)"],
}
"""Named groups of target modules (regexes over full module names). Combine with '+', e.g. `decoder+encoder`."""

DEFAULT_PRESET = "decoder"


def preset_regex(preset: str) -> str:
    """One regex matching every module of a preset such as `decoder` or `decoder+encoder`."""
    parts = []
    for name in preset.split("+"):
        if name not in LORA_PRESETS:
            raise ValueError(f"Unknown LoRA preset '{name}'; known: {', '.join(LORA_PRESETS)} (combine with '+').")
        parts.extend(LORA_PRESETS[name])
    return "|".join(f"(?:{p})" for p in parts)


def sam2_lora_config(
    preset: str = DEFAULT_PRESET,
    *,
    r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.1,
    target_regex: str | None = None,
    base_model_name_or_path: str | None = None,
) -> LoraConfig:
    """A peft `LoraConfig` for SAM 2.

    Args:
        preset: `decoder` (the mask decoder's 28 attention projections; default), `decoder+encoder` (adds Hiera
            attention), or any '+' combination of `LORA_PRESETS`.
        target_regex: a full-match regex over module names, used instead of the preset.
        base_model_name_or_path: recorded in `adapter_config.json` so the adapter names its base model.

    The task type stays unset: peft has no mask-generation task, and `FEATURE_EXTRACTION` breaks SAM 2's forward.
    """
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=target_regex or preset_regex(preset),
        base_model_name_or_path=base_model_name_or_path,
    )
