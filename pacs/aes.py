"""Registered DICOM peers: the one home of the AE registry.

``pacs ae add|list|remove`` manage it (:func:`add_ae`, :func:`list_aes`, :func:`remove_ae`); every
DIMSE service asks it through :class:`AERegistry` (or :func:`lookup` inside a session of its own), so
the rules are written once:

- a *calling* AE counts as registered only if, when registered with ``check_host``, it calls from its
  registered host (an address, or a name resolving to it: :func:`pacs.network_policy.host_matches`);
  otherwise it is treated exactly like an unknown AE, for every service and every request;
- a *move destination* is a registered AE with retrieve rights and an address (no host check: it is
  called, it does not call);
- database errors are wrapped where they occur: a registry that cannot be read raises
  :class:`~pacs.errors.IndexUnavailable`, which each transport answers with its own status.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from pacs.db.models import ApplicationEntity
from pacs.errors import Conflict, IndexUnavailable, InvalidInput, NotFound
from pacs.network_policy import host_matches


@dataclass(frozen=True)
class AERecord:
    ae_title: str
    host: str
    port: int
    description: str
    allow_store: bool
    allow_query: bool
    allow_retrieve: bool
    check_host: bool
    facility: str = ""

    def calls_from(self, peer_address: str) -> bool:
        """Does a peer at ``peer_address`` count as this AE (the host check, when it is registered with one)?"""
        return not self.check_host or host_matches(self.host, peer_address)


@dataclass(frozen=True)
class MoveDestination:
    """Where a C-MOVE sends its sub-operations: a registered AE with an address."""

    ae_title: str
    host: str
    port: int


def validate_ae_title(title: str) -> str:
    title = title.strip()
    if not 1 <= len(title) <= 16 or "\\" in title or not title.isprintable() or not title.isascii():
        raise InvalidInput(f"invalid AE title {title!r}: 1-16 printable ASCII characters, no backslash")
    return title


def add_ae(session: Session, title: str, host: str, port: int, description: str = "",
           allow_store: bool = True, allow_query: bool = True, allow_retrieve: bool = True,
           check_host: bool = False, facility: str = "") -> AERecord:
    title = validate_ae_title(title)
    if not 1 <= port <= 65535:
        raise InvalidInput(f"invalid port {port}")
    row = ApplicationEntity(ae_title=title, host=host, port=port, description=description,
                            allow_store=allow_store, allow_query=allow_query, allow_retrieve=allow_retrieve,
                            check_host=check_host, facility=facility.strip()[:64])
    session.add(row)
    try:
        session.flush()
    except IntegrityError as exc:
        raise Conflict(f"AE {title} is already registered") from exc
    return _record(row)


def list_aes(session: Session) -> list[AERecord]:
    return [_record(r) for r in session.scalars(select(ApplicationEntity).order_by(ApplicationEntity.ae_title))]


def remove_ae(session: Session, title: str) -> None:
    if not session.execute(delete(ApplicationEntity).where(ApplicationEntity.ae_title == title)).rowcount:
        raise NotFound(f"AE {title} is not registered")


def _record(row: ApplicationEntity) -> AERecord:
    return AERecord(row.ae_title, row.host, row.port, row.description, row.allow_store, row.allow_query,
                    row.allow_retrieve, row.check_host, row.facility)


def lookup(session: Session, title: str) -> AERecord | None:
    """The AE registered as ``title`` (surrounding spaces ignored), or None."""
    title = title.strip()
    if not title:
        return None
    row = session.scalars(select(ApplicationEntity).where(ApplicationEntity.ae_title == title)).first()
    return _record(row) if row is not None else None


class AERegistry:
    """The registry as the DIMSE services ask it: one short read-only session per question.

    Raises :class:`~pacs.errors.IndexUnavailable` when the registry cannot be read; each caller decides
    what that means for its peer (refused, failed closed, or an out-of-resources status).
    """

    def __init__(self, read_sessions: sessionmaker[Session]) -> None:
        self._read_sessions = read_sessions

    def get(self, title: str) -> AERecord | None:
        """The AE registered as ``title``, wherever it calls from."""
        try:
            with self._read_sessions() as session:
                return lookup(session, title)
        except SQLAlchemyError as exc:
            raise IndexUnavailable(f"AE registry unavailable: {_first_line(exc)}") from exc

    def calling_peer(self, title: str, peer_address: str) -> AERecord | None:
        """The registered AE a peer at ``peer_address`` calling as ``title`` is; None for an unknown AE,
        or a registered one calling from elsewhere than its host (``check_host``)."""
        record = self.get(title)
        return record if record is not None and record.calls_from(peer_address) else None

    def may_store(self, title: str, peer_address: str) -> bool:
        record = self.calling_peer(title, peer_address)
        return record is not None and record.allow_store

    def may_query(self, title: str, peer_address: str) -> bool:
        record = self.calling_peer(title, peer_address)
        return record is not None and record.allow_query

    def may_retrieve(self, title: str, peer_address: str) -> bool:
        """C-MOVE and C-GET: only registered AEs with retrieve rights (SPEC §5), from their host."""
        record = self.calling_peer(title, peer_address)
        return record is not None and record.allow_retrieve

    def sender(self, title: str, peer_address: str) -> tuple[str, bool]:
        """``(facility, trusted)`` of a peer storing objects: a registered AE (passing its host check)
        is trusted and stores for its facility; any other peer is untrusted (pacs.security.ingest_policy)."""
        record = self.calling_peer(title, peer_address)
        return (record.facility, True) if record is not None else ("", False)

    def move_destination(self, title: str) -> MoveDestination | None:
        """The registered AE named ``title``, if it has an address and may take part in retrieves.

        ``pacs ae add --no-retrieve`` bars an AE both from retrieving and from being a move destination.
        """
        record = self.get(title)
        if record is None or not record.allow_retrieve or not record.host or not 1 <= record.port <= 65535:
            return None
        return MoveDestination(record.ae_title, record.host, record.port)


def _first_line(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__).splitlines()[0][:200]
