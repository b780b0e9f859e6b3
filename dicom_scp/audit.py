"""Auditing of DIMSE requests: one row per C-FIND, C-MOVE, C-GET, worklist query, N-CREATE and
N-SET, and one per association the network policy rejects (what the row says: :mod:`pacs.audit.dimse`).

Each handler is decorated (``@audited_stream(...)`` for the generator handlers of the C-services,
``@audited_call(...)`` for the MPPS N-services). The decorator changes nothing in the answer: it
watches what the handler yields (the matches' studies and patients, the objects a retrieve sends,
the move destination, the sub-operation count) and, for the C-services, the final response
pynetdicom sends (``EVT_DIMSE_SENT``, bound to the association for the duration of the request):
its status, Error Comment and sub-operation counts are what the peer was told, including the
statuses pynetdicom sends itself (0xA801 move destination unknown or unreachable, 0xC311/0xC411/
0xC511 after a handler error). The row is written as that final response goes out; if the request
ends without one (the association was aborted), when the handler's generator is closed.

Auditing never breaks a DICOM answer: any error while auditing is logged and swallowed. Handlers
called without an :class:`~pacs.context.AppContext` (unit tests with stand-ins) are not audited.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.dimse_messages import C_FIND_RSP, C_GET_RSP, C_MOVE_RSP

from pacs.audit import dimse as dimse_audit
from pacs.audit.dimse import DimseRequest, FinalStatus
from pacs.context import AppContext
from pacs.dimse_status import PENDING_STATUSES, PROCESSING_FAILURE

log = logging.getLogger("dicom_scp")

_FINAL_RESPONSES = (C_FIND_RSP, C_GET_RSP, C_MOVE_RSP)
_MODELS = {
    "1.2.840.10008.5.1.4.1.2.1.1": "PATIENT_ROOT", "1.2.840.10008.5.1.4.1.2.1.2": "PATIENT_ROOT",
    "1.2.840.10008.5.1.4.1.2.1.3": "PATIENT_ROOT",
    "1.2.840.10008.5.1.4.1.2.2.1": "STUDY_ROOT", "1.2.840.10008.5.1.4.1.2.2.2": "STUDY_ROOT",
    "1.2.840.10008.5.1.4.1.2.2.3": "STUDY_ROOT",
    "1.2.840.10008.5.1.4.31": "MWL",
}


Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def audited_stream(action: str, role: str = dimse_audit.ROLE_AE) -> Decorator:
    """Decorate a C-FIND / C-MOVE / C-GET generator handler: one audit row per request."""

    def decorate(handler: Callable[..., Iterator[Any]]) -> Callable[..., Any]:
        @functools.wraps(handler)
        def wrapper(event: evt.Event, *args: Any) -> Iterator[Any]:
            ctx = _context(args)
            if ctx is None:
                return handler(event, *args)
            return _StreamAudit(event, ctx, action, role).run(handler(event, *args))

        return wrapper

    return decorate


def audited_call(action: str, role: str = dimse_audit.ROLE_MODALITY) -> Decorator:
    """Decorate an N-CREATE / N-SET handler returning ``(status, dataset)``: one audit row per request."""

    def decorate(handler: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(handler)
        def wrapper(event: evt.Event, *args: Any) -> Any:
            ctx = _context(args)
            if ctx is None:
                return handler(event, *args)
            try:
                result = handler(event, *args)
            except Exception as exc:  # pynetdicom answers 0x0110 Processing failure
                _safely(_record_n_request, event, ctx, action, role, (PROCESSING_FAILURE, None),
                        f"{type(exc).__name__}")
                raise
            _safely(_record_n_request, event, ctx, action, role, result, "")
            return result

        return wrapper

    return decorate


def association_rejected(ctx: AppContext, assoc: Any, calling_ae: str, reason: str,
                         reject: tuple[int, int, int] | None) -> None:
    """Audit an association the association checks reject (``dicom_scp.association_checks.on_requested``); never
    raises."""
    _safely(_record_rejection, ctx, assoc, calling_ae, reason, reject)


# -- the C-services ---------------------------------------------------------------------------------


class _StreamAudit:
    """One request's audit: facts from the handler's yields, the outcome from the final response."""

    def __init__(self, event: evt.Event, ctx: AppContext, action: str, role: str) -> None:
        self.event, self.ctx = event, ctx
        self.assoc = event.assoc
        self.request = DimseRequest(action=action, calling_ae=_calling_ae(event), address=_address(event), role=role)
        self.message_id: int | None = None
        self.written = False
        self.bound = False
        self.yields = 0

    def run(self, inner: Iterator[Any]) -> Iterator[Any]:
        _safely(self._start)
        try:
            for item in inner:
                _safely(self._observe, item)
                yield item
        except GeneratorExit:  # pynetdicom dropped the request (association aborted) or already answered it
            _safely(self._finish, FinalStatus(None), "the request ended without a final response")
            raise
        finally:
            close = getattr(inner, "close", None)
            if close is not None:
                close()

    def _start(self) -> None:
        request = self.event.request
        self.message_id = getattr(request, "MessageID", None)
        self.request.model = _MODELS.get(str(getattr(request, "AffectedSOPClassUID", "") or ""), "")
        if self.request.action == "dimse.c-move":
            self.request.destination = str(getattr(self.event, "move_destination", "") or "").strip()
        self.assoc.bind(evt.EVT_DIMSE_SENT, self._on_sent)
        self.bound = True

    def _observe(self, item: Any) -> None:
        self.yields += 1
        action = self.request.action
        if action in ("dimse.c-move", "dimse.c-get"):
            self._observe_retrieve(item)
            return
        if not isinstance(item, tuple) or len(item) != 2:
            return
        status, identifier = item
        if status in PENDING_STATUSES and isinstance(identifier, Dataset):
            self.request.matches = (self.request.matches or 0) + 1
            self.request.matched.add(identifier.get("StudyInstanceUID", ""), identifier.get("PatientID", ""))

    def _observe_retrieve(self, item: Any) -> None:
        move = self.request.action == "dimse.c-move"
        if move and self.yields == 1:  # (host, port, options) of the destination, or (None, None)
            if isinstance(item, tuple) and len(item) >= 2 and item[0] is not None:
                self.request.destination = f"{self.request.destination}@{item[0]}:{item[1]}"
            return
        if isinstance(item, int) and not isinstance(item, bool):
            if self.request.planned is None:
                self.request.planned = item
            return
        if isinstance(item, tuple) and len(item) == 2 and item[0] in PENDING_STATUSES:
            self.request.attempted += 1
            retrieve_item = getattr(item[1], "retrieve_item", None)
            if retrieve_item is not None:
                self.request.add_sent_object(getattr(retrieve_item, "object_key", ""))

    def _on_sent(self, event: evt.Event) -> None:
        """EVT_DIMSE_SENT: the final response of this request completes the row."""
        message = event.message
        if self.written or not isinstance(message, _FINAL_RESPONSES):
            return
        command = message.command_set
        status = int(command.get("Status", 0))
        if status in PENDING_STATUSES:
            return
        if self.message_id is not None and command.get("MessageIDBeingRespondedTo") not in (None, self.message_id):
            return
        final = FinalStatus(status, str(command.get("ErrorComment", "") or ""),
                            _count(command, "NumberOfCompletedSuboperations"),
                            _count(command, "NumberOfFailedSuboperations"),
                            _count(command, "NumberOfWarningSuboperations"),
                            _count(command, "NumberOfRemainingSuboperations"))
        if self.request.action in ("dimse.c-find", "dimse.worklist-find") and self.request.matches is None:
            self.request.matches = 0
        try:
            self._finish(final, "")
        except Exception as exc:
            log.error("audit of %s from %s failed: %s", self.request.action, self.request.calling_ae, exc)

    def _finish(self, final: FinalStatus, problem: str) -> None:
        if self.written:
            return
        self.written = True
        if self.bound:
            self.bound = False
            self.assoc.unbind(evt.EVT_DIMSE_SENT, self._on_sent)
        if problem:
            self.request.problem = problem
        self._read_identifier()
        dimse_audit.record_request(self.ctx.sessions, self.ctx.read_sessions, self.request, final)


    def _read_identifier(self) -> None:
        """The identifier's keys, read once the handler is done with it: pydicom converts an element in
        place when it is read, and the handler reads some as raw bytes (UTF-8 under a Latin-1 label)."""
        try:
            identifier = self.event.identifier
        except Exception as exc:
            self.request.problem = self.request.problem or f"identifier cannot be decoded: {type(exc).__name__}"
            return
        self.request.read_identifier(identifier, self.ctx.settings.assume_utf8_for_latin1)


def _count(command: Dataset, keyword: str) -> int | None:
    value = command.get(keyword)
    return int(value) if value is not None else None


# -- the N-services (MPPS) ---------------------------------------------------------------------------


def _record_n_request(event: evt.Event, ctx: AppContext, action: str, role: str, result: Any, error: str) -> None:
    """Read what the N-request was and what it was answered; :func:`pacs.audit.dimse.record_mpps_request`
    writes the row."""
    status, reply = result if isinstance(result, tuple) and len(result) == 2 else (result, None)
    code = int(status.Status) if isinstance(status, Dataset) else int(status)
    comment = str(status.get("ErrorComment", "") or "") if isinstance(status, Dataset) else error
    request = event.request
    uid = str(getattr(request, "AffectedSOPInstanceUID", None) or getattr(request, "RequestedSOPInstanceUID", None)
              or (reply.get("AffectedSOPInstanceUID", "") if isinstance(reply, Dataset) else "") or "")
    record = DimseRequest(action=action, calling_ae=_calling_ae(event), address=_address(event), role=role)
    try:
        attributes = event.attribute_list if action == "dimse.mpps-create" else event.modification_list
    except Exception:
        attributes = Dataset()
        record.problem = "attribute list cannot be decoded"
    dimse_audit.record_mpps_request(ctx.sessions, ctx.read_sessions, record, uid, attributes,
                                    FinalStatus(code, comment))


# -- association rejections ----------------------------------------------------------------------------


def _record_rejection(ctx: AppContext, assoc: Any, calling_ae: str, reason: str,
                      reject: tuple[int, int, int] | None) -> None:
    primitive = assoc.requestor.primitive
    syntaxes = [str(cx.abstract_syntax) for cx in getattr(primitive, "presentation_context_definition_list", None)
                or []]
    dimse_audit.record_association_rejected(
        ctx.sessions, calling_ae=calling_ae, address=f"{assoc.requestor.address}:{assoc.requestor.port}",
        reason=reason, reject=reject, services=dimse_audit.services_of(syntaxes))


# -- helpers ---------------------------------------------------------------------------------------------


def _context(args: tuple[Any, ...]) -> AppContext | None:
    return next((a for a in args if isinstance(a, AppContext)), None)


def _calling_ae(event: evt.Event) -> str:
    title = getattr(event.assoc.requestor, "ae_title", "")
    return title.strip() if isinstance(title, str) else ""


def _address(event: evt.Event) -> str:
    requestor = event.assoc.requestor
    return f"{getattr(requestor, 'address', '')}:{getattr(requestor, 'port', '')}"


def _safely(fn: Callable[..., Any], *args: Any) -> None:
    try:
        fn(*args)
    except Exception as exc:
        log.error("DIMSE audit failed (%s): %s", getattr(fn, "__name__", "audit"), exc)
