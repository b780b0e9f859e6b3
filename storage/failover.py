"""Which of several equivalent S3 endpoints to try, in what order: pure policy, no I/O.

An archive may name several endpoints of one object store (the gateways of a SeaweedFS cluster, the nodes of
a distributed MinIO) instead of putting a load balancer in front of them. :class:`EndpointPool` keeps the
preference: the endpoint that last answered is tried first (sticky, so a healthy archive talks to one
endpoint and reuses its connections); an endpoint that failed at the connection level sits out a cool-down
before it is tried first again, but is still tried as a last resort when every other endpoint has failed
too (a store that is back must not be refused for the rest of a cool-down).

:func:`is_connection_error` decides what counts as the endpoint failing, as opposed to the store answering:
connection refused or reset, timeouts, TLS failures. An S3 error answer (NoSuchKey, AccessDenied, a 5xx
InternalError) came from the store through a working endpoint; another endpoint of the same store would
give the same answer, so it is never a reason to fail over.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from urllib3.exceptions import (
    MaxRetryError,
    NewConnectionError,
    ProtocolError,
    ProxyError,
    ResponseError,
    SSLError,
)
from urllib3.exceptions import TimeoutError as Urllib3Timeout

log = logging.getLogger("storage.failover")

#: Seconds a failed endpoint sits out before it is tried ahead of the others again.
DEFAULT_COOLDOWN_S = 30.0

# the builtin ConnectionError and TimeoutError: what a socket raises when urllib3 does not wrap it
_CONNECTION_ERRORS = (NewConnectionError, Urllib3Timeout, ProtocolError, SSLError, ProxyError, ConnectionError,
                      TimeoutError)


def is_connection_error(exc: BaseException) -> bool:
    """True when ``exc`` says the endpoint could not be reached or stopped answering mid-request.

    urllib3 reports an exhausted retry as ``MaxRetryError`` whose ``reason`` is the last underlying error;
    a ``ResponseError`` reason means the retries were spent on 5xx *answers* (``status_forcelist``), which
    is the store speaking, not the endpoint failing.
    """
    if isinstance(exc, MaxRetryError):
        reason = exc.reason
        if reason is None or isinstance(reason, ResponseError):
            return False
        return is_connection_error(reason)
    return isinstance(exc, _CONNECTION_ERRORS)


class EndpointPool:
    """The order in which to try ``endpoints`` (names, for logs), and what the last calls taught us.

    Thread-safe; ``clock`` is injectable for tests (monotonic seconds).
    """

    def __init__(self, endpoints: Sequence[str], cooldown_s: float = DEFAULT_COOLDOWN_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not endpoints:
            raise ValueError("at least one endpoint is needed")
        if len(set(endpoints)) != len(endpoints):
            raise ValueError(f"duplicate endpoints in {list(endpoints)}")
        if cooldown_s < 0:
            raise ValueError(f"cool-down must be >= 0 seconds, got {cooldown_s}")
        self.endpoints = tuple(endpoints)
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._lock = threading.Lock()
        self._preferred = 0
        self._down_until: list[float | None] = [None] * len(endpoints)  # None: not marked down

    @property
    def preferred(self) -> str:
        """The endpoint tried first while it is not cooling down (the one that last answered)."""
        return self.endpoints[self._preferred]

    def order(self) -> list[int]:
        """Indexes to try, each once: the usable ones from the preferred one on (in list order, wrapping),
        then those cooling down, the one whose cool-down ends first first."""
        now = self._clock()
        n = len(self.endpoints)
        with self._lock:
            rotation = [(self._preferred + step) % n for step in range(n)]
            usable = [i for i in rotation if not self._cooling(i, now)]
            cooling = sorted((i for i in rotation if self._cooling(i, now)),
                             key=lambda i: self._down_until[i] or 0.0)
        return usable + cooling

    def _cooling(self, index: int, now: float) -> bool:
        until = self._down_until[index]
        return until is not None and until > now

    def succeeded(self, index: int) -> None:
        """``index`` answered (any S3 answer, error answers included): prefer it from now on."""
        with self._lock:
            was_down = self._down_until[index] is not None
            self._down_until[index] = None
            self._preferred = index
        if was_down:
            log.info("S3 endpoint %s answers again", self.endpoints[index])

    def failed(self, index: int, error: BaseException) -> None:
        """``index`` failed at the connection level: let it sit out a cool-down."""
        with self._lock:
            first = self._down_until[index] is None
            self._down_until[index] = self._clock() + self.cooldown_s
        if first:  # one line per outage, not one per request (no key in it: keys carry UIDs)
            log.warning("S3 endpoint %s unreachable (%s); trying the others first for %.0f s",
                        self.endpoints[index], type(error).__name__, self.cooldown_s)

    def status(self) -> list[tuple[str, bool]]:
        """Each endpoint and whether it is usable now (not cooling down), for health pages."""
        now = self._clock()
        with self._lock:
            return [(name, not self._cooling(i, now)) for i, name in enumerate(self.endpoints)]
