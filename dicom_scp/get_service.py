"""Query/Retrieve C-GET SCP (Patient Root, Study Root), and the C-STORE sub-operation machinery
that the C-MOVE SCP (:mod:`dicom_scp.move_service`) shares with it.

pynetdicom drives both services: the handler yields the number of sub-operations, then one
``(Pending, dataset)`` pair per object, and pynetdicom sends each dataset with
``send_c_store(dataset)`` on the association that carries the sub-operations (the requester's
own for C-GET, one it opens to the destination for C-MOVE), counting results and sending the
Pending and final responses. It would *encode* a dataset, which changes what was stored (pydicom
drops group lengths, for one) and needs the whole object decoded in memory. So the handlers
yield a :class:`PendingStore` placeholder that only carries the UIDs and the index row, and
:class:`StoredObjectSender` replaces that association's ``send_c_store`` with one that sends the
stored file as it is, streamed in PDU-sized chunks (``_config.STORE_SEND_CHUNKED_DATASET`` with
a file path): the bytes on the wire are the bytes in the store, one object at a time.

Only when the peer accepted no context for an object's stored transfer syntax is it converted:
decompressed with pydicom (the pylibjpeg / openjpeg / RLE plugins) and written as Explicit, else
Implicit, VR Little Endian to a temporary file, which is then sent the same way.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, AllTransferSyntaxes, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AllStoragePresentationContexts, _config, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelGet,
)

from dicom_scp.audit import audited_stream
from dicom_scp.presentation_contexts import own_copy
from dicom_scp.verification import UNCOMPRESSED
from pacs.ae_scope import ae_scope, destination_scope
from pacs.aes import AERegistry, MoveDestination
from pacs.context import AppContext
from pacs.dimse_responses import keeper_for
from pacs.dimse_status import (
    CANCEL,
    IDENTIFIER_DOES_NOT_MATCH,
    OUT_OF_RESOURCES_UNABLE_TO_CALCULATE,
    OUT_OF_RESOURCES_UNABLE_TO_PERFORM,
    PENDING,
    REFUSED_NOT_AUTHORIZED,
    UNABLE_TO_PROCESS,
    failure,
)
from pacs.errors import IndexUnavailable
from pacs.forwarding.delivery import local_file
from pacs.ingest import Ingestor
from pacs.retrieve import (
    IdentifierMismatch,
    InvalidIdentifier,
    Model,
    RetrieveItem,
    RetrievePlan,
    iter_items,
    parse_identifier,
    plan,
)
from pacs.transcode import Unconvertible, to_uncompressed

log = logging.getLogger("dicom_scp")

# Query/Retrieve statuses (PS3.4 C.4.2.1.5 / C.4.3.1.4), named in pacs.dimse_status: PENDING per
# sub-operation, CANCEL, REFUSED_NOT_AUTHORIZED (the caller may not retrieve, from where it calls),
# OUT_OF_RESOURCES_UNABLE_TO_CALCULATE / _PERFORM (the index cannot be read before / while sending),
# IDENTIFIER_DOES_NOT_MATCH and UNABLE_TO_PROCESS (the identifier).

UNCOMPRESSED_TARGETS = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)  # decompression fallback, in preference
STORAGE_SOP_CLASSES = frozenset(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)

GET_MODELS = {
    str(PatientRootQueryRetrieveInformationModelGet): Model.PATIENT_ROOT,
    str(StudyRootQueryRetrieveInformationModelGet): Model.STUDY_ROOT,
}


# -- deciding what to send ------------------------------------------------------------------------


def calling_ae(event: evt.Event) -> str:
    title = event.assoc.requestor.ae_title
    return title.strip() if isinstance(title, str) else ""


def prepare(event: evt.Event, ctx: AppContext, model: Model, destination: MoveDestination | None = None,
            ) -> tuple[Dataset | None, RetrievePlan | None]:
    """Authorize the caller, validate the identifier and count the matches inside the caller's scope
    (:func:`pacs.ae_scope.ae_scope`: another facility's study matches nothing, like an unknown one) and,
    for C-MOVE, inside the ``destination``'s scope too (:func:`pacs.ae_scope.destination_scope`).

    Returns ``(refusal, None)`` with a failure status to answer, or ``(None, plan)``.
    """
    caller = calling_ae(event)
    try:
        identifier = event.identifier
    except Exception as exc:  # pynetdicom could not decode it
        log.warning("retrieve from %s refused: unreadable identifier: %s", caller, exc)
        return failure(UNABLE_TO_PROCESS, "identifier cannot be decoded"), None
    address = str(event.assoc.requestor.address)
    try:
        peer = AERegistry(ctx.read_sessions).calling_peer(caller, address)
        if peer is None or not peer.allow_retrieve:
            log.warning("retrieve from %s@%s refused: AE not registered (from this host) or not allowed to retrieve",
                        caller, address)
            return failure(REFUSED_NOT_AUTHORIZED, f"AE {caller} is not allowed to retrieve"), None
        request = parse_identifier(identifier, model)
        if destination is None:
            retrieve = plan(ctx.read_sessions, request, scope=ae_scope(peer))
        else:
            retrieve = plan(ctx.read_sessions, request, scope=ae_scope(peer),
                            destination_scope=destination_scope(destination))
            withheld = plan(ctx.read_sessions, request, scope=ae_scope(peer)).count - retrieve.count
            if withheld:
                log.warning("C-MOVE from %s: %d instance(s) withheld: %s may not hold their studies (another "
                            "facility's, not shared with it)", caller, withheld, destination.ae_title)
                if not retrieve.count:
                    return failure(UNABLE_TO_PROCESS, f"move destination {destination.ae_title} may not receive "
                                   "these studies (another facility's)"), None
    except IndexUnavailable as exc:
        log.warning("retrieve from %s: index unavailable: %s", caller, exc)
        return failure(OUT_OF_RESOURCES_UNABLE_TO_CALCULATE, "index database unavailable"), None
    except InvalidIdentifier as exc:
        status = IDENTIFIER_DOES_NOT_MATCH if isinstance(exc, IdentifierMismatch) else UNABLE_TO_PROCESS
        log.warning("retrieve from %s refused (0x%04X): %s", caller, status, exc)
        return failure(status, str(exc)), None
    log.info("retrieve from %s: %s level, %d instance(s)", caller, request.level, retrieve.count)
    return None, retrieve


def sub_operations(event: evt.Event, ctx: AppContext, retrieve: RetrievePlan) -> Iterator[tuple[Any, Any]]:
    """The ``(status, dataset)`` pairs after the count: one Pending per instance, stopping on cancel."""
    try:
        for item in iter_items(ctx.read_sessions, retrieve):
            if event.is_cancelled:
                log.info("retrieve cancelled by %s", calling_ae(event))
                yield CANCEL, None  # pynetdicom adds the counts and the Failed SOP Instance UID List
                return
            yield PENDING, PendingStore.of(item)
    except IndexUnavailable as exc:
        log.warning("retrieve for %s stopped: %s", calling_ae(event), exc)
        yield failure(OUT_OF_RESOURCES_UNABLE_TO_PERFORM, "index database unavailable"), None


def refuse(refusal: Dataset) -> Iterator[Any]:
    """Answer a refusal through pynetdicom's generator contract.

    A failure can only follow a sub-operation count of at least 1 (a count of 0 is answered
    Success), so one is announced and the final response reports it failed.
    """
    yield 1
    yield refusal, None


# -- sending stored objects as they are ------------------------------------------------------------


class PendingStore(Dataset):
    """What a handler yields for one sub-operation: SOP Class and Instance UIDs only (pynetdicom
    lists failed ones from it) and, as a plain attribute, the index row of the object to send."""

    retrieve_item: RetrieveItem

    @classmethod
    def of(cls, item: RetrieveItem) -> PendingStore:
        ds = cls()
        ds.SOPClassUID = item.sop_class_uid
        ds.SOPInstanceUID = item.sop_instance_uid
        ds.retrieve_item = item
        return ds


class NotSendable(Exception):
    """The object can be sent neither as stored nor converted to a syntax the peer accepted (the
    sub-operation fails with this message in the log)."""


class StoredObjectSender:
    """Makes an association's ``send_c_store`` send :class:`PendingStore` objects from the store."""

    def __init__(self, ctx: AppContext) -> None:
        self.store = ctx.store  # read through pacs.forwarding.delivery.local_file, never addressed directly
        # Send a file's dataset as it is, in chunks (pynetdicom reads it from the path, never decodes
        # it). Process-wide, but it only changes send_c_store() given a path: forwarding sets it too.
        _config.STORE_SEND_CHUNKED_DATASET = True

    def install(self, assoc: Association, move_originator: str | None = None) -> None:
        """Wrap ``assoc.send_c_store`` (once per association; other datasets pass through unchanged).

        ``move_originator``: the C-MOVE requester's AE title, sent as Move Originator Application
        Entity Title (pynetdicom would send our own title there, which PS3.7 9.1.1.1 does not mean).
        """
        if assoc.__dict__.get("_pacs_stored_sender") is self:
            return
        original: Callable[..., Dataset] = assoc.send_c_store
        # associations we request (to a C-MOVE destination) run pynetdicom's reactor beside the sender
        sending = keeper_for(assoc).sending if assoc.is_requestor else contextlib.nullcontext

        def send_c_store(dataset: Any, msg_id: int = 1, priority: int = 2, originator_aet: str | None = None,
                         originator_id: int | None = None) -> Dataset:
            if move_originator and originator_aet is not None:
                originator_aet = move_originator
            kwargs = {"msg_id": msg_id, "priority": priority, "originator_aet": originator_aet,
                      "originator_id": originator_id}
            with sending():
                if isinstance(dataset, PendingStore):
                    return self.send(assoc, original, dataset.retrieve_item, **kwargs)
                return original(dataset, **kwargs)

        assoc.send_c_store = send_c_store  # type: ignore[method-assign]  # wrapped on this association only
        assoc.__dict__["_pacs_stored_sender"] = self

    def on_conn_open(self, event: evt.Event, move_originator: str | None = None) -> None:
        """EVT_CONN_OPEN handler for an association we request (to a C-MOVE destination)."""
        self.install(event.assoc, move_originator)

    def send(self, assoc: Association, send_c_store: Callable[..., Dataset], item: RetrieveItem,
             **kwargs: Any) -> Dataset:
        """C-STORE one stored object: as stored when its syntax was accepted, else converted."""
        accepted = accepted_syntaxes(assoc, item.sop_class_uid)
        stored = UID(item.transfer_syntax_uid)
        target = stored if stored in accepted else next((ts for ts in UNCOMPRESSED_TARGETS if ts in accepted), None)
        if target is None:
            raise NotSendable(f"peer accepted no context for {item.sop_class_uid} in {stored} or uncompressed")
        with local_file(self.store, item.object_key) as path:
            if target == stored:
                return send_c_store(path, **kwargs)
            log.info("sending %s converted from %s to %s (peer does not accept it as stored)",
                     item.sop_instance_uid, stored.name, target.name)
            with converted_copy(path, target) as copy:
                return send_c_store(copy, **kwargs)


def accepted_syntaxes(assoc: Association, sop_class_uid: str) -> list[UID]:
    """Transfer syntaxes of the contexts in which we may send ``sop_class_uid`` (as SCU)."""
    return [cx.transfer_syntax[0] for cx in assoc.accepted_contexts
            if cx.abstract_syntax == sop_class_uid and cx.as_scu]


@contextlib.contextmanager
def converted_copy(path: Path, target: UID) -> Iterator[Path]:
    """A temporary Part-10 file of the object decompressed (if it was) and encoded in ``target``."""
    ds = dcmread(path)
    try:
        to_uncompressed(ds, target)  # raises when no plugin decodes it: the sub-operation fails
    except Unconvertible as exc:  # Explicit VR Big Endian: refuse, never corrupt
        raise NotSendable(str(exc)) from None
    with tempfile.NamedTemporaryFile(prefix="pacs-converted-", suffix=".dcm") as tmp:
        ds.save_as(tmp, enforce_file_format=True)
        del ds
        tmp.flush()
        yield Path(tmp.name)


# -- the C-GET service -----------------------------------------------------------------------------


def accept_storage_scp_role(event: evt.Event) -> None:
    """EVT_REQUESTED: let a C-GET requester have us act as SCU for the storage SOP classes it
    proposes the SCP role for, and choose the transfer syntaxes that serve a retrieve best.

    pynetdicom accepts an SCP/SCU Role Selection only for contexts supported with explicit roles,
    and the services contract (``contexts()``: abstract and transfer syntaxes) carries none, so
    this association gets its own list, with its own copies of the contexts it changes, before negotiation. Only
    SOP classes the requester wants to receive are touched; ordinary C-STORE associations are not.

    pynetdicom accepts, for each proposed context, the first of *our* transfer syntaxes that the
    requester listed. For these contexts that order becomes: Explicit, then Implicit VR Little
    Endian (any object can then be delivered, decompressed if need be), then the requester's own
    order. A requester wanting compressed objects as stored proposes a context per syntax.
    """
    requestor = event.assoc.requestor
    wanted = {str(uid) for uid, item in requestor.role_selection.items() if item.scp_role}
    if not wanted:
        return
    proposed: dict[str, list[UID]] = {}
    assert requestor.primitive is not None  # the A-ASSOCIATE request this event is about
    for rq in requestor.primitive.presentation_context_definition_list:
        proposed.setdefault(str(rq.abstract_syntax), list(rq.transfer_syntax))
    contexts = list(event.assoc.acceptor.supported_contexts)  # shared read-only: this association's own list
    for index, shared_cx in enumerate(contexts):
        if shared_cx.abstract_syntax in wanted and shared_cx.abstract_syntax in STORAGE_SOP_CLASSES:
            cx = contexts[index] = own_copy(shared_cx)
            cx.scu_role = True
            cx.scp_role = True
            # list(): pynetdicom's setter is typed list[str | bytes | UID], and a list is invariant
            cx.transfer_syntax = list(_retrieve_order(cx.transfer_syntax, proposed.get(str(cx.abstract_syntax), [])))
    event.assoc.acceptor.supported_contexts = contexts


def _retrieve_order(ours: list[UID], theirs: list[UID]) -> list[UID]:
    first = [ts for ts in UNCOMPRESSED_TARGETS if ts in theirs and ts in ours]
    then = [ts for ts in theirs if ts in ours and ts not in first]
    return first + then + [ts for ts in ours if ts not in first and ts not in then]


@audited_stream("dimse.c-get")
def handle_get(event: evt.Event, ctx: AppContext, sender: StoredObjectSender) -> Iterator[Any]:
    model = GET_MODELS[str(event.context.abstract_syntax)]
    refusal, retrieve = prepare(event, ctx, model)
    if refusal is not None or retrieve is None:
        yield from refuse(refusal or failure(UNABLE_TO_PROCESS, "retrieve could not be planned"))
        return
    sender.install(event.assoc)
    yield retrieve.count
    yield from sub_operations(event, ctx, retrieve)


def contexts(ctx: AppContext) -> list[tuple[str, list[str]]]:
    """The GET models, and the storage SOP classes the C-STOREs go out in (also the Storage SCP's)."""
    all_syntaxes = [str(ts) for ts in AllTransferSyntaxes]
    return ([(uid, UNCOMPRESSED) for uid in GET_MODELS]
            + [(uid, all_syntaxes) for uid in sorted(STORAGE_SOP_CLASSES)])


def handlers(ctx: AppContext, ingestor: Ingestor) -> list[tuple]:
    sender = StoredObjectSender(ctx)
    return [(evt.EVT_REQUESTED, accept_storage_scp_role), (evt.EVT_C_GET, handle_get, [ctx, sender])]
