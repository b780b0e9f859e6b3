"""A short-lived memory of verified API tokens, for the DICOMweb read path only.

A viewer sends hundreds of frame and search requests per study, each with the same bearer token; looking the
token up in the index is a round trip to the database on every one of them. :class:`VerifiedTokens` remembers,
for at most :data:`API_TOKEN_CACHE_S` seconds, the principal an API token was found to be, keyed by the SHA-256
of its secret (the secret itself is never kept). Its bounds:

- **revocation** (``pacs token revoke``, the admin page) takes effect on these routes within
  :data:`API_TOKEN_CACHE_S` seconds: an entry is trusted only while younger than that, counted from *before* the
  statement that verified the token was sent (so a revocation committed after that statement began is seen by
  the next lookup at most that long after). A revocation made by this process (the admin page) clears the
  memory at once (:func:`forget_all`);
- **expiry** is checked against the token's own ``expires_at`` on every use, cached or not;
- only successful lookups are kept (an unknown, revoked or expired token is looked up every time), at most
  :data:`MAX_ENTRIES` of them.

Every other route (``/api/...``, the web pages, WADO-URI, FHIR) looks the token up on every request, as before.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from pacs.security.principal import Principal

API_TOKEN_CACHE_S = 1.0
MAX_ENTRIES = 1024


@dataclasses.dataclass(frozen=True)
class _Entry:
    principal: Principal
    expires_at: datetime  # the token's own expiry (aware, UTC)
    verified_at: float  # monotonic time before the verifying statement was sent


class VerifiedTokens:
    """Thread-safe; one per process (:data:`VERIFIED`)."""

    def __init__(self, ttl_s: float = API_TOKEN_CACHE_S, max_entries: int = MAX_ENTRIES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s, self._max, self._clock = ttl_s, max_entries, clock
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._generation = 0  # bumped by forget_all(): a lookup that began before it is not stored

    def started(self) -> tuple[float, int]:
        """Call before the verifying statement: the time and generation to pass to :meth:`put`."""
        with self._lock:
            return self._clock(), self._generation

    def get(self, digest: str, source_address: str) -> Principal | None:
        """The principal verified for ``digest`` less than ``ttl_s`` ago and not expired, else None."""
        entry = self._entries.get(digest)
        if entry is None:
            return None
        if self._clock() - entry.verified_at >= self.ttl_s or entry.expires_at <= datetime.now(UTC):
            with self._lock:
                if self._entries.get(digest) is entry:
                    del self._entries[digest]
            return None
        return dataclasses.replace(entry.principal, source_address=source_address, extra={})

    def put(self, digest: str, principal: Principal, expires_at: datetime, started: tuple[float, int]) -> None:
        verified_at, generation = started
        if expires_at.tzinfo is None:
            expires_at = expires_at.replace(tzinfo=UTC)
        with self._lock:
            if generation != self._generation:
                return  # forget_all() ran while this token was being looked up
            if len(self._entries) >= self._max:
                now = self._clock()
                self._entries = {k: e for k, e in self._entries.items() if now - e.verified_at < self.ttl_s}
                if len(self._entries) >= self._max:
                    self._entries.clear()
            self._entries[digest] = _Entry(principal, expires_at, verified_at)

    def forget_all(self) -> None:
        with self._lock:
            self._entries.clear()
            self._generation += 1


VERIFIED = VerifiedTokens()


def forget_all() -> None:
    """A token was revoked (or changed) by this process: nothing remembered is trusted any more."""
    VERIFIED.forget_all()
