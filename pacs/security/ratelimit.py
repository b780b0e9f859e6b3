"""A per-key sliding-window limit (login attempts per address and per user name, failed share-link opens), and
the key a client address is counted by.

Memory stays bounded without ever forgetting a live counter: a key keeps at most ``limit`` timestamps, and a
prune (when ``max_keys`` keys are tracked) drops only keys whose newest event is outside the window. Dropping
live keys instead would let a guesser reset its own count (or a victim user name's) by flooding new keys; when
the keys are all live the next prune waits until twice as many are tracked, so a flood costs amortised O(1) per
new key and memory grows only with the keys seen within one window.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import deque
from collections.abc import Callable


def client_key(host: str) -> str:
    """What a client is counted by: an IPv4 address itself, an IPv6 address by its /64 (one subscriber's network:
    a single machine may use any address in it), an IPv4-mapped IPv6 address as its IPv4 address; anything else
    (a test client's name) as it is. Never the port: a client changes it every connection."""
    try:
        ip = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


class RateLimiter:
    """At most ``limit`` events per ``window_s`` per key; thread-safe."""

    def __init__(self, limit: int, window_s: float = 60.0, max_keys: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._limit, self._window, self._max_keys, self._clock = max(1, limit), window_s, max_keys, clock
        self._prune_at = max_keys
        self._events: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """How many keys have a counter (for tests and metrics)."""
        with self._lock:
            return len(self._events)

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
                if len(self._events) >= self._prune_at:
                    self._prune(now)
                events = self._events[key] = deque(maxlen=self._limit)
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
        """Seconds until ``key`` may have an event again (its oldest counted event leaves the window)."""
        with self._lock:
            events = self._events.get(key)
            if not events:
                return 0
            return max(1, int(self._window - (self._clock() - events[0])) + 1)

    def _prune(self, now: float) -> None:
        """Drop the keys whose newest event is outside the window (never a live counter)."""
        for key in [k for k, ev in self._events.items() if not ev or now - ev[-1] >= self._window]:
            del self._events[key]
        self._prune_at = max(self._max_keys, 2 * len(self._events))
