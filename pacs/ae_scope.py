"""Which studies and orders a DICOM peer may see: the facility scope of HTTP, applied to AEs.

HTTP filters every read with :func:`pacs.security.access.study_condition` of the principal's
:class:`~pacs.security.principal.AccessScope`; the DIMSE services (C-FIND, C-MOVE, C-GET, Modality
Worklist, MPPS, Storage Commitment) use the same condition with the scope :func:`ae_scope` gives
the calling AE, as the registry (:mod:`pacs.aes`) knows it:

================================  ====================================================================
registered with ``--archive-wide``  every study and order (a province-level node, a teaching archive)
registered with ``--facility F``    studies of F and studies shared with F (``pacs share add``); F's orders
registered with neither             nothing: a store-only modality or a forwarding destination (``pacs ae
                                    add`` refuses query/retrieve rights without one of the two flags)
not registered, or failing its      nothing (the association policy already refuses query, retrieve and
host check                          the N-services to such a peer; this is the second lock)
================================  ====================================================================

A study outside the scope is answered exactly like one that does not exist: no C-FIND match, no
sub-operations, ``No such object instance`` in a commitment report, an unknown order for MPPS.
"""

from __future__ import annotations

from pacs.aes import AERecord, AERegistry, MoveDestination
from pacs.security.principal import UNRESTRICTED, AccessScope

#: The scope that matches no study and no order (``facility IN ()``).
NO_STUDIES = AccessScope(facilities=frozenset())


def ae_scope(record: AERecord | None) -> AccessScope:
    """The studies (and orders) the AE ``record`` may see; ``None`` (an unknown peer) sees nothing."""
    if record is None:
        return NO_STUDIES
    if record.archive_wide:
        return UNRESTRICTED
    facility = record.facility.strip()
    if facility:
        return AccessScope(facilities=frozenset({facility}))
    return NO_STUDIES


def destination_scope(destination: MoveDestination) -> AccessScope:
    """The studies a C-MOVE may send to ``destination``: those it could retrieve itself. A move by a peer of
    facility A to a node registered for facility B sends only A's studies shared with B (issue 12: the same
    facility scope over DICOM as over HTTP; a move must not carry a study to a facility that may not see it)."""
    if destination.archive_wide:
        return UNRESTRICTED
    facility = destination.facility.strip()
    return AccessScope(facilities=frozenset({facility})) if facility else NO_STUDIES


def needs_scope_flag(allow_query: bool, allow_retrieve: bool, facility: str, archive_wide: bool) -> str:
    """'' when the registration says whose studies the AE may query and retrieve, else why not.

    ``pacs ae add`` asks for exactly one of ``--facility`` and ``--archive-wide`` when the AE gets
    query or retrieve rights (a C-MOVE destination has retrieve rights too); a store-only AE may have
    neither (it then queries nothing).
    """
    if facility.strip() and archive_wide:
        return "give either --facility or --archive-wide, not both"
    if (allow_query or allow_retrieve) and not facility.strip() and not archive_wide:
        return ("an AE with query or retrieve rights needs --facility FACILITY (its facility's studies and "
                "orders) or --archive-wide (every facility's); --no-query --no-retrieve for a store-only AE")
    return ""


def calling_scope(registry: AERegistry, calling_ae: str, peer_address: str) -> AccessScope:
    """The scope of the peer at ``peer_address`` calling as ``calling_ae``, the host check included.

    Raises :class:`~pacs.errors.IndexUnavailable` when the registry cannot be read (each service
    answers that with its own status; none falls back to a wider scope).
    """
    return ae_scope(registry.calling_peer(calling_ae, peer_address))
