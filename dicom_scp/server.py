"""Builds the pynetdicom AE from settings and the services in dicom_scp.services, and starts it.

The listeners are pynetdicom's threaded server hardened against hostile peers (SPEC §7):

- a TCP connection is admitted only while its peer and the server are under the connection limits
  (``pacs.association_limits.connection_limits``, twice the association limits); others are closed at
  once, before a thread or a copy of the presentation contexts is spent on them;
- until its A-ASSOCIATE-RQ is in, a connection is *unassociated* and counts against a budget of its
  own (``pacs.connection_budget``: ``PACS_DICOM_MAX_UNASSOCIATED`` in all, ``..._PER_PEER`` per
  address; when the pool is full, a newcomer from a smaller holder replaces the oldest connection of
  the biggest one), never against the association slots: idle sockets cannot lock modalities out.
  It must finish its TLS handshake and A-ASSOCIATE-RQ within ``PACS_DICOM_PREASSOC_TIMEOUT_S`` of
  being accepted (an absolute deadline, kept by one reaper thread that shuts the socket down);
- every accepted socket gets a timeout (``PACS_NETWORK_TIMEOUT_S``), so a peer that stops in the
  middle of a PDU cannot block a thread forever; the TLS handshake happens in the connection's
  own thread, never in the accept loop;
- the length field of each incoming PDU is checked before its bytes are read: a P-DATA-TF over
  the maximum we announced, a control PDU over 1 MiB or an unknown PDU type is answered with
  A-ABORT and the connection closed (``pacs.association_limits.pdu_length_error``);
- the dataset fragments of one DIMSE message may add up to ``PACS_MAX_OBJECT_BYTES`` plus 1 MiB:
  past that the association is aborted while the object is still arriving, so that limit bounds
  the memory a sender can make us hold (a bit over it still gets its 0xA702 status from ingest);
- the association limits themselves are checked at EVT_REQUESTED (``dicom_scp.association_checks``);
- behind a load balancer (a peer in ``PACS_TRUSTED_PROXIES``, :mod:`pacs.trusted_proxies`), a
  connection must start with a PROXY protocol v1/v2 header (``pacs.proxy_protocol``, read in the
  connection's own thread, before the TLS handshake, within the pre-association/ACSE timeout), and
  the client it names is the association's requestor address: host checks, sightings, audit rows,
  logs, the per-peer limits and the pre-association budget all see the modality, not the balancer.
  At accept such a connection counts against the total limit only; its per-peer admission waits
  for the header. From any other peer a PROXY header is just an invalid PDU (A-ABORT).

Several receiving processes (``PACS_DICOM_PROCESSES``, ``pacs.receiving_processes``) each run
:func:`start_scp` with ``shared`` (:class:`pacs.shared_limits.SharedLimits`) and ``listening``: the listening
sockets their supervisor made, which they all accept from (the process that gets to ``accept`` first takes the
connection, so a busy one takes fewer), and every limit above counts the connections and associations of all of
them.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import socket
import socketserver
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from types import MethodType
from typing import Any, NamedTuple

from pynetdicom import AE, _config, evt
from pynetdicom.dul import DULServiceProvider
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer
from pynetdicom.utils import make_target

from dicom_scp import (
    association_checks,
    association_events,
    association_pdus,
    presentation_contexts,
    reactors,
    store_messages,
    uid_memo,
)
from dicom_scp.services import SERVICES
from dicom_scp.tls import server_ssl_context
from pacs import association_limits
from pacs.ae_access import peer_key
from pacs.association_limits import LiveAssociations
from pacs.connection_budget import PreAssociationBudget
from pacs.context import AppContext
from pacs.ingest import Ingestor
from pacs.proxy_protocol import V1_PREFIX, V2_SIGNATURE, read_header
from pacs.shared_limits import SharedLimits, SharedLiveAssociations, SharedPreAssociationBudget
from pacs.trusted_proxies import trusted_proxies

log = logging.getLogger("dicom_scp")

DATASET_SLACK_BYTES = 1024 * 1024  # over DIMSE, a dataset may run this far past PACS_MAX_OBJECT_BYTES
GC_INTERVAL_S = 30.0  # the accept loop's full garbage collection at most this often (GuardedAssociationServer)


def build_ae(ctx: AppContext) -> AE:
    s = ctx.settings
    uid_memo.install()  # conformant UIDs validated once, not on every association (dicom_scp.uid_memo)
    store_messages.install()  # C-STORE command sets by struct, as pynetdicom encodes them (dicom_scp.store_messages)
    association_pdus.install()  # A-ASSOCIATE-RQ items decoded, -AC encoded as pynetdicom does (association_pdus)
    if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        # pynetdicom's standard event handlers format every PDU and DIMSE message for log lines at INFO and
        # DEBUG, dropped at `pacs`'s WARNING: not bound, they cost nothing (its warnings and errors stay)
        _config.LOG_HANDLER_LEVEL = "none"
    else:
        _config.LOG_HANDLER_LEVEL = "standard"  # process-wide: an AE built later at INFO/DEBUG logs again
    ae = AE(ae_title=s.ae_title)
    ae.maximum_pdu_size = s.max_pdu_size
    # pynetdicom counts every connection's thread, negotiating or not: its limit is set to the
    # connection limit, a backstop; PACS_MAX_ASSOCIATIONS is enforced at EVT_REQUESTED (association_checks).
    ae.maximum_associations = association_limits.connection_limits(s.max_associations, s.max_associations_per_peer)[0]
    ae.network_timeout = s.network_timeout_s
    ae.acse_timeout = s.dicom_acse_timeout_s
    ae.dimse_timeout = s.network_timeout_s
    for service in SERVICES:
        for abstract_syntax, transfer_syntaxes in service.contexts(ctx):
            ae.add_supported_context(abstract_syntax, transfer_syntaxes)
    return ae


@dataclass
class Listeners:
    """The plain DICOM listener and, when a certificate is configured, the TLS one (same services)."""

    plain: GuardedAssociationServer
    tls: GuardedAssociationServer | None = None
    guard: ConnectionGuard | None = None

    @property
    def server_address(self) -> tuple[str, int]:
        return self.plain.server_address[:2]

    def shutdown(self) -> None:
        for server in (self.tls, self.plain):
            if server is not None:
                server.shutdown()
        if self.guard is not None:
            self.guard.stop()

    def stop_accepting(self) -> None:
        """Close the listening sockets (no new connection) and leave the open associations running."""
        for server in (self.tls, self.plain):
            if server is not None:
                server.stop_accepting()

    def open_associations(self) -> int:
        return len([a for a in self.plain.ae.active_associations if a.is_acceptor])

    def close(self, drain_s: float) -> int:
        """Stop accepting, let the open associations finish for up to ``drain_s`` seconds, abort those left and shut
        the listeners down; how many had to be aborted (SIGTERM of `pacs serve` and of a receiving process)."""
        left = self.drain(drain_s)
        for assoc in self.plain.ae.active_associations:
            with contextlib.suppress(Exception):
                assoc.abort()
        self.shutdown()
        return left

    def drain(self, timeout_s: float) -> int:
        """Stop accepting, then wait up to ``timeout_s`` for the open associations to end; how many are left."""
        self.stop_accepting()
        deadline = time.monotonic() + timeout_s
        while (left := self.open_associations()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return left


def start_scp(ctx: AppContext, ingestor: Ingestor, *, shared: SharedLimits | None = None,
              listening: ListeningSockets | None = None) -> Listeners:
    """Start listening in background threads; call ``shutdown()`` on the result to stop.

    ``shared``: the limits are kept with other receiving processes; ``listening``: accept from these sockets (made
    and shared by the receiving processes' supervisor) instead of binding the ports."""
    ae = build_ae(ctx)

    def is_alive(assoc: Any) -> bool:  # the register's tokens are the Associations (threads)
        return bool(assoc.is_alive())

    live = LiveAssociations(is_alive=is_alive) if shared is None else SharedLiveAssociations(shared, is_alive)
    evt_handlers: list[evt.EventHandlerType] = [
        (evt.EVT_CONN_OPEN, association_events.on_conn_open),
        # association limits and the AE's rights: may reject before negotiation
        (evt.EVT_REQUESTED, association_checks.on_requested, [ctx, live]),
        (evt.EVT_ACCEPTED, association_events.on_accepted),
        (evt.EVT_RELEASED, association_events.on_released),
        (evt.EVT_ABORTED, association_events.on_aborted),
        (evt.EVT_REJECTED, association_events.on_rejected),  # metrics (pacs.metrics), as are the two others
        (evt.EVT_CONN_CLOSE, association_events.on_conn_close),
    ]
    evt_handlers += [(event, association_checks.on_association_end, [live]) for event in
                     (evt.EVT_ACSE_RECV, evt.EVT_RELEASED, evt.EVT_ABORTED, evt.EVT_CONN_CLOSE)]
    evt_handlers += service_bindings(ctx, ingestor)
    guard = ConnectionGuard(ctx, shared=shared, ae=ae)
    evt_handlers.append((evt.EVT_CONN_CLOSE, guard.on_conn_close))
    address = (ctx.settings.dicom_host, ctx.settings.dicom_port)
    listeners = Listeners(_start_server(ae, address, evt_handlers, guard,
                                        listening=listening.dicom if listening is not None else None), guard=guard)
    guard.start_reaper()
    log.info("DICOM SCP %s listening on %s:%s", ctx.settings.ae_title, *listeners.server_address)
    ssl_context = server_ssl_context(ctx.settings)
    if ssl_context is not None:
        tls_address = (ctx.settings.dicom_host, ctx.settings.dicom_tls_port)
        listeners.tls = _start_server(ae, tls_address, evt_handlers, guard, ssl_context,
                                      listening=listening.tls if listening is not None else None)
        log.info("DICOM TLS listening on %s:%s (client certificate %s)", *listeners.tls.server_address[:2],
                 "required" if ctx.settings.tls_require_client_cert else "optional")
    return listeners


class ListeningSockets(NamedTuple):
    """The listening sockets several receiving processes share (``pacs.receiving_processes`` makes them)."""

    dicom: socket.socket
    tls: socket.socket | None


Route = tuple[set[str], Callable[..., Any], list[Any]]


def service_bindings(ctx: AppContext, ingestor: Ingestor) -> list[tuple]:
    """Every service's event bindings. pynetdicom keeps one handler per intervention event, so
    an intervention event bound by several services (C-FIND: Query/Retrieve and the worklist) is
    bound once, to a dispatcher that picks the service by the request's presentation context."""
    bindings: list[tuple] = []
    routes: dict[evt.InterventionEvent, list[Route]] = {}
    for service in SERVICES:
        syntaxes = {str(abstract_syntax) for abstract_syntax, _ in service.contexts(ctx)}
        for binding in service.handlers(ctx, ingestor):
            event, handler, args = binding[0], binding[1], list(binding[2]) if len(binding) > 2 else []
            if event.is_intervention:
                routes.setdefault(event, []).append((syntaxes, handler, args))
            else:
                bindings.append((event, handler, args))
    for event, event_routes in routes.items():
        if len(event_routes) == 1:
            bindings.append((event, event_routes[0][1], event_routes[0][2]))
        else:
            bindings.append((event, _dispatch, [event_routes]))
    return bindings


def _dispatch(event: evt.Event, routes: list[Route]) -> Any:
    """Call the handler of the service that offers the request's abstract syntax (else the last bound)."""
    try:
        abstract_syntax = str(event.context.abstract_syntax)
    except AttributeError:  # an intervention event without a presentation context
        abstract_syntax = ""
    for syntaxes, handler, args in routes:
        if abstract_syntax in syntaxes:
            return handler(event, *args)
    _, handler, args = routes[-1]
    return handler(event, *args)


# -- the hardened listener ----------------------------------------------------------------------


class ConnectionGuard:
    """Admission of TCP connections by peer address, shared by the plain and TLS listeners.

    Open connections are the live acceptor threads plus those admitted whose thread has not
    started yet (counted here, so a burst of connections cannot slip past the limit).
    """

    def __init__(self, ctx: AppContext, *, shared: SharedLimits | None = None, ae: AE | None = None) -> None:
        s = ctx.settings
        self.shared = shared  # several receiving processes: their connections count too (pacs.shared_limits)
        self.ae = ae
        self.total, self.per_peer = association_limits.connection_limits(s.max_associations,
                                                                         s.max_associations_per_peer)
        self.network_timeout = s.network_timeout_s
        self.acse_timeout = s.dicom_acse_timeout_s
        self.proxies = trusted_proxies(tuple(s.trusted_proxies))
        self.header_timeout = min(s.dicom_acse_timeout_s, s.dicom_preassoc_timeout_s)  # for the PROXY header
        self.max_dataset_bytes = s.max_object_bytes + DATASET_SLACK_BYTES
        self._lock = threading.Lock()
        self._starting: Counter[str] = Counter()
        self._awaiting_header = 0  # admitted from trusted proxies, PROXY header not read yet (whose: unknown)
        self._refused: Counter[str] = Counter()  # refusals not yet logged, by peer (one line a second)
        self._last_log: dict[str, float] = {}
        total = s.dicom_max_unassociated or s.max_associations
        per_peer = s.dicom_max_unassociated_per_peer or s.max_associations_per_peer
        self.budget = PreAssociationBudget(total=total, per_peer=per_peer, timeout_s=s.dicom_preassoc_timeout_s) \
            if shared is None else \
            SharedPreAssociationBudget(shared, total=total, per_peer=per_peer, timeout_s=s.dicom_preassoc_timeout_s)
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None

    def admit(self, ae: AE, client_address: Any, sock: Any = None) -> bool:
        """At accept, in the acceptor thread. A trusted proxy's connection is checked against the total
        limit only: whose it is (per-peer limit, pre-association budget) is known once its PROXY header
        is in (:meth:`admit_proxied`, in the connection's thread)."""
        peer = peer_key(_host_of(client_address))
        proxied = self.proxies.is_trusted(peer)
        open_by_peer = _open_by_peer(ae)
        with self._lock, self._shared_locked():
            if not self._admit_locked(peer, open_by_peer, None if proxied else sock, per_peer=not proxied):
                return False
            if proxied:
                self._awaiting_header += 1
            else:
                self._starting[peer] += 1
            self._publish_locked(open_by_peer)
        return True

    def admit_proxied(self, ae: AE, sock: Any, client_address: Any) -> bool:
        """The PROXY header named ``client_address``: the per-peer limit and budget for it; the slot
        taken at accept becomes one of that client's (False: the slot is free again)."""
        peer = peer_key(_host_of(client_address))
        open_by_peer = _open_by_peer(ae)
        with self._lock, self._shared_locked():
            self._awaiting_header -= 1
            admitted = self._admit_locked(peer, open_by_peer, sock, total=False)
            if admitted:
                self._starting[peer] += 1
            self._publish_locked(open_by_peer)
        return admitted

    def _admit_locked(self, peer: str, open_by_peer: Counter[str], sock: Any, *, per_peer: bool = True,
                      total: bool = True) -> bool:
        """The connection limits (and, given the socket, the budget) for one more connection from ``peer``
        (several receiving processes: with the shared lock held, the others' connections counted too)."""
        others_from_peer, others = self.shared.other_connections(peer) if self.shared is not None else (0, 0)
        reason = association_limits.admit_connection(
            open_by_peer[peer] + self._starting[peer] + others_from_peer if per_peer else 0,
            sum(open_by_peer.values()) + sum(self._starting.values()) + self._awaiting_header + others
            if total else 0,
            per_peer=self.per_peer, total=self.total)
        if reason:
            self._log_refusal(peer, reason)
            return False
        if sock is not None:
            admission = self.budget.admit(sock, peer, time.monotonic())
            if admission.evict is not None:
                _shut_down(admission.evict)
                self._log_refusal(admission.evict_peer, admission.reason)
            elif not admission.accept:
                self._log_refusal(peer, admission.reason)
                return False
        return True

    def _shared_locked(self) -> contextlib.AbstractContextManager[None]:
        return self.shared.locked() if self.shared is not None else contextlib.nullcontext()

    def _publish_locked(self, open_by_peer: Counter[str]) -> None:
        """Several receiving processes: this one's open connections by peer, for the others (both locks held)."""
        if self.shared is not None:
            self.shared.publish_connections(open_by_peer + self._starting, self._awaiting_header)

    def publish(self) -> None:
        if self.shared is not None and self.ae is not None:
            open_by_peer = _open_by_peer(self.ae)
            with self._lock, self.shared.locked():
                self._publish_locked(open_by_peer)

    # -- connections that have not associated yet (pacs.connection_budget) ---------------------------

    def on_conn_close(self, event: evt.Event) -> None:
        """EVT_CONN_CLOSE: a connection that ends before its A-ASSOCIATE-RQ frees its budget slot, and its
        association thread at once: pynetdicom 3.0's acceptor would wait for the request for the whole ACSE
        timeout, counted as an open connection of its peer all along (a balancer's health checks, every few
        seconds, would fill the balancer's per-peer limit)."""
        dul = getattr(event.assoc, "dul", None)
        token = getattr(dul, "_pacs_conn", None)
        if token is not None:
            self.budget.forget(token)
        if dul is not None and event.assoc.is_acceptor and not getattr(dul, "_pacs_requested", True):
            dul._pacs_requested = True  # once
            dul.to_user_queue.put(None)  # receive_pdu returns None: the acceptor gives up as if timed out

    def start_reaper(self) -> None:
        self._reaper = threading.Thread(target=self._reap, name="PreAssociationReaper", daemon=True)
        self._reaper.start()

    def stop(self) -> None:
        self._stop.set()

    def _reap(self) -> None:
        """Shut down connections past their pre-association deadline (their threads then see a closed socket)."""
        while not self._stop.wait(self._until_next_deadline()):
            late = self.budget.expired(time.monotonic())
            for sock, _ in late:
                _shut_down(sock)
            for peer in sorted({peer for _, peer in late}):
                with self._lock:
                    self._log_refusal(peer, f"no A-ASSOCIATE-RQ within {self.budget.timeout_s:g} s of connecting")
            if isinstance(self.budget, SharedPreAssociationBudget):  # several receiving processes
                evicted = self.budget.take_evicted()  # by another process, for a newcomer from a smaller holder
                for sock, _ in evicted:
                    _shut_down(sock)
                for peer in sorted({peer for _, peer in evicted}):
                    with self._lock:
                        self._log_refusal(peer, "oldest unassociated connection closed for a newcomer from a "
                                          "smaller holder (in another receiving process)")
                self.publish()  # connections closed since the last admission free their slots for the others

    def _until_next_deadline(self) -> float:
        longest = 0.5 if self.shared is None else 0.1  # shared: evictions and the connection snapshot, 0.1 s
        deadline = self.budget.next_deadline()
        if deadline is None:
            return longest  # a newly admitted connection's deadline is at least timeout_s away
        return min(longest, max(0.02, deadline - time.monotonic()))

    def _log_refusal(self, peer: str, reason: str) -> None:
        """At most one line a second per peer (a flood must not flood the log); called under the lock."""
        self._refused[peer] += 1
        now = time.monotonic()
        if now - self._last_log.get(peer, -1e9) >= 1.0:
            log.warning("%d connection(s) from %s closed at once: %s", self._refused.pop(peer), peer, reason)
            self._last_log[peer] = now
            if len(self._last_log) > 10_000:
                self._last_log.clear()

    def started(self, client_address: Any) -> None:
        with self._lock:
            self._release_starting(peer_key(_host_of(client_address)))

    def unadmit(self, client_address: Any) -> None:
        """Free the slot :meth:`admit` took for a connection whose thread did not start."""
        peer = peer_key(_host_of(client_address))
        if not self.proxies.is_trusted(peer):
            self.started(client_address)
            return
        with self._lock:
            self._awaiting_header -= 1

    def _release_starting(self, peer: str) -> None:
        self._starting[peer] -= 1
        if self._starting[peer] <= 0:
            del self._starting[peer]

    def client_of(self, ae: AE, sock: Any, client_address: Any) -> Any:
        """In this connection's thread, first: the client's address. From a trusted proxy the one its PROXY
        header names, admitted (:meth:`admit_proxied`), or None: close the connection (its slot is free again;
        otherwise the caller frees it with :meth:`started`)."""
        if not self.proxies.is_trusted(peer_key(_host_of(client_address))):
            return client_address
        client = None
        try:
            client = self._read_proxy_header(sock, client_address)
        finally:
            if client is None:
                with self._lock:
                    self._awaiting_header -= 1
        if client is None:  # its slot is free already: admit_proxied would release it a second time
            return None
        return client if self.admit_proxied(ae, sock, client) else None

    def prepare(self, sock: Any, client_address: Any) -> bool:
        """Socket timeouts and, for TLS, the handshake (in this connection's thread); False: close it."""
        try:
            if isinstance(sock, ssl.SSLSocket):
                sock.settimeout(self.acse_timeout)
                sock.do_handshake()
            sock.settimeout(self.network_timeout)
        except (OSError, ValueError) as exc:
            log.warning("connection from %s closed: %s", _host_of(client_address), exc)
            return False
        return True

    def _read_proxy_header(self, sock: Any, proxy_address: Any) -> Any:
        """The client named by the PROXY header (the proxy's own address for LOCAL/UNKNOWN), or None.

        Read from the raw socket (before any TLS handshake: ``socket.socket.recv`` even on an SSLSocket),
        exactly the header's bytes, all within ``header_timeout`` of starting.
        """
        deadline = time.monotonic() + self.header_timeout
        received = 0

        def recv_exactly(n: int) -> bytes:
            nonlocal received
            data = b""
            while len(data) < n:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                chunk = socket.socket.recv(sock, n - len(data))
                if not chunk:
                    break
                data += chunk
                received += len(chunk)
            return data

        proxy = peer_key(_host_of(proxy_address))
        try:
            header = read_header(recv_exactly)
        except (OSError, ValueError) as exc:  # TimeoutError is an OSError, ProxyProtocolError a ValueError
            if isinstance(exc, TimeoutError):
                why = f"no PROXY protocol header within {self.header_timeout:g} s"
            elif isinstance(exc, OSError):
                why = f"connection lost in its PROXY protocol header: {exc}"
            else:
                why = f"invalid PROXY protocol header: {exc}"
            if received or isinstance(exc, TimeoutError):
                with self._lock:
                    self._log_refusal(proxy, why)
            else:  # connected and closed without a byte: a load balancer's TCP health check
                log.debug("connection from trusted proxy %s closed: %s", proxy, why)
            return None
        if header.source is None:
            return proxy_address
        return header.source


ACCEPT_DEFER_S = 0.001  # a receiving process's wait before accepting from a shared socket, per association it has
ACCEPT_DEFER_MAX = 4  # open, up to this many (GuardedAssociationServer.get_request)


class GuardedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded association server with connection admission (see the module docstring)."""

    request_queue_size = 128  # listen backlog: a burst of modalities is not made to retry its SYNs

    def __init__(self, ae: AE, address: tuple[str, int], ae_title: str, contexts: list[PresentationContext],
                 ssl_context: ssl.SSLContext | None = None, evt_handlers: list[evt.EventHandlerType] | None = None,
                 *, guard: ConnectionGuard, listening: socket.socket | None = None) -> None:
        self.guard = guard
        self.listening = listening
        self._accepting_stopped = False
        self._last_gc = time.monotonic()
        super().__init__(ae, address, ae_title, contexts, ssl_context, evt_handlers,
                         request_handler=GuardedRequestHandler)

    def server_bind(self) -> None:
        """pynetdicom's bind; or, given a listening socket shared with other receiving processes, that socket
        instead, non-blocking: a process whose ``accept`` lost the connection to another returns to its loop
        (``socketserver`` ignores the ``BlockingIOError``) rather than wait in ``accept``."""
        if self.listening is None:
            super().server_bind()
            return
        assert self.socket is not None
        self.socket.close()  # the one socketserver made, never bound
        self.socket = self.listening
        self.socket.setblocking(False)  # of the open file: the same in every process that shares it
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        if self.listening is None:  # a shared socket listens already
            super().server_activate()

    def server_close(self) -> None:
        """pynetdicom's shuts the listening socket down before closing it, which for a shared one would end the
        other processes' accepting too: a shared socket is only closed (this process's descriptor)."""
        if self.listening is None:
            super().server_close()
            return
        assert self.socket is not None
        self.socket.close()

    def service_actions(self) -> None:
        """pynetdicom's runs a full ``gc.collect()`` on every 60th pass of the accept loop (every 60th connection):
        over this process's whole heap (~300,000 objects once the app is imported), 150-250 ms of CPU holding the
        GIL on the 2-core reference machine, a stall for every association and HTTP request in flight and ~3 ms of
        CPU per one-image association on average. Here the collection runs at most every
        :data:`GC_INTERVAL_S` seconds, as pynetdicom's does on an idle server (a pass every 0.5 s), so the cyclic
        garbage of ended associations is still collected while nothing else allocates; under load the interpreter's
        own generational collection frees it as well (and the long-running commands freeze their start-up heap,
        :func:`pacs.heap.freeze_startup_heap`, so a full collection only walks what was made since)."""
        now = time.monotonic()
        if now - self._last_gc >= GC_INTERVAL_S:
            self._last_gc = now
            gc.collect()

    def stop_accepting(self) -> None:
        """Stop the accept loop and close the listening socket; the associations run on (drain)."""
        if self._accepting_stopped:
            return
        self._accepting_stopped = True
        socketserver.BaseServer.shutdown(self)  # the accept loop ends
        assert self.socket is not None
        self.socket.close()

    def shutdown(self) -> None:
        if self._accepting_stopped:
            self.ae._servers.remove(self)  # the rest of AssociationServer.shutdown() (stopped already)
            return
        super().shutdown()

    def get_request(self) -> tuple[Any, Any]:
        """Accept; for TLS only wrap the socket: the handshake is done in the connection's thread.

        On a socket shared with other receiving processes, a process that has associations open first waits
        :data:`ACCEPT_DEFER_S` per association (up to :data:`ACCEPT_DEFER_MAX`), so an idler process takes the
        connection if it can: every process is woken by each connection, and the first to accept gets it. None
        is ever starved: whoever waited accepts what nobody else took."""
        assert self.socket is not None
        if self.listening is not None:
            busy = sum(1 for assoc in self.ae.active_associations if assoc.is_acceptor)
            if busy:
                time.sleep(min(busy, ACCEPT_DEFER_MAX) * ACCEPT_DEFER_S)
        client, address = self.socket.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return self.guard.admit(self.ae, client_address, request)

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)  # starts the connection's thread
        except BaseException:
            self.guard.unadmit(client_address)  # no thread: the admitted slot is free again
            raise


class GuardedRequestHandler(RequestHandler):
    """Prepares the socket in the connection's thread (behind a trusted proxy: reads whose connection it is
    first) and bounds the association's PDU reads."""

    server: GuardedAssociationServer

    def handle(self) -> None:
        guard = self.server.guard
        client_address = guard.client_of(self.ae, self.request, self.client_address)
        if client_address is None:  # from a trusted proxy, without a valid PROXY header or over a limit
            guard.budget.forget(self.request)
            self.server.shutdown_request(self.request)
            return
        self.client_address = client_address  # behind a proxy: the real client from here on
        try:
            if not guard.prepare(self.request, client_address):
                guard.budget.forget(self.request)
                self.server.shutdown_request(self.request)
                return
            super().handle()  # creates the association and starts its thread
        except BaseException:
            if (assoc := getattr(self, "_pacs_assoc", None)) is not None:
                reactors.discard(assoc)  # its thread did not start: nothing else closes its eventfd
            raise
        finally:
            guard.started(client_address)

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        # Any: our own attributes on pynetdicom's DUL (read back with getattr) and its PDU reader replaced
        dul: Any = assoc.dul
        dul._pacs_max_dataset = self.server.guard.max_dataset_bytes
        dul._pacs_conn = self.request  # its token in the pre-association budget
        dul._pacs_budget = self.server.guard.budget
        dul._pacs_requested = False  # its A-ASSOCIATE-RQ is not in yet (on_conn_close)
        dul._read_pdu_data = MethodType(_read_pdu_data_bounded, dul)
        reactors.install(assoc)  # its two threads wait for work instead of polling every millisecond
        self._pacs_assoc = assoc
        return assoc


def _start_server(ae: AE, address: tuple[str, int], evt_handlers: list[evt.EventHandlerType], guard: ConnectionGuard,
                  ssl_context: ssl.SSLContext | None = None, *,
                  listening: socket.socket | None = None) -> GuardedAssociationServer:
    """``AE.start_server(block=False)`` with our server class."""
    server = ae.make_server(address, ssl_context=ssl_context, evt_handlers=evt_handlers,
                            server_class=GuardedAssociationServer, guard=guard, listening=listening)
    assert isinstance(server, GuardedAssociationServer)  # make_server's type cannot tell from server_class
    server.contexts = presentation_contexts.shared(server.contexts)  # built once, shared read-only by associations
    thread = threading.Thread(target=make_target(server.serve_forever), name=f"AcceptorServer@{address[1]}",
                              daemon=True)
    thread.start()
    ae._servers.append(server)  # AssociationServer.shutdown() removes it from there
    return server


def _read_pdu_data_bounded(self: DULServiceProvider) -> None:
    """``DULServiceProvider._read_pdu_data`` (pynetdicom 3.0) with the PDU length checked first.

    A PDU whose type is unknown or whose length field is over its bound (``pdu_length_error``) gets
    Evt19 (invalid PDU: the state machine sends A-ABORT) without a byte of its body being read;
    afterwards whatever the peer still sends reads as a closed connection (Evt17).
    """
    if getattr(self, "_pacs_refused", False):
        self.event_queue.put("Evt17")
        return
    sock = self.socket
    assert sock is not None
    try:
        header = sock.recv(6)
    except (OSError, TimeoutError):
        self.event_queue.put("Evt17")  # Evt17: transport connection closed
        return
    try:
        pdu_type, _, pdu_length = struct.unpack(">BBL", header)
    except struct.error:
        self.event_queue.put("Evt17")
        return
    if header in (V2_SIGNATURE[:6], V1_PREFIX):  # an invalid PDU all the same; say why, for the operator
        _refuse(self, "a PROXY protocol header from a peer not in PACS_TRUSTED_PROXIES")
        return
    error = association_limits.pdu_length_error(pdu_type, pdu_length, self.assoc.acceptor.maximum_length or 0)
    if error:
        _refuse(self, error)
        return
    try:
        data = header + sock.recv(pdu_length)
    except (OSError, TimeoutError):
        self.event_queue.put("Evt17")
        return
    if len(data) != 6 + pdu_length:  # the peer closed in the middle of the PDU
        self.event_queue.put("Evt17")
        return
    try:
        pdu, event = self._decode_pdu(data)
    except Exception as exc:
        _refuse(self, f"undecodable {len(data)}-byte PDU type 0x{pdu_type:02X}: {exc}")
        return
    if event == "Evt10" and (error := _count_dataset_bytes(self, pdu)):
        _refuse(self, error)
        return
    if pdu_type == 0x01:
        self._pacs_requested = True  # type: ignore[attr-defined]  # our flag on pynetdicom's DUL
        if (budget := getattr(self, "_pacs_budget", None)) is not None:
            budget.associated(getattr(self, "_pacs_conn", None))  # its A-ASSOCIATE-RQ is in
    self.event_queue.put(event)
    self._recv_pdu.put(pdu)


def _refuse(dul: DULServiceProvider, why: str) -> None:
    """Evt19 (invalid PDU): the state machine answers A-ABORT; what the peer sends next reads as closed."""
    log.warning("aborting association with %s: %s", _requestor_address(dul.assoc), why)
    dul._pacs_refused = True  # type: ignore[attr-defined]  # our flag on pynetdicom's DUL
    dul.event_queue.put("Evt19")


def _count_dataset_bytes(dul: DULServiceProvider, pdu: Any) -> str:
    """Add a P-DATA-TF's dataset fragments to the current message's total; '' or why it is too much."""
    limit = getattr(dul, "_pacs_max_dataset", 0)
    if not limit:
        return ""
    total = getattr(dul, "_pacs_dataset_bytes", 0)
    for item in pdu.presentation_data_value_items:
        value = item.presentation_data_value or b""
        if not value or value[0] & 0x01:  # a command fragment
            continue
        total += len(value) - 1
        if total > limit:
            return f"the dataset being received exceeds {limit} bytes"
        if value[0] & 0x02:  # the last fragment: the next dataset starts from zero
            total = 0
    dul._pacs_dataset_bytes = total  # type: ignore[attr-defined]  # our running count on pynetdicom's DUL
    return ""


def _shut_down(sock: Any) -> None:
    """End a connection from another thread: its own thread's next read sees the connection closed.
    (``socket.socket.shutdown`` even for an SSLSocket, whose override would drop its SSL object.)"""
    with contextlib.suppress(OSError, ValueError, TypeError):  # closed already
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _open_by_peer(ae: AE) -> Counter[str]:
    """Live acceptor associations by requestor address (behind a proxy, the client it named)."""
    open_by_peer: Counter[str] = Counter()
    for assoc in ae.active_associations:
        if assoc.is_acceptor:
            open_by_peer[peer_key(_requestor_address(assoc))] += 1
    return open_by_peer


def _host_of(client_address: Any) -> str:
    return str(client_address[0]) if isinstance(client_address, tuple) and client_address else str(client_address)


def _requestor_address(assoc: Any) -> str:
    try:
        return str(assoc.requestor.address)
    except (AttributeError, ValueError):
        return ""
