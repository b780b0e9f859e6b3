"""A process that has imported `pacs` once and forks a `pacs` server command for each request (tests only).

Every `pacs serve`/`scp`/`worker`/`api` the suite starts spent ~3 s of CPU importing the same ~500 modules and
building the same FastAPI routes before doing anything a test looks at: about a third of the suite's CPU on the
2-core machine. This process does that once per pytest worker (:mod:`tests.support.zygote`) and forks a child per
command. The child becomes the process a test talks to, as if started with ``pacs ARGS``: its own session and
process group (the test signals the group), the environment, working directory and log file it was given, the
same entry point (:data:`pacs.cli.main.app`, as the ``pacs`` console script calls it), its own exit code. What it
skips is only the import of code that an exec would load from the same files.

Protocol, one connection per child over a UNIX socket: the client sends one JSON line ``{"script", "argv", "env",
"cwd", "log"}``; the server answers ``{"pid": N}`` (or ``{"error": why}``), and when the child ends,
``{"returncode": R}`` (negative: killed by that signal, as :class:`subprocess.Popen` reports it), then closes.

Run as ``python -m tests.support.zygote_server SOCKET``; it ends when its parent (the pytest worker) does.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import selectors
import socket
import sys
import threading
from typing import Any

# what `pacs serve` and the other server commands import before serving (pacs.cli.main imports lazily)
PRELOAD = (
    "pacs.cli.main", "pacs.cli.hl7", "pacs.runtime", "pacs.receiving_processes", "pacs.security.bootstrap",
    "pacs.metrics_port", "pacs.maintenance.file_modes", "dicom_scp.server", "viewer_api.app",
    "viewer_api.http_server", "viewer_api.audit_routes", "viewer_api.auth_routes", "viewer_api.consult_routes",
    "viewer_api.correction_routes", "viewer_api.deletion_routes", "viewer_api.fhir", "viewer_api.ohif",
    "viewer_api.ops_routes", "viewer_api.orders", "viewer_api.reconciliation", "viewer_api.rejection_routes",
    "viewer_api.reports", "viewer_api.share_routes", "viewer_api.slip_routes", "viewer_api.transfer_routes",
    "viewer_api.dicomweb.qido", "viewer_api.dicomweb.stow", "viewer_api.dicomweb.wado",
    "viewer_api.dicomweb.wado_uri", "viewer_api.dicomweb.fastpath", "viewer_api.ui.router", "uvicorn",
    "celery.signals",
)


def preload() -> None:
    for name in PRELOAD:
        importlib.import_module(name)
    from pacs.heap import freeze_startup_heap

    freeze_startup_heap()  # what the children inherit stays out of their collections


def run_child(request: dict[str, Any], conn: socket.socket, listener: socket.socket) -> None:
    """In the forked child: become ``pacs ARGV`` and never return."""
    code = 1
    try:
        conn.close()
        listener.close()
        os.setsid()
        log_fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null_fd = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null_fd, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        os.close(null_fd)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        sys.argv = [request["script"], *request["argv"]]
        _as_if_started_fresh(request["script"])
        from pacs.cli.main import app

        try:
            app()  # typer ends with SystemExit, as the console script does
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if not isinstance(exc.code, int | None):
                print(exc.code, file=sys.stderr)
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()  # as an interpreter does at its end (then os._exit: not the zygote's own exit)
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _as_if_started_fresh(script: str) -> None:
    """What an exec of the ``pacs`` script would have set up differently from the zygote's imports.

    - ``__main__`` is the console script (multiprocessing's spawn, which starts a receiving process again, runs it
      as ``__mp_main__`` in the new process, as it would after an exec);
    - :mod:`pacs.failpoints` reads ``PACS_FAILPOINTS`` when imported: read it again from this environment (the
      crash drills arm a point per process). It is the one import-time read of the environment in the packages
      the zygote loads (``grep -rn "os.environ" pacs dicom_scp viewer_api workers storage``: the others are read
      when called).
    """
    import types

    from pacs import failpoints

    main = types.ModuleType("__main__")
    main.__file__ = script
    sys.modules["__main__"] = main
    failpoints._ARMED = failpoints.parse(os.environ.get(failpoints.ENV_VAR, ""))
    failpoints._hits.clear()


def serve(path: str) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    parent = os.getppid()
    children: dict[int, socket.socket] = {}
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    print("ready", flush=True)
    while os.getppid() == parent:
        for _key, _ in selector.select(timeout=0.05):
            conn, _ = listener.accept()
            with conn.makefile("rb") as reader:
                line = reader.readline()
            try:
                request = json.loads(line)
                if threading.active_count() != 1:
                    raise RuntimeError(f"{threading.active_count()} threads in the zygote: a fork would be unsafe")
                pid = os.fork()
            except Exception as exc:
                conn.sendall(json.dumps({"error": str(exc)}).encode() + b"\n")
                conn.close()
                continue
            if pid == 0:
                run_child(request, conn, listener)
            children[pid] = conn
            conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = children.pop(pid, None)
            if conn is not None:
                with contextlib.suppress(OSError):
                    conn.sendall(json.dumps({"returncode": _returncode(status)}).encode() + b"\n")
                conn.close()


def _returncode(status: int) -> int:
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


if __name__ == "__main__":
    preload()
    serve(sys.argv[1])
