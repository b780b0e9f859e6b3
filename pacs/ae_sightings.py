"""An alert when a registered AE title calls from an address it never called from (issue 12 finding 3).

A spoofer posing as a registered AE from another host is refused by the host check, but whoever
watches the archive should learn that someone tried; an AE that moved (DHCP, a new workstation) shows
up the same way before its users complain. So the first time a (registered AE title, peer address)
pair is seen, whatever the association's outcome, this appends an ``ae.new-address`` audit event
(outcome ``success`` when the peer proved to be the AE, ``failure`` when it was treated as unknown)
and logs a WARNING; later associations of the same pair are silent.

Only *registered* titles are tracked: an unregistered title is attacker-chosen and unbounded (every
unknown peer could mint thousands), and it has no rights to steal. The pairs are kept in the
``ae_sighting`` table, at most :data:`MAX_ADDRESSES_PER_AE` per title (the least recently seen are
dropped, so an address dropped long ago alerts again when it comes back), and remembered per process
(:data:`MEMORY` pairs) so that an AE calling all day costs no database write: ``last_seen`` is the
time a process first saw the pair since it started. Two processes seeing a new pair at once write
one row and one event (the unique constraint decides).

Recording never decides anything and never fails an association: if the index cannot be written,
the sighting is logged and tried again at the next association.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from datetime import UTC, datetime

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from pacs import audit
from pacs.ae_access import peer_key
from pacs.audit.dimse import ROLE_AE
from pacs.context import AppContext
from pacs.db.models import AESighting

log = logging.getLogger("pacs.ae_sightings")

ACTION = "ae.new-address"
MAX_ADDRESSES_PER_AE = 64
MEMORY = 4096


class AESightings:
    """The pairs this process already knows are recorded, and the one way to record a new one."""

    def __init__(self, sessions: sessionmaker[Session], memory: int = MEMORY) -> None:
        self._sessions = sessions
        self._memory = memory
        self._known: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._lock = threading.Lock()

    def note(self, ae_title: str, address: str, *, recognized: bool, reason: str = "") -> bool:
        """Record that a peer at ``address`` called as the registered ``ae_title``; True when the pair is new.

        ``recognized``: the peer proved to be that AE (host check, TLS certificate); ``reason`` says why
        not, for the audit detail.
        """
        key = (ae_title.strip()[:16], peer_key(address)[:64])
        if not key[0] or not key[1] or self._remembers(key):
            return False
        try:
            new = self._record(key, recognized, reason)
        except SQLAlchemyError as exc:
            log.warning("AE %s seen from %s, but the sighting could not be recorded: %s", key[0], key[1],
                        (str(exc) or type(exc).__name__).splitlines()[0][:200])
            return False
        self._remember(key)
        if new:
            log.warning("AE title %s called from a new address %s (%s)%s", key[0], key[1],
                        "accepted as that AE" if recognized else "treated as an unknown AE",
                        f": {reason}" if reason else "")
        return new

    def _record(self, key: tuple[str, str], recognized: bool, reason: str) -> bool:
        title, address = key
        now = datetime.now(UTC)
        try:
            with self._sessions() as session, session.begin():
                row = session.scalars(select(AESighting).where(AESighting.ae_title == title,
                                                               AESighting.address == address)).first()
                if row is not None:
                    row.last_seen = now
                    return False
                session.add(AESighting(ae_title=title, address=address, first_seen=now, last_seen=now))
                session.flush()
                _forget_oldest(session, title)
                detail = f"ae={title} address={address} " + ("recognized" if recognized else f"unknown: {reason}")
                audit.append(session, action=ACTION, actor=title, role=ROLE_AE,
                             outcome="success" if recognized else "failure", source_address=address,
                             detail=detail)
            return True
        except IntegrityError:  # another process recorded the same pair first: its event is the one
            return False

    def _remembers(self, key: tuple[str, str]) -> bool:
        with self._lock:
            if key in self._known:
                self._known.move_to_end(key)
                return True
            return False

    def _remember(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._known[key] = None
            while len(self._known) > self._memory:
                self._known.popitem(last=False)


def _forget_oldest(session: Session, title: str) -> None:
    """Keep at most MAX_ADDRESSES_PER_AE addresses for a title: the least recently seen go."""
    count = session.scalar(select(func.count()).select_from(AESighting).where(AESighting.ae_title == title)) or 0
    if count <= MAX_ADDRESSES_PER_AE:
        return
    oldest = select(AESighting.id).where(AESighting.ae_title == title) \
        .order_by(AESighting.last_seen, AESighting.id).limit(count - MAX_ADDRESSES_PER_AE)
    session.execute(delete(AESighting).where(AESighting.id.in_(list(session.scalars(oldest)))))


def sightings_of(ctx: AppContext) -> AESightings:
    """The process's :class:`AESightings` for this context (made at first use)."""
    found = ctx.extras.get("ae_sightings")
    if not isinstance(found, AESightings):
        found = AESightings(ctx.sessions)
        ctx.extras["ae_sightings"] = found
    return found
