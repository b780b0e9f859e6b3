"""Association policy (SPEC §5): who may open an association for which DICOM services.

Pure decision logic, independent of pynetdicom and of the database; ``dicom_scp.policy`` applies it
to an association request before any presentation context is negotiated, with the AE as the
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

The limits that keep hostile peers from exhausting the server (SPEC §7) are decided here too:
association limits in all and per peer address (``LiveAssociations``, ``association_limit``),
connection admission (``connection_limits``, ``admit_connection``) and PDU length bounds
(``pdu_length_error``); ``dicom_scp.server`` and ``dicom_scp.policy`` apply them.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Callable, Hashable, Iterable
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


# -- association and connection limits (SPEC §7: bad input never crashes a server) ----------------

REJECT_LOCAL_LIMIT = (2, 3, 2)  # rejected-transient / service-provider (presentation) / local-limit-exceeded
MAX_CONTROL_PDU_BYTES = 1024 * 1024  # A-ASSOCIATE, A-RELEASE, A-ABORT: far above any real one
CONNECTIONS_PER_ASSOCIATION_SLOT = 2  # open connections (negotiating or idle) allowed per association slot
_PDU_TYPES = {0x01: "A-ASSOCIATE-RQ", 0x02: "A-ASSOCIATE-AC", 0x03: "A-ASSOCIATE-RJ", 0x04: "P-DATA-TF",
              0x05: "A-RELEASE-RQ", 0x06: "A-RELEASE-RP", 0x07: "A-ABORT"}


def association_limit(peer_live: int, total_live: int, *, per_peer: int, total: int, peer: str = "") -> Decision:
    """Accept one more association when the peer and the whole server are both under their limits.

    ``peer_live`` and ``total_live`` count the associations already live (not this one). Over a limit:
    A-ASSOCIATE-RJ (2, 3, 2), rejected-transient, local limit exceeded (the peer may try again later).
    """
    if total_live >= total:
        return Decision(False, f"{total_live} associations open, the limit is {total}", REJECT_LOCAL_LIMIT)
    if peer_live >= per_peer:
        return Decision(False, f"{peer_live} associations open from {peer or 'this peer'}, the per-peer limit "
                        f"is {per_peer}", REJECT_LOCAL_LIMIT)
    return Decision(True, "")


def connection_limits(max_associations: int, max_associations_per_peer: int) -> tuple[int, int]:
    """How many TCP connections (negotiating, idle or associated) are admitted: (total, per peer).

    Twice the association limits: a peer over its association limit still gets a clear
    A-ASSOCIATE-RJ, while a flood of connections that never associate (each costs two threads and
    a copy of the presentation contexts until the ACSE timeout) is dropped at accept.
    """
    return (CONNECTIONS_PER_ASSOCIATION_SLOT * max_associations,
            CONNECTIONS_PER_ASSOCIATION_SLOT * max_associations_per_peer)


def admit_connection(peer_open: int, total_open: int, *, per_peer: int, total: int) -> str:
    """'' to accept a new TCP connection, else why it is closed at once (limits from connection_limits)."""
    if total_open >= total:
        return f"{total_open} connections open, the limit is {total}"
    if peer_open >= per_peer:
        return f"{peer_open} connections open from this peer, the limit is {per_peer}"
    return ""


def pdu_length_error(pdu_type: int, length: int, max_pdu_length: int) -> str:
    """'' when a PDU of this type may be this long, else why the association is aborted.

    A P-DATA-TF PDU may not exceed the maximum length we announced (PS3.8 D.1: the length of its
    variable field; 0 means unlimited); other PDUs are small, bounded by MAX_CONTROL_PDU_BYTES. The
    check is made on the 6-byte header, before any of the claimed bytes are read.
    """
    if pdu_type not in _PDU_TYPES:
        return f"unknown PDU type 0x{pdu_type:02X}"
    if pdu_type == 0x04:
        if max_pdu_length and length > max_pdu_length:
            return f"P-DATA-TF PDU of {length} bytes exceeds the negotiated maximum {max_pdu_length}"
        return ""
    if length > MAX_CONTROL_PDU_BYTES:
        return f"{_PDU_TYPES[pdu_type]} PDU of {length} bytes exceeds {MAX_CONTROL_PDU_BYTES}"
    return ""


def peer_key(address: str) -> str:
    """The peer address that limits are counted by ('::ffff:10.0.0.5' is '10.0.0.5')."""
    return _normal_address(str(address or ""))


class LiveAssociations:
    """Thread-safe register of live associations by peer address, for the association limits.

    ``try_acquire`` checks the limits and registers an association in one step (two requests
    racing for the last slot cannot both get it). An association leaves with ``release`` (called
    on release, abort and connection close, any number of times); ``is_alive`` lets a register
    that missed those events drop associations whose thread has ended.
    """

    def __init__(self, is_alive: Callable[[Hashable], bool] | None = None) -> None:
        self._lock = threading.Lock()
        self._peers: dict[Hashable, str] = {}
        self._is_alive = is_alive

    def try_acquire(self, token: Hashable, address: str, *, per_peer: int, total: int, verified: bool = True,
                    reserved: int = 0) -> Decision:
        """``verified``: a registered AE that proved who it is; the last ``reserved`` slots are kept for those,
        so peers nobody registered cannot lock the hospital's modalities out by filling every slot."""
        peer = peer_key(address)
        with self._lock:
            if self._is_alive is not None:
                for stale in [t for t in self._peers if t is not token and not self._is_alive(t)]:
                    del self._peers[stale]
            others = {t: p for t, p in self._peers.items() if t is not token}
            limit = total if verified else max(total - reserved, 0)
            decision = association_limit(sum(1 for p in others.values() if p == peer), len(others),
                                         per_peer=per_peer, total=limit, peer=peer)
            if decision.accept:
                self._peers[token] = peer
            return decision

    def release(self, token: Hashable) -> None:
        with self._lock:
            self._peers.pop(token, None)

    def count(self, address: str | None = None) -> int:
        with self._lock:
            if address is None:
                return len(self._peers)
            peer = peer_key(address)
            return sum(1 for p in self._peers.values() if p == peer)
