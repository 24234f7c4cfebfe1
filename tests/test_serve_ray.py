"""`sam2-peft serve --engine ray`: the Ray Serve application on a local Ray instance (2 CPUs, 2 model replicas, one
adapter per replica), answers compared with the single-process app's, pixel for pixel."""

from __future__ import annotations

import base64
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
ray = pytest.importorskip("ray", reason="the Ray Serve tests need the ray extra: pip install 'sam2-peft[serve,ray]'")
serve = pytest.importorskip("ray.serve", reason="the Ray Serve tests need the ray extra (ray[serve])")

from fastapi.testclient import TestClient  # noqa: E402

from sam2_peft.models.loading import build_model_from_config, processor_for_image_size, tiny_config  # noqa: E402
from sam2_peft.serving.app import ServeConfig, create_app  # noqa: E402
from sam2_peft.serving.ray_app import REPLICA_HEADER, app_builder, application  # noqa: E402
from sam2_peft.serving.ray_config import RayServeConfig  # noqa: E402
from tests.serve_helpers import free_port, make_adapter  # noqa: E402
from tests.test_serve import BOX, _images, _png  # noqa: E402

ADAPTERS = ("lora_a", "lora_enc")  # one shares the base's image embeddings, one has its own encoder
PROPAGATION_S = 2.0
"""Time for a replica's loaded adapters to reach Ray's routers (pushed every 0.1 s, then broadcast)."""


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> ServeConfig:
    folder = tmp_path_factory.mktemp("serve_ray")
    base = folder / "base"
    build_model_from_config(tiny_config(128), seed=0).save_pretrained(base)
    processor_for_image_size(128).save_pretrained(base)
    adapters = [f"{kind}={make_adapter(kind, base, folder / kind, seed=seed)}" for seed, kind in enumerate(ADAPTERS, 1)]
    return ServeConfig(model=str(base), adapters=adapters, device="cpu", max_image_pixels=1_000_000)


@pytest.fixture(scope="module")
def reference(config):
    """The single-process app (`sam2-peft serve`), all adapters loaded."""
    with TestClient(create_app(config)) as client:
        yield client


@pytest.fixture(scope="module")
def ray_url(config):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        ray_config = RayServeConfig(engine="ray", replicas=2, max_adapters_per_replica=1, image_store_gb=0.01)
        serve.run(application(config, ray_config), name="sam2-peft-test", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _same(answer: dict, expected: dict) -> None:
    """Equal masks (RLE, box, area) pixel for pixel, equal scores to float precision, same image id."""
    assert answer["image_id"] == expected["image_id"] and answer["adapter"] == expected["adapter"]
    assert [{k: v for k, v in m.items() if k != "score"} for m in answer["masks"]] == [
        {k: v for k, v in m.items() if k != "score"} for m in expected["masks"]
    ]
    np.testing.assert_allclose(
        [m["score"] for m in answer["masks"]], [m["score"] for m in expected["masks"]], atol=1e-6
    )


@pytest.mark.slow
def test_ray_serve_equals_the_single_process_server(ray_url, reference):
    """Both adapters and the base, by uploaded image_id and inline: the same answers as `sam2-peft serve`; each
    adapter's requests stay on the replica that loaded it; a replica that never saw an image_id fetches the file from
    the shared store and encodes it itself."""
    png = _png(_images(1)[0])
    files = {"file": ("a.png", png, "image/png")}
    with httpx.Client(base_url=ray_url, timeout=120) as client:
        uploaded = client.post("/v1/images", files=files, data={"adapter": "lora_a"})
        assert uploaded.status_code == 200, uploaded.text
        image_id = uploaded.json()["image_id"]
        assert image_id == reference.post("/v1/images", files=files).json()["image_id"]
        holder = {"lora_a": uploaded.headers[REPLICA_HEADER]}
        time.sleep(PROPAGATION_S)
        requests = [
            {"image_id": image_id, "adapter": "lora_a", "boxes": [BOX]},
            {"image_id": image_id, "adapter": "lora_enc", "boxes": [BOX, [5, 5, 60, 40]]},
            {"image": base64.b64encode(png).decode(), "adapter": "lora_a", "points": [[[60, 35]]], "multimask": True},
            {"image_id": image_id, "adapter": "lora_enc", "points": [[[60, 35], [10, 10]]], "labels": [[1, 0]]},
            {"image_id": image_id, "adapter": None, "boxes": [BOX], "format": "png"},
            {"image_id": image_id, "adapter": "lora_a", "boxes": [[5, 5, 60, 40]]},
            {"image_id": image_id, "adapter": "lora_enc", "boxes": [BOX]},
        ]
        seen = set()
        for body in requests:
            response = client.post("/v1/segment", json=body)
            assert response.status_code == 200, response.text
            _same(response.json(), reference.post("/v1/segment", json=body).json())
            adapter, replica = body["adapter"], response.headers[REPLICA_HEADER]
            if adapter is None:
                continue
            assert holder.setdefault(adapter, replica) == replica, f"{adapter} moved to another replica"
            if body.get("image_id") and adapter not in seen:  # first time on its replica
                cached = response.json()["timing"]["cache_hit"]
                assert cached == (adapter == "lora_a"), "lora_a's replica encoded it at upload, lora_enc's had to"
                seen.add(adapter)
                time.sleep(PROPAGATION_S)
        assert holder["lora_a"] != holder["lora_enc"], "one adapter per replica: the second went to the idle one"

        unknown = client.post("/v1/segment", json={"image_id": image_id, "adapter": "nope", "boxes": [BOX]})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_adapter"
        assert "lora_a, lora_enc" in unknown.json()["error"]["message"]
        load = client.post("/v1/adapters", json={"name": "x", "source": "org/x"})
        assert load.status_code == 501 and load.json()["error"]["code"] == "not_supported"
        missing = client.post("/v1/segment", json={"image_id": "0" * 32, "boxes": [BOX]})
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_image"
        assert client.get("/health/ready").status_code == 200


def test_app_builder_checks_its_args():
    with pytest.raises(ValueError, match="port: set by Ray"):
        app_builder({"model": "compact-synthetic", "port": 9000})
