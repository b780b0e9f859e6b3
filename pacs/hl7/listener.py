"""The HL7 v2 MLLP listener of the RIS: ORM^O01 orders in, one ACK out per message.

One thread per connection, at most ``hl7_max_connections`` (one more is closed at once, logged).
Each connection may carry any number of messages, one at a time: read a frame (bounded by
``hl7_max_message_bytes``; each receive by ``hl7_timeout_s``), process it, answer its ACK.

Per message: MSH read first (its MSH-18 says how to decode the rest: ``UNICODE UTF-8``, empty →
UTF-8, ``8859/1`` → Latin-1), type and version checked, parsed with hl7apy
(:mod:`pacs.hl7.messages`), then every order it carries is created (ORC-1 ``NW``) or discontinued
(``CA``/``OC``/``DC``) through :mod:`pacs.ris.orders` in one transaction, with one audit row
(action ``hl7.orm``) in that same transaction. A message refused for any reason gets ``AR`` or
``AE`` naming the reason (MSA-3, ERR) and its own audit row (outcome ``failure``); nothing it
asked for is stored. A message larger than the limit is answered ``AR`` as soon as the limit is
reached, its remaining bytes are discarded as they arrive (never held), and the connection goes
on with the next message.
"""

from __future__ import annotations

import contextlib
import io
import logging
import socket
import socketserver
import threading
from dataclasses import dataclass

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from pacs import audit
from pacs.context import AppContext
from pacs.errors import Conflict, InvalidInput, NotFound
from pacs.hl7.messages import (
    CHARSETS,
    DATA_TYPE_ERROR,
    DUPLICATE_KEY,
    INTERNAL_ERROR,
    UNKNOWN_KEY,
    CancelRequest,
    Header,
    Hl7Error,
    Hl7Reject,
    OrmMessage,
    build_ack,
    check_supported,
    decode_text,
    parse_orm,
    read_header,
)
from pacs.hl7.mllp import FrameTooLarge, MllpError, MllpTimeout, frame, read_frame, skip_frame, socket_reader
from pacs.ris.models import DISCONTINUED
from pacs.ris.orders import NewOrder, OrderRecord, cancel_order, create_order, find_order_by_placer, get_order

log = logging.getLogger(__name__)

AUDIT_ACTION = "hl7.orm"
_SKIP_FACTOR = 64  # an oversized message is skipped up to 64× the limit, then the connection is closed


@dataclass(frozen=True)
class _Outcome:
    """What one message came to: the ACK to send and what the audit trail says about it."""

    ack: bytes
    code: str
    detail: str


class Hl7Listener:
    """The MLLP server; ``start()`` binds and serves in a background thread, ``stop()`` ends it."""

    def __init__(self, ctx: AppContext, host: str | None = None, port: int | None = None) -> None:
        settings = ctx.settings
        self.ctx = ctx
        self.host = settings.hl7_host if host is None else host
        self.port = settings.hl7_port if port is None else port
        self.max_message_bytes = settings.hl7_max_message_bytes
        self.timeout_s = settings.hl7_timeout_s
        self.default_facility = settings.hl7_default_facility
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def server_address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("the HL7 listener is not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> Hl7Listener:
        self._server = _Server((self.host, self.port), self, self.ctx.settings.hl7_max_connections)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="pacs-hl7-listener", daemon=True)
        self._thread.start()
        host, port = self.server_address
        log.info("hl7: MLLP listener on %s:%d (max %d connections, %d bytes per message)", host, port,
                 self.ctx.settings.hl7_max_connections, self.max_message_bytes)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    # -- one connection ------------------------------------------------------------------------

    def serve_connection(self, sock: socket.socket, peer: str) -> None:
        """Read, process and acknowledge messages until the peer closes, times out or breaks framing."""
        sock.settimeout(self.timeout_s)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with socket_reader(sock, 65_536) as stream:
            while True:
                try:
                    data = read_frame(stream, self.max_message_bytes, frame_timeout_s=self.timeout_s * 2)
                except FrameTooLarge as exc:
                    if not self._refuse_oversized(sock, stream, exc, peer):
                        return
                    continue
                except MllpTimeout as exc:
                    log.info("hl7: closing connection from %s: %s", peer, exc)
                    return
                except MllpError as exc:
                    log.warning("hl7: closing connection from %s: %s", peer, exc)
                    return
                except OSError as exc:
                    log.info("hl7: connection from %s ended: %s", peer, exc)
                    return
                if data is None:
                    return
                outcome = self.process(data, peer)
                try:
                    sock.sendall(frame(outcome.ack))
                except OSError as exc:
                    log.warning("hl7: could not send the %s acknowledgement to %s: %s", outcome.code, peer, exc)
                    return

    def _refuse_oversized(self, sock: socket.socket, stream: io.BufferedReader, exc: FrameTooLarge,
                          peer: str) -> bool:
        """Answer AR at once, then discard the rest of the frame; False when the connection must close."""
        header = _header_or_none(exc.head)
        error = Hl7Reject(f"message larger than {exc.limit} bytes refused (PACS_HL7_MAX_MESSAGE_BYTES)",
                          INTERNAL_ERROR)
        log.warning("hl7: %s from %s (control id %s)", error.message, peer, header.control_id if header else "?")
        self._audit_failure(header, peer, "", f"AR {error.message}")
        try:
            sock.sendall(frame(_encode_ack(build_ack(header, "AR", error), header)))
            skip_frame(stream, self.max_message_bytes * _SKIP_FACTOR, self.timeout_s * 4)
        except (OSError, MllpError) as skip_error:
            log.warning("hl7: closing connection from %s after an oversized message: %s", peer, skip_error)
            return False
        return True

    # -- one message ---------------------------------------------------------------------------

    def process(self, data: bytes, peer: str) -> _Outcome:
        """Everything one message leads to; never raises (a bug becomes AE 207, logged)."""
        header: Header | None = None
        orm: OrmMessage | None = None
        try:
            header = read_header(data)
            check_supported(header)
            text = decode_text(data, header)
            orm = parse_orm(text, default_facility=self.default_facility)
            detail = self._apply(orm, peer)
            # what was done, with accession numbers, is in the audit row; the log names no patient or order
            log.info("hl7: %s %s from %s (%s): %d order item(s) applied", orm.header.message_type,
                     orm.header.control_id, _actor(orm.header), peer, len(orm.items))
            return _Outcome(_encode_ack(build_ack(orm.header, "AA", text=""), orm.header), "AA", detail)
        except Hl7Error as exc:
            error = exc
        except Exception:  # never let a message take the listener down
            log.exception("hl7: could not process a message from %s", peer)
            error = Hl7Error("application internal error", INTERNAL_ERROR)
        header = orm.header if orm is not None else header
        detail = f"{error.ack_code} {error.message}"
        # the error text may quote the message's values (a patient ID, an accession number): the audit row has it
        log.warning("hl7: %s %s from %s answered %s (error %s at %s-%s)", header.message_type if header else "message",
                    header.control_id if header else "", peer, error.ack_code, error.code, error.segment or "?",
                    error.field_no)
        self._audit_failure(header, peer, orm.patient_id if orm is not None else "", detail)
        return _Outcome(_encode_ack(build_ack(header, error.ack_code, error), header), error.ack_code, detail)

    def _apply(self, orm: OrmMessage, peer: str) -> str:
        """Create/cancel every order of the message and audit it, in one transaction; returns what was done."""
        done: list[str] = []
        try:
            with self.ctx.sessions() as session, session.begin():
                for n, item in enumerate(orm.items, start=1):
                    if isinstance(item, NewOrder):
                        record = _create(session, item, n)
                        done.append(f"NW accession={record.accession_number} placer={record.placer_order_number}")
                    else:
                        done.append(_cancel(session, item, n))
                detail = f"{orm.header.message_type} {orm.header.control_id}: " + "; ".join(done)
                audit.append(session, action=AUDIT_ACTION, actor=_actor(orm.header), source_address=peer,
                             outcome="success", patient_id=orm.patient_id, detail=detail)
        except SQLAlchemyError as exc:
            log.warning("hl7: index unavailable: %s", str(exc).splitlines()[0][:300])
            raise Hl7Error("the index is unavailable, send the message again later", INTERNAL_ERROR) from exc
        return detail

    def _audit_failure(self, header: Header | None, peer: str, patient_id: str, detail: str) -> None:
        prefix = f"{header.message_type} {header.control_id}: " if header is not None else ""
        try:
            audit.record(self.ctx.sessions, action=AUDIT_ACTION, actor=_actor(header), source_address=peer,
                         outcome="failure", patient_id=patient_id, detail=prefix + detail)
        except SQLAlchemyError as exc:
            log.error("hl7: could not audit a refused message from %s: %s", peer, str(exc).splitlines()[0][:300])


def _create(session: Session, new: NewOrder, n: int) -> OrderRecord:
    if new.placer_order_number:
        existing = find_order_by_placer(session, new.placer_order_number)
        if existing is not None and existing.state != DISCONTINUED:
            raise Hl7Error(f"placer order number {new.placer_order_number} is already order "
                           f"{existing.accession_number}", DUPLICATE_KEY, "ORC", 2, n)
    try:
        return create_order(session, new)
    except Conflict as exc:
        raise Hl7Error(str(exc), DUPLICATE_KEY, "ORC", 3, n) from exc
    except InvalidInput as exc:
        raise Hl7Error(str(exc), DATA_TYPE_ERROR, sequence=n) from exc


def _cancel(session: Session, request: CancelRequest, n: int) -> str:
    """Discontinue the order; a repeat of a cancel already applied is accepted as it is."""
    record = _find(session, request)
    if record is None:
        known = " / ".join(x for x in (f"accession number {request.accession_number}" if request.accession_number
                                       else "", f"placer order number {request.placer_order_number}"
                                       if request.placer_order_number else "") if x)
        raise Hl7Error(f"no order with {known}", UNKNOWN_KEY, "ORC", 3 if request.accession_number else 2, n)
    if record.state == DISCONTINUED:
        return f"{request.order_control} accession={record.accession_number} (already discontinued)"
    try:
        cancel_order(session, record.accession_number)
    except (Conflict, NotFound) as exc:
        raise Hl7Error(str(exc), INTERNAL_ERROR, "ORC", 1, n) from exc
    return f"{request.order_control} accession={record.accession_number}"


def _find(session: Session, request: CancelRequest) -> OrderRecord | None:
    if request.accession_number:
        with contextlib.suppress(NotFound):
            return get_order(session, request.accession_number)
    if request.placer_order_number:
        return find_order_by_placer(session, request.placer_order_number)
    return None


def _actor(header: Header | None) -> str:
    if header is None or not header.sending_application:
        return "hl7:unknown"
    return header.sending_application + (f"@{header.sending_facility}" if header.sending_facility else "")


def _header_or_none(data: bytes) -> Header | None:
    try:
        return read_header(data)
    except Hl7Error:
        return None


def _encode_ack(ack: str, header: Header | None) -> bytes:
    """The ACK in the character set of the message it answers (MSH-18 echoed); UTF-8 otherwise."""
    codec = CHARSETS.get(header.charset.strip().upper(), "utf-8") if header is not None else "utf-8"
    return ack.encode(codec, errors="replace")


#: What socketserver hands a server per request (a TCP server only ever gets the socket).
_Request = socket.socket | tuple[bytes, socket.socket]


class _Server(socketserver.ThreadingTCPServer):
    """A thread per connection; over the limit a new connection is closed at once."""

    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], listener: Hl7Listener, max_connections: int) -> None:
        self.listener = listener
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, _Handler)

    def process_request(self, request: _Request, client_address: tuple[str, int]) -> None:
        if not self._slots.acquire(blocking=False):
            log.warning("hl7: refusing a connection from %s: %d connections already open", client_address[0],
                        self.max_connections)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: _Request, client_address: tuple[str, int]) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        host, port = self.client_address[:2]
        peer = f"{host}:{port}"
        try:
            self.server.listener.serve_connection(self.request, peer)
        except Exception:  # pragma: no cover - serve_connection handles what it expects
            log.exception("hl7: connection from %s failed", peer)


def start_listener(ctx: AppContext) -> Hl7Listener:
    """Start the listener on the configured address (``hl7_port`` must be non-zero)."""
    if not ctx.settings.hl7_port:
        raise InvalidInput("the HL7 listener is off (PACS_HL7_PORT=0)")
    return Hl7Listener(ctx).start()

