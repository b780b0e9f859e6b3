"""The gate in front of password checks: failed-login limits reserved before hashing, and a cap on how many
argon2 verifications run at once (issue 12, finding 9).

Checking the limit and counting the failure afterwards let 30 parallel attempts all pass the check before any
was counted, each then costing an argon2 verification (64 MiB and ~0.1 s of CPU: the server went from 192
to 1148 MiB). Here an attempt is counted *before* its password is verified — the check and the count are one
step under one lock — and given back only when the password was right (or never checked). At most
``max_concurrent`` verifications run at once; an attempt that cannot start one within ``wait_s`` is
refused with 503 and is not counted.

Counts are per process, like every limit of the HTTP API (several `pacs api` processes behind a load
balancer each allow the limit): three sliding one-minute windows per user name from one address (the tight
limit) and, with five times more room, per user name from anywhere and per address.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from pacs.errors import PacsError
from pacs.security.ratelimit import RateLimiter, client_key

T = TypeVar("T")

# Room of the per-user-name (from anywhere) and per-address windows, as a multiple of the tight limit: a
# hospital's clients may share one NAT address; a guesser elsewhere slows down but cannot lock a user out.
WIDE_FACTOR = 5


class LoginRefused(PacsError):
    """The attempt was not evaluated: 429 (over the limit) or 503 (too many verifications at once)."""

    def __init__(self, status: int, retry_after: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.retry_after, self.reason = status, retry_after, reason


@dataclass(frozen=True)
class _Reservation:
    events: tuple[tuple[RateLimiter, str, float], ...]


class LoginGuard:
    """One per HTTP process; thread-safe."""

    def __init__(self, attempts_per_minute: int, max_concurrent: int, *, wait_s: float = 1.0,
                 window_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._tight = RateLimiter(attempts_per_minute, window_s, clock=clock)
        self._per_user = RateLimiter(attempts_per_minute * WIDE_FACTOR, window_s, clock=clock)
        self._per_address = RateLimiter(attempts_per_minute * WIDE_FACTOR, window_s, clock=clock)
        self._lock = threading.Lock()
        self._verifying = threading.BoundedSemaphore(max_concurrent)
        self._wait_s = wait_s
        self.verifications = 0  # password checks run since start (what the limits bound)

    def attempt(self, username: str, host: str, verify: Callable[[], T | None]) -> T | None:
        """Run ``verify`` (the password check) if this attempt is within the limits; its result.

        A ``None`` result (wrong user name or password) stays counted against the limits; any other result
        gives the reserved count back. Raises :class:`LoginRefused` without calling ``verify``.
        """
        reservation = self._reserve(username, host)
        if not self._verifying.acquire(timeout=self._wait_s):
            self._refund(reservation)
            raise LoginRefused(503, 1, "too many logins at once; try again in a moment")
        try:
            with self._lock:
                self.verifications += 1
            result = verify()
        except BaseException:
            self._refund(reservation)
            raise
        finally:
            self._verifying.release()
        if result is not None:
            self._refund(reservation)
        return result

    def _reserve(self, username: str, host: str) -> _Reservation:
        name, client = username.lower(), client_key(host)  # an IPv6 client by its /64, never by its port
        keyed = ((self._tight, f"user:{name}|{client}"), (self._per_user, f"user:{name}"),
                 (self._per_address, f"addr:{client}"))
        with self._lock:  # check every window and count in all of them as one step
            for limiter, key in keyed:
                if limiter.limited(key):
                    raise LoginRefused(429, limiter.retry_after(key), "rate limited")
            return _Reservation(tuple((limiter, key, limiter.hit(key)) for limiter, key in keyed))

    def _refund(self, reservation: _Reservation) -> None:
        with self._lock:
            for limiter, key, at in reservation.events:
                limiter.refund(key, at)


UNVERIFIED_PREFIX = "unverified:"


def unverified_actor(username: str) -> str:
    """The audit actor of a login that did not prove who it is (issue 12, finding 11).

    The name is the client's claim, not an identity: marked so that an auditor filtering by a real user's
    name never counts an attacker's attempts as that user's actions; control characters are replaced and
    the name is cut to 64 characters.
    """
    cleaned = "".join(c if c.isprintable() else "?" for c in username.strip())[:64]
    return f"{UNVERIFIED_PREFIX}{cleaned}"
