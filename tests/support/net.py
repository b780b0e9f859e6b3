"""Free ports, waiting by polling, and a TCP proxy that tests can cut to simulate an outage."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import time
from collections.abc import Callable
from pathlib import Path

# Servers' ports come from below Linux's ephemeral range (32768+) and below the SeaweedFS slices
# (tests/support/seaweed.py, 12000+): a port the kernel picked with bind(0) is an ephemeral one, which any client
# socket of a parallel test may take as its source port before the server started on it binds ("Address already
# in use": a flake of a clean run). Each xdist worker has its own slice, and a process never hands out a port
# twice until its slice is used up, so two servers never pick the same port.
#
# Some servers listen on a fixed default port when a test leaves it unset (HL7 2575, DICOM TLS 2762, HTTP 8000,
# DICOM 11112) and the machines' own services sit in this range too: a port one of them may take between our
# bind check and our server's own bind is never handed out.
_PORT_LOW, _PORT_HIGH, _PORT_SLICES = 2000, 11999, 8
_NEVER = frozenset({2575, 2762, 3306, 4222, 4242, 5432, 5672, 6379, 8000, 8042, 8080, 8883, 9000, 9090, 11112})
_handed_out: set[int] = set()
_rng = random.Random()


def _port_slice() -> tuple[int, int]:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    index = int(worker) % _PORT_SLICES if worker.isdigit() else 0
    width = (_PORT_HIGH - _PORT_LOW + 1) // _PORT_SLICES
    low = _PORT_LOW + index * width
    return low, low + width - 1


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port nothing listens on, for a server a test starts (see the comment above)."""
    low, high = _port_slice()
    if len(_handed_out) >= (high - low + 1) // 2:
        _handed_out.clear()  # long since released by the servers that had them
    for _ in range(500):
        port = _rng.randint(low, high)
        if port not in _handed_out and port not in _NEVER and _bindable(port):
            _handed_out.add(port)
            return port
    with socket.socket() as s:  # the slice is crowded: the kernel's choice
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, interval: float = 0.1,
               what: str = "condition") -> None:
    """Poll ``predicate`` until it is true; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def listens(pid: int, port: int) -> bool:
    """True when process ``pid`` itself holds a listening TCP socket on ``port``: unlike :func:`port_open`, not
    fooled by another process that took the port first (our server then failed to bind and is exiting)."""
    inodes: set[str] = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                listening = fields[3] == "0A"
                if listening and int(fields[1].rsplit(":", 1)[1], 16) == port and fields[9] in inodes:
                    return True
    return False
