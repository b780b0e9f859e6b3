"""Named crash points for the crash drills (tests/test_crash_drills.py, bench/crash_drill.py). TEST-ONLY.

``failpoint("ingest.after_object_write")`` does nothing unless the environment variable
``PACS_TEST_FAILPOINTS`` arms that name, e.g. ``PACS_TEST_FAILPOINTS="ingest.after_object_write=3"``:
the process then SIGKILLs itself on the 3rd time it passes there (counted per process, across
threads). Several names may be armed, comma-separated; the first one reached kills.

Never set it on a server that holds real images: its only purpose is to prove that a process killed
at any of these points loses nothing it acknowledged (SPEC §4).

- Read once, when this module is imported; unset (every production process), :func:`failpoint` is
  one test of an empty dict.
- An unknown name or a bad count refuses to start the process (:class:`FailpointError` at import),
  so a drill can never pass because it armed a point that does not exist.
- The kill goes to the whole process group when the process group leads its own session (every
  ``pacs`` process the drills start), so a Celery worker dies with its pool children, as a machine
  crash would take it; otherwise to this process alone.
- Before dying it writes ``FAILPOINT <name> hit <n>: SIGKILL`` to stderr, which the drills look for
  to prove where the process died.
"""

from __future__ import annotations

import os
import signal
import threading

ENV_VAR = "PACS_TEST_FAILPOINTS"

#: Every failpoint in the code, in the order an object (then its derived work) passes them.
FAILPOINTS: tuple[str, ...] = (
    "ingest.after_receive",  # parsed and validated, nothing written yet
    "ingest.after_object_write",  # the object is in the store, no index row yet
    "ingest.after_index_commit",  # the index transaction committed, outbox rows not handed on
    "ingest.before_response",  # everything done, the transport has not answered yet
    "derived.before_write",  # a derived task read its object and is about to write its result
    "derived.after_write",  # its derived objects are written, the index does not point at them yet
    "derived.before_done",  # the handler finished, its outbox row is not marked done yet
)


class FailpointError(ValueError):
    """``PACS_TEST_FAILPOINTS`` names an unknown failpoint or has a bad count."""


def parse(spec: str) -> dict[str, int]:
    """``"name=N,name2=M"`` (``name`` alone means 1) → {name: N}; raises :class:`FailpointError`."""
    armed: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, count = item.partition("=")
        name = name.strip()
        if name not in FAILPOINTS:
            raise FailpointError(f"{ENV_VAR}: unknown failpoint {name!r}; known: {', '.join(FAILPOINTS)}")
        try:
            nth = int(count) if count.strip() else 1
        except ValueError:
            raise FailpointError(f"{ENV_VAR}: {item!r}: the count must be a whole number") from None
        if nth < 1:
            raise FailpointError(f"{ENV_VAR}: {item!r}: the count must be at least 1")
        armed[name] = nth
    return armed


_ARMED: dict[str, int] = parse(os.environ.get(ENV_VAR, ""))
_hits: dict[str, int] = {}
_lock = threading.Lock()


def failpoint(name: str) -> None:
    """SIGKILL this process here if ``name`` is armed and this is its N-th hit; otherwise nothing."""
    if _ARMED:
        _hit(name)


def armed() -> dict[str, int]:
    """What this process armed (empty in production)."""
    return dict(_ARMED)


def _hit(name: str) -> None:
    nth = _ARMED.get(name)
    if nth is None:
        return
    with _lock:
        _hits[name] = seen = _hits.get(name, 0) + 1
        if seen != nth:
            return
        # straight to file descriptor 2: Celery replaces sys.stderr in its pool processes
        os.write(2, f"FAILPOINT {name} hit {seen}: SIGKILL (pid {os.getpid()})\n".encode())
        _kill()


def _kill() -> None:
    pgid = os.getpgid(0)
    if pgid == os.getsid(0):
        os.killpg(pgid, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
