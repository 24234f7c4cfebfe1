"""Find an adapter (local folder or Hub repo), check what it is, and load it onto its base model.

Every failure is an `AdapterLoadError` naming what was asked for, what was expected and what was found.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from torch import nn
from transformers import Sam2Processor

from ..models.loading import hub_unreachable_reason, load_base_model
from .files import (
    ADAPTER_FILES,
    PARTIAL_CONFIG_FILE,
    PARTIAL_WEIGHTS_FILE,
    PEFT_CONFIG_FILE,
    TRAINING_CONFIG_FILE,
    AdapterLoadError,
    ensure_peft_type,
    load_adapter,
    peft_weights_path,
    read_adapter_json,
    read_peft_config,
    read_sidecar,
)

ADAPTER_DOWNLOADS = (*ADAPTER_FILES, TRAINING_CONFIG_FILE)
"""The files of a Hub adapter repo that are downloaded: nothing else (a model card, pictures) is needed to load it."""

MAX_DOWNLOAD_BYTES = {".json": 16 * 2**20, ".safetensors": 8 * 2**30}
"""The largest file of each kind that is downloaded: the repo's file sizes are checked first, so that a repo that is
not (only) an adapter cannot make a load download gigabytes."""


@dataclass(frozen=True)
class AdapterInfo:
    """A resolved adapter folder and what it declares.

    Attributes:
        directory: local folder holding the adapter files (a Hub snapshot in the cache, or the given path).
        kind: `"peft"` (adapter_config.json) or `"partial"` (partial_config.json).
        peft_type: the peft type (`"LORA"`, `"PTSAM"`, ...) or None for partial fine-tunes.
        base_model: `base_model_name_or_path` recorded with the adapter (None if it was not recorded).
    """

    directory: Path
    kind: str
    peft_type: str | None
    base_model: str | None


def download_adapter(
    adapter_id_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
) -> Path:
    """A local folder with the adapter files: `adapter_id_or_path` itself if it is a folder, else a Hub snapshot."""
    path = Path(adapter_id_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(adapter_id_or_path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise AdapterLoadError(f"Expected an adapter folder or a Hub repo id ('org/name'), found '{name}'.")
    at = f"'{name}'" + (f" at revision '{revision}'" if revision else "")
    try:
        if hub_unreachable_reason() is None:  # else the cache is used: nothing to download
            check_download_sizes(name, revision, token)
        folder = snapshot_download(name, revision=revision, token=token, allow_patterns=list(ADAPTER_DOWNLOADS))
    except RevisionNotFoundError as err:
        raise AdapterLoadError(
            f"The Hub repo '{name}' has no revision '{revision}' (expected a branch, tag or commit of it)."
        ) from err
    except (RepositoryNotFoundError, GatedRepoError) as err:
        raise AdapterLoadError(
            f"No adapter repo {at} on the Hub (nor a local folder of that name): it does not exist, or it is private "
            "and no valid token was given "
            "(log in with `hf auth login` or set HF_TOKEN)."
        ) from err
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        why = (
            "offline mode is on (HF_HUB_OFFLINE is set): unset HF_HUB_OFFLINE to download it"
            if constants.HF_HUB_OFFLINE
            else "the Hub is unreachable: connect once to cache it"
        )
        raise AdapterLoadError(
            f"Cannot fetch {at}: it is not in the local cache and {why}, or pass a local folder."
        ) from err
    except HfHubHTTPError as err:
        raise AdapterLoadError(f"The Hub refused {at}: {err}") from err
    return Path(folder)


def check_download_sizes(repo_id: str, revision: str | None, token: str | bool | None) -> None:
    """`AdapterLoadError` when a file of `ADAPTER_DOWNLOADS` in the Hub repo is over `MAX_DOWNLOAD_BYTES` for its kind
    (read from the repo's file metadata, before anything is downloaded)."""
    for file in HfApi().get_paths_info(repo_id, list(ADAPTER_DOWNLOADS), revision=revision, token=token):
        limit = MAX_DOWNLOAD_BYTES.get(Path(file.path).suffix)
        size = getattr(file, "size", None)
        if limit is not None and size is not None and size > limit:
            raise AdapterLoadError(
                f"'{file.path}' of the Hub repo '{repo_id}' weighs {size / 2**20:,.1f} MiB, over the "
                f"{limit / 2**20:,.0f} MiB that an adapter's {Path(file.path).suffix} file may have, so it is not "
                f"downloaded: check that it is the adapter you meant. If it is, download it yourself (hf download "
                f"{repo_id} --local-dir DIR) and pass that folder."
            )


def inspect_adapter(directory: str | os.PathLike) -> AdapterInfo:
    """Read what an adapter folder declares; raise `AdapterLoadError` if files are missing or the type is unknown."""
    directory = Path(directory)
    partial, peft = directory / PARTIAL_CONFIG_FILE, directory / PEFT_CONFIG_FILE
    read_sidecar(directory)  # a malformed sidecar fails here, before any download or model load
    if partial.exists():
        if not (directory / PARTIAL_WEIGHTS_FILE).exists():
            raise AdapterLoadError(f"'{directory}' has {PARTIAL_CONFIG_FILE} but no {PARTIAL_WEIGHTS_FILE}.")
        return AdapterInfo(directory, "partial", None, read_adapter_json(partial).get("base_model_name_or_path"))
    if not peft.exists():
        found = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
        raise AdapterLoadError(
            f"No adapter in '{directory}': expected {PEFT_CONFIG_FILE} (peft) or {PARTIAL_CONFIG_FILE} (partial "
            f"fine-tune), found {found or 'nothing'}."
        )
    peft_weights_path(directory)
    config = read_peft_config(directory)
    peft_type = config["peft_type"]
    ensure_peft_type(peft_type, peft)
    return AdapterInfo(directory, "peft", peft_type, config.get("base_model_name_or_path"))


def trained_prompt(directory: str | os.PathLike) -> str | None:
    """The prompt type the adapter was trained with (`box`, `point`, `mixed`, `none`), None when not recorded.

    Read from the sidecar's `prompt`, else from `training_config.json`'s dataset config (`prompts.prompt` under
    `dataset`, or under `data` when that holds the config rather than the data source)."""
    directory = Path(directory)
    sidecar = read_sidecar(directory) or {}
    if isinstance(sidecar.get("prompt"), str):
        return sidecar["prompt"]
    path = directory / TRAINING_CONFIG_FILE
    if not path.exists():
        return None
    config = read_adapter_json(path)
    for key in ("dataset", "data"):
        prompts = config.get(key, {}).get("prompts") if isinstance(config.get(key), dict) else None
        if isinstance(prompts, dict) and isinstance(prompts.get("prompt"), str):
            return prompts["prompt"]
    return None


def load_adapted_model(
    adapter_id_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    base_model: str | None = None,
    base_revision: str | None = None,
    token: str | bool | None = None,
    device: torch.device | str | None = None,
    video: bool = False,
) -> tuple[nn.Module, Sam2Processor, AdapterInfo]:
    """Download (if needed) an adapter, load the base it names (or `base_model`; its video model with `video`), and
    apply the adapter.

    Returns the adapted model in eval mode (a `PeftModel` for peft adapters, a `Sam2Model` for partial fine-tunes),
    the base model's processor, and the resolved `AdapterInfo`. The adapter's recorded base architecture is checked
    against the loaded base (`AdapterMismatchError` on a different image size or widths).
    """
    info = inspect_adapter(download_adapter(adapter_id_or_path, revision=revision, token=token))
    base_name = base_model or info.base_model
    if not base_name:
        raise AdapterLoadError(
            f"The adapter '{adapter_id_or_path}' does not record its base model (base_model_name_or_path is empty): "
            "pass base_model='facebook/sam2.1-hiera-...' or a local folder."
        )
    model, processor = load_base_model(base_name, video=video, revision=base_revision, device=device)
    model = load_adapter(model, info.directory)
    return model.eval(), processor, info
