"""The two loops of each association we accept wait for work instead of polling every millisecond.

pynetdicom (3.0) runs each association in two threads that poll: the DUL's reactor
(``DULServiceProvider.run_reactor``) sleeps ``_run_loop_delay`` (1 ms) whenever a pass found nothing to do, then
checks for a primitive to send and ``select``\\s the socket with a zero timeout; the association's reactor
(``Association._run_reactor``) sleeps 1 ms before every pass over its DIMSE and ACSE queues. Each open
association costs ~2 ms of CPU per second doing so on the 2-core reference machine, and every hand-over between
the threads (A-ASSOCIATE-RQ read, A-ASSOCIATE-AC sent, C-STORE received, response sent, release) waited up to a
sleep, much longer on a loaded machine (a one-image association's wall time under load: ~120 ms, ~70 ms with these
waits).

:func:`install` (on an acceptor association before its threads start, ``GuardedRequestHandler``) gives both threads
a copy of pynetdicom's loop in which that sleep is a wait that ends as soon as there is something to do:

- the DUL's on its socket (``poll``, or at once while a TLS socket holds decrypted bytes) and on an ``eventfd``
  written whenever another thread gives it work (a primitive to send, an event for its state machine, ``kill_dul``);
- the association's on an :class:`threading.Event` set whenever the DUL hands it something (a DIMSE message, an
  ACSE primitive), when the DUL thread ends and when its checkpoint is cleared or set (a service pausing the
  reactor to send, ``kill``, ``abort``).

Both waits end after :data:`MAX_WAIT_S` anyway, so what else either loop polls (the ARTIM timer, the network idle
timer, the kill flags, the DUL thread's death) is checked at least that often. Everything else in the loops is
pynetdicom's, line for line; associations we request (C-MOVE destinations, forwarding, commitment reports) keep
pynetdicom's own loops.
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import ssl
import threading
import time
from collections.abc import Callable
from types import MethodType
from typing import Any, cast

import pynetdicom
from pynetdicom import evt
from pynetdicom.association import LOGGER, Association
from pynetdicom.dul import LOGGER as DUL_LOGGER
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.utils import make_target

MAX_WAIT_S = 0.05  # the longest either loop waits without a reason to wake (timers, flags)
COPIED_FROM = "3.0."  # the pynetdicom release whose loops these are


def _wake_on_put(items: queue.Queue[Any], wake: Callable[[], None]) -> None:
    """Every ``put`` on this queue (this instance only; items already in it stay) also wakes its reader."""
    put = items.put

    def put_and_wake(item: Any, block: bool = True, timeout: float | None = None) -> None:
        put(item, block, timeout)
        wake()

    items.put = put_and_wake  # type: ignore[method-assign]


def _wake_on_change(checkpoint: threading.Event, wake: Callable[[], None]) -> None:
    """The association's reactor checkpoint: clearing it (a pause asked for) or setting it also wakes the reactor,
    so that it reaches the checkpoint at once (this instance only)."""
    set_, clear = checkpoint.set, checkpoint.clear

    def set_and_wake() -> None:
        set_()
        wake()

    def clear_and_wake() -> None:
        clear()
        wake()

    checkpoint.set = set_and_wake  # type: ignore[method-assign]
    checkpoint.clear = clear_and_wake  # type: ignore[method-assign]


class _EventFd:
    """An ``eventfd`` the DUL's loop waits on beside its socket; written by any thread, closed once by the DUL's.
    A write after the close does nothing (never to a file descriptor number reused since)."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._lock = threading.Lock()
        self._closed = False

    def wake(self) -> None:
        with self._lock:
            if not self._closed:
                with contextlib.suppress(OSError):  # the counter is full: it is readable already
                    os.eventfd_write(self.fd, 1)

    def drain(self) -> None:
        with contextlib.suppress(OSError):  # nothing to read (EAGAIN)
            os.eventfd_read(self.fd)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self.fd)


def install(assoc: Association) -> None:
    """Replace the polling of both loops of ``assoc`` (an acceptor, its threads not started yet). Without
    ``os.eventfd`` (not Linux), or with a pynetdicom other than the 3.0 these loops were copied from (the
    dependency allows any 3.x), pynetdicom's own loops stay."""
    if not hasattr(os, "eventfd") or not pynetdicom.__version__.startswith(COPIED_FROM):
        return
    dul = assoc.dul
    event_fd = _EventFd()
    woken = threading.Event()
    dul_any: Any = dul
    dul_any._pacs_event_fd = event_fd
    _wake_on_put(dul.to_provider_queue, event_fd.wake)
    _wake_on_put(dul.event_queue, event_fd.wake)  # holds Evt5 (connection accepted) already
    _wake_on_put(dul.to_user_queue, woken.set)
    _wake_on_put(assoc.dimse.msg_queue, woken.set)
    kill_dul = dul.kill_dul

    def kill_and_wake() -> None:
        kill_dul()
        event_fd.wake()

    dul_any.kill_dul = kill_and_wake
    _wake_on_change(assoc._reactor_checkpoint, woken.set)
    assoc_any: Any = assoc
    assoc_any._pacs_woken = woken
    assoc_any._run_reactor = MethodType(_association_loop, assoc)
    # DULServiceProvider.__init__ made its thread's target of the bound run_reactor already
    dul_any._target = make_target(MethodType(_dul_loop, dul))


def discard(assoc: Association) -> None:
    """The association's threads never started (its thread could not be started): close its ``eventfd``."""
    event_fd = getattr(assoc.dul, "_pacs_event_fd", None)
    if event_fd is not None and not assoc.dul.is_alive() and not assoc._started_dul:
        event_fd.close()


def _wait_for_work(dul: DULServiceProvider, event_fd: _EventFd) -> None:
    """The DUL loop's sleep: until its socket is readable, another thread gives it work, or :data:`MAX_WAIT_S`."""
    transport = dul.socket
    sock = getattr(transport, "socket", None)
    if sock is None or not getattr(transport, "_is_connected", False):
        time.sleep(dul._run_loop_delay)  # no connection (Sta1): pynetdicom's own sleep
        return
    if isinstance(sock, ssl.SSLSocket) and sock.pending():  # decrypted bytes that select cannot see
        return
    if dul.to_provider_queue.qsize() or dul.event_queue.qsize():
        return
    try:
        waiting = select.poll()  # not select(): no limit on the descriptors' numbers
        waiting.register(sock, select.POLLIN)
        waiting.register(event_fd.fd, select.POLLIN)
        waiting.poll(MAX_WAIT_S * 1000)
    except (OSError, ValueError, TypeError):  # closed meanwhile: the loop's own checks say so after this sleep
        time.sleep(dul._run_loop_delay)
        return
    event_fd.drain()


def _dul_loop(self: DULServiceProvider) -> None:
    """``DULServiceProvider.run_reactor`` of pynetdicom 3.0 with its sleep replaced by :func:`_wait_for_work`."""
    event_fd: _EventFd = cast(Any, self)._pacs_event_fd
    try:
        self._idle_timer.start()
        sleep = False
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                sleep = True
            if sleep:
                _wait_for_work(self, event_fd)
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:  # pynetdicom's handling, unchanged
                DUL_LOGGER.error("Exception in DUL.run(), aborting association")
                DUL_LOGGER.exception(exc)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                cast(Any, self.socket).send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                sleep = True
                continue
            self.state_machine.do_action(event)
            sleep = False
    finally:
        event_fd.close()
        woken = getattr(self.assoc, "_pacs_woken", None)
        if woken is not None:
            woken.set()  # the association's loop sees the DUL thread gone at once


def _association_loop(self: Association) -> None:
    """``Association._run_reactor`` of pynetdicom 3.0 (the acceptor's main loop) with its 1 ms sleep replaced by
    a wait on the association's wake-up event."""
    woken: threading.Event = cast(Any, self)._pacs_woken
    self._is_paused = False
    while not self._kill:
        if not (self.dimse.msg_queue.qsize() or self.dul.to_user_queue.qsize()):
            woken.wait(MAX_WAIT_S)
        woken.clear()

        self._is_paused = True
        self._reactor_checkpoint.wait()
        self._is_paused = False

        context_id, msg = self.dimse.get_msg(block=False)
        if msg:
            self._serve_request(msg, cast(int, context_id))

        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            LOGGER.info("Association Released")
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return

        if self.acse.is_aborted():
            log_msg = "Association Aborted"
            if self.acse.is_aborted("a-p-abort"):
                log_msg += " (A-P-ABORT)"
            LOGGER.info(log_msg)
            self.dul.receive_pdu(wait=False)
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return

        if not self.dul.is_alive():
            self.kill()
            return

        if self.dul.idle_timer_expired():
            LOGGER.error("Network timeout reached")
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()

            self.kill()
            return
