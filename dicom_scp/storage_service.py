"""Storage SCP (C-STORE) for every storage SOP class pynetdicom knows, with every transfer syntax
pydicom knows: objects are stored as received, so none needs a codec here.

The handler only adapts the event to :mod:`pacs.ingest` (the received bytes, undecoded, and who sent them)
and the outcome to a C-STORE status (:func:`pacs.ingest.statuses.store_status`).
"""

from __future__ import annotations

import logging

from pydicom.dataset import Dataset
from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AllStoragePresentationContexts, evt
from pynetdicom.dimse_primitives import C_STORE

from dicom_scp.association_checks import REGISTERED
from dicom_scp.received import received_part10
from pacs.aes import AERegistry, sender_rights
from pacs.context import AppContext
from pacs.dimse_status import REFUSED_NOT_AUTHORIZED, error_comment
from pacs.errors import IndexUnavailable
from pacs.ingest import Ingestor, IngestSource
from pacs.ingest.statuses import store_status

log = logging.getLogger("dicom_scp")

TRANSFER_SYNTAXES = [str(ts) for ts in AllTransferSyntaxes]


def contexts(ctx: AppContext) -> list[tuple[str, list[str]]]:
    return [(str(cx.abstract_syntax), TRANSFER_SYNTAXES) for cx in AllStoragePresentationContexts]


def handlers(ctx: AppContext, ingestor: Ingestor) -> list[tuple]:
    return [(evt.EVT_C_STORE, handle_store, [ingestor, ctx])]


def handle_store(event: evt.Event, ingestor: Ingestor, ctx: AppContext) -> Dataset:
    requestor = event.assoc.requestor
    calling_ae = requestor.ae_title.strip() if isinstance(requestor.ae_title, str) else ""
    status = Dataset()
    if not ctx.settings.accept_unknown_store_aes and not _may_store(ctx, calling_ae, str(requestor.address)):
        status.Status = REFUSED_NOT_AUTHORIZED
        status.ErrorComment = error_comment(f"AE {calling_ae} is not registered to store")
        return status
    request = event.request
    assert isinstance(request, C_STORE)  # the event this handler is bound to
    outcome = ingestor.ingest(
        received_part10(event),  # event.encoded_dataset(include_meta=True), without pydicom's writer
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
    any other peer is untrusted (pacs.security.filing_rules). Once per association, from the registration the
    association checks read (association_checks.REGISTERED), else from the registry."""
    requestor = event.assoc.requestor
    address = f"{requestor.address}:{requestor.port}"
    cache = event.assoc.__dict__
    if "_pacs_sender" not in cache and REGISTERED in cache:
        cache["_pacs_sender"] = sender_rights(cache[REGISTERED], str(requestor.address))
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
