"""Many adapters resident on one SAM 2 base, chosen per request.

The base weights are held once. Adapters of one peft type live in one `PeftModel` (peft's multi-adapter
`load_adapter(adapter_name=...)` + `set_adapter`; PTSAM's layers keep one token set per adapter name and use the
active one). peft cannot hold two peft types in one `PeftModel`, so each type gets its own module tree: a deep copy
of the base whose parameters and buffers are the base's own tensors (no copy of the weights), into which that type
injects its layers. The base itself stays pristine (requests with no adapter use it). A partial fine-tune replaces
whole components: it gets a tree sharing every tensor except those components', which it loads its weights into.

Each tree has a lock: `set_adapter` + the forward pass that depends on it run under it, so concurrent requests for
two adapters of one type never see each other's adapter. Unloading waits for the adapter's requests in flight.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import os
import re
import threading
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..adapters.files import (
    PARTIAL_WEIGHTS_FILE,
    PEFT_CONFIG_FILE,
    PEFT_WEIGHTS_FILE,
    AdapterLoadError,
    check_signature,
    load_partial,
    load_peft,
    read_adapter_weights,
)
from ..adapters.resolve import AdapterInfo, download_adapter, inspect_adapter
from ..inference.predictor import Sam2PeftPredictor
from .errors import ServeError

logger = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
ENCODER_PREFIXES = ("vision_encoder.", "mask_decoder.conv_s0.", "mask_decoder.conv_s1.")
"""Modules whose weights the cached image embedding depends on (`get_image_embeddings` applies conv_s0/conv_s1)."""
BASE_ENCODER = "base"
UNLOAD_WAIT_S = 60.0


def shared_copy(model: nn.Module, own: tuple[str, ...] = ()) -> nn.Module:
    """A deep copy of `model` whose parameters and buffers are `model`'s own tensors, except those whose names
    start with a prefix in `own` (copied, so that they can be changed without touching `model`)."""
    memo = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if not (own and name.startswith(own)):
            memo[id(tensor)] = tensor
    return copy.deepcopy(model, memo)


def _hub_outage(error: BaseException | None) -> bool:
    """Whether a failed Hub download is the Hub's (or the network's) failure, not a missing repo: unreachable while
    offline mode is off, or a 5xx answer. (With HF_HUB_OFFLINE set, an uncached repo is simply not available here.)"""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    if isinstance(error, LocalEntryNotFoundError):
        return not constants.HF_HUB_OFFLINE
    response = getattr(error, "response", None) if isinstance(error, HfHubHTTPError) else None
    return response is not None and response.status_code >= 500


def _clean(name: str) -> str:
    """A module path without peft's wrapper segments (`base_model.model.`, `.base_layer`)."""
    name = name.removeprefix("base_model.model.")
    return ".".join(part for part in name.split(".") if part != "base_layer") + "."


@dataclass
class ModelTree:
    """One module tree over the base weights and the predictor running it; `lock` guards its active adapter."""

    kind: str
    model: nn.Module
    predictor: Sam2PeftPredictor
    lock: threading.RLock = field(default_factory=threading.RLock)
    active: str | None = None

    @contextmanager
    def using(self, adapter: str | None):
        """Hold the tree with `adapter` active (None: a tree with one fixed adapter, or the base)."""
        with self.lock:
            if adapter is not None and self.active != adapter:
                self.model.set_adapter(adapter)
                self.active = adapter
            yield self.predictor


@dataclass
class AdapterEntry:
    """A loaded adapter: where it came from, the tree it lives in, and the encoder its embeddings go through."""

    name: str
    source: str
    revision: str | None
    kind: str
    peft_type: str | None
    tree: ModelTree
    encoder: str
    """`base` when the adapter leaves the image encoder alone (it shares the base's cached embeddings), else an id
    unique to this load of this adapter."""
    loaded_at: float
    inflight: int = 0
    removed: bool = False
    used_at: float = 0.0
    """`time.monotonic()` of its last request (the LRU cap evicts the adapter unused longest)."""
    classes: dict[str, str] | None = None
    """A multi-class PTSAM adapter's classes, mask value to name (its `id2label`); None for other adapters."""

    @property
    def adapter_name(self) -> str | None:
        """The name to `set_adapter` in its tree (None for a partial fine-tune's own tree)."""
        return self.name if self.kind == "peft" else None

    @property
    def prompt_free(self) -> bool:
        return self.peft_type == "PTSAM"

    def describe(self) -> dict:
        return {
            "name": self.name,
            "source": self.source,
            "revision": self.revision,
            "kind": self.kind,
            "peft_type": self.peft_type,
            "encoder": "base" if self.encoder == BASE_ENCODER else "own",
            "prompt_free": self.prompt_free,
            "classes": self.classes,
        }


class AdapterRegistry:
    """The base model and the adapters resident on it.

    Args:
        model: the base `Sam2Model` (already on `device`).
        processor: its `Sam2Processor`.
        base_name: the base's name (reported by /health).
        adapter_root: folder under which POST /v1/adapters may load local adapters (None: Hub ids only).
        dtype, device: passed to every tree's `Sam2PeftPredictor`.
        load_on_use: a request naming an adapter not loaded loads it first: a folder of that name under
            `adapter_root`, or a Hub repo id matching a pattern of `allowed_hub_repos` (`fnmatch`, e.g. `org/*`).
        max_adapters: most adapters resident at once (0: no cap); loading one more unloads the least recently used
            (after its requests in flight finish). `on_unload(entry)` runs after every unload (e.g. drop its cache).
    """

    def __init__(
        self,
        model,
        processor,
        base_name: str,
        *,
        adapter_root=None,
        dtype=None,
        device=None,
        load_on_use: bool = False,
        allowed_hub_repos: tuple[str, ...] = (),
        max_adapters: int = 0,
        accepts_adapters: bool = True,
    ) -> None:
        self.processor = processor
        self.base_name = base_name
        self.adapter_root = Path(adapter_root).resolve() if adapter_root else None
        self.load_on_use, self.allowed_hub_repos = load_on_use, tuple(allowed_hub_repos)
        self.max_adapters = max(0, int(max_adapters))
        self.on_unload = None
        self.evictions = self.loads_on_use = 0
        self._first_use_locks: dict[str, threading.Lock] = {}
        self.dtype, self.device = dtype, device
        self.base = ModelTree("base", model, self._predictor(model))
        self.accepts_adapters = accepts_adapters  # False for an ONNX export (`create_app` with an export folder)
        self.trees: dict[str, ModelTree] = {}
        self.entries: dict[str, AdapterEntry] = {}
        self._lock = threading.Lock()  # guards `entries`, `trees` and in-flight counts
        self._changed = threading.Condition(self._lock)
        self._loading: set[str] = set()
        self._generation = 0
        self.ever_loaded: set[str] = set()
        """Every name an adapter was loaded under (by the operator or an admin token): the metric label values."""

    def _predictor(self, model: nn.Module) -> Sam2PeftPredictor:
        return Sam2PeftPredictor(model, self.processor, dtype=self.dtype, device=self.device)

    # ---- resolving a source ---------------------------------------------------------------------------------------

    def resolve_request_source(self, source: str, revision: str | None) -> Path:
        """The adapter folder for an HTTP load request: a folder under `adapter_root`, or a Hub download.

        Nothing else on disk is reachable: absolute paths, `~`, `..` and symlinks leading out of the root are
        refused (403), as is a relative path that exists outside the root.
        """
        self.check_accepts_adapters()
        if not isinstance(source, str) or not source or "\x00" in source:
            raise ServeError(422, "bad_source", "'source' must be a Hub repo id (org/name) or a folder name.")
        parts = Path(source).parts
        if source.startswith(("/", "~", "\\")) or Path(source).is_absolute() or ".." in parts:
            raise ServeError(
                403,
                "source_forbidden",
                f"'{source}': absolute paths, '~' and '..' are not allowed; give a Hub repo id (org/name) or a "
                "folder relative to the server's --adapter-root.",
            )
        if self.adapter_root is not None:
            candidate = self.adapter_root / source
            if candidate.exists() or candidate.is_symlink():
                real = candidate.resolve()
                if real != self.adapter_root and self.adapter_root not in real.parents:
                    raise ServeError(
                        403, "source_forbidden", f"'{source}' leads outside the adapter root (a symlink out of it)."
                    )
                if not real.is_dir():
                    raise ServeError(422, "bad_source", f"'{source}' under the adapter root is not a folder.")
                return real
        if not HUB_ID_PATTERN.match(source):
            where = "a folder under the server's adapter root" if self.adapter_root else "allowed here"
            raise ServeError(
                404,
                "adapter_source_not_found",
                f"'{source}' is neither a Hub repo id (org/name) nor {where}"
                + ("" if self.adapter_root else " (the server has no --adapter-root: only Hub ids load)")
                + ".",
            )
        if Path(source).exists():
            raise ServeError(
                403, "source_forbidden", f"'{source}' is a path on the server outside the adapter root; refused."
            )
        try:
            return download_adapter(source, revision=revision)
        except AdapterLoadError as err:
            if _hub_outage(err.__cause__):
                raise ServeError(503, "hub_unavailable", f"{err} Retry later.") from err
            raise ServeError(404, "adapter_source_not_found", str(err)) from err

    # ---- loading and unloading ------------------------------------------------------------------------------------

    def check_accepts_adapters(self) -> None:
        """409 when the base is an ONNX export (its adapter is inside; no other can be added)."""
        if not self.accepts_adapters:
            raise ServeError(
                409, "adapters_unsupported", f"The base '{self.base_name}' is an ONNX export: no adapters."
            )

    def load(self, name: str, directory: str | os.PathLike, *, source: str, revision: str | None = None) -> dict:
        """Load the adapter in `directory` as `name`, with every check the predictor applies: its files and peft
        type (`inspect_adapter`), the base architecture (`check_signature`), finite weights (`read_adapter_weights`).
        With `max_adapters`, unloads the least recently used adapters over the cap.

        Raises `ServeError` (409 name taken, 422 invalid adapter / another architecture).
        """
        if not (NAME_PATTERN.match(name or "") or (name == source and HUB_ID_PATTERN.match(name))):
            raise ServeError(
                422, "bad_adapter_name", f"Adapter name '{name}' must be 1-64 letters, digits, '_' or '-'."
            )
        self.check_accepts_adapters()
        if name in ("base", "none", "null"):
            raise ServeError(422, "bad_adapter_name", f"'{name}' is reserved for the base model (send adapter: null).")
        with self._lock:
            if name in self.entries or name in self._loading:
                raise ServeError(
                    409, "adapter_exists", f"An adapter named '{name}' is already loaded; DELETE it first."
                )
            self._loading.add(name)
        try:
            entry = self._load(name, Path(directory), source, revision)
        except AdapterLoadError as err:
            raise ServeError(422, "adapter_invalid", self._hide_root(str(err))) from err
        except ValueError as err:  # AdapterMismatchError, PtsamArchitectureError
            raise ServeError(422, "adapter_mismatch", self._hide_root(str(err))) from err
        finally:
            with self._lock:
                self._loading.discard(name)
        with self._lock:
            entry.used_at = time.monotonic()
            self.entries[name] = entry
            self.ever_loaded.add(name)
        logger.info("Loaded adapter '%s' (%s) from %s", name, entry.peft_type or entry.kind, source)
        self._evict(keep=name)
        return entry.describe()

    def _evict(self, keep: str) -> None:
        """Unload least recently used adapters (not `keep`) while more than `max_adapters` are resident."""
        while self.max_adapters:
            with self._lock:
                others = [e for e in self.entries.values() if e.name != keep]
                if len(self.entries) <= self.max_adapters or not others:
                    return
                victim = min(others, key=lambda e: (e.inflight > 0, e.used_at)).name
            with suppress(ServeError):  # unloaded meanwhile by someone else
                self.unload(victim)
                self.evictions += 1
                logger.info("Evicted adapter '%s' (--max-adapters %d)", victim, self.max_adapters)

    def _load_on_first_use(self, name: str) -> None:
        """Load adapter `name` on its first request: the folder `name` under the adapter root, or the Hub repo
        `name` when an `allowed_hub_repos` pattern matches it (concurrent first requests wait for one load)."""
        hub = bool(HUB_ID_PATTERN.match(name))
        if hub and not any(fnmatch.fnmatchcase(name, pattern) for pattern in self.allowed_hub_repos):
            raise ServeError(
                403,
                "adapter_not_allowed",
                f"Hub repo '{name}' is not on this server's allow-list (--allow-hub-repo); ask the operator to add "
                "it, or name a loaded adapter.",
            )
        if not hub and not (NAME_PATTERN.match(name) and self.adapter_root and (self.adapter_root / name).is_dir()):
            raise ServeError(404, "unknown_adapter", self._unknown(name) + self._on_use_hint())
        with self._lock:
            lock = self._first_use_locks.setdefault(name, threading.Lock())
        with lock:
            if name not in self.entries:
                directory = self.resolve_request_source(name, None)
                self.load(name, directory, source=name)
                self.loads_on_use += 1
        with self._lock:
            self._first_use_locks.pop(name, None)

    def _on_use_hint(self) -> str:
        where = ["a folder under the adapter root" if self.adapter_root else "", "an allowed Hub repo (org/name)"]
        return " Adapters load on first use from " + " or ".join(w for w in where if w) + "."

    def _hide_root(self, message: str) -> str:
        """A message for a client: the adapter root's place on the server's disk replaced by `<adapter-root>`."""
        return message.replace(str(self.adapter_root), "<adapter-root>") if self.adapter_root else message

    def _load(self, name: str, directory: Path, source: str, revision: str | None) -> AdapterEntry:
        info: AdapterInfo = inspect_adapter(directory)
        base_model = self.base.model
        check_signature(base_model, directory)
        if info.base_model and info.base_model != self.base_name:
            logger.warning(
                "Adapter '%s' records base '%s'; serving it on '%s' (same architecture).",
                name,
                info.base_model,
                self.base_name,
            )
        if info.kind == "partial":
            state = read_adapter_weights(directory / PARTIAL_WEIGHTS_FILE)
            own = tuple(sorted({key.split(".")[0] + "." for key in state}))
            model = shared_copy(base_model, own)
            load_partial(model, directory)
            tree = ModelTree(f"partial:{name}", model.eval(), self._predictor(model))
            changes_encoder = any(key.startswith(ENCODER_PREFIXES) for key in state)
            return self._entry(name, source, revision, info, tree, changes_encoder)
        if (directory / PEFT_WEIGHTS_FILE).exists():
            read_adapter_weights(directory / PEFT_WEIGHTS_FILE)
        kind = info.peft_type
        with self._lock:
            tree = self.trees.get(kind)
        if tree is None:
            model = load_peft(shared_copy(base_model), directory, adapter_name=name).eval()
            tree = ModelTree(kind, model, self._predictor(model), active=name)
            with self._lock:
                if kind in self.trees:  # another load of this type won the race: add to its tree instead
                    tree = None
                else:
                    self.trees[kind] = tree
        else:
            tree = self._add_to_tree(tree, name, directory)
        if tree is None:
            return self._load(name, directory, source, revision)
        return self._entry(name, source, revision, info, tree, self._changes_encoder(tree.model, name))

    def _add_to_tree(self, tree: ModelTree, name: str, directory: Path) -> ModelTree:
        with tree.lock:
            try:
                tree.model.load_adapter(str(directory), adapter_name=name)
            except (ValueError, KeyError, TypeError) as err:
                raise AdapterLoadError(
                    f"The adapter config '{directory / PEFT_CONFIG_FILE}' does not fit this base model ({err})."
                ) from err
            if tree.active is not None:
                tree.model.set_adapter(tree.active)  # loading must not change what requests in flight run with
            tree.model.eval()
        return tree

    def _entry(self, name, source, revision, info: AdapterInfo, tree: ModelTree, changes_encoder: bool):
        with self._lock:
            self._generation += 1
            encoder = f"{name}#{self._generation}" if changes_encoder else BASE_ENCODER
        entry = AdapterEntry(name, source, revision, info.kind, info.peft_type, tree, encoder, time.time())
        if info.peft_type == "PTSAM":
            entry.classes = tree.model.peft_config[name].id2label or None
        return entry

    @staticmethod
    def _changes_encoder(model: nn.Module, adapter: str) -> bool:
        """Whether adapter `adapter` has layers in the image encoder (or in the convs its embedding goes through)."""
        for module_name, module in model.named_modules():
            if not isinstance(module, BaseTunerLayer) or not _clean(module_name).startswith(ENCODER_PREFIXES):
                continue
            for attribute in module.adapter_layer_names:
                holder = getattr(module, attribute, None)
                if hasattr(holder, "keys") and adapter in holder.keys():
                    return True
        return False

    def unload(self, name: str) -> dict:
        """Remove an adapter: new requests for it get 404 at once; requests already running finish with it first."""
        with self._lock:
            entry = self.entries.pop(name, None)
            if entry is None:
                raise ServeError(404, "unknown_adapter", self._unknown(name))
            entry.removed = True
            deadline = time.monotonic() + UNLOAD_WAIT_S
            while entry.inflight and time.monotonic() < deadline:
                self._changed.wait(timeout=1.0)
            tree = entry.tree
            last = entry.kind == "peft" and not any(e.tree is tree for e in self.entries.values())
            if last:
                self.trees.pop(tree.kind, None)
        if entry.kind == "peft" and not last:
            with tree.lock:
                if tree.active == name:
                    other = next(e.name for e in self.entries.values() if e.tree is tree)
                    tree.model.set_adapter(other)
                    tree.active = other
                tree.model.delete_adapter(name)
        if self.on_unload is not None:
            self.on_unload(entry)
        logger.info("Unloaded adapter '%s'", name)
        return entry.describe()

    # ---- per request ----------------------------------------------------------------------------------------------

    def _unknown(self, name: str) -> str:
        known = ", ".join(sorted(self.entries)) or "none"
        return f"No adapter named '{name}' is loaded (loaded: {known}); send adapter: null for the base model."

    @contextmanager
    def acquire(self, name: str | None):
        """The entry of adapter `name` (None: the base), held so that unloading waits for this request."""
        if name is None:
            yield None
            return
        for _ in range(3):  # an adapter loaded on use may be evicted again before this request holds it
            if self.load_on_use and name not in self.entries:
                self._load_on_first_use(name)
            with self._lock:
                entry = self.entries.get(name)
                if entry is not None:
                    entry.inflight += 1
                    entry.used_at = time.monotonic()
                    break
        if entry is None:
            raise ServeError(404, "unknown_adapter", self._unknown(name))
        try:
            yield entry
        finally:
            with self._lock:
                entry.inflight -= 1
                self._changed.notify_all()

    @contextmanager
    def encoder_for(self, entry: AdapterEntry | None):
        """The predictor to encode an image with for `entry` (the base's unless the adapter changes the encoder)."""
        if entry is None or entry.encoder == BASE_ENCODER:
            yield self.base.predictor
        else:
            with entry.tree.using(entry.adapter_name) as predictor:
                yield predictor

    @staticmethod
    def batch_group(entry: AdapterEntry | None) -> tuple:
        """Requests whose adapters have equal groups can share one decoder forward: the base alone; the adapters of
        one peft tree (LoRA without DoRA, rows mixed by peft's `adapter_names`; single-class PTSAM with the same token
        count and output-mask choice and no tuned upscaling, each row its own tokens); any other adapter alone (its
        own or its tree's)."""
        if entry is None:
            return (BASE_ENCODER,)
        group = (entry.tree.kind, id(entry.tree))
        if entry.kind != "peft":
            return group
        config = entry.tree.model.peft_config[entry.name]
        if entry.peft_type == "PTSAM" and not config.num_classes and not config.tune_upscaling:
            return (*group, config.num_tokens, config.output_mask)
        if entry.peft_type == "LORA" and not config.use_dora:  # peft's mixed batches refuse DoRA
            return group
        return (*group, entry.name)

    @contextmanager
    def decoder_for(self, entry: AdapterEntry | None):
        if entry is None:
            yield self.base.predictor
        else:
            with entry.tree.using(entry.adapter_name) as predictor:
                yield predictor

    def describe(self) -> list[dict]:
        with self._lock:
            return [e.describe() for e in self.entries.values()]
