"""Start `pacs` server commands forked from a process that imported `pacs` once (:mod:`tests.support.zygote_server`).

:func:`start` returns a :class:`ForkedProcess`, which answers what the tests ask of a :class:`subprocess.Popen`
(``pid``, ``poll``, ``wait``, ``returncode``, ``send_signal``, ``terminate``, ``kill``). One zygote per pytest worker,
started on first use; if it cannot start or refuses a fork, :func:`start` returns None and the caller executes the
command as usual. ``PACS_TEST_FORK=0`` turns the zygote off (every server command is then exec'd, as before).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_lock = threading.Lock()
_server: tuple[subprocess.Popen[bytes], str] | None = None
_failed = False


def enabled() -> bool:
    """In the test suite only: a bench measures servers as an operator starts them (and may run another tree's
    code with PYTHONPATH, which a zygote importing this checkout would not)."""
    return "pytest" in sys.modules and os.environ.get("PACS_TEST_FORK", "1") != "0"


def _zygote() -> str | None:
    """The socket of this process's zygote, started on first use (None: it could not start)."""
    global _server, _failed
    with _lock:
        if _server is not None and _server[0].poll() is None:
            return _server[1]
        if _failed:
            return None
        folder = tempfile.mkdtemp(prefix="pacs-zygote-")
        path = os.path.join(folder, "socket")
        proc = subprocess.Popen([sys.executable, "-m", "tests.support.zygote_server", path], cwd=ROOT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                                stdin=subprocess.DEVNULL)
        assert proc.stdout is not None
        ready = select.select([proc.stdout], [], [], 120)[0] and proc.stdout.readline().strip() == b"ready"
        if not ready:
            proc.kill()
            proc.wait()
            _failed = True
            return None
        _server = (proc, path)
        atexit.register(_stop, proc)
        return path


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


class ForkedProcess:
    """A `pacs` command forked by the zygote, seen as a :class:`subprocess.Popen` of it."""

    def __init__(self, conn: socket.socket, pid: int, args: list[str], received: bytes = b"") -> None:
        self._conn = conn
        self._received = received  # what came after the pid line: the exit, when the child ended at once
        self.pid = pid
        self.args = args
        self.returncode: int | None = None

    def _collect(self, timeout: float | None) -> int | None:
        if self.returncode is None and (self._received or select.select([self._conn], [], [], timeout)[0]):
            line = self._received
            with contextlib.suppress(OSError):
                while not line.endswith(b"\n") and (chunk := self._conn.recv(256)):
                    line += chunk
            # no answer: the zygote itself ended (killed with its pytest worker), and its children with it
            self.returncode = int(json.loads(line)["returncode"]) if line.strip() else -9
            self._conn.close()
        return self.returncode

    def poll(self) -> int | None:
        return self._collect(0)

    def wait(self, timeout: float | None = None) -> int:
        code = self._collect(timeout)
        if code is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        import signal

        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        import signal

        self.send_signal(signal.SIGKILL)


def start(script: str, args: list[str], env: dict[str, str], log_path: Path) -> ForkedProcess | None:
    """``script ARGS`` (the ``pacs`` console script) forked by the zygote, or None (exec it instead)."""
    path = _zygote() if enabled() else None
    if path is None:
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    request = {"script": script, "argv": args, "env": env, "cwd": os.getcwd(), "log": str(log_path)}
    conn.sendall(json.dumps(request).encode() + b"\n")
    line = b""
    while not line.endswith(b"\n") and (chunk := conn.recv(256)):
        line += chunk
    first, _, rest = line.partition(b"\n")
    answer = json.loads(first) if first.strip() else {"error": "the zygote closed the connection"}
    if "pid" not in answer:
        conn.close()
        return None
    return ForkedProcess(conn, int(answer["pid"]), [script, *args], rest)
