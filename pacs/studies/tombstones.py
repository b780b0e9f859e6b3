"""Tombstones of deleted objects: a deletion and a re-send of the same bytes never lose an acknowledged object.

Instance keys are content-addressed (``dicom/{study}/{series}/{sop}/{sha256}.dcm``): a modality that sends the
same bytes again right after a deletion puts the very key the deletion is about to remove. So a deletion
(:mod:`pacs.studies.deletion`) leaves a row here, state ``pending``, for every key it will delete, in the
transaction that removes the index rows; after the commit it deletes each object holding that row's lock
(:func:`pacs.studies.deletion.delete_objects`) and marks it ``gone``. Ingest, inside its index transaction,
removes the row of the key it is indexing (:func:`clear`): if there was one — pending or gone — the deletion may
have removed (or may be about to remove) the bytes just put, so ingest puts them again after its commit, before
it answers success. With the row lock between them, one of the two always sees the other:

- ingest committed first: the deletion finds no row and leaves the object alone;
- the deletion holds the row: ingest's DELETE waits for it, finds the row (gone) and puts the bytes back.

Rows ``gone`` for a day are removed by the retention sweep; rows left ``pending`` (a deletion that died or a store
that refused) are retried by it.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import cast

from sqlalchemy import DateTime, Integer, String, Table, bindparam, delete, func, insert
from sqlalchemy.orm import Mapped, Session, mapped_column

from pacs.db.models import Base

PENDING = "pending"
GONE = "gone"
_CHUNK = 500


class DeletedObject(Base):
    """A store key a committed deletion removes (``pending``) or removed (``gone``)."""

    __tablename__ = "deleted_object"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    object_key: Mapped[str] = mapped_column(String(400), unique=True)
    state: Mapped[str] = mapped_column(String(16), default=PENDING)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), index=True)


def add(session: Session, keys: Iterable[str]) -> None:
    """A ``pending`` row for each key, in the deleting transaction (a row left from an earlier deletion of the
    same key is replaced)."""
    wanted = sorted(set(keys))
    for start in range(0, len(wanted), _CHUNK):
        chunk = wanted[start:start + _CHUNK]
        session.execute(delete(DeletedObject).where(DeletedObject.object_key.in_(chunk)))
        session.execute(insert(DeletedObject), [{"object_key": key, "state": PENDING} for key in chunk])


# prebuilt on the table: ingest runs it for every object it indexes
_CLEAR = delete(cast(Table, DeletedObject.__table__)).where(
    cast(Table, DeletedObject.__table__).c.object_key == bindparam("key"))


def clear(session: Session, key: str) -> bool:
    """Ingest, in its index transaction: remove ``key``'s tombstone; True when there was one (the object may be
    deleted, or about to be: put the bytes again after the commit). Waits while a deletion holds the row."""
    return bool(session.connection().execute(_CLEAR, {"key": key}).rowcount)  # Core, no ORM (issue 13)
