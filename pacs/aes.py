"""Registered DICOM peers: the one home of the AE registry.

``pacs ae add|list|remove`` manage it (:func:`add_ae`, :func:`list_aes`, :func:`remove_ae`); every
DIMSE service asks it through :class:`AERegistry` (or :func:`lookup` inside a session of its own), so
the rules are written once:

- a *calling* AE counts as registered only if it proves to be it (:func:`pacs.ae_access.identity_mismatch`):
  with ``check_host`` (on unless ``pacs ae add --no-check-host``) it calls from its registered host (an
  address, or a name resolving to it); with a ``tls_subject`` it came over TLS with a verified client
  certificate of that identity. Otherwise it is treated exactly like an unknown AE, for every service and
  every request;
- the peer's TLS client certificate is that of the association being served: the DICOM listener sets
  :data:`association_certificate` in the association's own thread (pynetdicom serves each association,
  negotiation and every DIMSE request, in one thread), so every service's registry question sees it
  without passing it along; a thread that never set it has none (a TLS-bound AE is then not recognized);
- a *move destination* is a registered AE with retrieve rights and an address (no host check: it is
  called, it does not call);
- database errors are wrapped where they occur: a registry that cannot be read raises
  :class:`~pacs.errors.IndexUnavailable`, which each transport answers with its own status.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, bindparam, delete, select
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from pacs.ae_access import PeerCertificate, identity_mismatch, normal_tls_subject
from pacs.db.dml import affected_rows
from pacs.db.models import ApplicationEntity
from pacs.db.prepared import Prepared
from pacs.errors import Conflict, IndexUnavailable, InvalidInput, NotFound
from pacs.query.sessions import single_statement_engine

association_certificate: ContextVar[PeerCertificate | None] = ContextVar("association_certificate", default=None)
"""The verified TLS client certificate of the association served by this thread (None: plain TCP or none)."""


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
    archive_wide: bool = False  # sees every facility's studies and orders (pacs.ae_scope)

    tls_subject: str = ""  # the TLS client certificate identity it must present ('' = none required)

    def calls_from(self, peer_address: str, certificate: PeerCertificate | None = None) -> bool:
        """Does a peer at ``peer_address`` (with this verified TLS certificate, if any) count as this AE?"""
        return not identity_mismatch(self, peer_address, certificate)

    @property
    def identity_checked(self) -> bool:
        """False when anyone calling with this title is believed (no host check, no TLS binding)."""
        return self.check_host or bool(self.tls_subject)


@dataclass(frozen=True)
class MoveDestination:
    """Where a C-MOVE sends its sub-operations: a registered AE with an address, and whose studies it may
    hold (its registration's facility, or every facility's: :func:`pacs.ae_scope.destination_scope`)."""

    ae_title: str
    host: str
    port: int
    facility: str = ""
    archive_wide: bool = False


def validate_ae_title(title: str) -> str:
    title = title.strip()
    if not 1 <= len(title) <= 16 or "\\" in title or not title.isprintable() or not title.isascii():
        raise InvalidInput(f"invalid AE title {title!r}: 1-16 printable ASCII characters, no backslash")
    return title


def add_ae(session: Session, title: str, host: str, port: int, description: str = "",
           allow_store: bool = True, allow_query: bool = True, allow_retrieve: bool = True,
           check_host: bool = True, facility: str = "", *, archive_wide: bool = False,
           tls_subject: str = "") -> AERecord:
    """Register an AE. ``facility`` / ``archive_wide``: whose studies it may query and retrieve
    (:func:`pacs.ae_scope.ae_scope`; with neither, none)."""
    title = validate_ae_title(title)
    if archive_wide and facility.strip():
        raise InvalidInput("an AE is either of one facility or archive-wide, not both")
    if not 1 <= port <= 65535:
        raise InvalidInput(f"invalid port {port}")
    if check_host and not host.strip():  # its title is believed only from HOST (module docstring)
        raise InvalidInput(f"AE {title} has no host to check: give its host, or register it without the host check")
    row = ApplicationEntity(ae_title=title, host=host, port=port, description=description,
                            allow_store=allow_store, allow_query=allow_query, allow_retrieve=allow_retrieve,
                            check_host=check_host, facility=facility.strip()[:64], archive_wide=archive_wide)
    row.tls_subject = _tls_subject(tls_subject)
    session.add(row)
    try:
        session.flush()
    except IntegrityError as exc:
        raise Conflict(f"AE {title} is already registered") from exc
    return _record(row)


def list_aes(session: Session) -> list[AERecord]:
    return [_record(r) for r in session.scalars(select(ApplicationEntity).order_by(ApplicationEntity.ae_title))]


def set_identity(session: Session, title: str, *, check_host: bool | None = None,
                 tls_subject: str | None = None) -> AERecord:
    """Change how a registered AE proves who it is (None leaves that part as it is; '' removes a TLS binding)."""
    row = session.scalars(select(ApplicationEntity).where(ApplicationEntity.ae_title == title.strip())).first()
    if row is None:
        raise NotFound(f"AE {title} is not registered")
    if check_host is not None:
        if check_host and not row.host.strip():
            raise InvalidInput(f"AE {row.ae_title} has no host to check")
        row.check_host = check_host
    if tls_subject is not None:
        row.tls_subject = _tls_subject(tls_subject)
    session.flush()
    return _record(row)


def unchecked_aes(session: Session) -> list[AERecord]:
    """Registered AEs believed from any address: neither host check nor TLS binding (``pacs ae list``/``check``)."""
    return [r for r in list_aes(session) if not r.identity_checked]


def _tls_subject(subject: str) -> str:
    try:
        return normal_tls_subject(subject)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from exc


def remove_ae(session: Session, title: str) -> None:
    if not affected_rows(session, delete(ApplicationEntity).where(ApplicationEntity.ae_title == title)):
        raise NotFound(f"AE {title} is not registered")


def _record(row: ApplicationEntity) -> AERecord:
    return AERecord(row.ae_title, row.host, row.port, row.description, row.allow_store, row.allow_query,
                    row.allow_retrieve, row.check_host, row.facility, archive_wide=row.archive_wide,
                    tls_subject=row.tls_subject or "")


def lookup(session: Session, title: str) -> AERecord | None:
    """The AE registered as ``title`` (surrounding spaces ignored), or None."""
    title = title.strip()
    if not title:
        return None
    row = session.scalars(select(ApplicationEntity).where(ApplicationEntity.ae_title == title)).first()
    return _record(row) if row is not None else None


_LOST_CONNECTION_RETRIES = 3
_ae = cast(Table, ApplicationEntity.__table__).c
# every association (EVT_REQUESTED) and several DIMSE requests ask it: one prebuilt statement on the driver's cursor
# (pacs.db.prepared), not an ORM session and query (~1.5 ms of CPU per association, issue 13)
_BY_TITLE = Prepared(select(_ae.ae_title, _ae.host, _ae.port, _ae.description, _ae.allow_store, _ae.allow_query,
                            _ae.allow_retrieve, _ae.check_host, _ae.facility, _ae.archive_wide, _ae.tls_subject)
                     .where(_ae.ae_title == bindparam("title")))


class AERegistry:
    """The registry as the DIMSE services ask it: one read statement per question, without a session.

    Raises :class:`~pacs.errors.IndexUnavailable` when the registry cannot be read; each caller decides
    what that means for its peer (refused, failed closed, or an out-of-resources status).
    """

    def __init__(self, read_sessions: sessionmaker[Session]) -> None:
        self._read_sessions = read_sessions

    def get(self, title: str) -> AERecord | None:
        """The AE registered as ``title``, wherever it calls from (as :func:`lookup` reads it)."""
        title = title.strip()
        if not title:
            return None
        try:
            for attempt in range(_LOST_CONNECTION_RETRIES + 1):
                try:
                    row = self._by_title(title)
                    break
                except DBAPIError as exc:
                    # a pooled connection the database dropped (a restart, a cut): invalidated, ask on another
                    if not exc.connection_invalidated or attempt == _LOST_CONNECTION_RETRIES:
                        raise
        except SQLAlchemyError as exc:
            raise IndexUnavailable(f"AE registry unavailable: {_first_line(exc)}") from exc
        if row is None:
            return None
        (ae_title, host, port, description, allow_store, allow_query, allow_retrieve, check_host, facility,
         archive_wide, tls_subject) = row
        return AERecord(ae_title, host, port, description, bool(allow_store), bool(allow_query), bool(allow_retrieve),
                        bool(check_host), facility, archive_wide=bool(archive_wide), tls_subject=tls_subject or "")

    def _by_title(self, title: str) -> tuple[Any, ...] | None:
        with single_statement_engine(self._read_sessions).connect() as connection:
            return _BY_TITLE.one_or_none(connection, {"title": title})

    def calling_peer(self, title: str, peer_address: str) -> AERecord | None:
        """The registered AE a peer at ``peer_address`` calling as ``title`` is; None for an unknown AE,
        or a registered one that does not prove to be it (another host, or not its TLS certificate:
        that of the association this thread serves, :data:`association_certificate`)."""
        return proven_caller(self.get(title), peer_address)

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

    def sender(self, title: str, peer_address: str) -> tuple[str, bool, bool]:
        """``(facility, trusted, impersonating)`` of a peer storing objects: a registered AE (passing its
        host check) is trusted and stores for its facility; any other peer is untrusted
        (pacs.security.filing_rules). ``impersonating``: the title is registered but this peer failed its
        identity check, so it must not count as the title's earlier sender either."""
        return sender_rights(self.get(title), peer_address)

    def move_destination(self, title: str) -> MoveDestination | None:
        """The registered AE named ``title``, if it has an address and may take part in retrieves.

        ``pacs ae add --no-retrieve`` bars an AE both from retrieving and from being a move destination.
        """
        record = self.get(title)
        if record is None or not record.allow_retrieve or not record.host or not 1 <= record.port <= 65535:
            return None
        return MoveDestination(record.ae_title, record.host, record.port, record.facility, record.archive_wide)


def proven_caller(record: AERecord | None, peer_address: str) -> AERecord | None:
    """``record`` (the AE registered under a calling title) when the peer at ``peer_address`` proves to be it: its
    host, or the TLS certificate of the association this thread serves (:data:`association_certificate`)."""
    if record is None or not record.calls_from(peer_address, association_certificate.get()):
        return None
    return record


def sender_rights(record: AERecord | None, peer_address: str) -> tuple[str, bool, bool]:
    """:meth:`AERegistry.sender` for the AE registered under the calling title (``record``, None: none), read
    already: the association checks read it once per association (``dicom_scp.association_checks``)."""
    if (proven := proven_caller(record, peer_address)) is not None:
        return proven.facility, True, False
    return "", False, record is not None


def _first_line(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__).splitlines()[0][:200]
