"""DIMSE event handlers: adapt pynetdicom events onto `pacs` services and nothing more."""

from __future__ import annotations

import contextlib
import logging
import socket

from pydicom.dataset import Dataset
from pynetdicom import evt

from pacs.aes import AERegistry
from pacs.context import AppContext
from pacs.dimse_status import REFUSED_NOT_AUTHORIZED, error_comment
from pacs.errors import IndexUnavailable
from pacs.ingest import Ingestor, IngestSource
from pacs.store_statuses import store_status

log = logging.getLogger("dicom_scp")


def handle_store(event: evt.Event, ingestor: Ingestor, ctx: AppContext) -> Dataset:
    requestor = event.assoc.requestor
    calling_ae = requestor.ae_title.strip() if isinstance(requestor.ae_title, str) else ""
    status = Dataset()
    if not ctx.settings.accept_unknown_store_aes and not _may_store(ctx, calling_ae, str(requestor.address)):
        status.Status = REFUSED_NOT_AUTHORIZED
        status.ErrorComment = error_comment(f"AE {calling_ae} is not registered to store")
        return status
    request = event.request
    outcome = ingestor.ingest(
        event.encoded_dataset(include_meta=True),
        _source(event, ctx, calling_ae),
        expected_sop_instance_uid=str(request.AffectedSOPInstanceUID or "") or None,
        expected_sop_class_uid=str(request.AffectedSOPClassUID or "") or None,
    )
    status.Status = store_status(outcome)
    if outcome.warn:  # held for reconciliation, told only to a sender that may read the study
        status.ErrorComment = error_comment(outcome.message)
    if not outcome.ok:
        status.ErrorComment = error_comment(outcome.message)
        log.warning("C-STORE from %s refused (0x%04X): %s", calling_ae, status.Status, outcome.message)
    counts = event.assoc.__dict__.setdefault("_pacs_counts", {"ok": 0, "failed": 0})
    counts["ok" if outcome.ok else "failed"] += 1
    return status


def _source(event: evt.Event, ctx: AppContext, calling_ae: str) -> IngestSource:
    """Who is storing: a registered AE (passing its host check) is trusted and stores for its facility;
    any other peer is untrusted (pacs.security.ingest_policy). Looked up once per association."""
    requestor = event.assoc.requestor
    address = f"{requestor.address}:{requestor.port}"
    cache = event.assoc.__dict__
    if "_pacs_sender" not in cache:
        try:
            cache["_pacs_sender"] = AERegistry(ctx.read_sessions).sender(calling_ae, str(requestor.address))
        except IndexUnavailable:
            # the index is down: the ingest itself will answer with its own status
            return IngestSource("dimse", calling_ae=calling_ae, address=address, trusted=False)
    facility, trusted, impersonating = cache["_pacs_sender"]
    return IngestSource("dimse", calling_ae=calling_ae, address=address, facility=facility, trusted=trusted,
                        impersonating=impersonating)


def _may_store(ctx: AppContext, calling_ae: str, peer_address: str) -> bool:
    try:
        return AERegistry(ctx.read_sessions).may_store(calling_ae, peer_address)
    except IndexUnavailable:
        return False


def on_conn_open(event: evt.Event) -> None:
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def on_accepted(event: evt.Event) -> None:
    r = event.assoc.requestor
    log.info("association accepted: %s@%s:%s -> %s (max PDU %s)", r.ae_title, r.address, r.port,
             event.assoc.acceptor.ae_title, r.maximum_length)


def on_released(event: evt.Event) -> None:
    r = event.assoc.requestor
    counts = event.assoc.__dict__.get("_pacs_counts", {"ok": 0, "failed": 0})
    log.info("association released: %s@%s:%s stored=%d failed=%d", r.ae_title, r.address, r.port,
             counts["ok"], counts["failed"])


def on_aborted(event: evt.Event) -> None:
    r = event.assoc.requestor
    log.warning("association aborted: %s@%s:%s", r.ae_title, r.address, r.port)
