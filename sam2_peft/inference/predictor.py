"""Downstream use in one line: `Sam2PeftPredictor.from_pretrained("org/sam2-nuclei-lora").predict(image, boxes=...)`.

The predictor runs the adapted model's own forward (`Sam2Model.forward`, through the peft wrapper when there is one)
and uses the model's `Sam2Processor` for everything around it: resizing images, moving prompt coordinates from
original pixels to the model input, and scaling masks back to the original size. Each image is encoded once; all
its prompts go through the mask decoder together.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import Sam2Processor

from ..adapters.resolve import AdapterInfo, load_adapted_model
from ..data.sources import DataError
from ..evaluation.metrics import resolve_classes
from ..models.segmenter import unwrap_sam
from ..tuners.ptsam.layer import PtsamPromptEncoderLayer, active_classes, row_adapters

logger = logging.getLogger(__name__)

ImageLike = np.ndarray | Image.Image | torch.Tensor
"""`(H, W, 3)` or `(H, W)` uint8 array, a PIL image, or a `(3, H, W)` uint8 tensor."""


class PromptError(DataError):
    """A box or point that cannot describe an object of its image (non-finite, reversed, empty, outside it)."""


def check_boxes(boxes: np.ndarray | Sequence, image_size: Sequence[int], where: str) -> np.ndarray:
    """Boxes `(N, 4)` `x0, y0, x1, y1` in pixels, checked against an image of `image_size` `(H, W)`.

    A box partly outside the image is clipped to it (with a warning); a NaN/infinite, reversed, zero-area or entirely
    outside box raises `PromptError` naming `where` (the image), the box's index and its value, since the model
    would otherwise return a mask for a box nobody meant.
    """
    array = np.asarray(boxes, dtype=np.float64)
    if array.size == 0:
        return np.zeros((0, 4), np.float32)
    if array.shape[-1] != 4:
        raise PromptError(f"{where}: boxes must be (N, 4) as x0, y0, x1, y1 pixels, found shape {array.shape}.")
    array = array.reshape(-1, 4)
    height, width = image_size
    for index, box in enumerate(array):
        value = box.tolist()
        if not np.isfinite(box).all():
            problem = "has a NaN or infinite coordinate"
        elif box[2] < box[0] or box[3] < box[1]:
            problem = "is reversed (x1 < x0 or y1 < y0; boxes are x0, y0, x1, y1, not x, y, width, height)"
        elif box[2] == box[0] or box[3] == box[1]:
            problem = "has zero area (x0 == x1 or y0 == y1)"
        elif box[2] <= 0 or box[3] <= 0 or box[0] >= width or box[1] >= height:
            problem = f"lies entirely outside the {width}x{height} image"
        else:
            continue
        raise PromptError(f"{where}: box {index} {value} {problem}; give x0 < x1 and y0 < y1 in the image's pixels.")
    clipped = np.clip(array, 0, [width, height, width, height])
    for index in np.flatnonzero((clipped != array).any(axis=1)):
        logger.warning(
            "%s: box %d %s extends past the %dx%d image; clipped to %s.",
            where,
            index,
            array[index].tolist(),
            width,
            height,
            clipped[index].tolist(),
        )
    return clipped.astype(np.float32)


def check_points(points: np.ndarray | Sequence, image_size: Sequence[int], where: str) -> np.ndarray:
    """Points `(N, P, 2)` `x, y` in pixels; `PromptError` for a NaN/infinite point or one outside the image."""
    array = np.asarray(points, dtype=np.float64)
    if array.ndim != 3 or array.shape[-1] != 2:
        raise PromptError(f"{where}: points must be (N, P, 2) as x, y pixels, found shape {array.shape}.")
    height, width = image_size
    inside = np.isfinite(array).all(-1) & (array >= 0).all(-1) & (array[..., 0] <= width) & (array[..., 1] <= height)
    if not inside.all():
        n, k = np.argwhere(~inside)[0]
        raise PromptError(
            f"{where}: point {k} of object {n} {array[n, k].tolist()} is not a finite pixel of the {width}x{height} "
            "image; give x in [0, width] and y in [0, height]."
        )
    return array.astype(np.float32)


@dataclass
class Prediction:
    """Masks for one image, at its original size.

    Attributes:
        masks: `(N, H, W)` bool, one mask per prompt (`(N, 3, H, W)` with `multimask_output=True`); for prompt-free
            prediction N = 1.
        scores: `(N,)` predicted IoU of each mask (`(N, 3)` with `multimask_output=True`).
        logits: mask logits shaped like `masks` (float32), only when asked for with `return_logits=True`.
        class_map: with a multi-class PTSAM adapter (prompt-free), `(H, W)` the trained class id of each pixel (0:
            background), overlaps resolved by `evaluation.metrics.resolve_classes`; `masks` are then its classes,
            `(C, H, W)` in the order of `class_names`.
        class_names: with `class_map`, each class's mask value and name (`{1: "scratch", 2: "dent"}`), in order.
    """

    masks: np.ndarray
    scores: np.ndarray
    logits: np.ndarray | None = None
    class_map: np.ndarray | None = None
    class_names: dict[int, str] | None = None


@dataclass
class ImageEmbedding:
    """One encoded image: the encoder's outputs (each `(1, C, h, w)`, as `Sam2Model.get_image_embeddings` returns
    them) and the image's original `(H, W)`."""

    tensors: list[torch.Tensor]
    original_size: list[int]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


@dataclass
class DecodeRequest:
    """One `decode` call's inputs, for `Sam2PeftPredictor.decode_batch`: an encoded image and its prompts (original
    pixels, as `decode` takes them)."""

    embedding: ImageEmbedding
    boxes: np.ndarray | Sequence | None = None
    points: np.ndarray | Sequence | None = None
    labels: np.ndarray | Sequence | None = None


class Sam2PeftPredictor:
    """Predict masks with a SAM 2 model, adapted or not, from prompts given in original image pixels.

    Args:
        model: a `Sam2Model`, or a peft-wrapped one.
        processor: the model's `Sam2Processor`.
        dtype: `torch.float16` / `torch.bfloat16` run the model under autocast (weights stay float32); None = float32.
        device: where to run; default CUDA when available.
        batch_size: images encoded together.
    """

    def __init__(
        self,
        model: nn.Module,
        processor: Sam2Processor,
        *,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        batch_size: int = 8,
        adapter: AdapterInfo | None = None,
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.processor = processor
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.batch_size = batch_size
        self.adapter = adapter

    @classmethod
    def from_pretrained(
        cls,
        adapter_id_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        base_model: str | None = None,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        token: str | bool | None = None,
        batch_size: int = 8,
        merge: bool = True,
    ) -> Sam2PeftPredictor:
        """Load an adapter (Hub id or local folder, at `revision`) and the base model it records.

        `base_model` overrides the recorded base (a Hub id or a local folder with the same architecture). A LoRA
        adapter is merged into the base weights (`merge=True`, the default: the same masks, decoded without the
        extra low-rank products); `merge=False` keeps the `PeftModel`, e.g. to load
        and switch between several adapters. Raises `AdapterLoadError` (not found, offline and not cached, unknown
        type, missing files) or `AdapterMismatchError` (the base has another image size or widths than the adapter
        was trained for).
        """
        model, processor, info = load_adapted_model(
            adapter_id_or_path, revision=revision, base_model=base_model, token=token
        )
        if merge and info.peft_type == "LORA":
            model = model.merge_and_unload().eval()
        return cls(model, processor, dtype=dtype, device=device, batch_size=batch_size, adapter=info)

    def _autocast(self):
        if self.dtype in (None, torch.float32):
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @torch.no_grad()
    def predict(
        self,
        images: ImageLike | Sequence[ImageLike],
        boxes: np.ndarray | Sequence | None = None,
        points: np.ndarray | Sequence | None = None,
        labels: np.ndarray | Sequence | None = None,
        *,
        multimask_output: bool = False,
        return_logits: bool = False,
    ) -> Prediction | list[Prediction]:
        """Predict masks for one image or a list of images.

        Prompts are in original image pixels, per image: `boxes` `(N, 4)` as `x0, y0, x1, y1`; `points` `(N, P, 2)`
        as `x, y` with `labels` `(N, P)` (1 foreground, 0 background; default all 1). Give boxes, points or both
        (then box n and points n describe the same object). With a list of images, give a list of per-image prompts.
        With no prompts the model predicts one mask per image on its own (prompt-free, e.g. PTSAM adapters).

        Returns one `Prediction` for a single image, a list for a list of images. Boxes partly outside their image
        are clipped to it (with a warning); NaN/infinite, reversed, zero-area or entirely outside boxes, and points
        outside the image, raise `PromptError` (a `ValueError`) naming the image and the prompt.
        """
        single = not isinstance(images, (list, tuple))
        image_list = [images] if single else list(images)
        per_image = [
            _per_image(prompt, len(image_list), single, name)
            for prompt, name in ((boxes, "boxes"), (points, "points"), (labels, "labels"))
        ]
        arrays = [_to_array(image, index) for index, image in enumerate(image_list)]
        for index, array in enumerate(arrays):
            where = "image" if single else f"image {index}"
            if per_image[0][index] is not None:
                per_image[0][index] = check_boxes(per_image[0][index], array.shape[:2], where)
            if per_image[1][index] is not None:
                per_image[1][index] = check_points(per_image[1][index], array.shape[:2], where)
        results = []
        for start in range(0, len(arrays), self.batch_size):
            chunk = arrays[start : start + self.batch_size]
            encoded = self.processor(images=chunk, return_tensors="pt")
            pixel_values = encoded["pixel_values"].to(self.device)
            with self._autocast():
                embeddings = unwrap_sam(self.model).get_image_embeddings(pixel_values)
            for offset, original_size in enumerate(encoded["original_sizes"].tolist()):
                prompts = [p[start + offset] for p in per_image]
                results.append(
                    self._decode(
                        [e[offset : offset + 1] for e in embeddings],
                        original_size,
                        *prompts,
                        multimask_output,
                        return_logits,
                    )
                )
        return results[0] if single else results

    @torch.no_grad()
    def encode(self, image: ImageLike) -> ImageEmbedding:
        """Encode one image once, for any number of `decode` calls (what `predict` does inside, for a server or an
        annotation tool that keeps the embedding between clicks)."""
        encoded = self.processor(images=[_to_array(image, 0)], return_tensors="pt")
        with self._autocast():
            embeddings = unwrap_sam(self.model).get_image_embeddings(encoded["pixel_values"].to(self.device))
        return ImageEmbedding(list(embeddings), encoded["original_sizes"][0].tolist())

    @torch.no_grad()
    def decode(
        self,
        embedding: ImageEmbedding,
        boxes: np.ndarray | Sequence | None = None,
        points: np.ndarray | Sequence | None = None,
        labels: np.ndarray | Sequence | None = None,
        *,
        multimask_output: bool = False,
        return_logits: bool = False,
        where: str = "image",
    ) -> Prediction:
        """Masks for prompts on an image encoded by `encode`: the same checks and result as `predict` on that image."""
        size = embedding.original_size
        boxes = None if boxes is None else check_boxes(boxes, size, where)
        points = None if points is None else check_points(points, size, where)
        return self._decode(embedding.tensors, size, boxes, points, labels, multimask_output, return_logits)

    def _decode(
        self,
        embeddings: list[torch.Tensor],
        original_size: list[int],
        boxes,
        points,
        labels,
        multimask_output: bool,
        return_logits: bool,
    ) -> Prediction:
        prompts = self._prompt_tensors(original_size, boxes, points, labels)
        with self._autocast():
            outputs = self.model(image_embeddings=embeddings, multimask_output=multimask_output, **prompts)
        return self._prediction(
            outputs.pred_masks[0], outputs.iou_scores[0], original_size, multimask_output, not prompts, return_logits
        )

    @torch.no_grad()
    def decode_batch(
        self,
        requests: Sequence[DecodeRequest],
        *,
        multimask_output: bool = False,
        adapters: Sequence[str] | None = None,
    ) -> list[Prediction]:
        """Several `decode` calls in one decoder forward, each request's result the same as its own `decode` call.

        Every object of every request is one batch row, decoded against its own image's embedding, so the requests
        may be on different images. The requests must all have the same kind of prompt (boxes or not, points per
        object or none). `adapters` (one per request) mixes the adapters of a multi-adapter `PeftModel` in the
        batch: LoRA through peft's mixed-adapter forward (`adapter_names=`, `"__base__"` for none), PTSAM by giving
        each row its adapter's decoder tokens (single-class adapters with equal token counts).
        """
        rows, counts = [], []
        for index, request in enumerate(requests):
            size, where = request.embedding.original_size, f"request {index}"
            boxes = None if request.boxes is None else check_boxes(request.boxes, size, where)
            points = None if request.points is None else check_points(request.points, size, where)
            prompts = self._prompt_tensors(size, boxes, points, request.labels)
            counts.append(next(iter(prompts.values())).shape[1] if prompts else 1)
            rows.append({name: tensor.transpose(0, 1) for name, tensor in prompts.items()})  # (N, 1, ...)
        if any(row.keys() != rows[0].keys() for row in rows):
            raise ValueError("decode_batch takes requests with the same kind of prompt (boxes, points, or none).")
        if "input_points" in rows[0] and len({row["input_points"].shape[2] for row in rows}) > 1:
            raise ValueError("decode_batch takes requests with the same number of points per object.")
        inputs = {name: torch.cat([row[name] for row in rows]) for name in rows[0]}
        levels = range(len(requests[0].embedding.tensors))
        embeddings = [
            torch.cat([r.embedding.tensors[level].expand(n, -1, -1, -1) for r, n in zip(requests, counts)])
            for level in levels
        ]
        row_names = None if adapters is None else [name for name, n in zip(adapters, counts) for _ in range(n)]
        with self._autocast(), self._row_adapters(row_names) as extra:
            outputs = self.model(image_embeddings=embeddings, multimask_output=multimask_output, **inputs, **extra)
        results, start = [], 0
        for request, count in zip(requests, counts):
            stop = start + count
            masks, scores = (t[start:stop].flatten(0, 1) for t in (outputs.pred_masks, outputs.iou_scores))
            results.append(
                self._prediction(masks, scores, request.embedding.original_size, multimask_output, not inputs, False)
            )
            start = stop
        return results

    @contextmanager
    def _row_adapters(self, names: list[str] | None):
        """The extra forward arguments that give batch row b adapter `names[b]` (none when `names` is None)."""
        if names is None:
            yield {}
        elif any(isinstance(m, PtsamPromptEncoderLayer) for m in self.model.modules()):
            with row_adapters(self.model, names):
                yield {}
        else:
            yield {"adapter_names": names}

    def _prediction(
        self, masks, scores, original_size: list[int], multimask_output: bool, prompt_free: bool, return_logits: bool
    ) -> Prediction:
        """A `Prediction` from the decoder's `(N, M, h, w)` mask logits and `(N, M)` scores of one image."""
        logits = self.processor.post_process_masks([masks.float().cpu()], [original_size], binarize=False)[0]
        scores = scores.float().cpu()
        if not multimask_output:
            logits, scores = logits[:, 0], scores[:, 0]
        classes = active_classes(self.model) if prompt_free else None
        if classes is not None:
            ids = tuple(classes)
            resolved = resolve_classes(logits.numpy())
            class_map = np.concatenate([[0], ids]).astype(np.uint8 if max(ids) < 256 else np.uint16)[resolved]
            masks = resolved[None] == np.arange(1, len(ids) + 1)[:, None, None]
            logits_out = logits.numpy() if return_logits else None
            return Prediction(masks, scores.numpy(), logits_out, class_map=class_map, class_names=classes)
        return Prediction(
            masks=(logits > 0).numpy(), scores=scores.numpy(), logits=logits.numpy() if return_logits else None
        )

    def _prompt_tensors(self, original_size: list[int], boxes, points, labels) -> dict[str, torch.Tensor]:
        """Prompts in model-input coordinates, batched as `Sam2Model.forward` takes them (one image)."""
        if boxes is None and points is None:
            if labels is not None:
                raise ValueError("labels were given without points.")
            return {}
        kwargs: dict = {}
        if boxes is not None:
            boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4) if len(boxes) else np.zeros((0, 4), np.float32)
            kwargs["input_boxes"] = [boxes.tolist()]
        if points is not None:
            points = np.asarray(points, dtype=np.float32)
            if points.ndim != 3 or points.shape[-1] != 2:
                raise ValueError(f"points must be (N, P, 2) per image (x, y pixels), found shape {points.shape}.")
            labels = np.ones(points.shape[:2], np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
            if labels.shape != points.shape[:2]:
                raise ValueError(f"labels must be (N, P) = {points.shape[:2]} to match points, found {labels.shape}.")
            kwargs["input_points"], kwargs["input_labels"] = [points.tolist()], [labels.tolist()]
        if boxes is not None and points is not None and len(boxes) != len(points):
            raise ValueError(f"boxes and points describe the same objects: found {len(boxes)} boxes, {len(points)}.")
        encoded = self.processor(original_sizes=[original_size], return_tensors="pt", **kwargs)
        return {k: encoded[k].to(self.device) for k in ("input_boxes", "input_points", "input_labels") if k in encoded}

    @torch.no_grad()
    def decode_logits(
        self,
        encoded: ImageEmbedding,
        boxes: np.ndarray | None = None,
        points: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        mask_inputs: torch.Tensor | None = None,
        *,
        multimask_output: bool = False,
    ) -> DecodedPrompts:
        """Raw decoding of N prompts against an image from `encode`, optionally with each prompt's previous mask
        logits (interactive clicks, grids of point prompts): logit tensors rather than a checked `Prediction`.

        Prompts are in original pixels (checked by the caller): `boxes` `(N, 4)`, `points` `(N, P, 2)`, `labels`
        `(N, P)` (1 positive, 0 negative, -10 padding). `mask_inputs` `(N, 1, h, w)` are low-resolution logits from
        an earlier call (`DecodedPrompts.low_res_logits` of the chosen mask), fed to the prompt encoder as SAM's
        interactive loop does. Each prompt is its own batch entry so that each gets its own mask input.
        """
        prompts = self._prompt_tensors(encoded.original_size, boxes, points, labels)
        count = next(iter(prompts.values())).shape[1] if prompts else 1
        inputs = {name: tensor.transpose(0, 1) for name, tensor in prompts.items()}  # (N, 1, ...)
        embeddings = [e.expand(count, *e.shape[1:]) for e in encoded.tensors]
        with self._autocast():
            outputs = self.model(
                image_embeddings=embeddings,
                input_masks=None if mask_inputs is None else mask_inputs.to(self.device),
                multimask_output=multimask_output,
                **inputs,
            )
        low_res = outputs.pred_masks[:, 0].float()
        logits = self.processor.post_process_masks([low_res.cpu()], [encoded.original_size], binarize=False)[0]
        return DecodedPrompts(logits=logits, scores=outputs.iou_scores[:, 0].float().cpu(), low_res_logits=low_res)


@dataclass
class DecodedPrompts:
    """`Sam2PeftPredictor.decode_logits` output: `logits` `(N, M, H, W)` at the original size (M = 3 with multimask
    output, else 1), `scores` `(N, M)` predicted IoU, `low_res_logits` `(N, M, h, w)` to feed back as mask inputs."""

    logits: torch.Tensor
    scores: torch.Tensor
    low_res_logits: torch.Tensor


def _per_image(prompt, num_images: int, single: bool, name: str) -> list:
    """Split a prompt argument into one entry per image (None when absent)."""
    if prompt is None:
        return [None] * num_images
    if single:
        return [prompt]
    if len(prompt) != num_images:
        raise ValueError(f"{name} must hold one entry per image: {num_images} images, {len(prompt)} entries.")
    return list(prompt)


def _to_array(image: ImageLike, index: int) -> np.ndarray:
    """An `(H, W, 3)` uint8 array from any supported image type."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        image = image.permute(1, 2, 0).cpu().numpy() if image.ndim == 3 and image.shape[0] in (1, 3) else image.numpy()
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"Image {index}: expected (H, W, 3) or (H, W), found shape {array.shape}.")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return array[..., :3]
