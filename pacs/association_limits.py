"""The limits that keep hostile peers from exhausting the DICOM server (SPEC §7: bad input never crashes a server).

Association limits in all and per peer address (:class:`LiveAssociations`, :func:`association_limit`),
admission of TCP connections (:func:`connection_limits`, :func:`admit_connection`) and PDU length bounds
(:func:`pdu_length_error`). Pure decisions; ``dicom_scp.server`` and ``dicom_scp.association_checks``
apply them. Connections that have not associated yet have a budget of their own
(:mod:`pacs.connection_budget`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable

from pacs.ae_access import Decision, peer_key

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
