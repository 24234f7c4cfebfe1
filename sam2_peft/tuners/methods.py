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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..io import atomic_adapter_dir, atomic_write_json
from ..models.loading import RANDOM_WEIGHTS_KEY
from ..models.segmenter import unwrap_sam
from .lora import sam2_lora_config

SIDECAR_FILE = "sam2_peft.json"
"""Written beside every adapter: the method and the base architecture it was trained for."""

PARTIAL_CONFIG_FILE = "partial_config.json"
PARTIAL_WEIGHTS_FILE = "partial_model.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"

ADAPTER_FILE_NAMES = (PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, PARTIAL_CONFIG_FILE, PARTIAL_WEIGHTS_FILE)
"""Files that mark an adapter of some method: a save replaces (or removes) all of them, and the sidecar, at once,
so that an old adapter of another method cannot linger beside the new one (see `io.atomic_adapter_dir`)."""

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


class AdapterLoadError(RuntimeError):
    """An adapter could not be found, fetched or understood; the message says what was expected and found."""


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


def read_sidecar(adapter_dir: str | os.PathLike) -> dict | None:
    """The adapter's sidecar (`sam2_peft.json`), or None when it has none; `AdapterLoadError` when it is malformed."""
    sidecar = Path(adapter_dir) / SIDECAR_FILE
    if not sidecar.exists():
        return None
    fix = f"re-save the adapter with sam2-peft, or delete {SIDECAR_FILE} to load it without the architecture check"
    try:
        data = json.loads(sidecar.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterLoadError(f"'{sidecar}' is not valid JSON ({err}): {fix}.") from err
    if not isinstance(data, dict) or not isinstance(data.get("base_signature", {}), dict):
        raise AdapterLoadError(f"'{sidecar}' must be a JSON object with a 'base_signature' object: {fix}.")
    return data


def check_signature(model: nn.Module, adapter_dir: str | os.PathLike) -> None:
    """Raise `AdapterMismatchError` if the adapter in `adapter_dir` was trained for a different architecture."""
    sidecar = read_sidecar(adapter_dir)
    if sidecar is None:
        return
    expected = sidecar.get("base_signature", {})
    found = base_signature(model)
    differences = [
        f"{key}: adapter expects {expected[key]}, base model has {found.get(key)}"
        for key in expected
        if key != "model_type" and expected[key] != found.get(key)
    ]
    if differences:
        name = sidecar.get("base_model_name_or_path")
        raise AdapterMismatchError(
            f"The adapter in '{adapter_dir}' was trained for another base architecture"
            f"{f' ({name})' if name else ''}: " + "; ".join(differences)
        )


def read_adapter_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of an adapter's safetensors file, refusing a damaged file or NaN/infinite values.

    A truncated file would otherwise end in a safetensors traceback, and a non-finite weight would load silently and
    give empty masks (or a NaN model after merging), so both are `AdapterLoadError`s naming the file and tensor.
    """
    path = Path(path)
    try:
        state = load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise AdapterLoadError(
            f"'{path}' is not a complete safetensors file ({err}): it is truncated or damaged. Save the adapter "
            "again, or download it again."
        ) from err
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise AdapterLoadError(
                f"'{path}': tensor '{name}' holds {bad} NaN or infinite value(s) of {tensor.numel()}, so every mask "
                "would be empty. Training diverged: use an earlier checkpoint (checkpoints/step-N/adapter) or train "
                "again with a lower --lr."
            )
    return state


def write_sidecar(
    model: nn.Module, directory: Path, method: str, base_name: str | None, extra: dict | None = None
) -> None:
    """Write the sidecar into `directory` (the staging folder of a save, so it is published with the weights)."""
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
        with atomic_adapter_dir(directory, replaces=ADAPTER_FILE_NAMES) as staging:
            model.save_pretrained(staging, save_embedding_layers=False)
            write_sidecar(model, staging, self.name, base_name, {"lora": asdict(self)})


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
        with atomic_adapter_dir(directory, replaces=ADAPTER_FILE_NAMES) as staging:
            save_file(state, str(staging / PARTIAL_WEIGHTS_FILE), metadata={"format": "pt"})
            config = {"components": sorted(self.learning_rates), "base_model_name_or_path": base_name}
            atomic_write_json(staging / PARTIAL_CONFIG_FILE, config)
            write_sidecar(model, staging, self.name, base_name)


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
        with atomic_adapter_dir(directory, replaces=ADAPTER_FILE_NAMES) as staging:
            try:
                if self.save_dtype is not None:
                    sam.config.dtype = self.save_dtype
                sam.save_pretrained(staging, state_dict=state)
            finally:
                sam.config.dtype = trained_dtype
            write_sidecar(model, staging, self.name, base_name)


def _component(model: nn.Module, name: str) -> nn.Module:
    module = getattr(unwrap_sam(model), name, None)
    if module is None:
        raise ValueError(f"This model has no component '{name}' (video components need a Sam2VideoModel).")
    return module


def load_partial(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load partially fine-tuned weights into `model` in place; every saved tensor must fit."""
    directory = Path(directory)
    state = read_adapter_weights(directory / PARTIAL_WEIGHTS_FILE)
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


def read_adapter_json(path: str | os.PathLike) -> dict:
    """A JSON object of an adapter folder (its peft or partial config); `AdapterLoadError` when it is not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterLoadError(f"Could not read '{path}' as JSON ({err}): save the adapter again.") from err
    if not isinstance(data, dict):
        raise AdapterLoadError(
            f"Expected a JSON object in '{path}', found {type(data).__name__}: save the adapter again."
        )
    return data


def read_peft_config(directory: str | os.PathLike) -> dict:
    """The adapter's `adapter_config.json`, which must name its `peft_type`; `AdapterLoadError` otherwise."""
    config_file = Path(directory) / PEFT_CONFIG_FILE
    config = read_adapter_json(config_file)
    if not config.get("peft_type"):
        raise AdapterLoadError(
            f"'{config_file}' has no 'peft_type' field (e.g. \"LORA\"): it is not a peft adapter config; save the "
            "adapter again."
        )
    return config


def load_peft(model: nn.Module, directory: str | os.PathLike, **peft_kwargs) -> PeftModel:
    """`PeftModel.from_pretrained` with its weights checked first and config problems reported as `AdapterLoadError`."""
    directory = Path(directory)
    config_file = directory / PEFT_CONFIG_FILE
    read_peft_config(directory)
    if (directory / PEFT_WEIGHTS_FILE).exists():
        read_adapter_weights(directory / PEFT_WEIGHTS_FILE)
    try:
        return PeftModel.from_pretrained(model, str(directory), **peft_kwargs)
    except (ValueError, KeyError, TypeError) as err:
        raise AdapterLoadError(
            f"The adapter config '{config_file}' does not fit this base model or misses fields ({err}). Check its "
            "target_modules (module names of the base model) and fields, or save the adapter again."
        ) from err


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike, **peft_kwargs) -> nn.Module:
    """Load a saved adapter of any method into a base `Sam2Model` and return the adapted model.

    Raises `AdapterMismatchError` (another architecture) or `AdapterLoadError` (a damaged or non-finite weights
    file, a malformed config or sidecar, target modules that match nothing).
    """
    adapter_dir = Path(adapter_dir)
    check_signature(model, adapter_dir)
    if (adapter_dir / PARTIAL_CONFIG_FILE).exists():
        return load_partial(model, adapter_dir)
    if (adapter_dir / PEFT_CONFIG_FILE).exists():
        return load_peft(model, adapter_dir, **peft_kwargs)
    raise FileNotFoundError(
        f"No adapter in '{adapter_dir}': expected {PEFT_CONFIG_FILE} (peft) or {PARTIAL_CONFIG_FILE} (partial)."
    )


METHODS: dict[str, type[TuningMethod]] = {"lora": LoraMethod, "partial": PartialFinetuneMethod, "full": FullMethod}
"""Registry of tuning methods by name; other modules add theirs here."""
