"""The budget of DICOM connections that have not associated yet (SPEC §7; issue 12, finding 7).

A TCP connection costs the SCP a thread (two once pynetdicom's association thread starts) from the
moment it is accepted, but until its A-ASSOCIATE-RQ is in, nothing is known about it: not its AE
title, not whether it will ever send a byte. Without a budget of their own, such connections shared
the connection limits with working associations, and 64 idle sockets from four addresses locked every
modality out for the ACSE timeout, again and again. The rules, applied by ``dicom_scp.server``:

- a connection is *unassociated* from accept until its whole A-ASSOCIATE-RQ has been read; then it
  leaves this budget, and the association limits and checks (``dicom_scp.association_checks``) take over. So a
  registered, host-checked AE that has associated never counts here, and an unassociated flood can
  take at most ``total`` connections, never the association slots;
- at most ``per_peer`` unassociated connections from one address: more are closed at accept;
- at most ``total`` unassociated connections in all: when full, a newcomer from an address holding
  fewer than the biggest holder replaces the *oldest* unassociated connection of that biggest holder
  (so one address, or a few, cannot keep others out by holding the pool); a newcomer from the biggest
  holder itself (or a tie) is closed;
- each has ``timeout_s`` from accept to finish its A-ASSOCIATE-RQ (and TLS handshake): an absolute
  deadline, so sending one byte now and then does not extend it; past it the connection is closed.

Pure bookkeeping: the caller closes what :meth:`PreAssociationBudget.admit` evicts and what
:meth:`PreAssociationBudget.expired` returns.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass


@dataclass(frozen=True)
class Admission:
    accept: bool
    reason: str = ""  # why the newcomer is closed, or why ``evict`` is
    evict: Hashable | None = None  # a connection to close to make room for the newcomer
    evict_peer: str = ""


@dataclass
class _Entry:
    peer: str
    deadline: float
    seq: int  # arrival order (the oldest has the smallest)


class PreAssociationBudget:
    """Thread-safe register of unassociated connections (tokens) by peer address, with deadlines."""

    def __init__(self, *, total: int, per_peer: int, timeout_s: float) -> None:
        self.total, self.per_peer, self.timeout_s = total, per_peer, timeout_s
        self._lock = threading.Lock()
        self._entries: dict[Hashable, _Entry] = {}
        self._by_peer: Counter[str] = Counter()
        self._seq = 0

    def admit(self, token: Hashable, peer: str, now: float) -> Admission:
        """Register a newly accepted connection, or say why not (and whom to evict for it)."""
        with self._lock:
            if self._by_peer[peer] >= self.per_peer:
                return Admission(False, f"{self._by_peer[peer]} connections from {peer} have not associated "
                                 f"yet, the limit is {self.per_peer}")
            evict: Hashable | None = None
            reason = top_peer = ""
            if len(self._entries) >= self.total:
                top_peer, top_count = max(self._by_peer.items(), key=lambda item: item[1])
                if top_count <= self._by_peer[peer] + 1:  # evicting would not make the pool fairer
                    return Admission(False, f"{len(self._entries)} connections have not associated yet, "
                                     f"the limit is {self.total}")
                evict = min((t for t, e in self._entries.items() if e.peer == top_peer),
                            key=lambda t: self._entries[t].seq)
                reason = (f"oldest unassociated connection of {top_peer} ({top_count} held) closed for a "
                          f"newcomer from {peer}: {len(self._entries)} unassociated, the limit is {self.total}")
                self._remove(evict)
            self._seq += 1
            self._entries[token] = _Entry(peer, now + self.timeout_s, self._seq)
            self._by_peer[peer] += 1
            return Admission(True, reason, evict, top_peer if evict is not None else "")

    def associated(self, token: Hashable) -> None:
        """Its A-ASSOCIATE-RQ is in (or it closed): it leaves the budget. Any number of times."""
        with self._lock:
            self._remove(token)

    forget = associated

    def expired(self, now: float) -> list[tuple[Hashable, str]]:
        """Remove and return the connections past their deadline, with their peers (the caller closes them)."""
        with self._lock:
            late = [(t, e.peer) for t, e in self._entries.items() if e.deadline <= now]
            for token, _ in late:
                self._remove(token)
            return late

    def next_deadline(self) -> float | None:
        with self._lock:
            return min((e.deadline for e in self._entries.values()), default=None)

    def count(self, peer: str | None = None) -> int:
        with self._lock:
            return len(self._entries) if peer is None else self._by_peer[peer]

    def _remove(self, token: Hashable) -> None:
        entry = self._entries.pop(token, None)
        if entry is not None:
            self._by_peer[entry.peer] -= 1
            if self._by_peer[entry.peer] <= 0:
                del self._by_peer[entry.peer]
