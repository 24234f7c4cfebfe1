import pytest
import torch

from sam2_peft.models.loading import (
    RANDOM_WEIGHTS_KEY,
    Sam2LoadError,
    build_model_from_config,
    is_random_weights,
    load_base_model,
    model_image_size,
    tiny_config,
)


def test_builtin_tiny_is_labelled_random_and_ties_positional_encodings():
    model, processor = load_base_model("tiny-random")
    assert is_random_weights(model)
    assert model_image_size(model) == 256
    assert processor.image_processor.size["height"] == 256
    torch.testing.assert_close(
        model.shared_image_embedding.positional_embedding,
        model.prompt_encoder.shared_embedding.positional_embedding,
        rtol=0,
        atol=0,
    )


def test_builtin_video_model_and_dtype():
    model, _ = load_base_model("tiny-random", video=True, dtype="bfloat16")
    assert type(model).__name__ == "Sam2VideoModel"
    assert next(model.parameters()).dtype == torch.bfloat16


def test_unknown_hub_id_offline_names_the_id_and_the_offline_option(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(Sam2LoadError) as error:
        load_base_model("facebook/sam2.1-hiera-small-does-not-exist")
    message = str(error.value)
    assert "facebook/sam2.1-hiera-small-does-not-exist" in message
    assert "compact-synthetic" in message and "tiny-random" in message and "local folder" in message
    assert "offline mode is on (HF_HUB_OFFLINE is set)" in message and "Unset HF_HUB_OFFLINE to download" in message
    assert "HF_HUB_OFFLINE=1" not in message  # it is set already


def test_local_folder_round_trip_keeps_weights_and_random_label(saved_tiny_model, tiny_model):
    model, processor = load_base_model(str(saved_tiny_model))
    assert processor.image_processor.size["height"] == 128
    assert getattr(model.config, RANDOM_WEIGHTS_KEY)
    for (name, a), (_, b) in zip(tiny_model.state_dict().items(), model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_missing_local_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(Sam2LoadError, match="empty"):
        load_base_model(str(tmp_path / "empty"))


def test_meta_checkpoint_needs_its_config(tmp_path):
    with pytest.raises(Sam2LoadError, match="meta_config"):
        load_base_model(str(tmp_path / "sam2.1_hiera_small.pt"))


def test_build_from_config_is_deterministic_by_seed():
    a = build_model_from_config(tiny_config(128), seed=3)
    b = build_model_from_config(tiny_config(128), seed=3)
    torch.testing.assert_close(a.mask_decoder.iou_token.weight, b.mask_decoder.iou_token.weight, rtol=0, atol=0)


def test_a_path_that_does_not_exist_is_named_as_a_missing_folder(tmp_path):
    with pytest.raises(Sam2LoadError, match="no such folder") as error:
        load_base_model("./my-models/sam2-small")
    assert "repo_type" not in str(error.value)


def test_a_typo_of_a_builtin_name_suggests_it_without_going_to_the_hub(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("a typo must not reach the network")

    monkeypatch.setattr("socket.create_connection", no_network)
    with pytest.raises(Sam2LoadError, match="did you mean 'compact-synthetic'"):
        load_base_model("compact-synthtic")


def _unreachable_hub(monkeypatch):
    """A Hub endpoint on a loopback port that nothing listens on, with offline mode off."""
    import socket

    import huggingface_hub.constants

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")


def test_an_unreachable_hub_fails_fast_and_says_to_connect(monkeypatch, tmp_path):
    import time

    import huggingface_hub.constants

    _unreachable_hub(monkeypatch)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    start = time.perf_counter()
    with pytest.raises(Sam2LoadError, match="Hub is unreachable .*Connect to download it once") as error:
        load_base_model("facebook/sam2.1-hiera-tiny")
    assert time.perf_counter() - start < 10
    assert "compact-synthetic" in str(error.value) and "HF_HUB_OFFLINE" not in str(error.value)


def test_an_unreachable_hub_loads_a_cached_model(monkeypatch, tmp_path, saved_tiny_model):
    import shutil

    import huggingface_hub.constants

    _unreachable_hub(monkeypatch)
    repo = tmp_path / "hub" / "models--org--tiny"
    shutil.copytree(saved_tiny_model, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    model, _ = load_base_model("org/tiny")
    assert model_image_size(model) == 128
