"""Query/Retrieve C-MOVE SCP (Patient Root, Study Root): the matching objects go, as stored, to a
registered AE over an association this SCP opens to it.

pynetdicom opens that association after the handler yields the destination (with the presentation
contexts to propose) and the number of sub-operations; the sub-operations themselves are the
C-GET SCP's (:mod:`dicom_scp.get_service`): each object is proposed with its SOP class in its
stored transfer syntax, and Explicit and Implicit VR Little Endian are proposed beside it for the
decompression fallback.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context, evt
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from dicom_scp.audit import audited_stream
from dicom_scp.get_service import (
    StoredObjectSender,
    calling_ae,
    prepare,
    refuse,
    sub_operations,
)
from dicom_scp.verification import UNCOMPRESSED
from pacs.aes import AERegistry
from pacs.context import AppContext
from pacs.dimse_status import UNABLE_TO_PROCESS, failure
from pacs.forwarding.delivery import MAX_CONTEXTS, tcp_nodelay
from pacs.ingest import Ingestor
from pacs.retrieve import Model

log = logging.getLogger("dicom_scp")

MOVE_MODELS = {
    str(PatientRootQueryRetrieveInformationModelMove): Model.PATIENT_ROOT,
    str(StudyRootQueryRetrieveInformationModelMove): Model.STUDY_ROOT,
}


def store_contexts(syntaxes: tuple[tuple[str, str], ...]) -> list[PresentationContext]:
    """One context per (SOP class, stored transfer syntax), then Explicit and Implicit VR Little
    Endian per SOP class for objects the destination does not take as stored.

    Each context proposes a single transfer syntax, so that the destination's choice among several
    cannot hide the stored one. Beyond the 128 contexts an association can carry, fallbacks go first.
    """
    pairs = dict.fromkeys(syntaxes)
    for sop_class in dict.fromkeys(sop for sop, _ in syntaxes):
        for ts in (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)):
            pairs.setdefault((sop_class, ts))
    if len(pairs) > MAX_CONTEXTS:
        log.warning("C-MOVE: %d presentation contexts needed, proposing the first %d", len(pairs), MAX_CONTEXTS)
    contexts = [build_context(sop, ts) for sop, ts in list(pairs)[:MAX_CONTEXTS]]
    return contexts or [build_context(Verification)]


@audited_stream("dimse.c-move")
def handle_move(event: evt.Event, ctx: AppContext, sender: StoredObjectSender) -> Iterator[Any]:
    model = MOVE_MODELS[str(event.context.abstract_syntax)]
    caller = calling_ae(event)
    title = (event.move_destination or "").strip()
    # raises IndexUnavailable when the registry cannot be read: pynetdicom then answers 0xC511
    destination = AERegistry(ctx.read_sessions).move_destination(title)
    if destination is None:
        log.warning("C-MOVE from %s refused: move destination %r is not a registered AE with an address",
                    caller, title[:16])
        yield None, None  # pynetdicom answers 0xA801 Refused: Move destination unknown
        return
    refusal, retrieve = prepare(event, ctx, model, destination)
    # pynetdicom opens the association to the destination between the two next yields, even
    # for a refusal (a failure status can only follow a non-zero count): it is released at once.
    yield destination.host, destination.port, {
        "ae_title": destination.ae_title,
        "contexts": store_contexts(retrieve.syntaxes if retrieve else ()),
        "max_pdu": ctx.settings.max_pdu_size,
        "evt_handlers": [(evt.EVT_CONN_OPEN, _on_store_conn_open, [sender, caller])],
    }
    if refusal is not None or retrieve is None:
        yield from refuse(refusal or failure(UNABLE_TO_PROCESS, "retrieve could not be planned"))
        return
    log.info("C-MOVE from %s: %d object(s) to %s@%s:%s", caller, retrieve.count, destination.ae_title,
             destination.host, destination.port)
    yield retrieve.count
    yield from sub_operations(event, ctx, retrieve)


def _on_store_conn_open(event: evt.Event, sender: StoredObjectSender, caller: str) -> None:
    tcp_nodelay(event)
    sender.on_conn_open(event, move_originator=caller)


def contexts(ctx: AppContext) -> list[tuple[str, list[str]]]:
    return [(uid, UNCOMPRESSED) for uid in MOVE_MODELS]


def handlers(ctx: AppContext, ingestor: Ingestor) -> list[tuple]:
    return [(evt.EVT_C_MOVE, handle_move, [ctx, StoredObjectSender(ctx)])]
