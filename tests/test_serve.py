"""`sam2-peft serve`: the real app under uvicorn on loopback, talked to over HTTP (httpx).

One tiny base with six adapters (two decoder LoRAs, an encoder LoRA, PTSAM with and without encoder prompts, a
partial fine-tune); every answer is compared with `Sam2PeftPredictor` on the same adapter.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402
from pycocotools import mask as mask_utils  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from sam2_peft.data.sources import read_image  # noqa: E402
from sam2_peft.inference.predictor import Sam2PeftPredictor  # noqa: E402
from sam2_peft.models.loading import (  # noqa: E402
    build_model_from_config,
    load_base_model,
    processor_for_image_size,
    tiny_config,
)
from sam2_peft.serving.app import GB, ServeConfig, build_app, create_app  # noqa: E402
from sam2_peft.serving.batching import MicroBatcher  # noqa: E402
from sam2_peft.serving.encoding import polygon_support  # noqa: E402
from sam2_peft.serving.errors import ServeError  # noqa: E402
from tests.serve_helpers import LiveServer, free_port, make_adapter  # noqa: E402

KINDS = ["lora_a", "lora_b", "lora_enc", "ptsam", "ptsam_enc", "partial"]
TOKEN = "s3cret"
BOX = [30, 20, 90, 50]


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _images(count: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    images = []
    for index in range(count):
        image = rng.integers(0, 80, (72 + 8 * index, 150 - 20 * index, 3), dtype=np.uint8)
        image[20:50, 30:90] = 220
        images.append(image)
    return images


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny base, the adapter root with six adapters, the images as files, and the offline predictors."""
    folder = tmp_path_factory.mktemp("serve")
    base = folder / "base"
    build_model_from_config(tiny_config(128), seed=0).save_pretrained(base)
    processor_for_image_size(128).save_pretrained(base)
    root = folder / "adapters"
    for seed, kind in enumerate(KINDS, start=1):
        make_adapter(kind, base, root / kind, seed=seed)
    paths = []
    for index, image in enumerate(_images()):
        path = folder / f"img_{index}.png"
        path.write_bytes(_png(image))
        paths.append(path)
    model, processor = load_base_model(str(base))
    predictors = {None: Sam2PeftPredictor(model, processor, device="cpu")}
    for kind in KINDS:
        predictors[kind] = Sam2PeftPredictor.from_pretrained(root / kind, base_model=str(base), device="cpu")
    return {"base": base, "root": root, "folder": folder, "paths": paths, "predictors": predictors}


def _config(setup, **overrides) -> ServeConfig:
    values = dict(
        model=str(setup["base"]),
        adapters=[(kind, str(setup["root"] / kind)) for kind in KINDS],
        adapter_root=str(setup["root"]),
        token=TOKEN,
        device="cpu",
        max_image_pixels=1_000_000,
        max_prompts=8,
        max_body_mb=2.0,
        batch_wait_ms=20.0,
    )
    return ServeConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def server(setup):
    live = LiveServer(create_app(_config(setup)))
    yield live
    live.stop()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        yield http


ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def _upload(client, path: Path, **data) -> dict:
    response = client.post("/v1/images", files={"file": (path.name, path.read_bytes(), "image/png")}, data=data)
    assert response.status_code == 200, response.text
    return response.json()


def _rle_masks(answer: dict) -> np.ndarray:
    return np.stack([mask_utils.decode({**m["rle"], "counts": m["rle"]["counts"].encode()}) for m in answer["masks"]])


def _assert_error(response, status: int, code: str, *words: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    for word in words:
        assert word in error["message"], error
    return error


# ---- routes -----------------------------------------------------------------------------------------------------


def test_health_and_adapter_list(client, setup):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["base_model"] == str(setup["base"])
    assert health["adapters"] == sorted(KINDS)
    listed = {a["name"]: a for a in client.get("/v1/adapters").json()["adapters"]}
    assert {name: a["encoder"] for name, a in listed.items()} == {
        "lora_a": "base",
        "lora_b": "base",
        "lora_enc": "own",
        "ptsam": "base",
        "ptsam_enc": "own",
        "partial": "own",  # a fine-tuned mask decoder changes conv_s0/conv_s1, which the cached embedding includes
    }
    assert listed["ptsam"]["peft_type"] == "PTSAM" and listed["ptsam"]["prompt_free"]
    assert listed["partial"]["kind"] == "partial" and not listed["lora_a"]["prompt_free"]


@pytest.mark.parametrize("adapter", [None, *KINDS])
def test_masks_equal_the_predictor(client, setup, adapter):
    """Boxes and points, from an uploaded image and from an inline one: masks and scores equal the predictor's."""
    path = setup["paths"][0]
    image = read_image(path)
    image_id = _upload(client, path)["image_id"]
    predictor = setup["predictors"][adapter]
    boxes = [BOX, [5, 5, 60, 40]]
    expected = predictor.predict(image, boxes=boxes)
    answer = client.post("/v1/segment", json={"image_id": image_id, "adapter": adapter, "boxes": boxes}).json()
    assert answer["adapter"] == adapter and [m["object"] for m in answer["masks"]] == [0, 1]
    np.testing.assert_array_equal(_rle_masks(answer), expected.masks)
    np.testing.assert_allclose([m["score"] for m in answer["masks"]], expected.scores, atol=1e-6)
    assert [m["area"] for m in answer["masks"]] == expected.masks.sum((1, 2)).tolist()

    points, labels = [[[60, 35], [10, 10]]], [[1, 0]]
    expected = predictor.predict(image, points=points, labels=labels, multimask_output=True)
    inline = base64.b64encode(path.read_bytes()).decode()
    body = {"image": inline, "adapter": adapter, "points": points, "labels": labels, "multimask": True}
    answer = client.post("/v1/segment", json=body).json()
    assert answer["image_id"] == image_id and [m["candidate"] for m in answer["masks"]] == [0, 1, 2]
    np.testing.assert_array_equal(_rle_masks(answer), expected.masks[0])
    np.testing.assert_allclose([m["score"] for m in answer["masks"]], expected.scores[0], atol=1e-6)


def test_adapters_differ(client, setup):
    """A negative control for the equality test: the six adapters really give six different answers."""
    image_id = _upload(client, setup["paths"][0])["image_id"]
    answers = set()
    for adapter in [None, *KINDS]:
        answer = client.post("/v1/segment", json={"image_id": image_id, "adapter": adapter, "boxes": [BOX]}).json()
        answers.add((answer["masks"][0]["rle"]["counts"], round(answer["masks"][0]["score"], 6)))
    assert len(answers) == 7


@pytest.mark.parametrize("adapter", ["ptsam", "ptsam_enc"])
def test_prompt_free_ptsam(client, setup, adapter):
    path = setup["paths"][1]
    expected = setup["predictors"][adapter].predict(read_image(path))
    answer = client.post("/v1/segment", json={"image_id": _upload(client, path)["image_id"], "adapter": adapter})
    masks = _rle_masks(answer.json())
    np.testing.assert_array_equal(masks, expected.masks)


def test_multi_class_ptsam_answers_one_mask_per_class(client, setup):
    """A multi-class PTSAM adapter loaded at run time: one mask per class with its id and name, equal to the
    predictor's, also when two images' requests share a decode; prompts are refused."""
    make_adapter("ptsam_classes", setup["base"], setup["root"] / "classes", seed=9)
    loaded = client.post("/v1/adapters", json={"name": "classes", "source": "classes"}, headers=ADMIN)
    assert loaded.status_code == 201 and loaded.json()["classes"] == {"3": "scratch", "7": "dent"}
    try:
        predictor = Sam2PeftPredictor.from_pretrained(setup["root"] / "classes", device="cpu")
        ids = [_upload(client, path)["image_id"] for path in setup["paths"][:2]]
        answers = [None, None]

        def ask(index):
            answers[index] = client.post("/v1/segment", json={"image_id": ids[index], "adapter": "classes"}).json()

        threads = [threading.Thread(target=ask, args=(index,)) for index in range(2)]
        [thread.start() for thread in threads]
        [thread.join() for thread in threads]
        for path, answer in zip(setup["paths"], answers):
            expected = predictor.predict(read_image(path))
            assert [(m["class_id"], m["class_name"]) for m in answer["masks"]] == [(3, "scratch"), (7, "dent")]
            np.testing.assert_array_equal(_rle_masks(answer), expected.masks)
            assert _rle_masks(answer).any(axis=(1, 2)).all()  # both classes claim pixels: a real comparison
            np.testing.assert_allclose([m["score"] for m in answer["masks"]], expected.scores, atol=1e-6)
        body = {"image_id": ids[0], "adapter": "classes", "boxes": [BOX]}
        _assert_error(client.post("/v1/segment", json=body), 422, "bad_prompt", "2 classes without prompts")
    finally:
        client.delete("/v1/adapters/classes", headers=ADMIN)


def test_ptsam_with_tuned_upscaling_decodes_in_its_own_batch_and_answers_as_the_predictor(client, server, setup):
    """A PTSAM adapter that tunes the decoder's upscaling layers, loaded beside one that does not: its rows cannot
    share their decoder forward (another decoder), so it gets its own batch group; its answers equal `predict`."""
    make_adapter("ptsam_upscaling", setup["base"], setup["root"] / "upscaling", seed=11)
    loaded = client.post("/v1/adapters", json={"name": "upscaling", "source": "upscaling"}, headers=ADMIN)
    assert loaded.status_code == 201
    try:
        registry = server.app.state.service.registry
        assert registry.batch_group(registry.entries["upscaling"]) != registry.batch_group(registry.entries["ptsam"])
        predictor = Sam2PeftPredictor.from_pretrained(setup["root"] / "upscaling", device="cpu")
        for path in setup["paths"][:2]:
            body = {"image_id": _upload(client, path)["image_id"], "adapter": "upscaling"}
            answer = client.post("/v1/segment", json=body)
            np.testing.assert_array_equal(_rle_masks(answer.json()), predictor.predict(read_image(path)).masks)
    finally:
        client.delete("/v1/adapters/upscaling", headers=ADMIN)


MIXED = {  # adapter -> (image index, boxes): objects on different images, several adapters, 1 or 2 objects each
    "lora_a": [(0, [BOX]), (1, [[5, 5, 60, 40], BOX])],
    "lora_b": [(2, [[10, 8, 70, 44]]), (0, [[5, 5, 60, 40]])],
    "lora_enc": [(1, [BOX])],  # its own encoder: its rows carry their own embeddings
    "ptsam": [(2, [BOX]), (0, [[12, 10, 50, 45], BOX])],
    "ptsam_enc": [(1, [[5, 5, 60, 40]])],
}


@pytest.mark.parametrize(
    ("group", "prompt_free"),
    [(["lora_a", "lora_b", "lora_enc"], False), (["ptsam", "ptsam_enc"], False), (["ptsam", "ptsam_enc"], True)],
    ids=["lora", "ptsam", "ptsam-prompt-free"],
)
def test_mixed_batches_across_images_and_adapters_equal_the_predictor(server, setup, group, prompt_free):
    """Requests on three images with two or three adapters of one peft tree go through ONE decoder forward (peft's
    mixed-adapter LoRA batch; stacked PTSAM token sets), and each answer equals `predict` for its own request."""
    from sam2_peft.serving.service import Prompts, _Decode

    service = server.app.state.service
    registry, images = service.registry, [read_image(p) for p in setup["paths"]]
    items, expected, groups = [], [], set()
    for adapter in group:
        for index, boxes in MIXED[adapter]:
            entry = registry.entries[adapter]
            embedding, _ = service.embedding(entry, f"mixed-{index}", images[index])
            boxes = None if prompt_free else np.asarray(boxes, float)
            items.append(_Decode(entry, embedding, Prompts(boxes, None, None, False)))
            expected.append(setup["predictors"][adapter].predict(images[index], boxes=boxes))
            groups.add(registry.batch_group(entry))
    assert len(groups) == 1
    tree, forwards = registry.entries[group[0]].tree, []
    forward = tree.model.forward
    tree.model.forward = lambda *args, **kwargs: forwards.append(1) or forward(*args, **kwargs)
    try:
        results = service._decode(items)
    finally:
        del tree.model.forward
    assert len(forwards) == 1
    for result, want in zip(results, expected, strict=True):
        np.testing.assert_array_equal(result.masks, want.masks)
        np.testing.assert_allclose(result.scores, want.scores, atol=1e-6)


def test_decode_batch_refuses_requests_with_different_kinds_of_prompt(setup):
    from sam2_peft.inference.predictor import DecodeRequest

    predictor = setup["predictors"][None]
    embedding = predictor.encode(read_image(setup["paths"][0]))
    with pytest.raises(ValueError, match="same kind of prompt"):
        predictor.decode_batch([DecodeRequest(embedding, boxes=[BOX]), DecodeRequest(embedding, points=[[[9, 9]]])])
    two_points = DecodeRequest(embedding, points=[[[9, 9], [20, 20]]])
    with pytest.raises(ValueError, match="same number of points"):
        predictor.decode_batch([DecodeRequest(embedding, points=[[[9, 9]]]), two_points])


@pytest.mark.parametrize("adapter", [None, "lora_enc"])
def test_embedding_endpoint_decodes_on_the_client(client, setup, adapter):
    """GET /v1/images/{id}/embedding gives the .npz of the embedding through the adapter's encoder; decoding it
    off the server gives `predict`'s masks."""
    from sam2_peft.inference.predictor import ImageEmbedding

    path = setup["paths"][1]
    image, predictor = read_image(path), setup["predictors"][adapter]
    image_id = _upload(client, path)["image_id"]
    response = client.get(f"/v1/images/{image_id}/embedding", params={} if adapter is None else {"adapter": adapter})
    assert response.status_code == 200 and response.headers["content-type"] == "application/x-npz"
    arrays = np.load(io.BytesIO(response.content))
    names = [f"image_embeddings.{i}" for i in range(3)]
    assert sorted(arrays.files) == sorted([*names, "original_size", "input_size"])
    assert arrays["original_size"].tolist() == list(image.shape[:2]) and arrays["input_size"].tolist() == [128, 128]
    assert [arrays[n].shape[2] for n in names] == [32, 16, 8]
    service = client_service(client)
    encoder = "base" if adapter is None else service.registry.entries[adapter].encoder
    served = service.embeddings.peek((image_id, encoder))
    for name, tensor, offline in zip(names, served.tensors, predictor.encode(image).tensors):
        np.testing.assert_array_equal(arrays[name], tensor.numpy())  # what the server decodes with
        np.testing.assert_allclose(arrays[name], offline.numpy(), rtol=1e-4, atol=1e-4)  # merged LoRA: rounding
    embedding = ImageEmbedding([torch.from_numpy(arrays[n]) for n in names], arrays["original_size"].tolist())
    decoded = predictor.decode(embedding, boxes=[BOX])
    np.testing.assert_array_equal(decoded.masks, predictor.predict(image, boxes=[BOX]).masks)
    _assert_error(client.get("/v1/images/nope/embedding"), 404, "unknown_image")


def test_png_and_polygon_formats(client, setup):
    path = setup["paths"][0]
    image_id = _upload(client, path)["image_id"]
    expected = setup["predictors"]["lora_a"].predict(read_image(path), boxes=[BOX]).masks[0]
    body = {"image_id": image_id, "adapter": "lora_a", "boxes": [BOX], "format": "png"}
    answer = client.post("/v1/segment", json=body).json()
    png = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["masks"][0]["png"]))))
    np.testing.assert_array_equal(png.astype(bool), expected)
    response = client.post("/v1/segment", json={**body, "format": "polygon"})
    if polygon_support() is None:
        assert response.status_code == 200 and response.json()["masks"][0]["polygon"]
    else:
        _assert_error(response, 422, "polygon_unavailable", "OpenCV", "rle")


# ---- concurrency ------------------------------------------------------------------------------------------------


def test_two_clients_alternating_adapters_get_the_offline_results(server, setup):
    """Two threads, each alternating two adapters of one peft model (and PTSAM) on one image, concurrently: every
    answer is exactly the offline predictor's for its adapter (set_adapter + forward are atomic per model tree);
    concurrent requests for one adapter were decoded together (micro-batching)."""
    path = setup["paths"][0]
    image = read_image(path)
    orders = (["lora_a", "lora_b"], ["lora_b", "lora_a"], ["ptsam", "lora_a"], ["lora_a", "ptsam"])
    boxes = {  # each client its own boxes, so that a batch handing out another client's share is caught
        (k, a): [[5 + 7 * k, 5 + 3 * k, 60 + 9 * k, 40 + 2 * k]] for k in range(len(orders)) for a in orders[k]
    }
    expected = {key: setup["predictors"][key[1]].predict(image, boxes=b).masks for key, b in boxes.items()}
    with httpx.Client(base_url=server.url) as http:
        image_id = _upload(http, path)["image_id"]
        before = _metric(http.get("/metrics").text, "sam2peft_decode_batch_size_sum")
    failures, results = [], []

    barrier = threading.Barrier(4)

    def client_loop(k):
        order = orders[k]
        with httpx.Client(base_url=server.url, timeout=60) as http:
            for step in range(12):
                barrier.wait(timeout=60)  # in step: two clients ask for one adapter at once, others for another
                adapter = order[step % len(order)]
                body = {"image_id": image_id, "adapter": adapter, "boxes": boxes[k, adapter]}
                answer = http.post("/v1/segment", json=body)
                if answer.status_code != 200:
                    failures.append(answer.text)
                    continue
                results.append(((k, adapter), _rle_masks(answer.json())))

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(len(orders))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    assert len(results) == 48
    wrong = [adapter for adapter, masks in results if not np.array_equal(masks, expected[adapter])]
    assert not wrong, f"{len(wrong)} answers differ from the offline predictor: {wrong}"
    text = httpx.get(f"{server.url}/metrics").text
    batched = _metric(text, "sam2peft_decode_batch_size_sum") - before
    count = _metric(text, "sam2peft_decode_batch_size_count")
    assert batched >= 48 and _metric(text, "sam2peft_decode_batch_size_bucket", 'le="1.0"') < count


def _metric(text: str, name: str, label: str = "") -> float:
    for line in text.splitlines():
        if line.startswith(name) and label in line and not line.startswith("#"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {label} not in metrics")


def test_load_and_unload_while_requests_run(server, setup):
    """POST loads a folder under the adapter root and serves it like the predictor; DELETE unloads it while another
    client keeps segmenting with lora_a: none of that client's requests fails or changes."""
    path = setup["paths"][2]
    image = read_image(path)
    expected = setup["predictors"]["lora_a"].predict(image, boxes=[BOX]).masks
    stop, seen, failures = threading.Event(), [], []
    with httpx.Client(base_url=server.url, timeout=60) as http:
        image_id = _upload(http, path)["image_id"]

        def background():
            with httpx.Client(base_url=server.url, timeout=60) as other:
                while not stop.is_set():
                    answer = other.post("/v1/segment", json={"image_id": image_id, "adapter": "lora_a", "boxes": [BOX]})
                    if answer.status_code != 200:
                        failures.append(answer.text)
                    else:
                        seen.append(np.array_equal(_rle_masks(answer.json()), expected))

        thread = threading.Thread(target=background)
        thread.start()
        try:
            for _ in range(2):
                for name, source in (("extra", "lora_b"), ("extra_pt", "ptsam_enc")):
                    loaded = http.post("/v1/adapters", json={"name": name, "source": source}, headers=ADMIN)
                    assert loaded.status_code == 201, loaded.text
                    answer = http.post("/v1/segment", json={"image_id": image_id, "adapter": name, "boxes": [BOX]})
                    want = setup["predictors"][source].predict(image, boxes=[BOX]).masks
                    np.testing.assert_array_equal(_rle_masks(answer.json()), want)
                    racing = []  # a request for the adapter being unloaded: its answer (200, right) or 404, never 5xx

                    def race(name=name, want=want):
                        with httpx.Client(base_url=server.url, timeout=60) as other:
                            body = {"image_id": image_id, "adapter": name, "boxes": [BOX]}
                            answer = other.post("/v1/segment", json=body)
                            ok = answer.status_code == 200 and np.array_equal(_rle_masks(answer.json()), want)
                            racing.append(ok or answer.status_code == 404)

                    racer = threading.Thread(target=race)
                    racer.start()
                    time.sleep(0.005)
                    assert http.delete(f"/v1/adapters/{name}", headers=ADMIN).status_code == 200
                    racer.join()
                    assert racing == [True]
                    gone = http.post("/v1/segment", json={"image_id": image_id, "adapter": name, "boxes": [BOX]})
                    _assert_error(gone, 404, "unknown_adapter", name)
        finally:
            stop.set()
            thread.join()
        assert not failures and seen and all(seen)
        assert sorted(http.get("/health").json()["adapters"]) == sorted(KINDS)


# ---- cache ------------------------------------------------------------------------------------------------------


def test_cache_hits_and_per_encoder_entries(client, setup, tmp_path):
    """Second request on an image is a hit; decoder-only adapters share the base entry; encoder-changing adapters
    get their own; /metrics counts it."""
    path = tmp_path / "fresh.png"  # an image no other test sent
    path.write_bytes(_png(np.full((64, 96, 3), 77, np.uint8)))
    image_id = _upload(client, path)["image_id"]  # encodes through the base encoder
    service = client_service(client)

    def hit(adapter):
        body = {"image_id": image_id, "adapter": adapter, "boxes": [BOX]}
        return client.post("/v1/segment", json=body).json()["timing"]["cache_hit"]

    assert [hit(a) for a in (None, "lora_a", "lora_b", "ptsam")] == [True] * 4
    assert [hit("lora_enc"), hit("lora_enc"), hit("ptsam_enc"), hit("ptsam_enc")] == [False, True, False, True]
    encoders = sorted(e for i, e in service.embeddings.keys() if i == image_id)
    assert len(encoders) == 3 and encoders[0] == "base"
    text = client.get("/metrics").text
    assert _metric(text, "sam2peft_embedding_cache_hits_total") >= 6
    assert _metric(text, "sam2peft_embedding_cache_bytes") == service.embeddings.bytes > 0


_SERVERS: dict = {}


def client_service(client):
    """The service behind the module's server (same process)."""
    return _SERVERS["service"]


@pytest.fixture(autouse=True)
def _remember_service(request):
    if "server" in request.fixturenames:
        _SERVERS["service"] = request.getfixturevalue("server").app.state.service
    yield


def test_lru_evicts_by_bytes(setup):
    """A cache of two embeddings: a third image evicts the least recently used one, which then misses again."""
    app = create_app(_config(setup, adapters=[], cache_gb=0), registry=None)
    service = app.state.service
    one = None
    live = LiveServer(app)
    try:
        with httpx.Client(base_url=live.url, timeout=60) as http:
            first = _upload(http, setup["paths"][0])
            one = service.embeddings.peek((first["image_id"], "base"))
    finally:
        live.stop()
    assert one is None  # a zero budget keeps nothing
    app = create_app(_config(setup, adapters=[], cache_gb=2.5 * 65536 / GB))
    service = app.state.service
    live = LiveServer(app)
    try:
        with httpx.Client(base_url=live.url, timeout=60) as http:
            ids = [_upload(http, p)["image_id"] for p in setup["paths"]]
            assert [k[0] for k in service.embeddings.keys()] == ids[1:]
            assert service.embeddings.bytes <= 2.5 * 65536 and service.embeddings.evictions == 1
            body = {"image_id": ids[0], "boxes": [BOX]}
            assert http.post("/v1/segment", json=body).json()["timing"]["cache_hit"] is False
            assert [k[0] for k in service.embeddings.keys()] == [ids[2], ids[0]]
    finally:
        live.stop()


# ---- errors -----------------------------------------------------------------------------------------------------


def _bomb() -> bytes:
    """A 10000 x 10000 1-bit PNG: a few KB on the wire, 100 M pixels once decoded."""
    buffer = io.BytesIO()
    Image.new("1", (10000, 10000)).save(buffer, format="PNG")
    return buffer.getvalue()


ERROR_CASES = [
    ("unknown adapter", "segment", {"adapter": "nope", "boxes": [BOX]}, 404, "unknown_adapter", ["'nope'", "lora_a"]),
    ("unknown image_id", "segment", {"image_id": "0" * 32, "boxes": [BOX]}, 404, "unknown_image", ["POST /v1/images"]),
    ("NaN box", "segment", {"boxes": [[float("nan"), 1, 5, 5]]}, 422, "bad_prompt", ["box 0", "NaN"]),
    ("reversed box", "segment", {"boxes": [[50, 40, 10, 5]]}, 422, "bad_prompt", ["reversed"]),
    ("box outside", "segment", {"boxes": [[500, 500, 600, 600]]}, 422, "bad_prompt", ["entirely outside"]),
    ("point outside", "segment", {"points": [[[-5, 3]]]}, 422, "bad_prompt", ["not a finite pixel"]),
    ("labels mismatch", "segment", {"points": [[[5, 3]]], "labels": [[1, 0]]}, 422, "bad_prompt", ["labels"]),
    ("no prompt, base", "segment", {}, 422, "missing_prompt", ["PTSAM"]),
    ("no prompt, LoRA", "segment", {"adapter": "lora_a"}, 422, "missing_prompt", ["lora_a", "PTSAM"]),
    ("too many prompts", "segment", {"boxes": [BOX] * 9}, 413, "too_many_prompts", ["9", "--max-prompts"]),
    ("unknown field", "segment", {"boxes": [BOX], "box": [1]}, 422, "bad_request", ["'box'"]),
    ("bad format", "segment", {"boxes": [BOX], "format": "jpeg"}, 422, "bad_format", ["rle"]),
]


@pytest.mark.parametrize("case", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_segment_errors(client, setup, case):
    _, _, body, status, code, words = case
    if "image_id" not in body:
        body = {"image_id": _upload(client, setup["paths"][0])["image_id"], **body}
    # NaN is not JSON: send it the way Python's json writes it, which the server's parser accepts
    response = client.post("/v1/segment", content=json.dumps(body), headers={"content-type": "application/json"})
    _assert_error(response, status, code, *words)
    assert client.get("/health").status_code == 200


def test_upload_and_body_errors(client, setup):
    _assert_error(
        client.post("/v1/images", files={"file": ("x.png", b"not an image at all", "image/png")}),
        415, "not_an_image", "not an image",
    )  # fmt: skip
    started = time.perf_counter()
    _assert_error(
        client.post("/v1/images", files={"file": ("bomb.png", _bomb(), "image/png")}),
        413, "image_too_large", "10000x10000", "--max-image-pixels",
    )  # fmt: skip
    assert time.perf_counter() - started < 2  # refused from the header, not decoded
    _assert_error(client.post("/v1/images", data={"x": "1"}), 400, "bad_upload", "'file'")
    _assert_error(client.post("/v1/images", files={"file": ("e.png", b"", "image/png")}), 400, "empty_image")
    big = b"0" * (3 * 1024 * 1024)
    _assert_error(client.post("/v1/images", files={"file": ("b.png", big, "image/png")}), 413, "body_too_large")
    chunks = (b"x" * 65536 for _ in range(48))  # chunked: no Content-Length
    _assert_error(client.post("/v1/segment", content=chunks), 413, "body_too_large", "limit")
    _assert_error(client.post("/v1/segment", content=b"{nope"), 400, "bad_json")
    bad64 = {"image": "!!!notbase64", "boxes": [BOX]}
    _assert_error(client.post("/v1/segment", json=bad64), 400, "bad_base64")
    _assert_error(client.get("/v2/nothing"), 404, "not_found")
    assert client.get("/health").status_code == 200


def test_admin_token_and_sources(client, setup, tmp_path):
    root = setup["root"]
    load = {"name": "x", "source": "lora_a"}
    _assert_error(client.post("/v1/adapters", json=load), 401, "missing_token", "Bearer")
    _assert_error(client.post("/v1/adapters", json=load, headers={"Authorization": "Bearer no"}), 403, "invalid_token")
    _assert_error(client.delete("/v1/adapters/lora_a"), 401, "missing_token")
    assert client.get("/v1/adapters").status_code == 200  # reading needs no token without --token-all

    def refused(source, status, code, *words):
        body = {"name": "x", "source": source}
        return _assert_error(client.post("/v1/adapters", json=body, headers=ADMIN), status, code, *words)

    refused("../adapters/lora_a", 403, "source_forbidden", "'..'")
    refused(str(root / "lora_a"), 403, "source_forbidden", "absolute")
    outside = tmp_path / "outside"
    shutil.copytree(root / "lora_a", outside)
    link = root / "link_out"
    link.symlink_to(outside, target_is_directory=True)
    try:
        refused("link_out", 403, "source_forbidden", "outside the adapter root")
    finally:
        link.unlink()
    refused("no_such_folder", 404, "adapter_source_not_found", "adapter root")
    refused("nobody/no-such-adapter", 404, "adapter_source_not_found", "no-such-adapter")  # Hub offline in tests
    nan = root / "nan_weights"
    shutil.copytree(root / "lora_a", nan)
    weights = load_file(nan / "adapter_model.safetensors")
    first = sorted(weights)[0]
    weights[first][0] = float("nan")
    save_file(weights, nan / "adapter_model.safetensors")
    refused("nan_weights", 422, "adapter_invalid", "NaN", first)
    other = tmp_path / "other_base"
    build_model_from_config(tiny_config(256), seed=0).save_pretrained(other)
    processor_for_image_size(256).save_pretrained(other)
    make_adapter("lora_a", other, root / "other_arch")
    refused("other_arch", 422, "adapter_mismatch", "image_size")
    (root / "not_adapter").mkdir(exist_ok=True)
    refused("not_adapter", 422, "adapter_invalid", "adapter_config.json")
    body = {"name": "lora_a", "source": "lora_b"}
    _assert_error(client.post("/v1/adapters", json=body, headers=ADMIN), 409, "adapter_exists")
    body = {"name": "../x", "source": "lora_b"}
    _assert_error(client.post("/v1/adapters", json=body, headers=ADMIN), 422, "bad_adapter_name")
    _assert_error(client.delete("/v1/adapters/nope", headers=ADMIN), 404, "unknown_adapter")
    assert sorted(client.get("/health").json()["adapters"]) == sorted(KINDS)


def test_token_all_and_timeout(setup):
    """--token-all guards every route; a request past --timeout-s gets 504 and the server keeps serving."""
    app = create_app(_config(setup, adapters=[], token_all=True, timeout_s=0.001, cache_gb=0))
    live = LiveServer(app)
    try:
        with httpx.Client(base_url=live.url, timeout=60) as http:
            _assert_error(http.get("/health"), 401, "missing_token")
            _assert_error(http.get("/metrics"), 401, "missing_token")
            assert http.get("/health", headers=ADMIN).status_code == 200
            files = {"file": ("a.png", setup["paths"][0].read_bytes(), "image/png")}
            _assert_error(http.post("/v1/images", files=files, headers=ADMIN), 504, "timeout", "--timeout-s")
            assert http.get("/health", headers=ADMIN).json()["status"] == "ok"
    finally:
        live.stop()


def test_openapi_schema_is_served_and_can_be_turned_off(client):
    """/openapi.json describes the pydantic request models (and /docs serves); --no-openapi removes both."""
    schema = client.get("/openapi.json").json()
    segment = schema["components"]["schemas"]["SegmentRequest"]
    assert set(segment["properties"]) == {"image_id", "image", "adapter", "boxes", "points", "labels", "multimask",
                                          "format"}  # fmt: skip
    assert "/v1/segment" in schema["paths"] and client.get("/docs").status_code == 200
    closed = build_app(ServeConfig(model="m", openapi=False))
    assert closed.openapi_url is None and closed.docs_url is None


# ---- under load ---------------------------------------------------------------------------------------------------


def _slow_first_decode(calls: list, started: threading.Event):
    """A batch `process` that records its batches and takes 0.3 s over the first (the decoder is busy meanwhile)."""

    def process(items):
        calls.append(list(items))
        started.set()
        time.sleep(0.3 if len(calls) == 1 else 0)
        return items

    return process


def test_batches_form_while_a_decode_runs():
    """Requests that arrive, 30 ms apart, while a decode of their key runs all join the next decode (a fixed wait
    alone would close each after a few ms and decode them one by one)."""
    calls, started = [], threading.Event()
    process = _slow_first_decode(calls, started)
    batcher, results = MicroBatcher(wait_s=0.0), {}
    threads = [threading.Thread(target=lambda i=i: results.update({i: batcher.run("k", i, process)})) for i in range(4)]
    threads[0].start()
    started.wait(5)
    for thread in threads[1:]:
        thread.start()
        time.sleep(0.03)
    for thread in threads:
        thread.join()
    assert calls == [[0], [1, 2, 3]] and results == {i: i for i in range(4)}
    assert (batcher.batches, batcher.items, batcher.shared) == (2, 4, 3)


def test_requests_past_their_deadline_are_dropped_not_decoded():
    calls, started = [], threading.Event()
    process = _slow_first_decode(calls, started)
    batcher, outcomes = MicroBatcher(wait_s=0.0), {}

    def request(i, deadline):
        try:
            outcomes[i] = batcher.run("k", i, process, deadline)
        except ServeError as err:
            outcomes[i] = err.status

    first = threading.Thread(target=request, args=(0, None))
    first.start()
    started.wait(5)
    soon = time.monotonic() + 0.05
    threads = [threading.Thread(target=request, args=(i, d)) for i, d in ((1, soon), (2, soon), (3, None))]
    for thread in [*threads]:
        thread.start()
    for thread in [first, *threads]:
        thread.join()
    assert calls == [[0], [3]] and outcomes == {0: 0, 1: 504, 2: 504, 3: 3} and batcher.dropped == 2


@contextlib.contextmanager
def _held_server(setup, **overrides):
    """A server whose /v1/segment waits for `gate` (set it to let them through): a decoder that is busy."""
    app = create_app(_config(setup, adapters=[], **overrides))
    service, gate = app.state.service, threading.Event()
    segment = service.segment

    def held(*args, **kwargs):
        gate.wait(30)
        return segment(*args, **kwargs)

    service.segment = held
    live = LiveServer(app)
    try:
        with httpx.Client(base_url=live.url, timeout=60) as http:
            image_id = _upload(http, setup["paths"][0])["image_id"]
            yield live, http, gate, {"image_id": image_id, "boxes": [BOX]}
    finally:
        gate.set()
        live.stop()


def _in_background(url: str, body: dict, answers: list) -> threading.Thread:
    def post():
        answers.append(httpx.post(f"{url}/v1/segment", json=body, timeout=60).status_code)

    thread = threading.Thread(target=post)
    thread.start()
    return thread


def _wait_for(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_overloaded_server_answers_503_at_once_then_serves(setup):
    with _held_server(setup, workers=1, max_queue=2) as (live, http, gate, body):
        answers = []
        threads = [_in_background(live.url, body, answers) for _ in range(2)]
        _wait_for(lambda: live.app.state.admitted == 2)
        started = time.perf_counter()
        refused = http.post("/v1/segment", json=body)
        assert time.perf_counter() - started < 1
        _assert_error(refused, 503, "overloaded", "--max-queue")
        assert refused.headers["retry-after"] == "1"
        gate.set()
        for thread in threads:
            thread.join()
        assert answers == [200, 200] and http.post("/v1/segment", json=body).status_code == 200


def test_timed_out_requests_are_not_computed(setup):
    """Two requests past --timeout-s behind a busy decoder both get 504, and neither is decoded afterwards (one
    waited for the model thread, the other for its decode)."""
    with _held_server(setup, workers=1, timeout_s=0.5) as (live, http, gate, body):
        answers = []
        threads = [_in_background(live.url, body, answers) for _ in range(2)]
        for thread in threads:
            thread.join()
        assert answers == [504, 504]
        gate.set()
        _wait_for(lambda: live.app.state.admitted == 0)
        service = live.app.state.service
        assert (service.batcher.items, service.batcher.dropped) == (0, 1)
        assert http.post("/v1/segment", json=body).status_code == 200


def test_half_sent_requests_are_closed(setup):
    """A request head or body that stops arriving: the connection closes (head) or gets 408 (body) after
    --read-timeout-s, instead of staying open."""
    app = create_app(_config(setup, adapters=[], read_timeout_s=0.5))
    live = LiveServer(app)
    try:
        with socket.create_connection(("127.0.0.1", live.port), timeout=5) as head:
            head.sendall(b"POST /v1/segment HTTP/1.1\r\nHost: x\r\n")
            assert head.recv(1024) == b""  # closed by the server
        with socket.create_connection(("127.0.0.1", live.port), timeout=5) as body:
            body.sendall(b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            assert body.recv(1024).startswith(b"HTTP/1.1 408")
    finally:
        live.stop()


def test_metric_labels_name_only_loaded_adapters(client, setup):
    """Unknown adapter names (no token needed to send them) all count under one label, not one series each."""
    image_id = _upload(client, setup["paths"][0])["image_id"]
    for index in range(5):
        body = {"image_id": image_id, "adapter": f"random{index}", "boxes": [BOX]}
        _assert_error(client.post("/v1/segment", json=body), 404, "unknown_adapter")
    client.post("/v1/segment", json={"image_id": image_id, "adapter": "lora_a", "boxes": [BOX]})
    text = client.get("/metrics").text
    assert "random" not in text
    assert _metric(text, "sam2peft_requests_total", 'adapter="other"') >= 5
    assert _metric(text, "sam2peft_requests_total", 'adapter="lora_a"') >= 1


def test_adapters_load_on_first_use_with_an_lru_cap(setup):
    """--load-on-use: a folder under the root or an allowed Hub repo loads on its first request (answers equal the
    predictor's); --max-adapters 2 evicts the least recently used (its own embeddings dropped); anything else is
    refused with its code; per-adapter metrics name only loaded adapters."""
    config = _config(setup, adapters=[], load_on_use=True, allowed_hub_repos=["allowed/*"], max_adapters=2)
    live = LiveServer(create_app(config))
    try:
        with httpx.Client(base_url=live.url, timeout=60) as http:
            path = setup["paths"][0]
            image_id = _upload(http, path)["image_id"]
            service = live.app.state.service

            def segment(adapter):
                return http.post("/v1/segment", json={"image_id": image_id, "adapter": adapter, "boxes": [BOX]})

            expected = {k: setup["predictors"][k].predict(read_image(path), boxes=[BOX]).masks for k in KINDS}
            for adapter in ("lora_enc", "lora_a", "lora_a", "ptsam", "lora_enc"):
                answer = segment(adapter)
                assert answer.status_code == 200, answer.text
                np.testing.assert_array_equal(_rle_masks(answer.json()), expected[adapter])
                if adapter == "ptsam":  # lora_enc, unused longest, went with its cached embedding
                    assert http.get("/health").json()["adapters"] == ["lora_a", "ptsam"]
                    assert [e for _, e in service.embeddings.keys()] == ["base"]
            assert http.get("/health").json()["adapters"] == ["lora_enc", "ptsam"]
            _assert_error(segment("other/repo"), 403, "adapter_not_allowed", "--allow-hub-repo")
            _assert_error(segment("allowed/repo"), 404, "adapter_source_not_found")  # allowed; the Hub is offline
            _assert_error(segment("no_such"), 404, "unknown_adapter", "first use")
            _assert_error(segment("../lora_a"), 404, "unknown_adapter")
            statuses = []  # four concurrent first requests for one adapter: one load, four answers
            threads = [threading.Thread(target=lambda: statuses.append(segment("lora_b").status_code)) for _ in "1234"]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert statuses == [200] * 4
            text = http.get("/metrics").text
        assert (
            _metric(text, "sam2peft_adapter_loads_on_use_total"),
            _metric(text, "sam2peft_adapter_evictions_total"),
        ) == (5, 3)  # lora_b loaded once for its four concurrent first requests, evicting lora_enc
        assert _metric(text, "sam2peft_request_latency_seconds_count", 'adapter="lora_a"') == 2
        assert "no_such" not in text and "repo" not in text
    finally:
        live.stop()


def test_load_on_use_flags_are_checked(setup):
    with pytest.raises(ValueError, match="add --load-on-use"):
        _config(setup, allowed_hub_repos=["org/*"])
    with pytest.raises(ValueError, match="--adapter-root FOLDER or --allow-hub-repo"):
        _config(setup, adapter_root=None, load_on_use=True)
    with pytest.raises(ValueError, match="below the 6 --adapter"):
        _config(setup, max_adapters=2)


def test_image_cache_counts_hits_and_misses(client, tmp_path):
    path = tmp_path / "counted.png"
    path.write_bytes(_png(np.full((40, 50, 3), 9, np.uint8)))

    def counts():
        text = client.get("/metrics").text
        return _metric(text, "sam2peft_image_cache_hits_total"), _metric(text, "sam2peft_image_cache_misses_total")

    hits, misses = counts()
    image_id = _upload(client, path)["image_id"]  # a miss: decoded and kept
    _upload(client, path)  # the same bytes: a hit
    client.post("/v1/segment", json={"image_id": image_id, "boxes": [[5, 5, 30, 30]]})  # a hit
    client.post("/v1/segment", json={"image_id": "f" * 32, "boxes": [BOX]})  # a miss (404)
    assert counts() == (hits + 2, misses + 2)


def test_liveness_readiness_and_cors(setup):
    """/health/live answers at once; /health/ready 503 until one warm-up decode ran, then 200; with --cors-origin a
    browser's preflight from that origin is allowed, from another not."""
    app = create_app(_config(setup, adapters=[], cors_origins=["http://front.example"], token_all=True))
    live = LiveServer(app)
    try:
        with httpx.Client(base_url=live.url, timeout=60) as http:
            assert http.get("/health/live").json() == {"status": "ok"}
            _wait_for(lambda: http.get("/health/ready").status_code == 200)
            assert http.get("/health/ready").json() == {"status": "ready", "warmed": True}
            app.state.warmed.clear()
            not_ready = http.get("/health/ready")
            assert not_ready.status_code == 503 and not_ready.headers["retry-after"] == "1"
            preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
            allowed = http.options("/v1/segment", headers={"Origin": "http://front.example", **preflight})
            assert allowed.status_code == 200
            assert allowed.headers["access-control-allow-origin"] == "http://front.example"
            other = http.options("/v1/segment", headers={"Origin": "http://evil.example", **preflight})
            assert "access-control-allow-origin" not in other.headers
    finally:
        live.stop()


def test_hub_outage_is_503_not_404(client, monkeypatch):
    """The Hub unreachable (offline mode off) is the server's trouble: 503 with Retry-After, not 'not found'."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    from sam2_peft.adapters import resolve

    def unreachable(*args, **kwargs):
        raise LocalEntryNotFoundError("Connection error, and the file is not in the local cache.")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # as a real outage looks: the connection probe fails (so no size check is asked of the Hub) and the download finds
    # nothing in the cache
    monkeypatch.setattr(resolve, "hub_unreachable_reason", lambda *args: "the Hugging Face Hub is unreachable")
    monkeypatch.setattr(resolve, "snapshot_download", unreachable)
    answer = client.post("/v1/adapters", json={"name": "x", "source": "org/adapter"}, headers=ADMIN)
    _assert_error(answer, 503, "hub_unavailable", "unreachable", "Retry later")
    assert answer.headers["retry-after"] == "1"


# ---- the command ------------------------------------------------------------------------------------------------


def test_serve_flags_come_from_serve_config_with_their_defaults(capsys):
    """Every ServeConfig field is a flag whose --help shows its default; NAME=SOURCE mistakes are usage errors."""
    from dataclasses import fields

    from sam2_peft import cli

    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for item in fields(ServeConfig):
        assert f"--{item.name.replace('_', '-')}" in text
    assert "Most requests decoded together (1: no micro-batching). (default: 64)" in text
    with pytest.raises(SystemExit):
        cli.main(["serve", "--model", "m", "--adapter", "nuclei"])
    assert "--adapter takes NAME=SOURCE" in capsys.readouterr().err


def test_serve_without_the_extra_says_how_to_install():
    code = "import sys; sys.modules['fastapi'] = None; from sam2_peft import cli; cli.main(['serve', '--model', 'x'])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        'error: sam2-peft serve needs the serve extra (missing fastapi): pip install "sam2-peft[serve]"'
    )


@pytest.mark.slow
def test_serve_command_starts_serves_and_stops_gracefully(setup):
    """`sam2-peft serve` in a subprocess: binds loopback, serves, ends with status 0 on SIGINT; a bad start-up
    adapter ends in one `error:` line."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "sam2_peft.cli", "serve", "--model", str(setup["base"]), "--port", str(port)]
    process = subprocess.Popen(
        [*command, "--adapter", f"a={setup['root'] / 'lora_a'}"], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
                break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.3)
        assert health["adapters"] == ["a"]
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    bad = subprocess.run(
        [*command, "--adapter", f"b={setup['folder']}"], env=env, capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1].startswith("error: No adapter in")
