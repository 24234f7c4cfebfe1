"""Micro-batching: concurrent decode requests with the same group key run as one decoder call.

One decode per key runs at a time; requests that arrive while it runs wait in the key's open batch and all go into
the next decode as soon as it ends (a queue the decoder drains, so a batch forms while the decoder is busy and an
idle decoder adds no wait). `wait_s` > 0 also holds a request that finds the decoder idle that long for others to
join; `max_items = 1` turns batching off. A request whose deadline passed before its decode starts is dropped, not
computed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

from .errors import ServeError


class _Batch:
    def __init__(self) -> None:
        self.items: list[Any] = []
        self.deadlines: list[float | None] = []
        self.results: list[Any] = []
        self.errors: dict[int, BaseException] = {}
        self.done = threading.Event()


class _Lane:
    """The lock one key's decodes take turns on, and how many batches hold or wait for it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0


class MicroBatcher:
    """Groups concurrent calls of `run(key, item, process)` with equal `key` into one `process(items)` call.

    `process` returns one result per item, in order. `batches`, `items`, `shared` (items decoded with at least one
    other) and `dropped` (past their deadline) count what happened, and `on_batch(size)` is called once per batch.
    """

    def __init__(self, wait_s: float, max_items: int = 64, on_batch: Callable[[int], None] | None = None) -> None:
        self.wait_s = max(0.0, float(wait_s))
        self.max_items = max(1, int(max_items))
        self.on_batch = on_batch
        self._open: dict[Hashable, _Batch] = {}
        self._lanes: dict[Hashable, _Lane] = {}
        self._lock = threading.Lock()
        self.batches = self.items = self.shared = self.dropped = 0

    def run(self, key: Hashable, item: Any, process: Callable[[list[Any]], list[Any]], deadline: float | None = None):
        """`process([item, ...])`'s result for `item`; `deadline` is a `time.monotonic()` time (504 past it)."""
        batch = _Batch()
        if self.max_items == 1:
            batch.items, batch.deadlines = [item], [deadline]
            self._execute(batch, process)
            return self._result(batch, 0)
        with self._lock:
            open_batch = self._open.get(key)
            leader = open_batch is None
            if leader:
                self._open[key] = open_batch = batch
                lane = self._lanes.setdefault(key, _Lane())
                lane.users += 1
            index = len(open_batch.items)
            open_batch.items.append(item)
            open_batch.deadlines.append(deadline)
            if len(open_batch.items) >= self.max_items:
                self._open.pop(key, None)  # full: later requests start a new batch
        if not leader:
            open_batch.done.wait()
            return self._result(open_batch, index)
        if self.wait_s and not lane.lock.locked():
            time.sleep(self.wait_s)
        try:
            with lane.lock:  # while the previous decode of this key runs, requests keep joining this batch
                with self._lock:
                    if self._open.get(key) is batch:
                        del self._open[key]
                self._execute(batch, process)
        finally:
            with self._lock:
                lane.users -= 1
                if not lane.users:
                    self._lanes.pop(key, None)
        return self._result(batch, 0)

    def _execute(self, batch: _Batch, process) -> None:
        """Run the batch's live items through `process`; expired ones get a 504 without being computed."""
        now = time.monotonic()
        live = [i for i, deadline in enumerate(batch.deadlines) if deadline is None or deadline > now]
        for index in set(range(len(batch.items))) - set(live):
            batch.errors[index] = ServeError(
                504, "timeout", "The request waited past its deadline (--timeout-s) and was dropped before decoding."
            )
        batch.results = [None] * len(batch.items)
        try:
            if live:
                for index, result in zip(live, self._process(process, [batch.items[i] for i in live])):
                    batch.results[index] = result
        except BaseException as error:  # every live member of the batch gets the failure
            batch.errors.update(dict.fromkeys(live, error))
        finally:
            with self._lock:
                self.dropped += len(batch.items) - len(live)
            batch.done.set()

    @staticmethod
    def _result(batch: _Batch, index: int) -> Any:
        if index in batch.errors:
            raise batch.errors[index]
        return batch.results[index]

    def _process(self, process, items: list[Any]) -> list[Any]:
        with self._lock:
            self.batches += 1
            self.items += len(items)
            self.shared += len(items) if len(items) > 1 else 0
        if self.on_batch:
            self.on_batch(len(items))
        results = process(items)
        if len(results) != len(items):
            raise RuntimeError(f"batch processing returned {len(results)} results for {len(items)} items")
        return results
