"""Cached image-encoder outputs for frozen-encoder training: encode each image (view) once, reuse it every epoch.

What is cached is one of two stages of `Sam2Segmenter` (`CACHED_STAGES`): the decoder's inputs, after its
`conv_s0/conv_s1` projections (`image_embeddings`, 16 MiB per 1024 px view in float32, 8 MiB in bfloat16), when
those projections are frozen (decoder LoRA, PTSAM); or the encoder's three FPN maps before them (`vision_features`,
84 MiB), so that the cache stays exact when they train (partial fine-tuning of the decoder). Entries are stored in
the dtype they were computed in, or in `storage_dtype` (bfloat16 halves them) and turned back on reading. The
memory budget counts the entries' real bytes; the first entry logs how many of the run's views fit.

Two tiers: a memory tier within a byte budget, and an optional folder (one memory-mapped safetensors file per
entry) that persists between runs. The folder's `manifest.json` records the encoder fingerprint
(`encoder_fingerprint`: base model id and revision, a hash of the encoder weights, image size, preprocessing,
dtype, library versions); a folder written for another fingerprint is never used (rebuilt with a warning, or
`ForeignCacheError`). Each entry also stores a hash of the preprocessed pixels it was computed from; a changed image
is re-encoded (and logged), never served stale. Each entry file also stores a checksum of its own tensors, verified
on every read: a damaged entry (zeroed, overwritten, truncated) is re-encoded and rewritten with a warning naming the
file, never used.

Augmentation policy (`plan_embedding_cache`): the encoder output depends on the augmented image, so with
augmentation on each image is encoded in K fixed augmented views (geometric + photometric transforms applied before
encoding, `--cache-views K`) and each epoch draws one of them; prompts and object subsets are still drawn afresh
every step from the view's masks. No augmentation is dropped; their variety is bounded by K, which is logged.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
import xxhash
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..io import atomic_write_json
from ..models.segmenter import unwrap_sam
from .disk import is_disk_full

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 3
"""2: entries carry a checksum of their tensors; 3: the cached stage and storage dtype are part of the fingerprint
(older folders are rebuilt)."""
CACHED_STAGES = ("image_embeddings", "vision_features")
"""What an entry holds, named as the `Sam2Segmenter.forward` argument that takes it."""
MANIFEST_FILE = "manifest.json"
ENTRY_SUFFIX = ".safetensors"


class ForeignCacheError(RuntimeError):
    """A cache folder was written for another encoder, image size, preprocessing or format."""


def tensor_digest(tensor: torch.Tensor) -> str:
    """A 128-bit content hash of a tensor's bytes (xxh3), its dtype and shape."""
    hasher = xxhash.xxh3_128(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    hasher.update(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
    return hasher.hexdigest()


def encoder_fingerprint(
    model: nn.Module,
    processor,
    base_name: str | None = None,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
    stage: str = "vision_features",
    storage_dtype: torch.dtype | None = None,
) -> dict:
    """Everything that changes an image's cached features, as a JSON-able dict (the cache key of a whole cache).

    Args:
        model: the base `Sam2Model` (peft-wrapped or not); its image encoder's weights are hashed, and with `stage`
            "image_embeddings" those of the decoder's projections too.
        processor: the `Sam2Processor` whose image preprocessing produced the pixels.
        base_name, revision: the base model's id/path and Hub revision (informative; the weight hash decides).
        dtype: the dtype features are computed in (autocast), when not the weights' own.
        stage: one of `CACHED_STAGES`.
        storage_dtype: the dtype entries are stored in, when not the one they are computed in.
    """
    if stage not in CACHED_STAGES:
        raise ValueError(f"stage must be one of {CACHED_STAGES}, got {stage!r}.")
    sam = unwrap_sam(model)
    encoder = sam.vision_encoder
    weights = dict(encoder.state_dict())
    if stage == "image_embeddings":
        weights |= {f"mask_decoder.{k}": v for k, v in sam.mask_decoder.conv_s0.state_dict(prefix="conv_s0.").items()}
        weights |= {f"mask_decoder.{k}": v for k, v in sam.mask_decoder.conv_s1.state_dict(prefix="conv_s1.").items()}
        weights["no_memory_embedding"] = sam.no_memory_embedding
    hasher = xxhash.xxh3_128()
    for name, tensor in sorted(weights.items()):
        hasher.update(name.encode())
        hasher.update(tensor_digest(tensor).encode())
    preprocessing = json.dumps(processor.image_processor.to_dict(), sort_keys=True, default=str)
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "base_model": base_name,
        "revision": revision,
        "encoder_weights_xxh3": hasher.hexdigest(),
        "image_size": int(unwrap_sam(model).config.prompt_encoder_config.image_size),
        "preprocessing_xxh3": xxhash.xxh3_128_hexdigest(preprocessing.encode()),
        "dtype": str(dtype or next(encoder.parameters()).dtype),
        "stage": stage,
        "storage_dtype": None if storage_dtype is None else str(storage_dtype),
        "transformers": transformers.__version__,
        "torch": torch.__version__.split("+")[0],
    }


def features_checksum(features: list[torch.Tensor]) -> str:
    """The checksum an entry file stores of its feature maps (their bytes, dtypes and shapes)."""
    return xxhash.xxh3_128_hexdigest("".join(tensor_digest(level) for level in features).encode())


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    stale: int = 0
    damaged: int = 0
    memory_bytes: int = 0
    memory_entries: int = 0
    disk_entries: int = 0


class EmbeddingCache:
    """Encoder features keyed by sample (and view), in memory within a budget and optionally on disk.

    Args:
        encode: `(B, 3, S, S)` pixels -> list of 3 feature maps `(B, C_l, h_l, w_l)` (no gradients needed).
        fingerprint: `encoder_fingerprint(...)`; a folder written under another fingerprint is not used.
        memory_budget_bytes: bytes of features kept in memory; entries beyond it go to `directory` only (or are
            re-encoded every time when there is no folder, with a warning).
        directory: persistent folder of memory-mapped entries, or None for memory only.
        rebuild_foreign: on a foreign folder, delete its entries and start again (warning) instead of raising.
        stage: what `encode` returns, one of `CACHED_STAGES` (the segmenter input `segmenter_inputs` fills).
        storage_dtype: store entries in this dtype (e.g. bfloat16); None keeps the dtype they are computed in.
        output_dtype: the dtype entries are returned in (the weights' dtype of the layers that take them); None
            returns them as stored.
        expected_entries: how many entries the run needs (its views); the first entry logs how many of them fit.
    """

    def __init__(
        self,
        encode: Callable[[torch.Tensor], list[torch.Tensor]],
        fingerprint: dict,
        memory_budget_bytes: int,
        directory: str | Path | None = None,
        rebuild_foreign: bool = True,
        stage: str = "vision_features",
        storage_dtype: torch.dtype | None = None,
        output_dtype: torch.dtype | None = None,
        expected_entries: int | None = None,
    ) -> None:
        if stage not in CACHED_STAGES:
            raise ValueError(f"stage must be one of {CACHED_STAGES}, got {stage!r}.")
        self.encode = encode
        self.stage = stage
        self.storage_dtype = storage_dtype
        self.output_dtype = output_dtype
        self.expected_entries = expected_entries
        self.fingerprint = fingerprint
        self.memory_budget_bytes = memory_budget_bytes
        self.directory = Path(directory) if directory is not None else None
        self.stats = CacheStats()
        self._memory: dict[str, tuple[str, list[torch.Tensor]]] = {}
        self._sources: dict[str, str] = {}
        """Keys of the memory tier -> the source (`SegmentationDataset._view_source`) their pixels were made of."""
        self._warned_full = False
        self._logged_fit = False
        self.disk_full = False
        """The folder ran out of space: new entries stay in memory only (the ones on disk are still read)."""
        if self.directory is not None:
            self._open_directory(rebuild_foreign)

    def _open_directory(self, rebuild_foreign: bool) -> None:
        manifest = self.directory / MANIFEST_FILE
        if manifest.exists():
            try:
                found = json.loads(manifest.read_text()).get("fingerprint")
            except json.JSONDecodeError as err:
                found = f"unreadable manifest ({err})"
            if found != self.fingerprint:
                differences = _differences(found, self.fingerprint)
                if not rebuild_foreign:
                    raise ForeignCacheError(
                        f"The embedding cache in '{self.directory}' was written for another encoder or preprocessing "
                        f"({differences}). Delete it or point --cache-dir elsewhere."
                    )
                logger.warning("Embedding cache '%s' is stale (%s): rebuilding it.", self.directory, differences)
                for entry in self.directory.glob(f"*{ENTRY_SUFFIX}"):
                    entry.unlink()
        elif self.directory.exists() and any(self.directory.iterdir()):
            raise ForeignCacheError(
                f"'{self.directory}' is not empty and has no {MANIFEST_FILE}: not an embedding cache. Choose an empty "
                "or new folder for --cache-dir."
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            atomic_write_json(manifest, {"fingerprint": self.fingerprint, "entry_format": "safetensors, one per key"})
        except OSError as error:
            if not is_disk_full(error):
                raise
            self._note_disk_full(error)
            self.directory = None  # a folder without its manifest is not a cache
            return
        self.stats.disk_entries = sum(1 for _ in self.directory.glob(f"*{ENTRY_SUFFIX}"))

    def _note_disk_full(self, error: BaseException) -> None:
        """Once: the folder is full, so new entries stay in memory (within the budget) instead of stopping the run."""
        self.disk_full = True
        logger.warning(
            "Embedding cache folder '%s' is full (%s): new features are kept in memory only (within "
            "--cache-memory-gb, beyond it re-encoded). Free space there or choose another --cache-dir.",
            self.directory,
            str(error).splitlines()[0] if str(error) else type(error).__name__,
        )

    def _path(self, key: str) -> Path:
        return self.directory / f"{xxhash.xxh3_64_hexdigest(key.encode())}{ENTRY_SUFFIX}"

    def _lookup(self, key: str, digest: str) -> list[torch.Tensor] | None:
        if key in self._memory:
            stored_digest, features = self._memory[key]
            if stored_digest == digest:
                return features
            self._evict(key)
            self._note_stale(key)
        path = self._path(key) if self.directory is not None else None
        if path is None or not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as file:
                metadata = file.metadata() or {}
                if metadata.get("key") != key or metadata.get("digest") != digest:
                    self._note_stale(key)
                    return None
                features = [file.get_tensor(f"level_{level}") for level in range(int(metadata["levels"]))]
        except (SafetensorError, OSError, KeyError, ValueError) as err:
            return self._note_damaged(path, key, f"unreadable: {err}")
        if metadata.get("checksum") != features_checksum(features):
            return self._note_damaged(path, key, "its contents do not match their checksum")
        self._remember(key, digest, features)
        return features

    def _note_damaged(self, path: Path, key: str, reason: str) -> None:
        """Drop a damaged entry file; returning None makes the caller re-encode the image and rewrite it."""
        self.stats.damaged += 1
        self.stats.disk_entries -= 1
        logger.warning("Embedding cache file '%s' (of '%s') is damaged (%s): re-encoding it.", path, key, reason)
        path.unlink(missing_ok=True)

    def _note_stale(self, key: str) -> None:
        self.stats.stale += 1
        logger.warning("Embedding cache: the pixels of '%s' changed since it was cached; re-encoding it.", key)

    def _evict(self, key: str) -> None:
        _, features = self._memory.pop(key)
        self._sources.pop(key, None)
        self.stats.memory_bytes -= _nbytes(features)
        self.stats.memory_entries -= 1

    def _log_fit(self, entry_bytes: int, dtype: torch.dtype) -> None:
        """Once, at the first entry: its size and how many of the run's entries the memory budget holds."""
        fit = self.memory_budget_bytes // max(entry_bytes, 1)
        needed = "" if self.expected_entries is None else f" of the {self.expected_entries} this run needs"
        beyond = "on disk in --cache-dir" if self.directory is not None else "re-encoded on every visit"
        logger.info(
            "Embedding cache: %s, %.1f MiB per view (%s); the %.2f GB memory budget holds %d views%s%s.",
            self.stage,
            entry_bytes / 2**20,
            str(dtype).removeprefix("torch."),
            self.memory_budget_bytes / 1e9,
            fit,
            needed,
            "" if self.expected_entries is None or fit >= self.expected_entries else f"; the rest are {beyond}",
        )

    def _remember(self, key: str, digest: str, features: list[torch.Tensor]) -> None:
        size = _nbytes(features)
        if not self._logged_fit:
            self._log_fit(size, features[0].dtype)
            self._logged_fit = True
        if self.stats.memory_bytes + size > self.memory_budget_bytes:
            if not self._warned_full and (self.directory is None or self.disk_full):
                logger.warning(
                    "Embedding cache memory budget (%.2f GB) is full after %d entries: further images are re-encoded "
                    "every time. Raise --cache-memory-gb or give --cache-dir to keep them on disk.",
                    self.memory_budget_bytes / 1e9,
                    self.stats.memory_entries,
                )
                self._warned_full = True
            return
        self._memory[key] = (digest, features)
        self.stats.memory_bytes += size
        self.stats.memory_entries += 1

    def _store(self, key: str, digest: str, features: list[torch.Tensor]) -> None:
        self._remember(key, digest, features)
        if self.directory is not None and not self.disk_full:
            path = self._path(key)
            temp = path.with_name(f".{path.name}.tmp")
            tensors = {f"level_{level}": f.contiguous() for level, f in enumerate(features)}
            metadata = {
                "key": key,
                "digest": digest,
                "levels": str(len(features)),
                "checksum": features_checksum(features),
            }
            try:
                save_file(tensors, str(temp), metadata=metadata)
                temp.replace(path)
            except (OSError, SafetensorError) as error:
                temp.unlink(missing_ok=True)
                if not is_disk_full(error):
                    raise
                self._note_disk_full(error)
                return
            self.stats.disk_entries += 1

    def segmenter_inputs(
        self, keys: list[str], pixel_values: torch.Tensor, sources: list[str | None] | None = None
    ) -> dict[str, list[torch.Tensor]]:
        """`get_or_compute` as the `Sam2Segmenter.forward` argument it fills, e.g. `{"image_embeddings": [...]}`."""
        return {self.stage: self.get_or_compute(keys, pixel_values, sources)}

    def holds(self, key: str, source: str) -> bool:
        """Whether the memory tier holds `key` computed from pixels made of `source`: then its pixels are not needed
        (memory entries stay for the whole run)."""
        return self._sources.get(key) == source

    def get_or_compute(
        self, keys: list[str], pixel_values: torch.Tensor, sources: list[str | None] | None = None
    ) -> list[torch.Tensor]:
        """Features of a batch: `(B, 3, S, S)` pixels named by `keys` -> 3 maps `(B, C_l, h_l, w_l)`.

        Entries that `holds(key, source)` are used as they are (their pixels may be placeholders); other cached
        entries are checked against a hash of their pixels; missing or stale ones are encoded together in one batch
        and stored. Returned on the pixels' device (in `output_dtype`).
        """
        sources = sources or [None] * len(keys)
        found: list[list[torch.Tensor] | None] = [None] * len(keys)
        digests: list[str | None] = [None] * len(keys)
        for i, (key, source, pixels) in enumerate(zip(keys, sources, pixel_values)):
            if source is not None and self.holds(key, source):
                found[i] = self._memory[key][1]
            else:
                digests[i] = tensor_digest(pixels)
                found[i] = self._lookup(key, digests[i])
        missing = [i for i, features in enumerate(found) if features is None]
        self.stats.hits += len(keys) - len(missing)
        self.stats.misses += len(missing)
        if missing:
            with torch.no_grad():
                encoded = self.encode(pixel_values[missing])
            for j, i in enumerate(missing):
                found[i] = [  # contiguous: the convs' channels-last maps would make every hit's stack strided
                    level[j].detach().to("cpu", self.storage_dtype, copy=True, memory_format=torch.contiguous_format)
                    for level in encoded
                ]
                self._store(keys[i], digests[i], found[i])
        for key, source in zip(keys, sources):
            if source is not None and key in self._memory:
                self._sources[key] = source
        device = pixel_values.device
        return [torch.stack([f[level] for f in found]).to(device, self.output_dtype) for level in range(len(found[0]))]


def _nbytes(features: list[torch.Tensor]) -> int:
    return sum(f.numel() * f.element_size() for f in features)


def _differences(found: dict | str | None, expected: dict) -> str:
    if not isinstance(found, dict):
        return str(found)
    changed = [f"{k}: cache has {found.get(k)!r}, now {v!r}" for k, v in expected.items() if found.get(k) != v]
    return "; ".join(changed) or "different keys"


@dataclass(frozen=True)
class CachePlan:
    """Whether a run caches encoder features, how many augmented views per image, and why (logged)."""

    enabled: bool
    views: int
    reason: str


def plan_embedding_cache(requested: bool, trains_image_encoder: bool, augmentation: bool, views: int) -> CachePlan:
    """Decide the cache mode of a training run (see the module docstring for the augmentation policy)."""
    if not requested:
        return CachePlan(False, 0, "turned off (--no-cache-embeddings): the image encoder runs on every step")
    if trains_image_encoder:
        return CachePlan(False, 0, "off: the method trains the image encoder, so its outputs change every step")
    if not augmentation:
        return CachePlan(True, 1, "on: frozen image encoder, no augmentation; each image is encoded once")
    if views < 1:
        raise ValueError(f"cache_views must be at least 1, got {views}.")
    return CachePlan(
        True,
        views,
        f"on: frozen image encoder; augmentation on, so each image is encoded in {views} fixed augmented views "
        "(flips, affine, colour, blur applied before encoding) and each epoch draws one; prompts and object subsets "
        "are still re-drawn every step. --cache-views N for more variety, --no-cache-embeddings for a fresh "
        "augmentation every epoch",
    )
