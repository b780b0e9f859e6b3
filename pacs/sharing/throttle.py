"""The per-address throttle of failed share-link opens (unknown tokens, wrong birth dates, opens of expired,
revoked or locked links).

Guessing tokens is hopeless (192 random bits), but each guess would otherwise cost a database look-up and an
audit row. Failures are counted per client *host* — the caller passes ``request.client.host``, never
``host:port`` (a client changes its port every connection) — in memory per process; once a host has used up
``settings.share_open_failures_per_minute`` in a sliding minute a request from it is refused with 429 before
any database work. An IPv6 client is counted by its /64 (one subscriber's network: a single machine can pick
any address in it), an IPv4 client by its address.

Memory stays bounded without ever forgetting a live counter: a host keeps at most ``limit`` timestamps, and
pruning drops only hosts whose newest failure is older than the window (their count is zero anyway).

A refusal is audited once per host and window (:meth:`ShareThrottle.refusal_to_audit`), and a failed open of
a known link (gone, locked, the birth-date form) once per link and window (:meth:`ShareThrottle.link_to_audit`),
so a flood writes at most a few rows a minute, not one per request.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import deque
from collections.abc import Callable

from pacs.audit import ReadCoalescer
from pacs.errors import PacsError

WINDOW_S = 60.0
PRUNE_AT = 10_000  # hosts tracked before expired ones are dropped


class Throttled(PacsError):
    """Too many failed opens from this address: HTTP 429 with ``Retry-After``."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"too many failed attempts from this address; try again in {retry_after} s")
        self.retry_after = retry_after


class ShareThrottle:
    """Thread-safe; one per app (each API process counts its own clients)."""

    def __init__(self, failures_per_window: int, window_s: float = WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._limit, self._window, self._clock = max(1, failures_per_window), window_s, clock
        self._events: dict[str, deque[float]] = {}
        self._audited: dict[str, float] = {}
        self._links = ReadCoalescer(window_s, clock=clock)
        self._lock = threading.Lock()

    @staticmethod
    def key(host: str) -> str:
        """What a client is counted by: an IPv4 address itself, an IPv6 address's /64 (an IPv4-mapped IPv6
        address as its IPv4 address); anything else (a test client's name) as it is."""
        try:
            ip = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
        except ValueError:
            return host
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.ipv4_mapped is not None:
                return str(ip.ipv4_mapped)
            return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
        return str(ip)

    def check(self, host: str) -> None:
        """Raise :class:`Throttled` when ``host`` has used up its failures (no database work is done)."""
        key, now = self.key(host), self._clock()
        with self._lock:
            events = self._events.get(key)
            if events is None:
                return
            while events and now - events[0] >= self._window:
                events.popleft()
            if len(events) >= self._limit:
                raise Throttled(max(1, int(self._window - (now - events[0])) + 1))

    def failed(self, host: str) -> None:
        """Count one failed open from ``host``."""
        key, now = self.key(host), self._clock()
        with self._lock:
            events = self._events.get(key)
            if events is None:
                if len(self._events) >= PRUNE_AT:
                    self._prune(now)
                events = self._events[key] = deque(maxlen=self._limit)
            events.append(now)

    def tracked(self) -> int:
        """How many hosts have a counter (for tests and metrics)."""
        with self._lock:
            return len(self._events)

    def refusal_to_audit(self, host: str) -> bool:
        """True for the first refusal of ``host`` in a window: that one is audited, the rest are not."""
        key, now = self.key(host), self._clock()
        with self._lock:
            last = self._audited.get(key)
            if last is not None and now - last < self._window:
                return False
            if len(self._audited) >= PRUNE_AT:
                self._audited = {k: t for k, t in self._audited.items() if now - t < self._window}
            self._audited[key] = now
            return True

    def link_to_audit(self, link_id: int, what: str) -> bool:
        """True for the first failed open of kind ``what`` ("revoked", "locked", "birth date asked", …) of link
        ``link_id`` in a window: that one is audited, the repeats are covered by it."""
        return self._links.should_record(f"link {link_id}", what, "")

    def _prune(self, now: float) -> None:
        """Drop hosts whose newest failure is outside the window (never a live counter)."""
        for key in [k for k, ev in self._events.items() if not ev or now - ev[-1] >= self._window]:
            del self._events[key]
