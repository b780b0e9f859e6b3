"""Checks each association request before negotiation: the association limits (pacs.association_limits)
and which services the calling AE may use (pacs.ae_access).

Bound to ``EVT_REQUESTED``, which pynetdicom triggers once the A-ASSOCIATE-RQ has been read and
before it negotiates anything; a handler may answer with an A-ASSOCIATE-RJ there (see
``Association.run_reactor``). Refused abstract syntaxes are removed from this association's own
copy of the supported contexts, so negotiation rejects those presentation contexts.

The handler fails closed: if the registry cannot be read or anything goes wrong, a request
for anything but Verification and Storage is rejected (transient), while Verification and
Storage go on (C-STORE then reports an unavailable index with its own status).

Before any of that, the association limits (``PACS_MAX_ASSOCIATIONS`` in all and
``PACS_MAX_ASSOCIATIONS_PER_PEER`` from one address) are checked against the register of live
associations; over a limit the request gets A-ASSOCIATE-RJ (2, 3, 2) local limit exceeded.
``on_association_end`` takes an association out of the register when it is released or aborted
or its connection closes.

A registered AE title counts only when the peer proves to be that AE (host check, TLS client
certificate: ``pacs.ae_access.identity_mismatch``); the certificate is read from the TLS socket
here and set as :data:`pacs.aes.association_certificate` for this association's thread, where every
later registry question of its DIMSE services finds it. The first time a registered title calls
from an address it is audited and logged (``pacs.ae_sightings``), whatever the decision.
"""

from __future__ import annotations

import logging

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT, A_RELEASE

from dicom_scp import audit as dimse_audit
from dicom_scp.tls import peer_certificate
from pacs import ae_access
from pacs.ae_access import Decision, PeerCertificate
from pacs.ae_sightings import sightings_of
from pacs.aes import AERecord, AERegistry, association_certificate
from pacs.association_limits import LiveAssociations
from pacs.context import AppContext

log = logging.getLogger("dicom_scp")

# On the association (its __dict__): the AE registered under its calling title as read at EVT_REQUESTED (None:
# none); absent when the registry was not read. The storage service's sender comes from it (storage_service._source).
REGISTERED = "_pacs_registered"


def on_requested(event: evt.Event, ctx: AppContext, live: LiveAssociations | None = None) -> None:
    assoc = event.assoc
    request = assoc.requestor.primitive
    calling_ae = str(getattr(request, "calling_ae_title", "") or "").strip()
    address = str(assoc.requestor.address or "")
    certificate = peer_certificate(assoc)
    association_certificate.set(certificate)  # this thread serves this association only (pacs.aes)
    assert request is not None  # the A-ASSOCIATE request this event is about
    syntaxes = [str(cx.abstract_syntax) for cx in (request.presentation_context_definition_list or [])]
    decision, registered, looked_up = _decide(ctx, calling_ae, address, syntaxes, certificate)
    if looked_up:  # the storage service's sender for this association, without reading the registry again
        assoc.__dict__[REGISTERED] = registered
    if registered is not None:
        _note_sighting(ctx, registered, address, decision)
    if live is not None:
        verified = registered is not None and decision.accept and not decision.not_the_ae \
            and (registered.check_host or bool(registered.tls_subject))
        limit = live.try_acquire(assoc, address, per_peer=ctx.settings.max_associations_per_peer,
                                 total=ctx.settings.max_associations, verified=verified,
                                 reserved=ctx.settings.dicom_reserved_associations)
        if not limit.accept:
            assert limit.reject is not None
            log.warning("association from %s@%s rejected %s: local limit exceeded: %s", calling_ae, address,
                        limit.reject, limit.reason)
            _reject(assoc, limit.reject)
            return
    if not decision.accept:
        assert decision.reject is not None
        log.warning("association from %s@%s rejected %s: %s", calling_ae, address, decision.reject, decision.reason)
        dimse_audit.association_rejected(ctx, assoc, calling_ae, decision.reason, decision.reject)
        if live is not None:
            live.release(assoc)
        _reject(assoc, decision.reject)
        return
    if decision.refused:
        log.info("association from %s@%s: %d presentation context(s) refused: %s", calling_ae, address,
                 len(decision.refused), decision.reason)
        assoc.acceptor.supported_contexts = [
            cx for cx in assoc.acceptor.supported_contexts if str(cx.abstract_syntax) not in decision.refused
        ]


def on_association_end(event: evt.Event, live: LiveAssociations) -> None:
    """Bound to EVT_RELEASED, EVT_ABORTED, EVT_CONN_CLOSE and EVT_ACSE_RECV: the association's slot is
    free again. On EVT_ACSE_RECV only for an A-RELEASE or A-ABORT from the peer, which arrives before
    our A-RELEASE-RP is sent, so a peer that opens a new association right after the release
    finds its slot free."""
    if event.event is evt.EVT_ACSE_RECV and not isinstance(getattr(event, "primitive", None),
                                                           A_RELEASE | A_ABORT | A_P_ABORT):
        return
    live.release(event.assoc)


def _decide(ctx: AppContext, calling_ae: str, address: str, syntaxes: list[str],
            certificate: PeerCertificate | None) -> tuple[Decision, AERecord | None, bool]:
    """The decision, the AE registered under the calling title (None: unregistered, or not looked up), and whether
    the registry was read."""
    try:
        if not ae_access.needs_registry(syntaxes):
            return Decision(True, ""), None, False
        registered = AERegistry(ctx.read_sessions).get(calling_ae)
        return ae_access.decide(calling_ae, address, syntaxes, registered, certificate=certificate,
                                accept_unknown_store_aes=ctx.settings.accept_unknown_store_aes), registered, True
    except Exception as exc:  # the registry is unreadable (or a bug): never fail open for query/retrieve
        try:
            open_only = ae_access.only_open_services(syntaxes)
        except Exception:
            open_only = False
        if open_only:
            log.warning("association policy for %s@%s not checked (%s): verification/storage only, accepted",
                        calling_ae, address, exc)
            return Decision(True, ""), None, False
        return Decision(False, f"AE registry unavailable: {exc}", ae_access.REJECT_TRANSIENT), None, False


def _note_sighting(ctx: AppContext, registered: AERecord, address: str, decision: Decision) -> None:
    """Audit a registered title calling from a new address; never in the way of the association."""
    try:
        sightings_of(ctx).note(registered.ae_title, address, recognized=not decision.not_the_ae,
                               reason=decision.not_the_ae)
    except Exception:
        log.exception("AE %s seen from %s: the sighting could not be noted", registered.ae_title, address)


def _reject(assoc: Association, reason: tuple[int, int, int]) -> None:
    """What pynetdicom's own acceptor does when it rejects (ACSE._negotiate_as_acceptor)."""
    assoc.acse.send_reject(*reason)
    evt.trigger(assoc, evt.EVT_REJECTED, {})
    assoc.kill()
