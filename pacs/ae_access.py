"""Which AE may open an association for which DICOM services, and whether a peer proves to be that AE (SPEC §5).

Pure decision logic, independent of pynetdicom and of the database; ``dicom_scp.association_checks``
applies it to an association request before any presentation context is negotiated, with the AE as the
registry (:mod:`pacs.aes`) knows it.

The rules, per requested abstract syntax:

========================  ==================================================================
Verification              anyone
Storage (C-STORE)         a registered AE with allow_store; an unregistered one when
                          ``accept_unknown_store_aes`` (the default)
Query (FIND, worklist)    a registered AE with allow_query
Retrieve (MOVE, GET)      a registered AE with allow_retrieve
anything else             a registered AE (MPPS, Storage Commitment, future N-services)
========================  ==================================================================

A registered AE counts as registered only when the peer proves to be it (:func:`identity_mismatch`):
with ``check_host`` (the default of ``pacs ae add``) the peer address is (or resolves from) its
registered host; with a ``tls_subject`` the association came over TLS with a verified client
certificate of that identity (:func:`certificate_matches`). Otherwise it is treated as an unknown AE.

Outcome:

- an unknown AE asking for anything beyond Verification and Storage: the association is
  rejected, (1, 1, 3) rejected-permanent / service-user / calling AE title not recognized;
- otherwise, if no requested abstract syntax is permitted: rejected, (1, 1, 3) for an unknown
  AE, (1, 1, 1) no-reason-given for a registered AE that lacks the permission;
- otherwise accepted, with the abstract syntaxes it may not use refused (their presentation
  contexts are rejected: "abstract syntax not supported"), so a modality registered without
  query rights can still store and echo on an association that also proposes C-FIND.

The limits that keep hostile peers from exhausting the server (SPEC §7) are in
:mod:`pacs.association_limits`.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Protocol

from pydicom.uid import UID

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


class PeerRights(Protocol):
    """What the policy needs to know of a registered AE (:class:`pacs.aes.AERecord` is one)."""

    @property
    def ae_title(self) -> str: ...
    @property
    def host(self) -> str: ...
    @property
    def allow_store(self) -> bool: ...
    @property
    def allow_query(self) -> bool: ...
    @property
    def allow_retrieve(self) -> bool: ...
    @property
    def check_host(self) -> bool: ...
    @property
    def tls_subject(self) -> str: ...


@dataclass(frozen=True)
class RegisteredAE:
    ae_title: str
    host: str
    allow_store: bool = True
    allow_query: bool = True
    allow_retrieve: bool = True
    check_host: bool = False
    tls_subject: str = ""


@dataclass(frozen=True)
class PeerCertificate:
    """The verified client certificate of a TLS association: what an AE's ``tls_subject`` is matched against."""

    sha256: str  # fingerprint of the DER certificate, lower-case hex without separators
    common_names: tuple[str, ...] = ()  # subject CN(s)
    dns_names: tuple[str, ...] = ()  # subjectAltName DNS entries


@dataclass(frozen=True)
class Decision:
    accept: bool
    reason: str  # for the log: why rejected, or what was refused
    reject: tuple[int, int, int] | None = None  # (result, source, diagnostic) of A-ASSOCIATE-RJ
    refused: frozenset[str] = field(default_factory=frozenset)  # abstract syntaxes whose contexts are refused
    not_the_ae: str = ""  # a registered title the peer did not prove to be (identity_mismatch): why


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
    registered: PeerRights | None,
    *,
    accept_unknown_store_aes: bool = True,
    resolve: Callable[[str], set[str]] | None = None,
    certificate: PeerCertificate | None = None,
) -> Decision:
    """Accept, accept with some abstract syntaxes refused, or reject an association request.

    ``certificate`` is the peer's verified TLS client certificate (None: plain TCP, or none presented).
    """
    calling_ae = calling_ae.strip()
    mismatch = identity_mismatch(registered, peer_address, certificate, resolve) if registered is not None else ""
    if mismatch:
        decision = _decide_for(calling_ae, abstract_syntaxes, None, f"AE {calling_ae!r} {mismatch}",
                               accept_unknown_store_aes)
        return replace(decision, not_the_ae=mismatch)
    return _decide_for(calling_ae, abstract_syntaxes, registered, f"calling AE title {calling_ae!r} not recognized",
                       accept_unknown_store_aes)


def _decide_for(calling_ae: str, abstract_syntaxes: Iterable[str], ae: PeerRights | None, why_unknown: str,
                accept_unknown_store_aes: bool) -> Decision:
    """decide() once it is known whether the peer is a registered AE (``ae``) or an unknown one."""
    syntaxes = list(dict.fromkeys(str(a).strip() for a in abstract_syntaxes))
    services = {a: service_of(a) for a in syntaxes}
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


def identity_mismatch(ae: PeerRights, peer_address: str, certificate: PeerCertificate | None,
                      resolve: Callable[[str], set[str]] | None = None) -> str:
    """'' when the peer may be ``ae``, else why not (then it is an unknown AE, whatever title it calls with).

    Both checks apply when both are registered: the host (``check_host``) and the TLS identity
    (``tls_subject``). An AE with neither is believed from any address (``pacs ae add --no-check-host``).
    """
    if ae.check_host and not host_matches(ae.host, peer_address, resolve):
        return f"connects from {peer_address}, registered for host {ae.host!r}"
    subject = (ae.tls_subject or "").strip()
    if subject:
        if certificate is None:
            return f"is bound to TLS client certificate {subject!r}: none presented"
        if not certificate_matches(subject, certificate):
            return (f"is bound to TLS client certificate {subject!r}: presented CN={','.join(certificate.common_names)}"
                    f" sha256={certificate.sha256[:16]}…")
    return ""


FINGERPRINT_PREFIX = "sha256:"


def normal_tls_subject(subject: str) -> str:
    """The canonical form of an AE's ``tls_subject`` ('' = none), or ValueError when it is not one.

    Either the certificate's SHA-256 fingerprint (64 hex digits, optionally after ``sha256:``; colons and
    case do not matter: ``openssl x509 -noout -fingerprint -sha256`` prints it), or a name the certificate must carry as
    its subject CN or as a subjectAltName DNS entry (compared without regard to case; no wildcards).
    """
    text = subject.strip()
    if not text:
        return ""
    bare = text.replace(":", "").lower()
    if len(bare) == 64 and all(c in "0123456789abcdef" for c in bare):
        return FINGERPRINT_PREFIX + bare  # a fingerprint without its prefix (with or without colons)
    if text.lower().startswith(FINGERPRINT_PREFIX):
        digits = text[len(FINGERPRINT_PREFIX):].replace(":", "").strip().lower()
        if len(digits) != 64 or any(c not in "0123456789abcdef" for c in digits):
            raise ValueError(f"invalid TLS subject {subject!r}: sha256: needs 64 hex digits")
        return FINGERPRINT_PREFIX + digits
    if len(text) > 255 or not text.isprintable() or "*" in text:
        raise ValueError(f"invalid TLS subject {subject!r}: a certificate CN or DNS name (no wildcards), "
                         "or sha256:<fingerprint>")
    return text


def certificate_matches(tls_subject: str, certificate: PeerCertificate) -> bool:
    """Does ``certificate`` carry the identity ``tls_subject`` (see :func:`normal_tls_subject`)?"""
    try:
        subject = normal_tls_subject(tls_subject)
    except ValueError:
        return False
    if not subject:
        return False
    if subject.startswith(FINGERPRINT_PREFIX):
        return certificate.sha256.lower() == subject[len(FINGERPRINT_PREFIX):]
    wanted = subject.lower()
    return any(name.strip().lower() == wanted for name in (*certificate.common_names, *certificate.dns_names))


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


def peer_key(address: str) -> str:
    """The peer address that limits and sightings are counted by ('::ffff:10.0.0.5' is '10.0.0.5')."""
    return _normal_address(str(address or ""))
