"""A background thread that works in passes: forwarding delivery and commitment reports use it."""

from __future__ import annotations

import logging
import threading
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

log = logging.getLogger(__name__)


class PollingLoop:
    """Calls :meth:`run_once` until stopped; sleeps ``config.poll_s`` after a pass that found nothing to do.

    A failing pass is logged and retried on the next poll: an unreachable index is expected during
    outages (a warning), anything else is a bug (logged with its traceback). :meth:`wake` cuts the
    sleep short when new work was just recorded in this process.
    """

    config: Any  # the subclass's settings; must have ``poll_s``
    what = "background loop"  # for log lines

    def __init__(self, thread_name: str) -> None:
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=thread_name, daemon=True)

    def start(self) -> PollingLoop:
        self._thread.start()
        return self

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 30) -> None:
        """Let the current pass finish (it checks ``self._stop`` between items), then end the thread."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)

    def run_once(self) -> bool:
        """One pass; returns True when it did something (then the next pass starts at once)."""
        raise NotImplementedError

    def _loop(self) -> None:
        while not self._stop.is_set():
            busy = False
            try:
                busy = self.run_once()
            except SQLAlchemyError as exc:
                log.warning("%s: index unavailable, will retry: %s", self.what, str(exc).splitlines()[0][:300])
            except Exception:
                log.exception("%s: pass failed", self.what)
            if not busy:
                self._wake.wait(self.config.poll_s)
                self._wake.clear()
