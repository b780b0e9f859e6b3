"""The DICOM admission limits kept across several receiving processes (``PACS_DICOM_PROCESSES``, issue 13).

With one receiving process the limits live in that process (:class:`pacs.association_limits.LiveAssociations`,
:class:`pacs.connection_budget.PreAssociationBudget`, ``dicom_scp.server.ConnectionGuard``). With several, the
processes accept from one listening socket (``pacs.receiving_processes``), and each limit must still hold for the
whole server: ``PACS_MAX_ASSOCIATIONS`` in all and per peer, the connection limits (twice those) and the budget of
connections that have not associated yet.

They share one table in shared memory (:class:`SharedLimits`, made by the supervising process before it starts
the receiving ones, ``pacs.receiving_processes``), guarded by one cross-process lock. A row is one holding of one
process: ``(pid, kind, peer, a, b)``, the peer as a 63-bit hash of its address (no address is ever compared
by hash only within one process: the local registers keep the addresses):

- ``ASSOC``: one live association (``a``: its local token);
- ``UNASSOC``: one connection that has not associated yet (``a``: its local token, ``b``: its arrival order);
  ``EVICT`` is such a row another process chose to make room for a newcomer: its owner closes the connection
  (its reaper looks every 0.1 s) and frees the row; it no longer counts;
- ``CONN``: how many connections a process has open from a peer (a snapshot the process publishes whenever it
  admits one, and every 0.1 s from its reaper: a closed connection frees its slot for the others within that,
  at once for its own process).

Every decision is made under the lock on the whole table, and the deciding process writes its new holding before
letting go, so two processes cannot both take the last slot. When a receiving process dies, its supervisor drops
its rows (:meth:`SharedLimits.purge`).
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import threading
from collections import Counter
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import Any

from pacs.ae_access import Decision, peer_key
from pacs.association_limits import LiveAssociations, association_limit, connection_limits
from pacs.connection_budget import Admission, PreAssociationBudget, _Entry

log = logging.getLogger("pacs.shared_limits")

FREE, ASSOC, UNASSOC, EVICT, CONN = 0, 1, 2, 3, 4
FIELDS = 5  # pid, kind, peer, a, b
UNKNOWN_PEER = 1  # a trusted proxy's connection whose PROXY header is not read yet: counts in the total only
LOCK_TIMEOUT_S = 5.0


def peer_hash(peer: str) -> int:
    """A 63-bit hash of a peer key (never 0 or UNKNOWN_PEER)."""
    value = int.from_bytes(hashlib.blake2b(peer.encode(), digest_size=8).digest(), "big") >> 1
    return value if value > UNKNOWN_PEER else value + 2


class SharedLimits:
    """The table and its lock; made in the supervisor, handed to each receiving process when it is started."""

    def __init__(self, capacity: int, mp_context: Any | None = None) -> None:
        mp = mp_context or multiprocessing.get_context("spawn")
        self.capacity = capacity
        # a plain lock (any process may release it: the supervisor frees one a killed holder left), re-entered in
        # a thread by counting (the association guard takes it around the connection budget's use of it)
        self.lock = mp.Lock()
        self._held = threading.local()
        self.table = mp.RawArray("q", capacity * FIELDS)
        self.seq = mp.RawValue("q", 0)

    @classmethod
    def for_settings(cls, settings: Any, processes: int, mp_context: Any | None = None) -> SharedLimits:
        """Room for every holding the limits allow: each process's connection snapshot, every association,
        every unassociated connection (and some slack)."""
        total, _ = connection_limits(settings.max_associations, settings.max_associations_per_peer)
        unassociated = settings.dicom_max_unassociated or settings.max_associations
        return cls(processes * (total + 2) + settings.max_associations + 2 * unassociated + 16, mp_context)

    def __getstate__(self) -> dict[str, Any]:  # pickled only to a spawned process (multiprocessing's rule)
        return {k: v for k, v in self.__dict__.items() if k != "_held"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._held = threading.local()

    @contextmanager
    def locked(self) -> Iterator[None]:
        depth = getattr(self._held, "depth", 0)
        if depth == 0 and not self.lock.acquire(timeout=LOCK_TIMEOUT_S):  # a holder died in the lock
            raise TimeoutError("the shared DICOM limits are locked")
        self._held.depth = depth + 1
        try:
            yield
        finally:
            self._held.depth = depth
            if depth == 0:
                self.lock.release()

    # -- rows (call with the lock held) ---------------------------------------------------------------------

    def rows(self) -> list[tuple[int, int, int, int, int, int]]:
        """Every used row as (index, pid, kind, peer, a, b)."""
        flat = self.table[:]
        return [(i, *flat[i * FIELDS:(i + 1) * FIELDS]) for i in range(self.capacity)
                if flat[i * FIELDS + 1] != FREE]

    def insert(self, kind: int, peer: int, a: int = 0, b: int = 0) -> int | None:
        for i in range(self.capacity):
            if self.table[i * FIELDS + 1] == FREE:
                self.table[i * FIELDS:(i + 1) * FIELDS] = [os.getpid(), kind, peer, a, b]
                return i
        log.error("the shared DICOM limits table is full (%d rows)", self.capacity)
        return None

    def clear(self, index: int) -> None:
        self.table[index * FIELDS:(index + 1) * FIELDS] = [0, FREE, 0, 0, 0]

    def kind_of(self, index: int) -> int:
        return int(self.table[index * FIELDS + 1])

    def next_seq(self) -> int:
        self.seq.value += 1
        return int(self.seq.value)

    # -- for the supervisor -----------------------------------------------------------------------------------

    def purge(self, pid: int) -> int:
        """Drop every row of a process that ended; how many there were. A process killed inside the lock
        (a few microseconds of table work) would leave it held: after the timeout it is released once."""
        if not self.lock.acquire(timeout=LOCK_TIMEOUT_S):
            log.error("the shared DICOM limits were left locked by process %d: released", pid)
            self.lock.release()  # the dead holder's (a multiprocessing Lock may be released by any process)
            self.lock.acquire()
        try:
            dropped = 0
            for index, row_pid, *_ in self.rows():
                if row_pid == pid:
                    self.clear(index)
                    dropped += 1
            return dropped
        finally:
            self.lock.release()

    def count(self, kind: int) -> int:
        with self.locked():
            return sum(1 for row in self.rows() if row[2] == kind)

    # -- connection snapshots (ConnectionGuard) ---------------------------------------------------------------

    def publish_connections(self, open_by_peer: Counter[str], awaiting_header: int) -> None:
        """Replace this process's CONN rows (lock held)."""
        me = os.getpid()
        for index, pid, kind, *_ in self.rows():
            if pid == me and kind == CONN:
                self.clear(index)
        counts: Counter[int] = Counter()
        for peer, n in open_by_peer.items():
            if n > 0:
                counts[peer_hash(peer)] += n
        if awaiting_header > 0:
            counts[UNKNOWN_PEER] += awaiting_header
        for peer_h, n in counts.items():
            self.insert(CONN, peer_h, n)

    def other_connections(self, peer: str) -> tuple[int, int]:
        """Connections other processes have open: (from ``peer``, in all) (lock held)."""
        me, wanted = os.getpid(), peer_hash(peer)
        from_peer = total = 0
        for _, pid, kind, peer_h, a, _ in self.rows():
            if kind == CONN and pid != me:
                total += a
                if peer_h == wanted:
                    from_peer += a
        return from_peer, total


class SharedLiveAssociations(LiveAssociations):
    """:class:`LiveAssociations` whose limits count the associations of every receiving process."""

    def __init__(self, shared: SharedLimits, is_alive: Callable[[Hashable], bool] | None = None) -> None:
        super().__init__(is_alive)
        self.shared = shared
        self._rows: dict[Hashable, int] = {}

    def try_acquire(self, token: Hashable, address: str, *, per_peer: int, total: int, verified: bool = True,
                    reserved: int = 0) -> Decision:
        peer = peer_key(address)
        wanted, me = peer_hash(peer), os.getpid()
        with self.shared.locked(), self._lock:
            if self._is_alive is not None:
                for stale in [t for t in self._peers if t is not token and not self._is_alive(t)]:
                    self._drop_locked(stale)
            own = self._rows.get(token)
            others = [row for row in self.shared.rows() if row[2] == ASSOC and not (row[1] == me and row[0] == own)]
            limit = total if verified else max(total - reserved, 0)
            decision = association_limit(sum(1 for row in others if row[3] == wanted), len(others),
                                         per_peer=per_peer, total=limit, peer=peer)
            if decision.accept and own is None:
                index = self.shared.insert(ASSOC, wanted, id(token) & 0x7FFFFFFFFFFFFFFF)
                if index is None:
                    return Decision(False, "the shared limits table is full", decision.reject)
                self._rows[token] = index
            if decision.accept:
                self._peers[token] = peer
            return decision

    def release(self, token: Hashable) -> None:
        with self.shared.locked(), self._lock:
            self._drop_locked(token)

    def _drop_locked(self, token: Hashable) -> None:
        self._peers.pop(token, None)
        index = self._rows.pop(token, None)
        if index is not None:
            self.shared.clear(index)

    def count(self, address: str | None = None) -> int:
        with self.shared.locked():
            rows = [row for row in self.shared.rows() if row[2] == ASSOC]
        if address is None:
            return len(rows)
        wanted = peer_hash(peer_key(address))
        return sum(1 for row in rows if row[3] == wanted)


class SharedPreAssociationBudget(PreAssociationBudget):
    """:class:`PreAssociationBudget` over every receiving process: the per-peer and total counts are the
    server's; the oldest connection of the biggest holder may be another process's (marked ``EVICT``: its
    owner closes it, :meth:`take_evicted`)."""

    def __init__(self, shared: SharedLimits, *, total: int, per_peer: int, timeout_s: float) -> None:
        super().__init__(total=total, per_peer=per_peer, timeout_s=timeout_s)
        self.shared = shared
        self._rows: dict[Hashable, int] = {}
        self._by_row: dict[int, Hashable] = {}

    def admit(self, token: Hashable, peer: str, now: float) -> Admission:
        wanted = peer_hash(peer)
        me = os.getpid()
        with self.shared.locked(), self._lock:
            rows = [row for row in self.shared.rows() if row[2] == UNASSOC]
            by_peer = Counter(row[3] for row in rows)
            if by_peer[wanted] >= self.per_peer:
                return Admission(False, f"{by_peer[wanted]} connections from {peer} have not associated "
                                 f"yet, the limit is {self.per_peer}")
            evict: Hashable | None = None
            reason = evict_peer = ""
            if len(rows) >= self.total:
                top_h, top_count = max(by_peer.items(), key=lambda item: item[1])
                if top_count <= by_peer[wanted] + 1:  # evicting would not make the pool fairer
                    return Admission(False, f"{len(rows)} connections have not associated yet, "
                                     f"the limit is {self.total}")
                victim = min((row for row in rows if row[3] == top_h), key=lambda row: row[5])
                victim_token = self._by_row.get(victim[0]) if victim[1] == me else None
                if victim_token is not None:
                    evict_peer = self._entries[victim_token].peer
                    self._remove_locked(victim_token)
                    evict = victim_token
                else:  # another process's: it closes the connection
                    self.shared.table[victim[0] * FIELDS + 1] = EVICT
                    evict_peer = "another address"
                reason = (f"oldest unassociated connection of {evict_peer} ({top_count} held) closed for a "
                          f"newcomer from {peer}: {len(rows)} unassociated, the limit is {self.total}")
            index = self.shared.insert(UNASSOC, wanted, id(token) & 0x7FFFFFFFFFFFFFFF, self.shared.next_seq())
            if index is None:
                return Admission(False, "the shared limits table is full")
            self._seq += 1
            self._entries[token] = _Entry(peer, now + self.timeout_s, self._seq)
            self._by_peer[peer] += 1
            self._rows[token], self._by_row[index] = index, token
            return Admission(True, reason, evict, evict_peer if evict is not None else "")

    def associated(self, token: Hashable) -> None:
        with self.shared.locked(), self._lock:
            self._remove_locked(token)

    forget = associated

    def _remove_locked(self, token: Hashable) -> None:
        self._remove(token)
        index = self._rows.pop(token, None)
        if index is not None:
            self._by_row.pop(index, None)
            self.shared.clear(index)

    def expired(self, now: float) -> list[tuple[Hashable, str]]:
        with self.shared.locked(), self._lock:
            late = [(t, e.peer) for t, e in self._entries.items() if e.deadline <= now]
            for token, _ in late:
                self._remove_locked(token)
            return late

    def take_evicted(self) -> list[tuple[Hashable, str]]:
        """This process's connections another process evicted (removed here: the caller closes them)."""
        with self.shared.locked(), self._lock:
            gone = [(token, self._entries[token].peer) for token, index in self._rows.items()
                    if self.shared.kind_of(index) == EVICT and token in self._entries]
            for token, _ in gone:
                self._remove_locked(token)
            return gone

    def count(self, peer: str | None = None) -> int:
        with self.shared.locked():
            rows = [row for row in self.shared.rows() if row[2] == UNASSOC]
        if peer is None:
            return len(rows)
        wanted = peer_hash(peer)
        return sum(1 for row in rows if row[3] == wanted)
