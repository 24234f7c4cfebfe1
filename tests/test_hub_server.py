"""The loopback Hub, driven by the real huggingface_hub, transformers and peft code."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
from pathlib import Path

import httpx2
import pytest
import torch
from huggingface_hub import (
    HfApi,
    ModelCard,
    ModelCardData,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from tests.hub_server import HubServer

pytest_plugins = ["tests.hub_fixtures"]


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def download(repo_id: str, filename: str, **kwargs) -> bytes:
    """Content of a file fetched with the real `hf_hub_download`."""
    return Path(hf_hub_download(repo_id, filename, **kwargs)).read_bytes()


def test_whoami_answers_for_any_token(hub_server: HubServer) -> None:
    assert HfApi().whoami()["name"] == hub_server.user
    assert HfApi(token="another-token").whoami()["name"] == hub_server.user


def test_create_repo_conflict_exist_ok_and_private(hub_server: HubServer, make_hub_repo_id) -> None:
    api = HfApi()
    public, private = make_hub_repo_id("public"), make_hub_repo_id("private")

    url = api.create_repo(public)
    assert url.repo_id == public and url.startswith(hub_server.url)
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo(public)
    assert conflict.value.response.status_code == 409
    assert api.create_repo(public, exist_ok=True).repo_id == public
    assert api.list_repo_files(public) == [".gitattributes"]  # the Hub's initial commit

    api.create_repo(private, private=True)
    assert api.model_info(private).private is True
    assert api.model_info(public).private is False
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(private, token=False)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(private, ".gitattributes", token=False)
    api.model_info(public, token=False)  # public repos need no token


def test_create_repo_without_namespace_uses_token_user(hub_server: HubServer, make_hub_repo_id) -> None:
    name = make_hub_repo_id("bare").split("/")[1]
    assert HfApi().create_repo(name).repo_id == f"{hub_server.user}/{name}"


def test_regular_upload_round_trip(hub_server: HubServer, hub_repo_id: str) -> None:
    api = HfApi()
    api.create_repo(hub_repo_id)
    content = b'{"hidden_size": 8}\n'
    first = api.upload_file(path_or_fileobj=content, path_in_repo="config.json", repo_id=hub_repo_id)

    assert sorted(api.list_repo_files(hub_repo_id)) == [".gitattributes", "config.json"]
    (entry,) = api.get_paths_info(hub_repo_id, ["config.json"])
    assert entry.lfs is None and entry.size == len(content) and entry.blob_id == git_blob_sha1(content)
    info = api.model_info(hub_repo_id, files_metadata=True)
    assert info.sha == first.oid
    assert "config.json" in {sibling.rfilename for sibling in info.siblings}

    assert download(hub_repo_id, "config.json") == content
    meta = get_hf_file_metadata(hf_hub_url(hub_repo_id, "config.json"))
    assert (meta.etag, meta.size, meta.commit_hash) == (
        git_blob_sha1(content),
        len(content),
        first.oid,
    )

    # Same content again: preupload reports the remote oid, the client skips the commit.
    again = api.upload_file(path_or_fileobj=content, path_in_repo="config.json", repo_id=hub_repo_id)
    assert again.oid == first.oid


def test_lfs_upload_by_gitattributes_round_trips_bytes(hub_server: HubServer, hub_repo_id: str, tmp_path) -> None:
    api = HfApi()
    api.create_repo(hub_repo_id)
    weights = os.urandom(300_000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "weights.safetensors").write_bytes(weights)
    (tmp_path / "notes.txt").write_text("hello\n")
    start = len(hub_server.requests)

    api.upload_folder(repo_id=hub_repo_id, folder_path=tmp_path)

    calls = hub_server.requests[start:]
    assert ("POST", f"/{hub_repo_id}.git/info/lfs/objects/batch") in calls
    sha256 = hashlib.sha256(weights).hexdigest()
    upload_url = f"/{hub_repo_id}.git/info/lfs/objects/{sha256}/{len(weights)}"
    assert ("PUT", upload_url) in calls
    assert ("POST", f"/{hub_repo_id}.git/info/lfs/objects/verify") in calls

    files = {f.path: f for f in api.list_repo_tree(hub_repo_id, recursive=True)}
    assert set(files) == {
        ".gitattributes",
        "notes.txt",
        "sub",
        "sub/weights.safetensors",
    }
    lfs_file = files["sub/weights.safetensors"]
    assert lfs_file.lfs is not None and lfs_file.lfs.sha256 == sha256
    assert lfs_file.size == len(weights)
    assert files["notes.txt"].lfs is None
    sub_folder = api.list_repo_tree(hub_repo_id, "sub")
    assert [f.path for f in sub_folder] == ["sub/weights.safetensors"]

    assert download(hub_repo_id, "sub/weights.safetensors") == weights
    meta = get_hf_file_metadata(hf_hub_url(hub_repo_id, "sub/weights.safetensors"))
    assert meta.etag == sha256 and meta.size == len(weights)

    snapshot = api.snapshot_download(hub_repo_id)
    assert Path(snapshot, "sub", "weights.safetensors").read_bytes() == weights


def test_lfs_upload_by_size_threshold(hub_server: HubServer, tmp_path) -> None:
    with HubServer(lfs_threshold=1024) as small:
        api = HfApi(endpoint=small.url)
        repo_id = api.create_repo("threshold").repo_id
        big, tiny = os.urandom(4096), b"tiny"
        api.upload_file(path_or_fileobj=big, path_in_repo="big.txt", repo_id=repo_id)
        api.upload_file(path_or_fileobj=tiny, path_in_repo="tiny.txt", repo_id=repo_id)

        big_info, tiny_info = api.get_paths_info(repo_id, ["big.txt", "tiny.txt"])
        assert big_info.lfs is not None and tiny_info.lfs is None
        cached = download(repo_id, "big.txt", endpoint=small.url, cache_dir=tmp_path)
        assert cached == big
    assert not small.running


def test_stop_cuts_connections_and_restart_keeps_repos(hub_server: HubServer) -> None:
    server = HubServer().start()
    api = HfApi(endpoint=server.url)
    # Leaves a keep-alive connection in the client's pool.
    repo_id = api.create_repo("kept").repo_id
    port = server.port

    server.stop()
    with pytest.raises(httpx2.ConnectError):
        api.model_info(repo_id)

    server.start()
    assert server.port == port
    assert api.model_info(repo_id).id == repo_id
    server.stop()


def test_request_bodies_are_drained_for_keep_alive(hub_server: HubServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", hub_server.port, timeout=10)
    # An error answer to a request with a body leaves the connection usable...
    conn.request("POST", "/api/not-a-route", body=b"x" * 10_000)
    response = conn.getresponse()
    assert response.status == 404 and b"Not implemented" in response.read()
    sock = conn.sock

    # ... and so does a chunked body.
    chunks = [b'{"content": "---\\nlicense: mit\\n', b'---\\n"}']
    conn.request("POST", "/api/validate-yaml", body=iter(chunks), encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 200
    assert json.loads(response.read()) == {"errors": [], "warnings": []}

    conn.request("GET", "/api/whoami-v2", headers={"Authorization": "Bearer t"})
    response = conn.getresponse()
    assert json.loads(response.read())["name"] == hub_server.user
    assert conn.sock is sock  # one connection for all three requests
    conn.close()


def test_branches_and_revisions(hub_server: HubServer, hub_repo_id: str) -> None:
    api = HfApi()
    api.create_repo(hub_repo_id)
    main = api.upload_file(path_or_fileobj=b"main\n", path_in_repo="value.txt", repo_id=hub_repo_id)
    api.create_branch(hub_repo_id, branch="dev")
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_branch(hub_repo_id, branch="dev")
    assert conflict.value.response.status_code == 409
    api.create_branch(hub_repo_id, branch="dev", exist_ok=True)

    dev = api.upload_file(
        path_or_fileobj=b"dev\n",
        path_in_repo="value.txt",
        repo_id=hub_repo_id,
        revision="dev",
    )
    api.upload_file(
        path_or_fileobj=b"x",
        path_in_repo="only-dev.txt",
        repo_id=hub_repo_id,
        revision="dev",
    )

    assert download(hub_repo_id, "value.txt") == b"main\n"
    assert download(hub_repo_id, "value.txt", revision="dev") == b"dev\n"
    assert download(hub_repo_id, "value.txt", revision=main.oid) == b"main\n"
    assert download(hub_repo_id, "value.txt", revision=dev.oid) == b"dev\n"
    assert "only-dev.txt" in api.list_repo_files(hub_repo_id, revision="dev")
    assert "only-dev.txt" not in api.list_repo_files(hub_repo_id)
    assert {b.name for b in api.list_repo_refs(hub_repo_id).branches} == {"main", "dev"}

    with pytest.raises(EntryNotFoundError):
        hf_hub_download(hub_repo_id, "only-dev.txt")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(hub_repo_id, "value.txt", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        api.list_repo_files(hub_repo_id, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        api.upload_file(
            path_or_fileobj=b"x",
            path_in_repo="x.txt",
            repo_id=hub_repo_id,
            revision="no-such-branch",
        )
    assert not api.revision_exists(hub_repo_id, "no-such-branch")


def test_missing_repo_and_file_raise_client_errors(hub_server: HubServer, hub_repo_id: str) -> None:
    api = HfApi()
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(hub_repo_id, "config.json")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(hub_repo_id)
    assert not api.repo_exists(hub_repo_id)

    api.create_repo(hub_repo_id)
    assert api.repo_exists(hub_repo_id)
    assert not api.file_exists(hub_repo_id, "config.json")
    with pytest.raises(EntryNotFoundError):
        api.delete_file("config.json", repo_id=hub_repo_id)
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id=hub_repo_id)
    assert api.file_exists(hub_repo_id, "config.json")
    api.delete_file("config.json", repo_id=hub_repo_id)
    assert api.list_repo_files(hub_repo_id) == [".gitattributes"]


def test_model_card_metadata_round_trip(hub_server: HubServer, hub_repo_id: str) -> None:
    HfApi().create_repo(hub_repo_id)
    data = ModelCardData(license="apache-2.0", library_name="peft", tags=["sam", "lora"])
    card = ModelCard.from_template(data, model_description="A test adapter.")
    card.push_to_hub(hub_repo_id)

    card = ModelCard.load(hub_repo_id)
    assert card.data.license == "apache-2.0"
    assert card.data.library_name == "peft"
    assert card.data.tags == ["sam", "lora"]
    assert "A test adapter." in card.text


def _tiny_base() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def test_peft_push_to_hub_then_from_pretrained_online_and_offline(
    hub_server: HubServer, hub_repo_id: str, hub_offline
) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=False)
    model = get_peft_model(_tiny_base(), config)
    model.push_to_hub(hub_repo_id)

    siblings = HfApi().model_info(hub_repo_id, files_metadata=True).siblings
    files = {sibling.rfilename: sibling for sibling in siblings}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(files)
    # The weights went through the LFS batch API (`.safetensors` is an LFS pattern).
    assert files["adapter_model.safetensors"].lfs is not None

    expected = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    inputs = torch.randn(3, 16)
    with torch.no_grad():
        reference = model(inputs)

    loaded = PeftModel.from_pretrained(_tiny_base(), hub_repo_id)
    got = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert got.keys() == expected.keys() and len(got) == 4
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    with torch.no_grad():
        assert torch.equal(loaded(inputs), reference)

    requests_before = len(hub_server.requests)
    with hub_offline():
        assert not hub_server.running
        with pytest.raises(OfflineModeIsEnabled):
            HfApi().model_info(hub_repo_id)
        offline = PeftModel.from_pretrained(_tiny_base(), hub_repo_id)
        with torch.no_grad():
            assert torch.equal(offline(inputs), reference)
    assert len(hub_server.requests) == requests_before  # served from the cache only
    assert hub_server.running
    # Back online after the block.
    assert HfApi().model_info(hub_repo_id).id == hub_repo_id
