"""Upload a trained adapter to the Hugging Face Hub with a generated model card."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx2
from huggingface_hub import CommitInfo, HfApi, constants
from huggingface_hub.errors import OfflineModeIsEnabled

from ..adapters.files import (
    ADAPTER_FILES,
    PARTIAL_CONFIG_FILE,
    PARTIAL_WEIGHTS_FILE,
    PEFT_CONFIG_FILE,
    PEFT_WEIGHTS_FILE,
    SIDECAR_FILE,
    TRAINING_CONFIG_FILE,
    AdapterLoadError,
    read_adapter_weights,
)
from ..adapters.resolve import inspect_adapter
from .model_card import PICTURE_NAME, build_model_card, comparison_picture, is_hub_id

logger = logging.getLogger(__name__)

EXTRA_FILES = (TRAINING_CONFIG_FILE,)
"""Run files uploaded beside the adapter when present (small, and they say how it was trained)."""


class HubUnreachableError(AdapterLoadError):
    """The Hub could not be reached for an upload (offline mode, no network, a wrong endpoint)."""


@contextmanager
def _reaching_hub(repo_id: str) -> Iterator[None]:
    """Turn offline mode and connection failures into a `HubUnreachableError` that says how to fix them."""
    try:
        yield
    except OfflineModeIsEnabled as err:
        raise HubUnreachableError(
            f"Cannot push to '{repo_id}': Hugging Face Hub offline mode is on (HF_HUB_OFFLINE=1). Unset HF_HUB_OFFLINE "
            "when you are online and run the push again; nothing was uploaded."
        ) from err
    except (httpx2.TransportError, ConnectionError, TimeoutError) as err:
        raise HubUnreachableError(
            f"Cannot push to '{repo_id}': the Hub at {constants.ENDPOINT} is unreachable ({err}); you seem to be "
            "offline. Check your network (or HF_ENDPOINT) and run the push again; nothing was uploaded."
        ) from err


def push_adapter(
    output_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    base_model: str | None = None,
    license: str | None = None,
) -> CommitInfo:
    """Upload the adapter in `output_dir` (a training run's folder) to `repo_id`, with a README.md model card.

    Creates the repo if needed (`private` applies only then) and the branch `revision` if it does not exist yet.
    Only the adapter files, `training_config.json`, the card and one comparison picture are uploaded (never
    checkpoints). `base_model` replaces the recorded base (e.g. the Hub id of the local copy the run trained on), in
    the uploaded adapter config and the card, so that downstream users resolve it; `license` (e.g. `apache-2.0`) goes
    into the card's metadata. The card is `build_model_card`'s, the same `write_model_card` leaves in the run. Token and login work as in
    huggingface_hub (`token=`, `HF_TOKEN`, or `hf auth login`).

    Returns the commit's `CommitInfo` (its `oid` and `commit_url`).
    """
    output_dir = Path(output_dir)
    info = inspect_adapter(output_dir)  # fails clearly on a folder without an adapter
    for weights in (PEFT_WEIGHTS_FILE, PARTIAL_WEIGHTS_FILE):
        if (output_dir / weights).exists():
            read_adapter_weights(output_dir / weights)  # never publish a damaged or NaN adapter
    recorded = base_model or info.base_model
    if not is_hub_id(recorded):
        logger.warning(
            "The adapter's base model is '%s', not a Hub id: downstream users will have to pass base_model=... "
            "(push with base_model='facebook/sam2.1-hiera-...' to record the Hub id).",
            recorded,
        )
    api = HfApi(token=token)
    with _reaching_hub(repo_id):
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
    with _reaching_hub(repo_id), tempfile.TemporaryDirectory(prefix="sam2-peft-push-") as staging_name:
        staging = Path(staging_name)
        for name in (*ADAPTER_FILES, *EXTRA_FILES):
            if (output_dir / name).exists():
                shutil.copy2(output_dir / name, staging / name)
        if base_model is not None:
            _set_base_model(staging, base_model)
        picture = comparison_picture(output_dir)
        if picture is not None:
            shutil.copy2(picture, staging / PICTURE_NAME)
        card = build_model_card(
            output_dir,
            repo_id,
            base_model=base_model,
            picture=PICTURE_NAME if picture is not None else None,
            license=license,
        )
        card.save(staging / "README.md")
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=staging,
            revision=revision,
            commit_message=commit_message or f"Upload {info.peft_type or info.kind} adapter with sam2-peft",
            allow_patterns=[*ADAPTER_FILES, *EXTRA_FILES, PICTURE_NAME, "README.md"],
        )


def _set_base_model(folder: Path, base_model: str) -> None:
    """Record `base_model` as `base_model_name_or_path` in every config of the staged adapter."""
    for name in (PEFT_CONFIG_FILE, PARTIAL_CONFIG_FILE, SIDECAR_FILE):
        path = folder / name
        if path.exists():
            config = json.loads(path.read_text())
            config["base_model_name_or_path"] = base_model
            path.write_text(json.dumps(config, indent=2) + "\n")
