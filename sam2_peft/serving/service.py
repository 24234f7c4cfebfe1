"""What the routes do, without HTTP: images kept by content hash, embeddings cached per encoder, decodes batched.

Every result equals `Sam2PeftPredictor.predict` for the same adapter, image and prompts: the service calls the
predictor's own `encode` (once per image and encoder) and `decode`, or `decode_batch` for concurrent requests with
the same kind of prompt on one model tree: one decoder forward over every request's objects, whatever their images,
with per-row adapters (peft's mixed LoRA batches, stacked PTSAM token sets).
"""

from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass

import numpy as np

from ..inference.predictor import (
    DecodeRequest,
    ImageEmbedding,
    Prediction,
    PromptError,
    check_boxes,
    check_points,
)
from .adapters import AdapterEntry, AdapterRegistry
from .batching import MicroBatcher
from .cache import ByteLRU
from .encoding import encode_mask
from .errors import ServeError
from .images import content_id, decode_base64, decode_image
from .schemas import SegmentRequest


@dataclass
class Prompts:
    """One request's checked prompts in original pixels: boxes `(N, 4)`, points `(N, P, 2)`, labels `(N, P)`."""

    boxes: np.ndarray | None
    points: np.ndarray | None
    labels: np.ndarray | None
    multimask: bool

    @property
    def count(self) -> int:
        for value in (self.boxes, self.points):
            if value is not None:
                return len(value)
        return 0

    def signature(self) -> tuple:
        """Requests whose prompts have equal signatures can be decoded together (concatenated objects)."""
        return (
            self.boxes is not None,
            None if self.points is None else self.points.shape[1],
            self.multimask,
        )


@dataclass
class _Decode:
    entry: AdapterEntry | None
    embedding: ImageEmbedding
    prompts: Prompts


class SegmentService:
    """Images, embeddings and decodes for one `AdapterRegistry`.

    Args:
        registry: the base and its adapters.
        cache_bytes: budget of the embedding LRU; image_cache_bytes: of the decoded uploaded images.
        max_image_pixels: larger uploads are refused from their header (413).
        max_prompts: most objects (boxes or point sets) per request (413 above).
        batch_wait_s: how long a decode that finds the decoder idle waits for others to join it (batches also form,
            with no wait, while the previous decode of the same image and adapter runs).
        max_batch: most requests decoded together (1: no micro-batching).
    """

    def __init__(
        self,
        registry: AdapterRegistry,
        *,
        cache_bytes: int,
        image_cache_bytes: int,
        max_image_pixels: int | None,
        max_prompts: int,
        batch_wait_s: float,
        max_batch: int = 64,
        on_batch=None,
    ) -> None:
        self.registry = registry
        self.embeddings = ByteLRU(cache_bytes, lambda e: e.nbytes)
        self.images = ByteLRU(image_cache_bytes, lambda a: a.nbytes)
        self.max_image_pixels = max_image_pixels
        self.max_prompts = max_prompts
        self.batcher = MicroBatcher(batch_wait_s, max_batch, on_batch=on_batch)
        registry.on_unload = lambda entry: self.drop_adapter(entry.encoder)  # its embeddings can never be hit again
        self._encoding: dict[tuple, threading.Lock] = {}
        self._encoding_lock = threading.Lock()

    # ---- images -----------------------------------------------------------------------------------------------

    def add_image(self, data: bytes) -> tuple[str, np.ndarray]:
        image_id = content_id(data)
        array = self.images.get(image_id)
        if array is None:
            array = decode_image(data, self.max_image_pixels)
            self.images.put(image_id, array)
        return image_id, array

    def image(self, image_id: str) -> np.ndarray:
        array = self.images.get(image_id)
        if array is None:
            raise ServeError(
                404,
                "unknown_image",
                f"No image with id '{image_id}' on this server (never uploaded, or evicted from its cache): upload "
                "it again with POST /v1/images, or send it inline as 'image' (base64).",
            )
        return array

    def embedding(self, entry: AdapterEntry | None, image_id: str, array: np.ndarray) -> tuple[ImageEmbedding, dict]:
        """The image's embedding through the encoder `entry` uses: from the cache, or computed once (concurrent
        requests for one missing key wait for a single encoding)."""
        encoder = "base" if entry is None else entry.encoder
        key = (image_id, encoder)
        embedding = self.embeddings.get(key)
        if embedding is not None:
            return embedding, {"encode_ms": 0.0, "cache_hit": True}
        with self._encoding_lock:
            lock = self._encoding.setdefault(key, threading.Lock())
        with lock:
            embedding = self.embeddings.peek(key)
            if embedding is not None:  # another request encoded it while this one waited
                return embedding, {"encode_ms": 0.0, "cache_hit": True}
            start = time.perf_counter()
            with self.registry.encoder_for(entry) as predictor:
                embedding = predictor.encode(array)
            encode_ms = (time.perf_counter() - start) * 1000
            self.embeddings.put(key, embedding)
        with self._encoding_lock:
            self._encoding.pop(key, None)
        return embedding, {"encode_ms": round(encode_ms, 3), "cache_hit": False}

    def embedding_file(self, image_id: str, adapter: str | None = None) -> bytes:
        """The image's embedding through `adapter`'s encoder as an `.npz` file (numpy's zip of `.npy` arrays), for
        decoding on the client (e.g. with the exported ONNX decoder): float32 `image_embeddings.0` `(1, C0, S/4, S/4)`
        and `image_embeddings.1` `(1, C1, S/8, S/8)` (the decoder's high-resolution features), `image_embeddings.2`
        `(1, C, S/16, S/16)` (the image embedding); int64 `original_size` `[H, W]` and `input_size` `[S, S]` (prompts
        go from original pixels to the model input's, as the processor moves them)."""
        with self.registry.acquire(adapter) as entry:
            embedding, _ = self.embedding(entry, image_id, self.image(image_id))
        size = self.registry.processor.image_processor.size
        arrays = {f"image_embeddings.{i}": t.detach().float().cpu().numpy() for i, t in enumerate(embedding.tensors)}
        arrays["original_size"] = np.asarray(embedding.original_size, np.int64)
        arrays["input_size"] = np.asarray([size["height"], size["width"]], np.int64)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return buffer.getvalue()

    def warm_up(self) -> None:
        """One encode and decode through the base on a small grey image (first-call costs paid before /health/ready
        says ready; nothing cached, nothing counted)."""
        image = np.full((64, 64, 3), 128, np.uint8)
        self.registry.base.predictor.predict(image, boxes=[[16, 16, 48, 48]])

    def drop_adapter(self, encoder: str) -> None:
        if encoder != "base":
            self.embeddings.drop(lambda key: key[1] == encoder)

    # ---- segmenting -------------------------------------------------------------------------------------------

    def check_prompts(self, body: SegmentRequest, image_size, entry: AdapterEntry | None) -> Prompts:
        boxes, points, labels = body.boxes, body.points, body.labels
        try:
            if boxes is not None:
                boxes = check_boxes(_numeric(boxes, "boxes"), image_size, "image")
            if points is not None:
                points = check_points(_numeric(points, "points"), image_size, "image")
                labels = np.ones(points.shape[:2], np.int64) if labels is None else _numeric(labels, "labels")
                if labels.shape != points.shape[:2]:
                    raise PromptError(
                        f"image: labels must be (N, P) = {list(points.shape[:2])} to match points, found "
                        f"{list(labels.shape)}."
                    )
                labels = labels.astype(np.int64)
            elif labels is not None:
                raise PromptError("image: labels were given without points.")
        except PromptError as err:
            raise ServeError(422, "bad_prompt", str(err)) from err
        if boxes is not None and len(boxes) == 0:
            boxes = None
        if boxes is not None and points is not None and len(boxes) != len(points):
            raise ServeError(
                422,
                "bad_prompt",
                f"image: boxes and points describe the same objects: found {len(boxes)} boxes, {len(points)} "
                "point sets.",
            )
        prompts = Prompts(boxes, points, labels, body.multimask)
        if prompts.count > self.max_prompts:
            raise ServeError(
                413,
                "too_many_prompts",
                f"{prompts.count} objects in one request, over this server's limit of {self.max_prompts} "
                "(--max-prompts); split the request.",
            )
        if entry is not None and entry.classes and (boxes is not None or points is not None):
            raise ServeError(
                422,
                "bad_prompt",
                f"Adapter '{entry.name}' segments {len(entry.classes)} classes without prompts: send no 'boxes' or "
                "'points'.",
            )
        if boxes is None and points is None and not (entry is not None and entry.prompt_free):
            which = "the base model" if entry is None else f"adapter '{entry.name}' ({entry.peft_type or entry.kind})"
            raise ServeError(
                422,
                "missing_prompt",
                f"No box or point given, and {which} cannot segment without a prompt: give 'boxes' or 'points', or "
                "choose a PTSAM adapter (prompt-free).",
            )
        return prompts

    def segment(self, body: SegmentRequest, deadline: float | None = None) -> dict:
        """The `POST /v1/segment` answer for a validated request (fields in `schemas.SegmentRequest`); past
        `deadline` (`time.monotonic()`) before its decode starts, a 504 instead, with nothing decoded."""
        adapter = body.adapter
        with self.registry.acquire(adapter) as entry:
            if body.image is not None:
                if body.image_id is not None:
                    raise ServeError(422, "bad_request", "Give 'image_id' or 'image', not both.")
                image_id, array = self.add_image(decode_base64(body.image))
            elif body.image_id is not None:
                image_id = body.image_id
                array = self.image(image_id)
            else:
                raise ServeError(422, "bad_request", "Give 'image_id' (from POST /v1/images) or 'image' (base64).")
            prompts = self.check_prompts(body, array.shape[:2], entry)
            embedding, timing = self.embedding(entry, image_id, array)
            start = time.perf_counter()
            key = (self.registry.batch_group(entry), prompts.signature())
            prediction = self.batcher.run(key, _Decode(entry, embedding, prompts), self._decode, deadline)
            timing["decode_ms"] = round((time.perf_counter() - start) * 1000, 3)
        return {
            "image_id": image_id,
            "adapter": adapter,
            "masks": _masks_json(prediction, prompts.multimask, body.format),
            "timing": timing,
        }

    def _decode(self, items: list[_Decode]) -> list[Prediction]:
        """Decode requests of one batch group (`AdapterRegistry.batch_group`, same kind of prompt) in one decoder
        forward; prompt-free requests on one image and adapter are one request."""
        first = items[0]
        if first.prompts.count == 0:
            keys = [(id(item.embedding), item.entry and item.entry.name) for item in items]
            unique = list(dict.fromkeys(keys))
            if len(unique) < len(keys):
                decoded = self._decode([items[keys.index(key)] for key in unique])
                return [decoded[unique.index(key)] for key in keys]
        with self.registry.decoder_for(first.entry) as predictor:
            p = first.prompts
            if len(items) == 1:
                return [predictor.decode(first.embedding, p.boxes, p.points, p.labels, multimask_output=p.multimask)]
            names = [item.entry.adapter_name if item.entry else None for item in items]
            requests = [DecodeRequest(i.embedding, i.prompts.boxes, i.prompts.points, i.prompts.labels) for i in items]
            adapters = None if len(set(names)) == 1 else names
            return predictor.decode_batch(requests, multimask_output=p.multimask, adapters=adapters)


def _numeric(value, name: str) -> np.ndarray:
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise PromptError(f"image: '{name}' must be nested lists of numbers ({err}).") from err


def _masks_json(prediction: Prediction, multimask: bool, fmt: str) -> list[dict]:
    """One entry per mask (per candidate with `multimask`); a multi-class prediction's masks are its classes, each
    with its `class_id` and `class_name`."""
    masks, scores = prediction.masks, prediction.scores
    classes = list((prediction.class_names or {}).items())
    out = []
    for index in range(len(masks)):
        candidates = [(masks[index], scores[index])] if not multimask else list(zip(masks[index], scores[index]))
        for candidate, (mask, score) in enumerate(candidates):
            entry = {"object": index, "score": float(score), **encode_mask(np.asarray(mask, bool), fmt)}
            if multimask:
                entry["candidate"] = candidate
            if classes:
                entry["class_id"], entry["class_name"] = classes[index]
            out.append(entry)
    return out
