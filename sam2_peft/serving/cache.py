"""An LRU of values bounded by their total size in bytes, with hit/miss accounting (image embeddings, images)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any


class ByteLRU:
    """Least-recently-used map bounded by `max_bytes` (the sum of `size(value)` over entries).

    Thread-safe. An entry larger than the whole budget is not kept (a miss every time, never an error). `hits`,
    `misses`, `evictions` count `get` calls and removals since creation.
    """

    def __init__(self, max_bytes: int, size: Callable[[Any], int]) -> None:
        self.max_bytes = int(max_bytes)
        self._size = size
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def peek(self, key: Hashable) -> Any | None:
        """The value without counting a hit or a miss, nor refreshing its recency."""
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else entry[0]

    def put(self, key: Hashable, value: Any) -> None:
        nbytes = int(self._size(value))
        with self._lock:
            if key in self._entries:
                self.bytes -= self._entries.pop(key)[1]
            if nbytes > self.max_bytes:
                return
            self._entries[key] = (value, nbytes)
            self.bytes += nbytes
            while self.bytes > self.max_bytes:
                _, (_, dropped) = self._entries.popitem(last=False)
                self.bytes -= dropped
                self.evictions += 1

    def drop(self, predicate: Callable[[Hashable], bool]) -> int:
        """Remove every entry whose key satisfies `predicate` (e.g. an unloaded adapter's embeddings); the count."""
        with self._lock:
            keys = [k for k in self._entries if predicate(k)]
            for key in keys:
                self.bytes -= self._entries.pop(key)[1]
            return len(keys)

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[Hashable]:
        with self._lock:
            return list(self._entries)

    def stats(self) -> dict:
        with self._lock:
            return {
                "entries": len(self._entries),
                "bytes": self.bytes,
                "max_bytes": self.max_bytes,
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
            }
