"""Association policy (SPEC §5): who may open an association for which DICOM services.

Pure decision logic, independent of pynetdicom; ``dicom_scp.policy`` applies it to an
association request before any presentation context is negotiated.

The rules, per requested abstract syntax:

========================  ==================================================================
Verification              anyone
Storage (C-STORE)         a registered AE with allow_store; an unregistered one when
                          ``accept_unknown_store_aes`` (the default)
Query (FIND, worklist)    a registered AE with allow_query
Retrieve (MOVE, GET)      a registered AE with allow_retrieve
anything else             a registered AE (MPPS, Storage Commitment, future N-services)
========================  ==================================================================

A registered AE with ``check_host`` counts as registered only when the peer address is (or
resolves from) its registered host; otherwise it is treated as an unknown AE.

Outcome:

- an unknown AE asking for anything beyond Verification and Storage: the association is
  rejected, (1, 1, 3) rejected-permanent / service-user / calling AE title not recognized;
- otherwise, if no requested abstract syntax is permitted: rejected, (1, 1, 3) for an unknown
  AE, (1, 1, 1) no-reason-given for a registered AE that lacks the permission;
- otherwise accepted, with the abstract syntaxes it may not use refused (their presentation
  contexts are rejected: "abstract syntax not supported"), so a modality registered without
  query rights can still store and echo on an association that also proposes C-FIND.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from pydicom.uid import UID
from sqlalchemy import select
from sqlalchemy.orm import Session

from pacs.db.models import ApplicationEntity

VERIFICATION_UID = "1.2.840.10008.1.1"

REJECT_CALLING_AE_NOT_RECOGNIZED = (1, 1, 3)
REJECT_NO_REASON = (1, 1, 1)
REJECT_TRANSIENT = (2, 1, 1)  # the registry could not be read: try again later


class Service(StrEnum):
    VERIFICATION = "verification"
    STORE = "store"
    QUERY = "query"
    RETRIEVE = "retrieve"
    OTHER = "other"  # needs a registered AE


@dataclass(frozen=True)
class RegisteredAE:
    ae_title: str
    host: str
    allow_store: bool = True
    allow_query: bool = True
    allow_retrieve: bool = True
    check_host: bool = False


@dataclass(frozen=True)
class Decision:
    accept: bool
    reason: str  # for the log: why rejected, or what was refused
    reject: tuple[int, int, int] | None = None  # (result, source, diagnostic) of A-ASSOCIATE-RJ
    refused: frozenset[str] = field(default_factory=frozenset)  # abstract syntaxes whose contexts are refused


def service_of(abstract_syntax: str) -> Service:
    """Which permission an abstract syntax needs (classified with pynetdicom's service classes)."""
    from pynetdicom.sop_class import uid_to_service_class

    uid = str(abstract_syntax).strip()
    if uid == VERIFICATION_UID:
        return Service.VERIFICATION
    service_class = uid_to_service_class(uid).__name__
    if service_class in ("StorageServiceClass", "NonPatientObjectStorageServiceClass"):
        return Service.STORE
    if service_class == "BasicWorklistManagementServiceClass":
        return Service.QUERY
    if service_class.endswith("QueryRetrieveServiceClass"):
        name = UID(uid).name.upper()
        if "- FIND" in name:
            return Service.QUERY
        if "- MOVE" in name or "- GET" in name:
            return Service.RETRIEVE
    return Service.OTHER


def lookup(session: Session, ae_title: str) -> RegisteredAE | None:
    row = session.scalars(select(ApplicationEntity).where(ApplicationEntity.ae_title == ae_title.strip())).first()
    if row is None:
        return None
    return RegisteredAE(row.ae_title, row.host, row.allow_store, row.allow_query, row.allow_retrieve,
                        row.check_host)


def needs_registry(abstract_syntaxes: Iterable[str]) -> bool:
    """False when the request asks for Verification only (no registry look-up needed)."""
    return any(service_of(a) is not Service.VERIFICATION for a in abstract_syntaxes)


def only_open_services(abstract_syntaxes: Iterable[str]) -> bool:
    """True when the request asks only for Verification and Storage (what unknown AEs may use)."""
    return all(service_of(a) in (Service.VERIFICATION, Service.STORE) for a in abstract_syntaxes)


def decide(
    calling_ae: str,
    peer_address: str,
    abstract_syntaxes: Iterable[str],
    registered: RegisteredAE | None,
    *,
    accept_unknown_store_aes: bool = True,
    resolve: Callable[[str], set[str]] | None = None,
) -> Decision:
    """Accept, accept with some abstract syntaxes refused, or reject an association request."""
    calling_ae = calling_ae.strip()
    syntaxes = list(dict.fromkeys(str(a).strip() for a in abstract_syntaxes))
    services = {a: service_of(a) for a in syntaxes}
    ae, why_unknown = registered, f"calling AE title {calling_ae!r} not recognized"
    if ae is not None and ae.check_host and not host_matches(ae.host, peer_address, resolve):
        ae, why_unknown = None, f"AE {calling_ae!r} connects from {peer_address}, registered for host {ae.host!r}"

    if ae is None:
        restricted = sorted({s.value for s in services.values()} - {Service.VERIFICATION, Service.STORE})
        if restricted:
            return Decision(False, f"{why_unknown}: asks for {', '.join(restricted)}",
                            REJECT_CALLING_AE_NOT_RECOGNIZED)
        permitted = {Service.VERIFICATION, Service.STORE} if accept_unknown_store_aes else {Service.VERIFICATION}
    else:
        permitted = {Service.VERIFICATION, Service.OTHER}
        permitted |= {s for s, ok in ((Service.STORE, ae.allow_store), (Service.QUERY, ae.allow_query),
                                      (Service.RETRIEVE, ae.allow_retrieve)) if ok}

    refused = frozenset(a for a, s in services.items() if s not in permitted)
    refused_services = ", ".join(sorted({services[a].value for a in refused}))
    if syntaxes and len(refused) == len(syntaxes):
        if ae is None:
            return Decision(False, f"{why_unknown}: storage from unknown AEs is disabled",
                            REJECT_CALLING_AE_NOT_RECOGNIZED)
        return Decision(False, f"AE {calling_ae!r} may not use {refused_services}", REJECT_NO_REASON)
    reason = f"AE {calling_ae!r} may not use {refused_services}" if refused else ""
    return Decision(True, reason, refused=refused)


def host_matches(registered_host: str, peer_address: str, resolve: Callable[[str], set[str]] | None = None) -> bool:
    """Is ``peer_address`` the registered host (an address, or a name resolving to it)?"""
    host = registered_host.strip()
    peer = _normal_address(peer_address)
    if not host or not peer:
        return False
    if _normal_address(host) == peer:
        return True
    try:
        ipaddress.ip_address(host)
        return False  # a literal address that differs
    except ValueError:
        pass
    addresses = (resolve or _resolve)(host)
    return peer in {_normal_address(a) for a in addresses}


def _normal_address(address: str) -> str:
    """'::ffff:10.0.0.5' and '10.0.0.5' are the same peer; names are left as they are (lower case)."""
    text = address.strip().strip("[]")
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return text.lower()
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def _resolve(host: str) -> set[str]:
    try:
        return {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except OSError:
        return set()
