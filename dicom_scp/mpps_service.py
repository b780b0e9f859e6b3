"""Modality Performed Procedure Step SCP (PS3.4 F.7): N-CREATE and N-SET, a thin adapter onto pacs.ris.mpps.

Statuses (PS3.4 F.7.2.1.2, F.7.2.2.2, PS3.7 C):

- 0x0000 Success;
- 0x0111 Duplicate SOP Instance: N-CREATE of a step that exists;
- 0x0112 No such SOP Instance: N-SET of a step we never created;
- 0x0110 Processing failure, Error ID 0xA710 "Performed Procedure Step object may no longer be
  updated": N-SET of a COMPLETED or DISCONTINUED step (0xC310, "not in progress", is the UPS
  service's status, not MPPS's);
- 0x0106 Invalid attribute value: N-CREATE not IN PROGRESS, an unknown status, a malformed UID;
- 0x0110 Processing failure: the index cannot be written (the modality retries).

The step is committed before the response is sent, so a Success is never lost. Any other error in
the handler is answered 0x0110 by pynetdicom itself.

Facility scope (pacs.ris.mpps): an N-CREATE links its step only to an order of the calling AE's scope
(pacs.ae_scope), an order of another facility being answered exactly like an unknown one; an N-SET
from another AE title than the step's creator gets 0x0112, like a step that does not exist.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import evt
from pynetdicom.dimse_primitives import N_CREATE, N_SET
from pynetdicom.sop_class import ModalityPerformedProcedureStep
from sqlalchemy.exc import SQLAlchemyError

from dicom_scp.audit import audited_call
from pacs.ae_scope import calling_scope
from pacs.aes import AERegistry
from pacs.context import AppContext
from pacs.dimse_status import (
    DUPLICATE_SOP_INSTANCE,
    INVALID_ATTRIBUTE_VALUE,
    MPPS_MAY_NO_LONGER_BE_UPDATED,
    NO_SUCH_SOP_CLASS,
    NO_SUCH_SOP_INSTANCE,
    PROCESSING_FAILURE,
    SUCCESS,
    failure,
)
from pacs.errors import PacsError
from pacs.ingest import Ingestor
from pacs.ris import mpps
from pacs.security.principal import AccessScope

log = logging.getLogger("dicom_scp")

MPPS = str(ModalityPerformedProcedureStep)
TRANSFER_SYNTAXES = [str(ImplicitVRLittleEndian), str(ExplicitVRLittleEndian), "1.2.840.10008.1.2.2"]

ScopeOf = Callable[[str, str], AccessScope]  # (calling AE title, peer address) -> what it may see

_STATUS: list[tuple[type[PacsError], int]] = [
    (mpps.DuplicateStep, DUPLICATE_SOP_INSTANCE),
    (mpps.NoSuchStep, NO_SUCH_SOP_INSTANCE),
    (mpps.StepFinal, PROCESSING_FAILURE),
    (mpps.InvalidStep, INVALID_ATTRIBUTE_VALUE),
]


def contexts(ctx: AppContext) -> list[tuple[str, list[str]]]:
    return [(MPPS, TRANSFER_SYNTAXES)]


def handlers(ctx: AppContext, ingestor: Ingestor) -> list[tuple]:
    scope_of = partial(calling_scope, AERegistry(ctx.read_sessions))
    return [(evt.EVT_N_CREATE, handle_n_create, [ctx, scope_of]), (evt.EVT_N_SET, handle_n_set, [ctx])]


@audited_call("dimse.mpps-create")
def handle_n_create(event: evt.Event, ctx: AppContext, scope_of: ScopeOf) -> tuple[Dataset | int, Dataset | None]:
    request = event.request
    assert isinstance(request, N_CREATE)  # the event this handler is bound to
    if str(request.AffectedSOPClassUID) != MPPS:
        return failure(NO_SUCH_SOP_CLASS, "only Modality Performed Procedure Step is created here"), None
    uid = str(request.AffectedSOPInstanceUID or "") or generate_uid(prefix=None)
    calling_ae = _calling_ae(event)
    try:
        attributes = event.attribute_list
    except Exception as exc:  # an attribute list pydicom cannot decode
        return _refused("N-CREATE", calling_ae, uid, mpps.InvalidStep(f"cannot read the attribute list: {exc}")), None
    try:
        scope = scope_of(calling_ae, str(event.assoc.requestor.address or ""))
        with ctx.sessions() as session, session.begin():
            step = mpps.create_step(session, uid, attributes, calling_ae, scope=scope)
    except (PacsError, SQLAlchemyError) as exc:
        return _refused("N-CREATE", calling_ae, uid, exc), None
    log.info("MPPS %s IN PROGRESS from %s (%s)", uid, calling_ae,  # no accession number: it names a patient's
             "order matched" if step.order_accession_number else "no order")  # order (the audit trail has it)
    reply = Dataset()
    if request.AffectedSOPInstanceUID is None:  # we assigned the UID: pynetdicom moves it into the response
        reply.AffectedSOPInstanceUID = uid
    return SUCCESS, reply


@audited_call("dimse.mpps-set")
def handle_n_set(event: evt.Event, ctx: AppContext) -> tuple[Dataset | int, Dataset | None]:
    request = event.request
    assert isinstance(request, N_SET)  # the event this handler is bound to
    if str(request.RequestedSOPClassUID) != MPPS:
        return failure(NO_SUCH_SOP_CLASS, "only Modality Performed Procedure Step is updated here"), None
    uid = str(request.RequestedSOPInstanceUID or "")
    calling_ae = _calling_ae(event)
    try:
        modification = event.modification_list
    except Exception as exc:  # a modification list pydicom cannot decode
        return _refused("N-SET", calling_ae, uid, mpps.InvalidStep(f"cannot read the modification list: {exc}")), None
    try:
        with ctx.sessions() as session, session.begin():
            step = mpps.set_step(session, uid, modification, calling_ae=calling_ae)
    except (PacsError, SQLAlchemyError) as exc:
        return _refused("N-SET", calling_ae, uid, exc), None
    log.info("MPPS %s %s from %s (order %s, %d series)", uid, step.state, calling_ae,
             step.order_state or "none", len(step.series_instance_uids))
    return SUCCESS, None


def _refused(operation: str, calling_ae: str, uid: str, exc: Exception) -> Dataset:
    if isinstance(exc, SQLAlchemyError):
        log.warning("MPPS %s %s from %s failed: %s", operation, uid, calling_ae, exc)
        return failure(PROCESSING_FAILURE, "index database unavailable")
    code = next((c for kind, c in _STATUS if isinstance(exc, kind)), PROCESSING_FAILURE)
    log.warning("MPPS %s %s from %s refused (0x%04X): %s", operation, uid, calling_ae, code, exc)
    status = failure(code, str(exc))
    if isinstance(exc, mpps.StepFinal):
        status.ErrorID = MPPS_MAY_NO_LONGER_BE_UPDATED
    return status


def _calling_ae(event: evt.Event) -> str:
    return str(event.assoc.requestor.ae_title).strip()
