"""Micro-batching: concurrent decode requests with the same group key run as one decoder call.

The first request of a group becomes its leader: it waits `wait_s` (a few milliseconds) for others with the same key
to join, then runs the whole group through `process` while the others wait for their share of the result. With
`wait_s = 0` every request runs alone, at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Any


class _Batch:
    def __init__(self) -> None:
        self.items: list[Any] = []
        self.results: list[Any] | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()


class MicroBatcher:
    """Groups concurrent calls of `run(key, item, process)` with equal `key` into one `process(items)` call.

    `process` returns one result per item, in order. `batches` and `items` count what ran (for /metrics), and
    `on_batch(size)` is called once per batch.
    """

    def __init__(self, wait_s: float, max_items: int = 64, on_batch: Callable[[int], None] | None = None) -> None:
        self.wait_s = max(0.0, float(wait_s))
        self.max_items = max(1, int(max_items))
        self.on_batch = on_batch
        self._open: dict[Hashable, _Batch] = {}
        self._lock = threading.Lock()
        self.batches = 0
        self.items = 0

    def run(self, key: Hashable, item: Any, process: Callable[[list[Any]], list[Any]]) -> Any:
        if self.wait_s == 0:
            return self._process(process, [item])[0]
        with self._lock:
            batch = self._open.get(key)
            leader = batch is None
            if leader:
                batch = self._open[key] = _Batch()
            index = len(batch.items)
            batch.items.append(item)
            if len(batch.items) >= self.max_items:
                self._open.pop(key, None)  # full: later requests start a new batch
        if leader:
            time.sleep(self.wait_s)
            with self._lock:
                if self._open.get(key) is batch:
                    del self._open[key]
            try:
                batch.results = self._process(process, batch.items)
            except BaseException as error:  # every member of the batch gets the failure
                batch.error = error
            finally:
                batch.done.set()
        else:
            batch.done.wait()
        if batch.error is not None:
            raise batch.error
        return batch.results[index]

    def _process(self, process, items: list[Any]) -> list[Any]:
        with self._lock:
            self.batches += 1
            self.items += len(items)
        if self.on_batch:
            self.on_batch(len(items))
        results = process(items)
        if len(results) != len(items):
            raise RuntimeError(f"batch processing returned {len(results)} results for {len(items)} items")
        return results
