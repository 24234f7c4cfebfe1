"""Pytest fixtures pointing huggingface_hub, transformers and peft at `HubServer`.

Enable with `pytest_plugins = ["tests.hub_fixtures"]` in `tests/conftest.py`.

- `hub_server` (session): the running server; environment variables and the constants
  huggingface_hub derived from them at import are patched for the whole session.
- `hub_repo_id`, `make_hub_repo_id` (function): unique `user/name` ids (not created).
- `hub_offline` (function): `with hub_offline(): ...` stops the server and enables
  `HF_HUB_OFFLINE=1`, so only the local cache answers; leaving restarts the server.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest

from tests.hub_server import HubServer

HUB_TOKEN = "hf_test_token"


def _reset_clients() -> None:
    """Drop what holds connections or a captured endpoint: session, fsspec cache."""
    from huggingface_hub import HfFileSystem
    from huggingface_hub.utils import close_session

    close_session()
    HfFileSystem.clear_instance_cache()


def patch_hub(mp: pytest.MonkeyPatch, endpoint: str, home: Path) -> None:
    """Point huggingface_hub, transformers and peft at `endpoint`, caching in `home`."""
    from huggingface_hub import constants, hf_api

    cache = home / "hub"
    env = {
        "HF_ENDPOINT": endpoint,
        "HF_TOKEN": HUB_TOKEN,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    for name, value in env.items():
        mp.setenv(name, value)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGINGFACE_HUB_CACHE"):
        mp.delenv(name, raising=False)

    # huggingface_hub reads its environment once, at import: patch its constants too.
    resolve_url = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    values = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": resolve_url,
        "HF_URL_HOSTS": constants.HF_URL_HOSTS | {"127.0.0.1"},
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache),
        "HUGGINGFACE_HUB_CACHE": str(cache),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
    }
    for name, value in values.items():
        mp.setattr(constants, name, value)
    # The module-level HfApi behind `huggingface_hub.create_repo`, `upload_file`, ...
    mp.setattr(hf_api.api, "endpoint", endpoint)
    try:
        import transformers.utils.hub as transformers_hub

        # transformers' shared HfApi, rebuilt lazily with the patched endpoint.
        mp.setattr(transformers_hub, "_hf_api", None)
    except ImportError:
        pass
    _reset_clients()


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    """The running loopback Hub that every Hub client call of the session talks to."""
    server = HubServer().start()
    with pytest.MonkeyPatch.context() as mp:
        patch_hub(mp, server.url, tmp_path_factory.mktemp("hf_home"))
        try:
            yield server
        finally:
            server.stop()
            _reset_clients()
    _reset_clients()  # after the constants are restored


@pytest.fixture
def make_hub_repo_id(hub_server: HubServer) -> Callable[[str], str]:
    """Factory of unique ids in the user's namespace: `make_hub_repo_id("adapter")`."""

    def make(prefix: str = "repo") -> str:
        return f"{hub_server.user}/{prefix}-{uuid.uuid4().hex[:10]}"

    return make


@pytest.fixture
def hub_repo_id(make_hub_repo_id: Callable[[str], str]) -> str:
    """One unique repo id (not created)."""
    return make_hub_repo_id("repo")


@contextmanager
def offline_hub(server: HubServer) -> Iterator[HubServer]:
    """Stop `server` and enable offline mode (env and constant); undo both on exit."""
    from huggingface_hub import constants

    server.stop()
    _reset_clients()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(constants, "HF_HUB_OFFLINE", True)
        try:
            yield server
        finally:
            server.start()


@pytest.fixture
def hub_offline(
    hub_server: HubServer,
) -> Callable[[], AbstractContextManager[HubServer]]:
    """`with hub_offline(): ...` runs the block with the Hub down, offline mode on."""
    return lambda: offline_hub(hub_server)
