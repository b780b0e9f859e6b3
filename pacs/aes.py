"""Registered DICOM peers (`pacs ae add|list|remove`)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pacs.db.models import ApplicationEntity
from pacs.errors import Conflict, InvalidInput, NotFound


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
