"""Push adapters to the loopback Hub and use them from there, online, at a revision, and offline from the cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from peft import PeftModel

from sam2_peft.adapters import AdapterLoadError
from sam2_peft.hub.push import push_adapter
from sam2_peft.inference.predictor import Sam2PeftPredictor
from sam2_peft.models.loading import load_base_model
from tests.adapter_helpers import make_adapter, non_square_images

BOX = [[30, 20, 90, 50], [5, 5, 40, 60]]


def logits(predictor: Sam2PeftPredictor, image: np.ndarray) -> np.ndarray:
    return predictor.predict(image, boxes=BOX, return_logits=True).logits


@pytest.mark.parametrize("kind", ["lora", "partial"])
def test_push_then_load_online_and_offline(kind, hub_server, make_hub_repo_id, hub_offline, saved_tiny_model, tmp_path):
    adapter = make_adapter(kind, saved_tiny_model, tmp_path / kind)
    repo_id = make_hub_repo_id(kind)
    commit = push_adapter(adapter, repo_id)

    api = HfApi()
    weights = "adapter_model.safetensors" if kind == "lora" else "partial_model.safetensors"
    config = "adapter_config.json" if kind == "lora" else "partial_config.json"
    expected = {".gitattributes", "README.md", "comparison.png", "sam2_peft.json", config, weights}
    assert set(api.list_repo_files(repo_id)) == expected
    assert api.model_info(repo_id).sha == commit.oid
    paths = {entry.path: entry for entry in api.get_paths_info(repo_id, [weights, config])}
    assert paths[weights].lfs is not None  # LFS upload (.safetensors rule)
    assert paths[config].lfs is None  # regular upload
    assert Path(hf_hub_download(repo_id, weights)).read_bytes() == (adapter / weights).read_bytes()

    card = ModelCard.load(repo_id)
    assert card.data.pipeline_tag == "mask-generation" and {"sam2", kind} <= set(card.data.tags)
    assert card.data.library_name == ("peft" if kind == "lora" else None)  # peft cannot load a partial fine-tune
    assert [(r.metric_type, r.metric_value) for r in card.data.eval_results][:2] == [("iou", 0.72), ("dice", 0.83)]
    assert card.data.base_model is None  # a local folder is not a Hub id; the text says so
    assert "| IoU | 0.4100 | 0.7200 |" in card.text and "| Dice | 0.5500 | 0.8300 |" in card.text
    assert (
        "nuclei-coelho2009" in card.text
        and "12,345" in card.text
        and "![Base vs. fine-tuned](comparison.png)" in card.text
    )
    picture = next((adapter / "panels" / "final").glob("*.png")).read_bytes()
    assert Path(hf_hub_download(repo_id, "comparison.png")).read_bytes() == picture

    image = non_square_images(1)[0]
    local = logits(Sam2PeftPredictor.from_pretrained(adapter, device="cpu"), image)
    from_hub = Sam2PeftPredictor.from_pretrained(repo_id, device="cpu")
    np.testing.assert_array_equal(logits(from_hub, image), local)
    if kind == "lora":  # plain peft reads the same repo
        base, processor = load_base_model(str(saved_tiny_model))
        plain = Sam2PeftPredictor(PeftModel.from_pretrained(base, repo_id), processor, device="cpu")
        unmerged = Sam2PeftPredictor.from_pretrained(adapter, device="cpu", merge=False)  # the same computation
        np.testing.assert_array_equal(logits(plain, image), logits(unmerged, image))

    requests = len(hub_server.requests)
    with hub_offline():
        offline = Sam2PeftPredictor.from_pretrained(repo_id, device="cpu")
        np.testing.assert_array_equal(logits(offline, image), local)
        with pytest.raises(
            AdapterLoadError,
            match=r"not in the local cache and offline mode is on \(HF_HUB_OFFLINE is set\): unset HF_HUB_OFFLINE",
        ):
            Sam2PeftPredictor.from_pretrained(make_hub_repo_id("never-pushed"))
    assert len(hub_server.requests) == requests


def test_revisions_private_repos_and_missing_repos(hub_server, make_hub_repo_id, saved_tiny_model, tmp_path):
    first = make_adapter("lora", saved_tiny_model, tmp_path / "v1", seed=1)
    second = make_adapter("lora", saved_tiny_model, tmp_path / "v2", seed=2)
    repo_id = make_hub_repo_id("private")
    push_adapter(first, repo_id, private=True, base_model="facebook/sam2.1-hiera-tiny")
    commit = push_adapter(second, repo_id, revision="v2", commit_message="Second try")

    api = HfApi()
    assert api.model_info(repo_id).private is True
    with pytest.raises(AdapterLoadError, match="No adapter repo .* private and no valid token"):
        Sam2PeftPredictor.from_pretrained(repo_id, token=False)
    assert {b.name for b in api.list_repo_refs(repo_id).branches} == {"main", "v2"}
    assert api.model_info(repo_id, revision="v2").sha == commit.oid != api.model_info(repo_id).sha
    card = ModelCard.load(repo_id)
    assert card.data.base_model == "facebook/sam2.1-hiera-tiny"
    config = json.loads(Path(hf_hub_download(repo_id, "adapter_config.json")).read_text())
    assert config["base_model_name_or_path"] == "facebook/sam2.1-hiera-tiny"

    image = non_square_images(1)[0]
    expected_v1 = logits(Sam2PeftPredictor.from_pretrained(first, device="cpu"), image)
    expected_v2 = logits(Sam2PeftPredictor.from_pretrained(second, device="cpu"), image)
    assert not np.allclose(expected_v1, expected_v2)
    main = Sam2PeftPredictor.from_pretrained(repo_id, base_model=str(saved_tiny_model), device="cpu")
    np.testing.assert_array_equal(logits(main, image), expected_v1)
    at_v2 = Sam2PeftPredictor.from_pretrained(repo_id, revision="v2", device="cpu")  # v2 records the local base
    np.testing.assert_array_equal(logits(at_v2, image), expected_v2)

    with pytest.raises(AdapterLoadError, match=f"'{repo_id}' has no revision 'nope'"):
        Sam2PeftPredictor.from_pretrained(repo_id, revision="nope")
    missing = make_hub_repo_id("missing")
    with pytest.raises(AdapterLoadError, match=f"No adapter repo '{missing}' on the Hub"):
        Sam2PeftPredictor.from_pretrained(missing)


def test_push_refuses_a_folder_without_adapter(hub_server, hub_repo_id, tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(AdapterLoadError, match=r"expected adapter_config.json .* found \['metrics.json'\]"):
        push_adapter(tmp_path, hub_repo_id)
    assert not HfApi().repo_exists(hub_repo_id)


def test_ptsam_adapter_round_trip(hub_server, hub_repo_id, saved_tiny_model, tmp_path):
    from sam2_peft.adapters.methods import PtsamMethod

    model, _ = load_base_model(str(saved_tiny_model))
    method = PtsamMethod()
    model = method.prepare(model, str(saved_tiny_model))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn_like(parameter))
    method.save(model, tmp_path / "ptsam", str(saved_tiny_model))
    push_adapter(tmp_path / "ptsam", hub_repo_id)
    image = non_square_images(1)[0]
    local = Sam2PeftPredictor.from_pretrained(tmp_path / "ptsam", device="cpu").predict(image, return_logits=True)
    remote = Sam2PeftPredictor.from_pretrained(hub_repo_id, device="cpu").predict(image, return_logits=True)
    assert remote.masks.shape == (1, *image.shape[:2])
    np.testing.assert_array_equal(remote.logits, local.logits)


def test_only_adapter_files_are_downloaded_and_their_sizes_are_capped(
    hub_server, make_hub_repo_id, saved_tiny_model, tmp_path, monkeypatch
):
    from sam2_peft.adapters import resolve
    from sam2_peft.cli import main

    adapter = make_adapter("lora", saved_tiny_model, tmp_path / "lora")
    repo_id = make_hub_repo_id("big-readme")
    push_adapter(adapter, repo_id)
    api = HfApi()
    api.upload_file(path_or_fileobj=b"#" * 3_000_000, path_in_repo="README.md", repo_id=repo_id)
    monkeypatch.setitem(resolve.MAX_DOWNLOAD_BYTES, ".json", 2**20)
    requests = len(hub_server.requests)
    folder = resolve.download_adapter(repo_id)
    assert {p.name for p in folder.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "sam2_peft.json"}
    assert not any(path.endswith(("README.md", "comparison.png")) for _, path in hub_server.requests[requests:])

    config = json.loads((adapter / "adapter_config.json").read_text())
    padded = json.dumps({**config, "padding": "x" * 1_500_000})
    api.upload_file(path_or_fileobj=padded.encode(), path_in_repo="adapter_config.json", repo_id=repo_id)
    requests = len(hub_server.requests)
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", repo_id, str(tmp_path / "merged")])
    assert exit_info.value.code == (
        f"error: 'adapter_config.json' of the Hub repo '{repo_id}' weighs 1.4 MiB, over the 1 MiB that an adapter's "
        f".json file may have, so it is not downloaded: check that it is the adapter you meant. If it is, download "
        f"it yourself (hf download {repo_id} --local-dir DIR) and pass that folder."
    )
    assert not any("/resolve/" in path for _, path in hub_server.requests[requests:])
