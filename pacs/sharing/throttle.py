"""The per-address throttle of failed share-link opens (unknown tokens, wrong birth dates, opens of expired,
revoked or locked links).

Guessing tokens is hopeless (192 random bits), but each guess would otherwise cost a database look-up and an
audit row. Failures are counted per client *host* — the caller passes ``request.client.host``, never
``host:port`` (a client changes its port every connection) — in memory per process; once a host has used up
``settings.share_open_failures_per_minute`` in a sliding minute a request from it is refused with 429 before
any database work. An IPv6 client is counted by its /64 (one subscriber's network: a single machine can pick
any address in it), an IPv4 client by its address.

The counting is :class:`pacs.security.ratelimit.RateLimiter` (as for logins): memory bounded without ever
forgetting a live counter.

A refusal is audited once per host and window (:meth:`ShareThrottle.refusal_to_audit`), and a failed open of
a known link (gone, locked, the birth-date form) once per link and window (:meth:`ShareThrottle.link_to_audit`),
so a flood writes at most a few rows a minute, not one per request.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from pacs.audit import ReadCoalescer
from pacs.errors import PacsError
from pacs.security.ratelimit import RateLimiter, client_key

WINDOW_S = 60.0
PRUNE_AT = 10_000  # hosts tracked before expired ones are dropped (pacs.security.ratelimit)


class Throttled(PacsError):
    """Too many failed opens from this address: HTTP 429 with ``Retry-After``."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"too many failed attempts from this address; try again in {retry_after} s")
        self.retry_after = retry_after


class ShareThrottle:
    """Thread-safe; one per app (each API process counts its own clients)."""

    def __init__(self, failures_per_window: int, window_s: float = WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._failures = RateLimiter(failures_per_window, window_s, max_keys=PRUNE_AT, clock=clock)
        self._refusals = ReadCoalescer(window_s, max_keys=PRUNE_AT, clock=clock)
        self._links = ReadCoalescer(window_s, clock=clock)

    key = staticmethod(client_key)

    def check(self, host: str) -> None:
        """Raise :class:`Throttled` when ``host`` has used up its failures (no database work is done)."""
        key = client_key(host)
        if self._failures.limited(key):
            raise Throttled(self._failures.retry_after(key))

    def failed(self, host: str) -> None:
        """Count one failed open from ``host``."""
        self._failures.hit(client_key(host))

    def tracked(self) -> int:
        """How many hosts have a counter (for tests and metrics)."""
        return len(self._failures)

    def refusal_to_audit(self, host: str) -> bool:
        """True for the first refusal of ``host`` in a window: that one is audited, the rest are not."""
        return self._refusals.should_record(client_key(host), "refused", "")

    def link_to_audit(self, link_id: int, what: str) -> bool:
        """True for the first failed open of kind ``what`` ("revoked", "locked", "birth date asked", …) of link
        ``link_id`` in a window: that one is audited, the repeats are covered by it."""
        return self._links.should_record(f"link {link_id}", what, "")
