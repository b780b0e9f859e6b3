"""A per-key sliding-window limit (login attempts per address and per user name, share-link opens)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable


class RateLimiter:
    """At most ``limit`` events per ``window_s`` per key; memory bounded by ``max_keys``."""

    def __init__(self, limit: int, window_s: float = 60.0, max_keys: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._limit, self._window, self._max_keys, self._clock = limit, window_s, max_keys, clock
        self._events: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def limited(self, key: str) -> bool:
        """Whether ``key`` has used up its events in the current window."""
        now = self._clock()
        with self._lock:
            events = self._events.get(key)
            if not events:
                return False
            while events and now - events[0] >= self._window:
                events.popleft()
            return len(events) >= self._limit

    def hit(self, key: str) -> float:
        """Count one event (e.g. a failed login) for ``key``; its time, for :meth:`refund`."""
        now = self._clock()
        with self._lock:
            events = self._events.get(key)
            if events is None:
                if len(self._events) >= self._max_keys:
                    self._prune(now)
                events = self._events.setdefault(key, deque())
            events.append(now)
        return now

    def refund(self, key: str, at: float) -> None:
        """Take back the event counted at ``at`` (a login attempt reserved, then not a failure)."""
        with self._lock:
            events = self._events.get(key)
            if events is not None and at in events:
                events.remove(at)

    def allow(self, key: str) -> bool:
        """Count an event for ``key`` unless it is over the limit; False when it is."""
        if self.limited(key):
            return False
        self.hit(key)
        return True

    def retry_after(self, key: str) -> int:
        with self._lock:
            events = self._events.get(key)
            if not events:
                return 0
            return max(1, int(self._window - (self._clock() - events[0])) + 1)

    def _prune(self, now: float) -> None:
        for key in [k for k, ev in self._events.items() if not ev or now - ev[-1] >= self._window]:
            del self._events[key]
        if len(self._events) >= self._max_keys:  # still full of live keys: forget the oldest half
            for key in list(self._events)[: self._max_keys // 2]:
                del self._events[key]
