"""Several DICOM receiving processes on one port (``PACS_DICOM_PROCESSES``, ``--dicom-processes``; issue 13).

pynetdicom decodes every PDU in Python under one GIL, so one process receives C-STOREs on about one core. With
``N`` over 1, `pacs serve` (and `pacs scp`) start ``N`` receiving processes that all accept from one listening
socket on the DICOM port (and one on the TLS port). Every connection wakes them all and the first to accept takes
it; one with associations open waits a little first (``dicom_scp.server.GuardedAssociationServer.get_request``),
so the connections spread over the processes by how busy they are (``SO_REUSEPORT``, one socket per process, let
the kernel spread them by a hash of the addresses: all four of a 4-association send went to one process in two
tries out of five, issue 13). The main process (the *supervisor*) makes the sockets and keeps them open, but never
accepts a DICOM connection; it runs everything else once: the HTTP API, the
outbox relay and the in-process derived-work pool, forward delivery, the storage-commitment reporter (the
N-EVENT-REPORT sender is its loop, so reports are sent once), HL7, retention and the schedulers.

A receiving process runs the DICOM services and an Ingestor only. What it needs from the supervisor goes over
its pipe: the ids of the derived tasks its ingest armed (``relay.notify`` in the supervisor: the relay publishes
them at once, as for its own ingest; the relay's poll would find them anyway), a wake-up for the commitment
reporter after an N-ACTION, and its metrics (:func:`pacs.metrics.snapshot`: pushed every second and on
demand at each scrape; the supervisor adds them to its own). The association limits, the connection limits
and the pre-association budget hold for the whole server: :mod:`pacs.shared_limits`, one table in shared memory.

The supervisor makes the listening sockets first (port 0 becomes a real port; the backlog stays, so connections
wait there while a receiving process restarts; ``SO_REUSEPORT`` only lets a server started again bind while the
processes of the last one drain), then starts the processes and waits until each accepts. `pacs serve` starts
them before it starts any thread of its own: they are *forked* (every module already imported, a start in a
fraction of a second, where a fresh interpreter imports for seconds); one started again later, when the supervisor
runs threads, is *spawned* (a fresh interpreter: nothing inherited from them but the sockets, passed to it).

Receiving processes ignore SIGINT and SIGTERM (a terminal's Ctrl-C and `kill` of the process group reach
every process): they stop when the supervisor says so, or when its pipe closes (the supervisor died: no
orphan). Stopping closes the listening sockets, waits up to ``PACS_DICOM_DRAIN_S`` for the open associations
to end, aborts what is left, sends the last metrics and exits 0. A receiving process that ends on its own is
started again (its rows in the shared table dropped first); one that keeps dying (``MAX_RESTARTS`` within
``RESTART_WINDOW_S``) is not, nor one that ends before it first listened (a configuration error, say a TLS
key that cannot be read): the supervisor calls ``on_fatal`` and the command exits non-zero.

``PACS_DICOM_PROCESSES=0`` (the default) means :func:`default_processes`: the usable cores, up to
:data:`DEFAULT_MAX_PROCESSES`, measured (issue 13): see there.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pacs import metrics
from pacs.settings import Settings
from pacs.shared_limits import SharedLimits

if TYPE_CHECKING:
    from dicom_scp.server import ListeningSockets

log = logging.getLogger("pacs.receiving")

MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
READY_TIMEOUT_S = 120.0
METRICS_PUSH_S = 1.0
PULL_TIMEOUT_S = 1.0
DEFAULT_MAX_PROCESSES = 4  # receiving processes by default, whatever the cores (default_processes)
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" in µs, or "max <period>"


def default_processes() -> int:
    """The number of receiving processes when ``PACS_DICOM_PROCESSES`` is 0: the cores this process may run on,
    up to :data:`DEFAULT_MAX_PROCESSES` (1 core: the DICOM services in the main process).

    Measured on the 2-core test host (README "Several DICOM receiving processes"): with two receiving processes
    four associations store 30-40 % more instances per second than with one, one association as many, at the same
    CPU per instance, for ~190 MB more resident memory per process. Each process costs that memory whether
    associations come or not, hence the cap; raise ``PACS_DICOM_PROCESSES`` on a host with more cores and many
    modalities sending at once.
    """
    return max(1, min(usable_cores(), DEFAULT_MAX_PROCESSES))


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), fewer where its cgroup's CPU quota allows fewer (a
    container with a CPU limit sees every core of its host)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2 here, or a line we do not know
        pass
    return cores


def effective_processes(settings: Settings) -> int:
    return settings.dicom_processes or default_processes()


# -- the supervisor ----------------------------------------------------------------------------------------


@dataclass
class _Child:
    index: int
    process: Any  # multiprocessing.context.SpawnProcess
    conn: Any  # multiprocessing.connection.Connection (our end)
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    ready: threading.Event = field(default_factory=threading.Event)
    metrics_in: threading.Event = field(default_factory=threading.Event)
    last: metrics.Snapshot = field(default_factory=dict)
    ended: bool = False
    restart: bool = False  # started again after one that ended (not the first start)

    def send(self, message: tuple[Any, ...]) -> None:
        with self.send_lock, contextlib.suppress(OSError, ValueError):
            self.conn.send(message)


class ReceivingProcesses:
    """Starts, watches, restarts and stops the receiving processes of one `pacs serve` / `pacs scp`."""

    def __init__(self, settings: Settings, count: int, *, role: str,
                 on_tasks: Callable[[Iterable[int]], None] | None = None,
                 on_commitment: Callable[[], None] | None = None,
                 on_fatal: Callable[[str], None] | None = None) -> None:
        self.settings, self.count, self.role = settings, count, role
        self.on_tasks, self.on_commitment, self.on_fatal = on_tasks, on_commitment, on_fatal
        self.mp = multiprocessing.get_context("spawn")
        self.shared = SharedLimits.for_settings(settings, count, self.mp)
        self.children: dict[int, _Child] = {}
        self._listening: list[socket.socket] = []
        self._stopping = threading.Event()
        self._restarts: deque[float] = deque()
        self._lock = threading.Lock()  # children, and one pull at a time
        self._monitor: threading.Thread | None = None
        self.port = settings.dicom_port
        self.tls_port: int | None = None
        self.failed = ""

    # -- start -------------------------------------------------------------------------------------------

    def start(self) -> ReceivingProcesses:
        # imported once here, inherited by forked receiving processes
        import pacs.runtime  # noqa: F401
        from dicom_scp.server import GuardedAssociationServer, ListeningSockets

        backlog = GuardedAssociationServer.request_queue_size
        dicom = self._listen(self.settings.dicom_port, backlog)
        tls = self._listen(self.settings.dicom_tls_port, backlog) if self.settings.tls_cert_file is not None else None
        self.sockets = ListeningSockets(dicom, tls)
        self.port = int(dicom.getsockname()[1])
        self.tls_port = int(tls.getsockname()[1]) if tls is not None else None
        self.child_settings = self.settings.model_copy(update={
            "dicom_port": self.port, **({"dicom_tls_port": self.tls_port} if self.tls_port is not None else {})})
        for index in range(1, self.count + 1):
            self._spawn(index)
        self._monitor = threading.Thread(target=self._watch, name="ReceivingProcesses", daemon=True)
        self._monitor.start()
        return self

    def _listen(self, port: int, backlog: int) -> socket.socket:
        """The listening socket every receiving process accepts from (port 0 gets its number here); it stays
        open while a receiving process restarts, so connections wait in its backlog for the others."""
        family = socket.AF_INET6 if ":" in self.settings.dicom_host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if hasattr(socket, "SO_REUSEPORT"):  # a server started again binds while the last one's processes drain
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self.settings.dicom_host, port))
            sock.listen(backlog)
            sock.setblocking(False)  # the receiving processes race to accept (dicom_scp.server)
        except OSError:
            sock.close()
            raise
        self._listening.append(sock)
        return sock

    def _spawn(self, index: int, restart: bool = False) -> _Child:
        ours, theirs = self.mp.Pipe(duplex=True)
        # forked while this process has no thread yet (everything imported: a quick start), else spawned
        forked = threading.active_count() == 1 and "fork" in multiprocessing.get_all_start_methods()
        mp = multiprocessing.get_context("fork") if forked else self.mp
        with self._lock:  # a forked child closes what it inherited of the others' pipes
            inherited = [c.conn.fileno() for c in self.children.values() if not c.conn.closed] + \
                [ours.fileno()] if forked else []
        process = mp.Process(target=child_main, name=f"pacs-dicom-{index}", daemon=True,
                             args=(self.child_settings, index, self.count, self.role, self.shared, theirs, inherited,
                                   self.sockets))
        process.start()
        theirs.close()
        child = _Child(index, process, ours, restart=restart)
        with self._lock:
            self.children[index] = child
        return child

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Until every receiving process listens; RuntimeError if one does not in time (or ended)."""
        deadline = time.monotonic() + timeout
        for index in range(1, self.count + 1):
            while True:
                if self.failed:
                    raise RuntimeError(self.failed)
                with self._lock:
                    child = self.children.get(index)
                if child is not None and child.ready.wait(0.1):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"DICOM receiving process {index} did not start listening in {timeout:g} s")

    def pids(self) -> list[int]:
        with self._lock:
            return [c.process.pid for c in self.children.values() if c.process.is_alive()]

    # -- watch ---------------------------------------------------------------------------------------------

    def _watch(self) -> None:
        while True:
            with self._lock:
                children = [c for c in self.children.values() if not c.ended]
            if not children:
                if self._stopping.is_set() or self.failed:
                    return
                time.sleep(0.1)
                continue
            by_object: dict[Any, tuple[str, _Child]] = {}
            for child in children:
                by_object[child.conn] = ("conn", child)
                by_object[child.process.sentinel] = ("exit", child)
            for ready in multiprocessing.connection.wait(list(by_object), timeout=0.5):
                what, child = by_object[ready]
                if child.ended:
                    continue
                if what == "conn":
                    self._receive(child)
                else:
                    while self._receive(child):  # its last messages first (sent before it ended)
                        pass
                    child.ended = True
                    self._ended(child)

    def _receive(self, child: _Child) -> bool:
        try:
            if not child.conn.poll():
                return False
            message = child.conn.recv()
        except (EOFError, OSError):
            if child.process.is_alive():  # a closed pipe from a live process: it ends; wait for its exit
                time.sleep(0.05)
            return False
        kind = message[0]
        if kind == "tasks":
            if self.on_tasks is not None:
                self.on_tasks(message[1])
        elif kind == "commitment":
            if self.on_commitment is not None:
                self.on_commitment()
        elif kind == "metrics":
            snap = message[1]
            metrics.add_snapshot_delta(child.last, snap, str(child.index))
            child.last = snap
            child.metrics_in.set()
        elif kind == "ready":
            log.info("DICOM receiving process %d/%d (pid %d) listening on port %d", child.index, self.count,
                     message[1], self.port)
            child.ready.set()
        elif kind == "bye" and message[2]:
            log.warning("DICOM receiving process %d: %d association(s) aborted at shutdown after %g s",
                        child.index, message[2], self.settings.dicom_drain_s)
        return True

    def _ended(self, child: _Child) -> None:
        process = child.process
        process.join(0.1)
        self.shared.purge(process.pid)
        metrics.add_snapshot_delta(child.last, metrics.retired(child.last), str(child.index))
        child.last = {}
        if self._stopping.is_set():
            return
        log.error("DICOM receiving process %d (pid %s) ended (exit code %s)", child.index, process.pid,
                  process.exitcode)
        if not child.ready.is_set() and not child.restart:  # its first start: the configuration is wrong
            self._give_up(child, f"DICOM receiving process {child.index} could not start (exit code "
                          f"{process.exitcode}): not restarted")
            return
        now = time.monotonic()
        self._restarts.append(now)
        while self._restarts and now - self._restarts[0] > RESTART_WINDOW_S:
            self._restarts.popleft()
        if len(self._restarts) > MAX_RESTARTS:
            self._give_up(child, f"DICOM receiving processes ended {len(self._restarts)} times in "
                          f"{RESTART_WINDOW_S:g} s: not restarted")
            return
        with contextlib.suppress(OSError):
            child.conn.close()
        self._spawn(child.index, restart=True)
        log.warning("DICOM receiving process %d started again", child.index)

    def _give_up(self, child: _Child, why: str) -> None:
        self.failed = why
        log.error("%s", why)
        with self._lock:
            self.children.pop(child.index, None)
        if self.on_fatal is not None:
            self.on_fatal(why)

    def _close_listening(self) -> None:
        for sock in self._listening:
            sock.close()
        self._listening.clear()

    # -- metrics ---------------------------------------------------------------------------------------------

    def pull_metrics(self, timeout: float = PULL_TIMEOUT_S) -> None:
        """Ask every live receiving process for its metrics and wait (up to ``timeout``) for them."""
        with self._lock:
            children = [c for c in self.children.values() if c.process.is_alive() and c.ready.is_set()]
        for child in children:
            child.metrics_in.clear()
            child.send(("metrics",))
        deadline = time.monotonic() + timeout
        for child in children:
            child.metrics_in.wait(max(0.0, deadline - time.monotonic()))

    # -- stop --------------------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every receiving process (each drains its associations, bounded) and release the ports: no new
        connection is accepted once the processes have been told (what waits in the backlog then is refused)."""
        self._stopping.set()
        started = time.monotonic()
        with self._lock:
            children = list(self.children.values())
        for child in children:
            child.send(("stop",))
        self._close_listening()
        deadline = time.monotonic() + self.settings.dicom_drain_s + 15
        for child in children:
            child.process.join(max(0.1, deadline - time.monotonic()))
            if child.process.is_alive():
                log.error("DICOM receiving process %d did not stop: killed", child.index)
                child.process.kill()
                child.process.join(5)
        if self._monitor is not None:
            self._monitor.join(5)
        for child in children:
            self.shared.purge(child.process.pid)
            with contextlib.suppress(OSError):
                child.conn.close()
        log.info("DICOM receiving processes stopped in %.1f s", time.monotonic() - started)


# -- a receiving process ------------------------------------------------------------------------------------


class _Parent:
    """The receiving process's end of its pipe (sent to from several threads)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.lock = threading.Lock()

    def send(self, message: tuple[Any, ...]) -> None:
        with self.lock, contextlib.suppress(OSError, ValueError):
            self.conn.send(message)

    def notify(self, task_ids: Iterable[int]) -> None:
        ids = list(task_ids)
        if ids:
            self.send(("tasks", ids))


class _WakeReporter:
    """``ctx.extras["commitment_reporter"]`` in a receiving process: the N-ACTION handler wakes the
    supervisor's reporter."""

    def __init__(self, parent: _Parent) -> None:
        self.parent = parent

    def wake(self) -> None:
        self.parent.send(("commitment",))


def child_main(settings: Settings, index: int, count: int, role: str, shared: SharedLimits, conn: Any,
               inherited: list[int] | None = None, sockets: ListeningSockets | None = None) -> None:
    """A receiving process: the DICOM services and an Ingestor, until the supervisor stops it (``inherited``:
    file descriptors a forked one closes: the supervisor's ends of the other pipes; ``sockets``: the listening
    sockets it accepts from, shared with the supervisor and the other receiving processes).
    It ends with ``os._exit``: 0, or 1 after logging what went wrong (multiprocessing's own exit would wait for
    every non-daemon thread the services started)."""
    code = 1
    try:
        _receive(settings, index, count, role, shared, conn, inherited, sockets)
        code = 0
    except BaseException:
        log.exception("DICOM receiving process %d failed", index)
    finally:
        logging.shutdown()
        os._exit(code)


def _receive(settings: Settings, index: int, count: int, role: str, shared: SharedLimits, conn: Any,
             inherited: list[int] | None, sockets: ListeningSockets | None) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):  # the supervisor decides (see the module docstring)
        signal.signal(sig, signal.SIG_IGN)
    for fd in inherited or ():
        with contextlib.suppress(OSError):
            os.close(fd)
    from pacs import logging_setup
    from pacs.maintenance.file_modes import restrict_new_files
    from pacs.security.redaction import install_log_redaction

    restrict_new_files()
    logging_setup.set_role(role)
    logging_setup.configure(settings.log_level, settings.log_format)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    install_log_redaction()

    from dicom_scp.server import start_scp
    from pacs.context import AppContext
    from pacs.ingest.fragment_writer import drain_fragments
    from pacs.runtime import make_ingestor

    parent = _Parent(conn)
    ctx = AppContext.create(settings)
    ctx.extras["commitment_reporter"] = _WakeReporter(parent)
    ctx.extras["ingest_notify"] = parent.notify
    ingestor = make_ingestor(ctx, notify=parent.notify)
    listeners = start_scp(ctx, ingestor, shared=shared, listening=sockets)
    from pacs.heap import freeze_startup_heap

    freeze_startup_heap()  # full garbage collections walk only what is made from now on
    parent.send(("ready", os.getpid()))
    stop = threading.Event()

    def listen() -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):  # the supervisor is gone
                log.warning("DICOM receiving process %d: the supervising process is gone: stopping", index)
                stop.set()
                return
            if message[0] == "metrics":
                parent.send(("metrics", metrics.snapshot()))
            elif message[0] == "stop":
                stop.set()
                return

    threading.Thread(target=listen, name="SupervisorPipe", daemon=True).start()
    while not stop.wait(METRICS_PUSH_S):
        parent.send(("metrics", metrics.snapshot()))
    left = listeners.close(settings.dicom_drain_s)
    drain_fragments()  # the fragments of objects answered already (pacs.ingest.fragment_writer)
    parent.send(("metrics", metrics.snapshot()))
    parent.send(("bye", os.getpid(), left))
    ctx.close()
    with contextlib.suppress(OSError):
        conn.close()
