"""Storage Commitment Push Model SCP (PS3.4 Annex J): N-ACTION in, N-EVENT-REPORT out.

**N-ACTION** (Action Type 1, on the well-known instance 1.2.840.10008.1.20.1.1): the Action
Information is validated, the request is written to the ``storage_commitment`` table
(:func:`pacs.commitment.service.record_request`) and answered Success at once; deciding what is stored
and reporting it is the background reporter's work (:class:`pacs.commitment.service.CommitmentReporter`).
A bad request gets a failure status with an Error Comment, never an exception:

- 0x0115 Invalid argument value: no or undecodable Action Information; no or invalid Transaction
  UID; no or empty Referenced SOP Sequence; an item without valid SOP Class/Instance UIDs; a
  Transaction UID already used for another request;
- 0x0123 No such action: an Action Type ID other than 1;
- 0x0112 No such SOP instance / 0x0117 Invalid object instance: the requested SOP instance is not
  the well-known one / not a valid UID;
- 0x0124 Refused, not authorised: the requester is not registered with a host and port, so there
  is no address for the report (recorded as failed with that reason);
- 0x0213 Resource limitation: more than MAX_REFS instances in one request;
- 0x0110 Processing failure: the index cannot be written (retry later).

**N-EVENT-REPORT** is always sent on a *new* association to the requester's registered address
(``pacs ae add``), on which we are the association requestor and propose the SCP role for the
Storage Commitment Push Model SOP class (SCP/SCU Role Selection). PS3.4 J.3.3.1 lets the SCP try
the N-ACTION's own association first, but the SCU is free to release it at any time (most
modalities do, right after the N-ACTION response), so a report sent there races their A-RELEASE;
every SCU must be able to take the report on another association (J.3.3.1.3), and that path goes
through the table's retries. A peer that refuses the proposed role (no acceptable context) is
tried once more without role selection, as some SCUs accept only the default roles.
"""

from __future__ import annotations

import logging

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.dimse_primitives import N_ACTION
from sqlalchemy.exc import SQLAlchemyError

from pacs.commitment.service import (
    CommitmentConfig,
    CommitmentResult,
    Recorded,
    ReportNotDelivered,
    SopRef,
    record_request,
)
from pacs.context import AppContext
from pacs.dimse_responses import keeper_for, rejection_of
from pacs.dimse_status import (
    INVALID_ARGUMENT_VALUE,
    INVALID_OBJECT_INSTANCE,
    NO_SUCH_ACTION,
    NO_SUCH_SOP_INSTANCE,
    PROCESSING_FAILURE,
    REFUSED_NOT_AUTHORIZED,
    RESOURCE_LIMITATION,
    SUCCESS,
    failure,
)
from pacs.forwarding.delivery import Destination
from pacs.ingest import Ingestor
from pacs.ingest.parsing import is_valid_uid

log = logging.getLogger("dicom_scp")

STORAGE_COMMITMENT_PUSH_MODEL = "1.2.840.10008.1.20.1"
WELL_KNOWN_INSTANCE = "1.2.840.10008.1.20.1.1"
REQUEST_STORAGE_COMMITMENT = 1  # the one Action Type ID of the SOP class
TRANSFER_SYNTAXES = [str(ImplicitVRLittleEndian), str(ExplicitVRLittleEndian)]
MAX_REFS = 50_000  # instances in one request (a very large study is a few thousand)


def contexts(ctx: AppContext) -> list[tuple[str, list[str]]]:
    return [(STORAGE_COMMITMENT_PUSH_MODEL, TRANSFER_SYNTAXES)]


def handlers(ctx: AppContext, ingestor: Ingestor) -> list[tuple]:
    return [(evt.EVT_N_ACTION, handle_n_action, [ctx])]


# -- N-ACTION ---------------------------------------------------------------------------------


class InvalidRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def parse_request(action_type: int | None, requested_instance: str, info: Dataset | None) -> tuple[str, list[SopRef]]:
    """The Transaction UID and the refs of a commitment request; ``InvalidRequest`` says what is wrong."""
    if action_type != REQUEST_STORAGE_COMMITMENT:
        raise InvalidRequest(NO_SUCH_ACTION, f"no such action type {action_type}")
    if requested_instance != WELL_KNOWN_INSTANCE:
        if not is_valid_uid(requested_instance):
            raise InvalidRequest(INVALID_OBJECT_INSTANCE, f"invalid SOP instance {requested_instance[:40]!r}")
        raise InvalidRequest(NO_SUCH_SOP_INSTANCE, f"use the well-known instance {WELL_KNOWN_INSTANCE}")
    if info is None or len(info) == 0:
        raise InvalidRequest(INVALID_ARGUMENT_VALUE, "no Action Information")
    transaction = _text(info, "TransactionUID")
    if not transaction:
        raise InvalidRequest(INVALID_ARGUMENT_VALUE, "missing TransactionUID")
    if not is_valid_uid(transaction):
        raise InvalidRequest(INVALID_ARGUMENT_VALUE, f"invalid TransactionUID {transaction[:30]!r}")
    items = info.get("ReferencedSOPSequence")
    if not items:
        raise InvalidRequest(INVALID_ARGUMENT_VALUE, "missing or empty ReferencedSOPSequence")
    if len(items) > MAX_REFS:
        raise InvalidRequest(RESOURCE_LIMITATION, f"{len(items)} instances in one request (max {MAX_REFS})")
    refs = []
    for n, item in enumerate(items, 1):
        sop_class, sop_instance = _text(item, "ReferencedSOPClassUID"), _text(item, "ReferencedSOPInstanceUID")
        for keyword, value in (("ReferencedSOPClassUID", sop_class), ("ReferencedSOPInstanceUID", sop_instance)):
            if not is_valid_uid(value):
                raise InvalidRequest(INVALID_ARGUMENT_VALUE, f"item {n}: invalid {keyword} {value[:20]!r}")
        refs.append(SopRef(sop_class, sop_instance))
    return transaction, refs


def _text(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword)
    except Exception:  # an undecodable element: reported as invalid, like a bad value
        return "?"
    return str(value).strip().rstrip("\0") if value is not None else ""


def handle_n_action(event: evt.Event, ctx: AppContext) -> tuple[Dataset | int, Dataset | None]:
    requestor = event.assoc.requestor
    calling_ae = requestor.ae_title.strip() if isinstance(requestor.ae_title, str) else ""
    request = event.request
    assert isinstance(request, N_ACTION)  # the event this handler is bound to
    try:
        info = event.action_information
    except Exception as exc:
        info = None
        log.warning("N-ACTION from %s: undecodable Action Information: %s", calling_ae, exc)
    try:
        transaction, refs = parse_request(request.ActionTypeID, str(request.RequestedSOPInstanceUID or ""), info)
    except InvalidRequest as exc:
        log.warning("storage commitment request from %s refused (0x%04X): %s", calling_ae, exc.status, exc.message)
        return failure(exc.status, exc.message), None
    try:
        recorded = record_request(ctx.sessions, transaction, calling_ae, refs,
                                  requesting_address=f"{requestor.address}:{requestor.port}")
    except SQLAlchemyError as exc:
        log.error("storage commitment request %s from %s: index unavailable: %s", transaction, calling_ae,
                  str(exc).splitlines()[0][:300])
        return failure(PROCESSING_FAILURE, "index database unavailable"), None
    if recorded is Recorded.CONFLICT:
        return failure(INVALID_ARGUMENT_VALUE, "TransactionUID already used for another request"), None
    if recorded is Recorded.UNREGISTERED:
        log.warning("storage commitment request %s from unregistered AE %s recorded as failed", transaction,
                    calling_ae)
        return failure(REFUSED_NOT_AUTHORIZED, f"AE {calling_ae} not registered for reports"), None
    log.info("storage commitment request %s from %s: %d instance(s)", transaction, calling_ae, len(refs))
    reporter = ctx.extras.get("commitment_reporter")
    if reporter is not None and hasattr(reporter, "wake"):
        reporter.wake()
    return SUCCESS, None


# -- N-EVENT-REPORT -------------------------------------------------------------------------------


def event_information(transaction_uid: str, result: CommitmentResult, retrieve_ae: str) -> Dataset:
    """Event Information of the report (PS3.4 Table J.3-2): successes, and failures with their reason."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    ds.RetrieveAETitle = retrieve_ae
    if result.success:
        ds.ReferencedSOPSequence = [_item(r.sop_class_uid, r.sop_instance_uid) for r in result.success]
    if result.failed:
        failed = []
        for f in result.failed:
            item = _item(f.sop_class_uid, f.sop_instance_uid)
            item.FailureReason = f.reason
            failed.append(item)
        ds.FailedSOPSequence = failed
    return ds


def _item(sop_class: str, sop_instance: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    return item


def send_event_report(cfg: CommitmentConfig, dest: Destination, transaction_uid: str,
                      result: CommitmentResult) -> None:
    """Report on a new association to ``dest``; raises ``ReportNotDelivered`` unless it answered Success."""
    info = event_information(transaction_uid, result, cfg.calling_ae)
    for with_role in (True, False):
        ae = AE(ae_title=cfg.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = cfg.network_timeout_s
        ae.connection_timeout = min(cfg.network_timeout_s, 10.0)
        ae.add_requested_context(STORAGE_COMMITMENT_PUSH_MODEL, TRANSFER_SYNTAXES)
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, max_pdu=cfg.max_pdu,
                             ext_neg=[build_role(STORAGE_COMMITMENT_PUSH_MODEL, scp_role=True)] if with_role else [])
        if not assoc.is_established:
            if with_role and assoc.is_aborted and assoc.rejected_contexts and not assoc.accepted_contexts:
                continue  # it answered but took no context with us as SCP: try the default roles
            why = "rejected the association" if rejection_of(assoc) else "is unreachable"
            raise ReportNotDelivered(f"{dest} {why}")
        try:
            with keeper_for(assoc).sending():
                status, _ = assoc.send_n_event_report(info, result.event_type, STORAGE_COMMITMENT_PUSH_MODEL,
                                                      WELL_KNOWN_INSTANCE)
        except (RuntimeError, OSError, ValueError) as exc:
            raise ReportNotDelivered(f"N-EVENT-REPORT to {dest} failed: {exc}") from exc
        finally:
            if assoc.is_established:
                assoc.release()
        if not status or "Status" not in status:
            raise ReportNotDelivered(f"no N-EVENT-REPORT response from {dest} (association aborted or timed out)")
        code = int(status.Status)
        if code != SUCCESS:
            comment = str(status.get("ErrorComment", "")).strip()
            raise ReportNotDelivered(f"{dest} answered the N-EVENT-REPORT with 0x{code:04X}"
                                     + (f": {comment}" if comment else ""))
        return
    raise ReportNotDelivered(f"{dest} accepted no Storage Commitment presentation context for the report")
