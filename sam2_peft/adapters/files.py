"""An adapter folder on disk: its file names, the sidecar (`sam2_peft.json`: method and base architecture), and
reading, checking, saving and loading the adapter files of every method.

Every problem with a folder's content is an `AdapterLoadError` (or `AdapterMismatchError` for another architecture)
naming the file and the fix, so that the predictor, merging, serving and the CLI report bad input the same way.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import torch
from peft import PeftModel
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..io import atomic_adapter_dir, atomic_write_json
from ..models.loading import family_of
from ..models.names import FAMILIES
from ..models.segmenter import unwrap_sam

SIDECAR_FILE = "sam2_peft.json"
"""Written beside every adapter: the method and the base architecture it was trained for."""

PARTIAL_CONFIG_FILE = "partial_config.json"
PARTIAL_WEIGHTS_FILE = "partial_model.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PICKLED_WEIGHTS_FILE = "adapter_model.bin"
"""peft's old pickle format: refused, since unpickling a file can run any code in it."""

ADAPTER_FILE_NAMES = (PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, PARTIAL_CONFIG_FILE, PARTIAL_WEIGHTS_FILE)
"""Files that mark an adapter of some method: a save replaces (or removes) all of them, and the sidecar, at once,
so that an old adapter of another method cannot linger beside the new one (see `io.atomic_adapter_dir`)."""

ADAPTER_FILES = (*ADAPTER_FILE_NAMES, SIDECAR_FILE)
"""Every file an adapter folder may hold (a peft adapter, or a partial fine-tune, plus the sidecar)."""

TRAINING_CONFIG_FILE = "training_config.json"
"""Written by the trainer beside the adapter (and uploaded by push): how it was trained, its prompts included."""

CUSTOM_PEFT_MODULES = {"PTSAM": "sam2_peft.tuners.ptsam"}
"""Peft types this package adds to peft: importing the module registers the type."""


class AdapterMismatchError(ValueError):
    """An adapter does not fit the base model it is being loaded into."""


class AdapterLoadError(RuntimeError):
    """An adapter could not be found, fetched or understood; the message says what was expected and found."""


def base_signature(model: nn.Module) -> dict:
    """The architecture facts an adapter depends on: family, image size and the widths of each component."""
    config = unwrap_sam(model).config
    family = family_of(config)
    backbone = config.vision_config.backbone_config
    if family.name == "sam2":
        widths, blocks = list(backbone.embed_dim_per_stage), list(backbone.blocks_per_stage)
    elif family.name == "edgetam":
        widths, blocks = (
            list(config.vision_config.backbone_channel_list[::-1]),
            [getattr(backbone, "architecture", None)],
        )
    else:
        widths, blocks = [int(backbone.hidden_size)], [int(backbone.num_hidden_layers)]
    return {
        "family": family.name,
        "model_type": config.model_type,
        "image_size": int(config.prompt_encoder_config.image_size),
        "encoder_widths": widths,
        "encoder_blocks": blocks,
        "decoder_width": int(config.mask_decoder_config.hidden_size),
    }


def read_sidecar(adapter_dir: str | os.PathLike) -> dict | None:
    """The adapter's sidecar (`sam2_peft.json`), or None when it has none; `AdapterLoadError` when it is malformed."""
    sidecar = Path(adapter_dir) / SIDECAR_FILE
    if not sidecar.exists():
        return None
    fix = f"re-save the adapter with sam2-peft, or delete {SIDECAR_FILE} to load it without the architecture check"
    data = read_adapter_json(sidecar, fix)
    if not isinstance(data.get("base_signature", {}), dict):
        raise AdapterLoadError(f"'{sidecar}' must be a JSON object with a 'base_signature' object: {fix}.")
    return data


def check_signature(model: nn.Module, adapter_dir: str | os.PathLike) -> None:
    """Raise `AdapterMismatchError` if the adapter in `adapter_dir` was trained for a different architecture."""
    sidecar = read_sidecar(adapter_dir)
    if sidecar is None:
        return
    expected = sidecar.get("base_signature", {})
    found = base_signature(model)
    name = sidecar.get("base_model_name_or_path")
    trained_for = f" ({name})" if name else ""
    family = expected.get("family", "sam2")  # sidecars written before other families existed name none
    if family != found["family"]:
        title = FAMILIES[family].title if family in FAMILIES else family
        raise AdapterMismatchError(
            f"The adapter in '{adapter_dir}' was trained for {title}{trained_for}, but this base model is "
            f"{FAMILIES[found['family']].title}: load it into a base of its family (--base-model / base_model=)."
        )
    differences = [
        f"{key}: adapter expects {expected[key]}, base model has {found.get(key)}"
        for key in expected
        if key not in ("model_type", "family") and expected[key] != found.get(key)
    ]
    if differences:
        raise AdapterMismatchError(
            f"The adapter in '{adapter_dir}' was trained for another base architecture{trained_for}: "
            + "; ".join(differences)
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


def save_peft_adapter(
    model: PeftModel, directory: str | os.PathLike, method: str, base_name: str | None, options: dict
) -> None:
    """Save a peft adapter (config, weights) and its sidecar (`{method: options}` recorded) as one atomic publish."""
    model.peft_config["default"].base_model_name_or_path = base_name
    with atomic_adapter_dir(directory, replaces=ADAPTER_FILE_NAMES) as staging:
        model.save_pretrained(staging, save_embedding_layers=False)
        write_sidecar(model, staging, method, base_name, {method: options})


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


def read_adapter_json(path: str | os.PathLike, fix: str = "save the adapter again") -> dict:
    """A JSON object of an adapter folder (its config or sidecar); `AdapterLoadError` saying `fix` when it is not
    one (unreadable, not JSON, nested too deeply for Python's parser, or not an object)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterLoadError(f"'{path}' is not valid JSON ({err}): {fix}.") from err
    except RecursionError as err:
        raise AdapterLoadError(f"'{path}' is not an adapter's JSON (nested too deeply to read): {fix}.") from err
    if not isinstance(data, dict):
        raise AdapterLoadError(f"Expected a JSON object in '{path}', found {type(data).__name__}: {fix}.")
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


def ensure_peft_type(peft_type: str, config_file: Path) -> None:
    """Import the module of a custom peft type so peft knows it; `AdapterLoadError` on a type nobody registers."""
    if peft_type in CUSTOM_PEFT_MODULES:
        try:
            importlib.import_module(CUSTOM_PEFT_MODULES[peft_type])
        except ImportError as err:
            raise AdapterLoadError(
                f"'{config_file}' is a {peft_type} adapter, but {CUSTOM_PEFT_MODULES[peft_type]} is not available "
                f"in this installation of sam2_peft: {err}"
            ) from err
    known = sorted(str(getattr(k, "value", k)) for k in PEFT_TYPE_TO_CONFIG_MAPPING)
    if peft_type not in known:
        raise AdapterLoadError(
            f"Unknown peft_type '{peft_type}' in '{config_file}'; expected one of peft's types ({', '.join(known[:8])}"
            f", ...) or one this package adds ({', '.join(CUSTOM_PEFT_MODULES)})."
        )


def peft_weights_path(directory: Path) -> Path:
    """The adapter's safetensors weights; `AdapterLoadError` when it has none, or only a pickle (never unpickled)."""
    path = directory / PEFT_WEIGHTS_FILE
    if path.exists():
        return path
    pickled = directory / PICKLED_WEIGHTS_FILE
    if pickled.exists():
        raise AdapterLoadError(
            f"'{pickled}' is a pickle, which can run any code when loaded, so it is not loaded: convert it to "
            f'{PEFT_WEIGHTS_FILE} once, where you trust its source (python -c "import torch; from safetensors.torch '
            f"import save_file; save_file(torch.load('{pickled}', weights_only=True), '{path}')\"), then delete it."
        )
    raise AdapterLoadError(f"'{directory}' has {PEFT_CONFIG_FILE} but no weights ({PEFT_WEIGHTS_FILE}).")


def check_lora_rank(config: dict, state: dict[str, torch.Tensor], config_file: Path) -> None:
    """`AdapterLoadError` when a LoRA config's `r` differs from the rank of its saved weights (an edited config)."""
    if config.get("peft_type") != "LORA" or config.get("rank_pattern"):
        return
    ranks = sorted({int(t.shape[0]) for name, t in state.items() if ".lora_A." in name and t.ndim == 2})
    if ranks and ranks != [config.get("r")]:
        raise AdapterLoadError(
            f"'{config_file}' says r={config.get('r')!r}, but the LoRA weights beside it have rank "
            f'{", ".join(map(str, ranks))}: set "r": {ranks[0]} again (r is fixed when an adapter is trained), or '
            "train a new adapter with another --lora-r."
        )


def load_peft(model: nn.Module, directory: str | os.PathLike, **peft_kwargs) -> PeftModel:
    """`PeftModel.from_pretrained` with its weights checked first and config problems reported as `AdapterLoadError`
    (weights of another shape than the base's modules: `AdapterMismatchError`)."""
    directory = Path(directory)
    config_file = directory / PEFT_CONFIG_FILE
    config = read_peft_config(directory)
    ensure_peft_type(config["peft_type"], config_file)
    check_lora_rank(config, read_adapter_weights(peft_weights_path(directory)), config_file)
    try:
        return PeftModel.from_pretrained(model, str(directory), **peft_kwargs)
    except (ValueError, KeyError, TypeError) as err:
        raise AdapterLoadError(
            f"The adapter config '{config_file}' does not fit this base model or misses fields ({err}). Check its "
            "target_modules (module names of the base model) and fields, or save the adapter again."
        ) from err
    except RuntimeError as err:
        mismatch = next((line.strip(" \t.") for line in str(err).splitlines() if "size mismatch" in line), None)
        if mismatch is None:
            raise
        raise AdapterMismatchError(
            f"The weights in '{directory / PEFT_WEIGHTS_FILE}' do not fit this base model ({mismatch}): the adapter "
            f"was trained for another base architecture (it has no {SIDECAR_FILE} naming it). Load it into the base "
            "it was trained for (--base-model / base_model=)."
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
