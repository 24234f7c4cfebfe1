"""Training methods: what trains, how its parameters are grouped, and how the result is saved.

A method turns a frozen base `Sam2Model` into the trainable model (`prepare`), gives the optimizer its parameter
groups, and saves only what it trained (`adapters.files` holds the formats). The trainer knows methods only through
`TuningMethod`, so a new method is a new class here, not an edit of the trainer.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar

import torch
from peft import get_peft_model
from safetensors.torch import save_file
from torch import nn

from ..io import atomic_adapter_dir, atomic_write_json
from ..models.loading import RANDOM_WEIGHTS_KEY
from ..models.names import BASE_DTYPES, COMPONENTS
from ..models.segmenter import unwrap_sam
from ..tuners.lora import install_lora_dropout, sam2_lora_config
from ..tuners.options import LoraOptions, PtsamOptions
from ..tuners.ptsam import PtsamConfig
from .files import ADAPTER_FILE_NAMES, PARTIAL_CONFIG_FILE, PARTIAL_WEIGHTS_FILE, save_peft_adapter, write_sidecar


class TuningMethod(ABC):
    """Interface between a way of adapting SAM 2 and the trainer."""

    name: ClassVar[str]
    own_learning_rates: ClassVar[bool] = False
    """Whether the method sets its learning rates itself (`parameter_groups` ignores the training `lr`, which the
    trainer then records as None)."""

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

    def settings(self) -> dict:
        """The method's knobs (recorded with the run; a resumed run must match them)."""
        return asdict(self) if hasattr(self, "__dataclass_fields__") else {}


@dataclass
class LoraMethod(TuningMethod, LoraOptions):
    """LoRA on chosen modules: the knobs of `tuners.options.LoraOptions` (targets, lora_r, ...)."""

    name: ClassVar[str] = "lora"

    def prepare(self, model: nn.Module, base_name: str | None) -> nn.Module:
        model.name_or_path = base_name  # peft copies it into the adapter config
        model = get_peft_model(model, sam2_lora_config(self, base_name))
        install_lora_dropout(model, self.lora_dropout, self.lora_dropout_inputs)
        return model

    def save(self, model: nn.Module, directory: str | os.PathLike, base_name: str | None) -> None:
        save_peft_adapter(model, directory, self.name, base_name, self.settings())


@dataclass
class PtsamMethod(TuningMethod, PtsamOptions):
    """Train only PTSAM prompt tokens (decoder tokens, optionally encoder prompts): the knobs of
    `tuners.options.PtsamOptions`, and the seed of their initialisation."""

    init_seed: int = 0
    id2label: dict[str, str] | None = None
    """Multi-class: the classes trained, mask value -> name (None: one class)."""
    name: ClassVar[str] = "ptsam"

    def peft_config(self, base_name: str | None) -> PtsamConfig:
        options = {f.name: getattr(self, f.name) for f in fields(PtsamOptions)}
        return PtsamConfig(
            **options, init_seed=self.init_seed, id2label=self.id2label, base_model_name_or_path=base_name
        )

    def prepare(self, model: nn.Module, base_name: str | None) -> nn.Module:
        model.name_or_path = base_name  # peft copies it into the adapter config
        return get_peft_model(model, self.peft_config(base_name))

    def save(self, model: nn.Module, directory: str | os.PathLike, base_name: str | None) -> None:
        save_peft_adapter(model, directory, self.name, base_name, self.settings())


@dataclass
class PartialFinetuneMethod(TuningMethod):
    """Unfreeze whole components, each with its own learning rate (the usual fine-tuning baseline)."""

    learning_rates: dict[str, float] = field(default_factory=lambda: {"prompt_encoder": 1e-4, "mask_decoder": 1e-4})
    """Component name -> learning rate, e.g. `{"vision_encoder": 1e-6, "mask_decoder": 1e-4}`."""
    weight_decay: float = 1e-4
    name: ClassVar[str] = "partial"
    own_learning_rates: ClassVar[bool] = True

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
        with atomic_adapter_dir(directory, replaces=ADAPTER_FILE_NAMES) as staging:
            save_file(state, str(staging / PARTIAL_WEIGHTS_FILE), metadata={"format": "pt"})
            config = {"components": sorted(self.learning_rates), "base_model_name_or_path": base_name}
            atomic_write_json(staging / PARTIAL_CONFIG_FILE, config)
            write_sidecar(model, staging, self.name, base_name)


@dataclass
class FullMethod(TuningMethod):
    """Every parameter trains (from-scratch pre-training or continued training); saves a whole model folder.

    `save_dtype` (`float16`, `bfloat16`) stores the weights in that dtype, leaving the trained model untouched.
    """

    save_dtype: str = "float32"
    name: ClassVar[str] = "full"

    def __post_init__(self) -> None:
        if self.save_dtype not in BASE_DTYPES:
            raise ValueError(f"save_dtype must be one of {BASE_DTYPES}, got '{self.save_dtype}'.")

    def prepare(self, model: nn.Module, base_name: str | None) -> nn.Module:
        return model.requires_grad_(True)

    def save(self, model: nn.Module, directory: str | os.PathLike, base_name: str | None) -> None:
        sam = unwrap_sam(model)
        setattr(sam.config, RANDOM_WEIGHTS_KEY, False)  # trained: no longer the random initialisation
        dtype = getattr(torch, self.save_dtype)
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sam.state_dict().items()}
        trained_dtype = sam.config.dtype
        with atomic_adapter_dir(directory, replaces=ADAPTER_FILE_NAMES) as staging:
            try:
                sam.config.dtype = dtype
                sam.save_pretrained(staging, state_dict=state)
            finally:
                sam.config.dtype = trained_dtype
            write_sidecar(model, staging, self.name, base_name)


def _component(model: nn.Module, name: str) -> nn.Module:
    module = getattr(unwrap_sam(model), name, None)
    if module is None:
        raise ValueError(f"This model has no component '{name}' (video components need a Sam2VideoModel).")
    return module
