"""Fold an adapter into its base model and save a full model that plain transformers loads."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from peft import PeftModel

from ..io import atomic_write_dir
from .files import AdapterLoadError
from .resolve import load_adapted_model

MERGEABLE_PEFT_TYPES = ("LORA",)
"""Peft types whose weights fold into the base layers (learned prompt tokens, for instance, do not)."""


def merge_adapter(
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    revision: str | None = None,
    base_model: str | None = None,
    token: str | bool | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write base model + adapter as one model folder (`config.json`, `model.safetensors`, processor files).

    `transformers.Sam2Model.from_pretrained(out_dir)` then gives the adapted model's outputs without peft. Works for
    LoRA adapters (`merge_and_unload`) and partial fine-tunes (their weights replace the base's). `adapter_dir` is a
    local folder or a Hub id (at `revision`); `base_model` overrides the base the adapter records. The folder is
    written atomically. Returns `out_dir`.
    """
    model, processor, info = load_adapted_model(adapter_dir, revision=revision, base_model=base_model, token=token)
    if isinstance(model, PeftModel):
        if info.peft_type not in MERGEABLE_PEFT_TYPES:
            raise AdapterLoadError(
                f"Cannot merge a {info.peft_type} adapter into the base weights (mergeable: "
                f"{', '.join(MERGEABLE_PEFT_TYPES)} and partial fine-tunes); load it with Sam2PeftPredictor instead."
            )
        model = model.merge_and_unload()
    if dtype is not None:
        model = model.to(dtype)
    model.config._name_or_path = str(out_dir)
    with atomic_write_dir(out_dir) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
    return Path(out_dir)
