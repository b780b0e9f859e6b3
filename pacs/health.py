"""Readiness checks of one process: the index, the object store and (scaled mode) the broker, each bounded in time.

``/health/ready`` (and its older name ``/health``) answers 200 only when every check passes, else 503 with the
check that failed named (:func:`readiness`). A check runs in a daemon thread and is waited for at most
``timeout_s``: a database that hangs (a half-open connection, a black-holed host) makes the probe answer 503
in that time instead of hanging the request. At most one run of each check is in flight: while a hung one is
still running, the next probe fails at once ("still running") rather than piling up threads.

``/health/live`` needs none of this: the process answers, so it is alive.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from sqlalchemy import text

if TYPE_CHECKING:
    from pacs.context import AppContext

CHECK_TIMEOUT_S = 2.5  # each check; all run concurrently, so a probe answers within about this long


class Bounded:
    """Runs named calls in daemon threads, waiting at most a timeout; one run per name in flight."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inflight: dict[str, threading.Thread] = {}

    def start(self, name: str, fn: Callable[[], Any]) -> _Run:
        """Start ``fn`` unless a run of ``name`` is still going (then the returned run has already failed)."""
        run = _Run(name)
        with self._lock:
            previous = self._inflight.get(name)
            if previous is not None and previous.is_alive():
                run.finish(None, "unavailable: previous check still running")
                return run
            thread = threading.Thread(target=run.execute, args=(fn,), name=f"check-{name}", daemon=True)
            self._inflight[name] = thread
        thread.start()
        return run

    def call(self, name: str, fn: Callable[[], Any], timeout_s: float) -> Any:
        """``fn()``'s result within ``timeout_s``; raises :class:`CheckFailed` if it failed or took longer."""
        run = self.start(name, fn)
        return run.result(timeout_s)


class CheckFailed(Exception):
    """A bounded call failed, or did not finish in time; the message says which, without a stack trace."""


@dataclass
class _Run:
    name: str
    done: threading.Event = field(default_factory=threading.Event)
    value: Any = None
    error: str = ""

    def execute(self, fn: Callable[[], Any]) -> None:
        try:
            self.finish(fn(), "")
        except Exception as exc:
            self.finish(None, f"unavailable: {type(exc).__name__}")

    def finish(self, value: Any, error: str) -> None:
        self.value, self.error = value, error
        self.done.set()

    def result(self, wait_s: float, timeout_s: float | None = None) -> Any:
        if not self.done.wait(wait_s):
            raise CheckFailed(f"unavailable: no answer within {timeout_s or wait_s:g} s")
        if self.error:
            raise CheckFailed(self.error)
        return self.value


def check_index(ctx: AppContext) -> None:
    with ctx.engine.connect() as conn:
        conn.execute(text("SELECT 1"))


def check_store(ctx: AppContext) -> None:
    ctx.store.ping()


def check_broker(ctx: AppContext) -> None:
    """One connection to the Celery broker (Redis: a PING; others: kombu's connect)."""
    url = ctx.settings.broker_url
    if url.startswith(("redis://", "rediss://")):
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        try:
            client.ping()
        finally:
            client.close()
        return
    from kombu import Connection

    with Connection(url, connect_timeout=2) as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=2)


def checks_for(ctx: AppContext) -> dict[str, Callable[[AppContext], None]]:
    """The checks this process's readiness needs: the broker only when one is configured (scaled mode)."""
    checks: dict[str, Callable[[AppContext], None]] = {"index": check_index, "storage": check_store}
    if ctx.settings.broker_url:
        checks["broker"] = check_broker
    return checks


_BOUNDED = Bounded()


def readiness(ctx: AppContext, timeout_s: float = CHECK_TIMEOUT_S,
              bounded: Bounded | None = None) -> tuple[bool, dict[str, str]]:
    """Every check of :func:`checks_for`, run concurrently: (all ok, ``{name: "ok" | "unavailable: …"}``)."""
    bounded = bounded or _BOUNDED
    key = str(id(ctx))
    runs = {name: bounded.start(f"{key}:{name}", partial(fn, ctx)) for name, fn in checks_for(ctx).items()}
    deadline = time.monotonic() + timeout_s
    results: dict[str, str] = {}
    for name, run in runs.items():
        try:
            run.result(max(0.0, deadline - time.monotonic()), timeout_s)
            results[name] = "ok"
        except CheckFailed as exc:
            results[name] = str(exc)
    return all(v == "ok" for v in results.values()), results
