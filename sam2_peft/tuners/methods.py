"""Tuning methods: what trains, how its parameters are grouped, and how the result is saved and loaded.

A method turns a frozen base `Sam2Model` into the trainable model (`prepare`), gives the optimizer its parameter
groups, and saves only what it trained. The trainer knows methods only through this interface, so a new method
(learned prompt tokens, full training) is a new class here, not an edit of the trainer.
"""

from __future__ import annotations

import json
import os
import re
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from ..io import atomic_write_dir, atomic_write_json
from ..models.loading import RANDOM_WEIGHTS_KEY
from ..models.segmenter import unwrap_sam
from .lora import sam2_lora_config

SIDECAR_FILE = "sam2_peft.json"
"""Written beside every adapter: the method and the base architecture it was trained for."""

PARTIAL_CONFIG_FILE = "partial_config.json"
PARTIAL_WEIGHTS_FILE = "partial_model.safetensors"

COMPONENTS = (
    "vision_encoder",
    "prompt_encoder",
    "mask_decoder",
    "memory_attention",
    "memory_encoder",
    "object_pointer_proj",
)


class AdapterMismatchError(ValueError):
    """An adapter does not fit the base model it is being loaded into."""


def base_signature(model: nn.Module) -> dict:
    """The architecture facts an adapter depends on: image size and the widths of each component."""
    config = unwrap_sam(model).config
    backbone = config.vision_config.backbone_config
    return {
        "model_type": config.model_type,
        "image_size": int(config.prompt_encoder_config.image_size),
        "encoder_widths": list(backbone.embed_dim_per_stage),
        "encoder_blocks": list(backbone.blocks_per_stage),
        "decoder_width": int(config.mask_decoder_config.hidden_size),
    }


def check_signature(model: nn.Module, adapter_dir: str | os.PathLike) -> None:
    """Raise `AdapterMismatchError` if the adapter in `adapter_dir` was trained for a different architecture."""
    sidecar = Path(adapter_dir) / SIDECAR_FILE
    if not sidecar.exists():
        return
    expected = json.loads(sidecar.read_text()).get("base_signature", {})
    found = base_signature(model)
    differences = [
        f"{key}: adapter expects {expected[key]}, base model has {found.get(key)}"
        for key in expected
        if key != "model_type" and expected[key] != found.get(key)
    ]
    if differences:
        name = json.loads(sidecar.read_text()).get("base_model_name_or_path")
        raise AdapterMismatchError(
            f"The adapter in '{adapter_dir}' was trained for another base architecture"
            f"{f' ({name})' if name else ''}: " + "; ".join(differences)
        )


def write_sidecar(
    model: nn.Module, directory: Path, method: str, base_name: str | None, extra: dict | None = None
) -> None:
    data = {"method": method, "base_model_name_or_path": base_name, "base_signature": base_signature(model)}
    atomic_write_json(directory / SIDECAR_FILE, {**data, **(extra or {})})


class TuningMethod(ABC):
    """Interface between a way of adapting SAM 2 and the trainer."""

    name: str

    @abstractmethod
    def prepare(self, model: nn.Module, base_name: str | None) -> nn.Module:
        """Freeze the base, add or unfreeze what trains, and return the model to train."""

    def parameter_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        """Optimizer parameter groups; by default one group of everything trainable."""
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr, "weight_decay": weight_decay}]

    def trains_image_encoder(self, model: nn.Module) -> bool:
        """Whether any trainable parameter sits in the image encoder (if not, its outputs can be cached)."""
        return any(p.requires_grad for p in unwrap_sam(model).vision_encoder.parameters())

    @abstractmethod
    def save(self, model: nn.Module, directory: str | os.PathLike, base_name: str | None) -> None:
        """Write the trained parameters (and only those) to `directory`, atomically."""


@dataclass
class LoraMethod(TuningMethod):
    """LoRA on chosen modules (see `tuners.lora.LORA_PRESETS`)."""

    preset: str = "decoder"
    r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    target_regex: str | None = None
    name: str = field(default="lora", init=False)

    def prepare(self, model: nn.Module, base_name: str | None) -> nn.Module:
        config = sam2_lora_config(
            self.preset,
            r=self.r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_regex=self.target_regex,
            base_model_name_or_path=base_name,
        )
        model.name_or_path = base_name  # peft copies it into the adapter config
        return get_peft_model(model, config)

    def save(self, model: nn.Module, directory: str | os.PathLike, base_name: str | None) -> None:
        model.peft_config["default"].base_model_name_or_path = base_name
        with atomic_write_dir(directory) as staging:
            model.save_pretrained(staging, save_embedding_layers=False)
        write_sidecar(model, Path(directory), self.name, base_name, {"lora": asdict(self)})


@dataclass
class PartialFinetuneMethod(TuningMethod):
    """Unfreeze whole components, each with its own learning rate (the usual fine-tuning baseline)."""

    learning_rates: dict[str, float] = field(default_factory=lambda: {"prompt_encoder": 5e-6, "mask_decoder": 5e-6})
    """Component name -> learning rate, e.g. `{"vision_encoder": 1e-6, "mask_decoder": 5e-6}`."""
    weight_decay: float = 1e-4
    name: str = field(default="partial", init=False)

    def __post_init__(self) -> None:
        unknown = set(self.learning_rates) - set(COMPONENTS)
        if unknown:
            raise ValueError(f"Unknown component(s) {sorted(unknown)}; choose from {COMPONENTS}.")

    def prepare(self, model: nn.Module, base_name: str | None) -> nn.Module:
        model.requires_grad_(False)
        for component in self.learning_rates:
            _component(model, component).requires_grad_(True)
        return model

    def parameter_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        del lr, weight_decay  # each component has its own
        return [
            {
                "params": [p for p in _component(model, c).parameters() if p.requires_grad],
                "lr": component_lr,
                "weight_decay": self.weight_decay,
            }
            for c, component_lr in self.learning_rates.items()
        ]

    def save(self, model: nn.Module, directory: str | os.PathLike, base_name: str | None) -> None:
        pattern = re.compile(rf"^({'|'.join(self.learning_rates)})\.")
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if pattern.match(k)}
        with atomic_write_dir(directory) as staging:
            save_file(state, str(staging / PARTIAL_WEIGHTS_FILE), metadata={"format": "pt"})
            config = {"components": sorted(self.learning_rates), "base_model_name_or_path": base_name}
            atomic_write_json(staging / PARTIAL_CONFIG_FILE, config)
        write_sidecar(model, Path(directory), self.name, base_name)


@dataclass
@dataclass
class FullMethod(TuningMethod):
    """Every parameter trains (from-scratch pre-training or continued training); saves a whole model folder.

    `save_dtype` (e.g. `torch.float16`) stores the weights in that dtype, leaving the trained model untouched.
    """

    save_dtype: torch.dtype | None = None
    name: str = field(default="full", init=False)

    def prepare(self, model: nn.Module, base_name: str | None) -> nn.Module:
        return model.requires_grad_(True)

    def save(self, model: nn.Module, directory: str | os.PathLike, base_name: str | None) -> None:
        sam = unwrap_sam(model)
        setattr(sam.config, RANDOM_WEIGHTS_KEY, False)  # trained: no longer the random initialisation
        state = None
        if self.save_dtype is not None:
            state = {k: v.to(self.save_dtype) if v.is_floating_point() else v for k, v in sam.state_dict().items()}
        trained_dtype = sam.config.dtype
        with atomic_write_dir(directory) as staging:
            try:
                if self.save_dtype is not None:
                    sam.config.dtype = self.save_dtype
                sam.save_pretrained(staging, state_dict=state)
            finally:
                sam.config.dtype = trained_dtype
        write_sidecar(model, Path(directory), self.name, base_name)


def _component(model: nn.Module, name: str) -> nn.Module:
    module = getattr(unwrap_sam(model), name, None)
    if module is None:
        raise ValueError(f"This model has no component '{name}' (video components need a Sam2VideoModel).")
    return module


def load_partial(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load partially fine-tuned weights into `model` in place; every saved tensor must fit."""
    directory = Path(directory)
    state = load_file(str(directory / PARTIAL_WEIGHTS_FILE))
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    wrong = sorted(k for k in state if k in own and own[k].shape != state[k].shape)
    if unknown or wrong:
        details = [f"unknown keys {unknown[:5]}"] if unknown else []
        details += [f"{k}: saved {tuple(state[k].shape)}, model {tuple(own[k].shape)}" for k in wrong[:5]]
        raise AdapterMismatchError(f"Weights in '{directory}' do not fit this base model: " + "; ".join(details))
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value)
    return model


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike, **peft_kwargs) -> nn.Module:
    """Load a saved adapter of any method into a base `Sam2Model` and return the adapted model."""
    adapter_dir = Path(adapter_dir)
    check_signature(model, adapter_dir)
    if (adapter_dir / PARTIAL_CONFIG_FILE).exists():
        return load_partial(model, adapter_dir)
    if (adapter_dir / "adapter_config.json").exists():
        return PeftModel.from_pretrained(model, str(adapter_dir), **peft_kwargs)
    raise FileNotFoundError(
        f"No adapter in '{adapter_dir}': expected adapter_config.json (peft) or {PARTIAL_CONFIG_FILE} (partial)."
    )


METHODS: dict[str, type[TuningMethod]] = {"lora": LoraMethod, "partial": PartialFinetuneMethod, "full": FullMethod}
"""Registry of tuning methods by name; other modules add theirs here."""
