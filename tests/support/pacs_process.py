"""Runs `pacs` subcommands as real processes, the way an operator would start them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psutil
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.support import zygote
from tests.support.net import wait_until

PACS = str(Path(sys.executable).with_name("pacs"))


def dicom_echo(port: int, aec: str = "PACS") -> bool:
    ae = AE(ae_title="PROBE")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 3
    assoc = ae.associate("127.0.0.1", port, ae_title=aec)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and status.Status == 0
    finally:
        assoc.release()


T = TypeVar("T")


class PacsProcess:
    """One `pacs` process with its own environment and log file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.args = args
        self.env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.log_path = log_path
        # exec'd, or forked by this worker's zygote (the same entry point, without importing everything again)
        self.proc: subprocess.Popen[bytes] | zygote.ForkedProcess | None = None

    def start(self) -> PacsProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        forked = zygote.start(PACS, self.args, self.env, self.log_path)
        if forked is not None:
            self.proc = forked
            return self
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([PACS, *self.args], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_dicom(self, port: int, timeout: float = 60) -> None:
        def ready() -> bool:
            if not self.alive():
                raise RuntimeError(f"pacs {self.args} exited early:\n{self.log_tail()}")
            return dicom_echo(port)

        wait_until(ready, timeout=timeout, interval=0.1, what=f"pacs {self.args[0]} on port {port}")

    def tree(self) -> list[psutil.Process]:
        """The process and its children (Celery's forked workers, `pacs serve`'s DICOM receiving processes)."""
        assert self.proc is not None
        proc = psutil.Process(self.proc.pid)
        return [proc, *proc.children(recursive=True)]

    def _over_tree(self, measure: Callable[[psutil.Process], T]) -> list[T]:
        """``measure`` of each process of :meth:`tree` still there."""
        found: list[T] = []
        for proc in self.tree():
            with contextlib.suppress(psutil.Error):
                found.append(measure(proc))
        return found

    def rss_bytes(self) -> int:
        """Resident memory of the process and its children."""
        return sum(self._over_tree(lambda proc: proc.memory_info().rss))

    def num_threads(self) -> int:
        """Threads of the process and its children (wherever the DICOM connections are served)."""
        return sum(self._over_tree(lambda proc: proc.num_threads()))

    def tcp_connections(self) -> list[Any]:
        """The TCP sockets of the process and its children (psutil's ``pconn`` tuples)."""
        return [conn for conns in self._over_tree(lambda proc: proc.net_connections(kind="tcp")) for conn in conns]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def log_tail(self, lines: int = 80) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def run_pacs(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run a one-shot `pacs` command (db upgrade, ae add, import...) and return its output."""
    return subprocess.run([PACS, *args], env={**os.environ, **env, "COLUMNS": "200"}, capture_output=True,
                          text=True, timeout=timeout)


def invoke_pacs(args: list[str], env: dict[str, str], input: str | None = None) -> subprocess.CompletedProcess[str]:
    """`pacs ARGS` run in this process (typer's CliRunner) with ``env`` added to the environment: the same
    command code and output as :func:`run_pacs` without a new interpreter (~1.4 s of CPU per command), for tests
    of a command's logic; the entry point and exit codes as a process stay tested by :func:`run_pacs` callers.
    ``input``: the command's stdin. A command that crashes raises here instead of exiting 1."""
    from typer.testing import CliRunner

    from pacs.cli import common
    from pacs.cli.main import app

    # the consoles are made once per process: one made while the environment said otherwise (or none: 80
    # columns) would wrap tables that run_pacs's processes print 200 columns wide
    common.out.width = common.console.width = 200

    umask = os.umask(0o077)  # a `pacs` command sets the owner-only umask for its process: not for this one
    os.umask(umask)
    try:
        result = CliRunner().invoke(app, args, input=input, env={**env, "COLUMNS": "200"}, catch_exceptions=False)
    finally:
        os.umask(umask)
    return subprocess.CompletedProcess(["pacs", *args], result.exit_code, result.stdout, result.stderr)
