"""A bounded, process-wide cache of rendered images (``/rendered``, frame thumbnails).

A viewer scrolling through a series asks for the same frames again and again; rendering one means reading
the object, decoding the frame, windowing it and encoding a JPEG. The cache keeps the encoded answer, keyed
by what determines it exactly: the SHA-256 of the stored object (a new version of an instance has another),
the frame, the media type and every rendering parameter. It holds bytes only, never who asked: callers
resolve the request inside the asker's scope *before* they look here (the key needs the object's hash, which
only that resolution yields), so the cache cannot hand one user's image to another who may not see it.

Least recently used entries go first once :attr:`RenderedCache.max_bytes` is reached; an image larger than
:attr:`RenderedCache.max_item_bytes` is not kept.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Final

DEFAULT_MAX_BYTES: Final = 64 * 1024 * 1024
DEFAULT_MAX_ITEM_BYTES: Final = 4 * 1024 * 1024


class RenderedCache:
    """Thread-safe LRU of encoded images, bounded in bytes."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, max_item_bytes: int = DEFAULT_MAX_ITEM_BYTES) -> None:
        self.max_bytes = max(int(max_bytes), 0)
        self.max_item_bytes = min(max(int(max_item_bytes), 0), self.max_bytes)
        self._items: OrderedDict[Hashable, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def size_bytes(self) -> int:
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def get(self, key: Hashable) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: Hashable, value: bytes) -> None:
        if len(value) > self.max_item_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            self._items[key] = value
            self._bytes += len(value)
            while self._bytes > self.max_bytes and self._items:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= len(evicted)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0
