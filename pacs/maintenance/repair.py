"""What crashes leave behind, listed by ``pacs check`` and collected by ``pacs check --repair``.

* **Orphans**: objects under ``dicom/`` that no index row references — an ingest that wrote its object and
  died (or whose index commit failed, and whose clean-up failed too) before its row committed. The sender
  was never acknowledged, so nothing it relies on is lost with them.
* **Temporary files** (filesystem store): ``.tmp-*`` files of a write that died before its rename.

Both are warnings, not errors: the archive is whole. Repair removes one only when all of these hold, each
checked again immediately before it goes:

1. it is older than the grace period (default 60 minutes; its modification time, read again), so a write
   in flight — object written, index row not yet committed — is never taken;
2. no index row points at its key: every ``*_key`` column of every table is searched (current instances,
   prior versions, derived products, and whatever else names store keys, such as the reconciliation queue),
   so an object the index refers to in any way is never deleted;
3. on the filesystem store the file is first renamed aside, and (1) and (2) are checked on what was renamed:
   a concurrent re-send of the same object (same key, since keys hold the SHA-256) writes a new, young file,
   which is put back. On S3 there is no rename: a re-send of the same bytes landing between the last check
   and the delete, more than the grace period after the first attempt failed, could still be lost (the
   sender would have to send the identical object again in that millisecond); the index row would then show
   up as ``missing`` in the next check, and the sender's copy is still complete.

Every removal is written to the audit trail.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import Column, String, select
from sqlalchemy.orm import Session, sessionmaker

from pacs import audit
from pacs.db.models import Base, Instance, InstanceVersion
from pacs.maintenance import as_utc
from storage import ObjectStore, StorageError
from storage.filesystem import TMP_PREFIX, FilesystemStore
from storage.keys import parse_instance_key

log = logging.getLogger(__name__)

_ASIDE_PREFIX = f"{TMP_PREFIX}repair-"

DEFAULT_GRACE = timedelta(minutes=60)


@dataclass(frozen=True)
class TemporaryFile:
    path: str  # relative to the store's root
    size: int
    modified: datetime


def temporary_files(store: ObjectStore) -> Iterator[TemporaryFile]:
    """``.tmp-*`` files of interrupted writes (filesystem store; S3 leaves none of its own)."""
    if not isinstance(store, FilesystemStore):
        return
    for folder, _dirs, files in os.walk(store.root):
        for name in sorted(files):
            if not name.startswith(TMP_PREFIX) or name.startswith(_ASIDE_PREFIX):
                continue  # an object a repair holds aside is never a temporary file (see _restore_aside)
            path = Path(folder, name)
            try:
                st = path.lstat()
            except FileNotFoundError:  # finished (renamed) while we looked
                continue
            yield TemporaryFile(str(path.relative_to(store.root)), st.st_size,
                                datetime.fromtimestamp(st.st_mtime, tz=UTC))


def _key_columns() -> list[Column[str]]:
    """Every string column named ``*_key`` in the index (the places a row can point at a stored object),
    except the instance tables', which :func:`referenced` searches through their indexed SOP Instance UID
    (their other ``*_key`` columns name derived objects, never ``dicom/`` keys)."""
    return [column for table in Base.metadata.sorted_tables
            if table.name not in (Instance.__tablename__, InstanceVersion.__tablename__)
            for column in table.columns if column.name.endswith("_key") and isinstance(column.type, String)]


def referenced(session: Session, key: str) -> bool:
    """Whether any index row names ``key``: a current or prior version, or any other row naming store keys."""
    parsed = parse_instance_key(key)
    if parsed is not None:
        sop = parsed[2]
        for model in (Instance, InstanceVersion):
            if session.scalar(select(model.id).where(model.sop_instance_uid == sop, model.object_key == key)
                              .limit(1)) is not None:
                return True
    return any(session.execute(select(column).where(column == key).limit(1)).first() is not None
               for column in _key_columns())


@dataclass
class RepairSummary:
    grace_minutes: float
    removed_orphans: list[str] = field(default_factory=list)
    removed_temporary: list[str] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)  # (key or path, why it stayed)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


#: ``--repair`` refuses when more than this share of the listed objects would be orphans: the index it was
#: given is probably not this store's (an empty or restored database, a wrong ``PACS_DATABASE_URL``).
MAX_ORPHAN_SHARE = 0.5


def repair_refusal(errors: int, indexed: int, listed: int, orphans: int) -> str:
    """Why collecting ``orphans`` would be unsafe, or "" when it is not.

    Removing an orphan is only right when the index is the true account of the store. An index that misses
    objects it should have (check errors), holds nothing, or leaves a large share of the store unreferenced
    is more likely the wrong or a restored database than a record of crashed writes: there, ``pacs reindex``
    recovers the objects, and removing them would destroy acknowledged images.
    """
    if errors:
        return f"the check found {errors} error(s): fix the index first (pacs reindex), then repair"
    if orphans and indexed == 0:
        return "the index holds no instance but the store does: wrong or empty database? (pacs reindex)"
    if listed and orphans / listed > MAX_ORPHAN_SHARE:
        return (f"{orphans} of {listed} objects are unreferenced (over {MAX_ORPHAN_SHARE:.0%}): wrong or restored "
                "database? Rebuild it with pacs reindex before removing anything")
    return ""


def repair(sessions: sessionmaker[Session], store: ObjectStore, orphans: list[str], *,
           grace: timedelta = DEFAULT_GRACE, actor: str = "") -> RepairSummary:
    """Remove the given orphan keys and the store's temporary files that are older than ``grace``.

    ``orphans`` comes from :func:`pacs.maintenance.check.check`; each is checked again here (see the module
    docstring). Raises ``StorageUnavailable`` and SQLAlchemy errors; what was removed until then is audited.
    """
    summary = RepairSummary(grace_minutes=grace.total_seconds() / 60)
    if isinstance(store, FilesystemStore):
        _restore_aside(store)
    try:
        for key in orphans:
            why = _remove_orphan(sessions, store, key, grace)
            if why:
                summary.kept.append((key, why))
            else:
                summary.removed_orphans.append(key)
        cutoff = datetime.now(UTC) - grace
        for tmp in list(temporary_files(store)):
            if tmp.modified >= cutoff:
                summary.kept.append((tmp.path, "younger than the grace period (a write may be in flight)"))
                continue
            assert isinstance(store, FilesystemStore)
            path = store.root / tmp.path
            with contextlib.suppress(FileNotFoundError):
                if datetime.fromtimestamp(path.lstat().st_mtime, tz=UTC) < cutoff:
                    path.unlink()
                    summary.removed_temporary.append(tmp.path)
    finally:
        _audit(sessions, summary, actor)
    return summary


def _remove_orphan(sessions: sessionmaker[Session], store: ObjectStore, key: str, grace: timedelta) -> str:
    """Remove one orphan; returns why it was kept ("" when removed)."""
    cutoff = datetime.now(UTC) - grace
    if isinstance(store, FilesystemStore):
        return _remove_file_orphan(sessions, store, key, cutoff)
    modified = _modified(store, key)
    if modified is None:
        return "gone already"
    if modified >= cutoff:
        return "younger than the grace period (a write may be in flight)"
    with sessions() as session:
        if referenced(session, key):
            return "an index row points at it now"
    store.delete(key)
    return ""


def _remove_file_orphan(sessions: sessionmaker[Session], store: FilesystemStore, key: str,
                        cutoff: datetime) -> str:
    path = store.root.joinpath(*key.split("/"))
    aside = path.with_name(f"{_ASIDE_PREFIX}{uuid.uuid4().hex}-{path.name}")
    try:
        os.rename(path, aside)  # from here a re-send writes a new file at ``path``; we judge the one we hold
    except FileNotFoundError:
        return "gone already"
    except OSError as exc:
        raise StorageError(f"could not move {key} aside: {exc}") from exc
    try:
        young = datetime.fromtimestamp(aside.lstat().st_mtime, tz=UTC) >= cutoff
        with sessions() as session:
            wanted = referenced(session, key)
    except BaseException:
        _put_back(aside, path)
        raise
    if young or wanted:
        _put_back(aside, path)
        return ("younger than the grace period (a write may be in flight)" if young
                else "an index row points at it now")
    try:
        aside.unlink()
    except FileNotFoundError:  # another repair run put it back meanwhile: it judges it again
        return "put back by another repair run"
    return ""


def _restore_aside(store: FilesystemStore) -> None:
    """Put back objects a killed repair held aside (``.tmp-repair-{uuid}-{name}``): judged again by this run."""
    for folder, _dirs, files in os.walk(store.root):
        for name in files:
            if name.startswith(_ASIDE_PREFIX) and name.count("-") >= 3:
                original = Path(folder, name[len(_ASIDE_PREFIX):].split("-", 1)[1])
                with contextlib.suppress(FileNotFoundError):
                    _put_back(Path(folder, name), original)


def _put_back(aside: Path, path: Path) -> None:
    """The same key holds the same bytes (its name is their SHA-256): replacing a newer copy changes nothing."""
    os.replace(aside, path)


def _modified(store: ObjectStore, key: str) -> datetime | None:
    for info in store.list(key):
        if info.key == key:
            return as_utc(info.last_modified)
    return None


def _audit(sessions: sessionmaker[Session], summary: RepairSummary, actor: str) -> None:
    if not (summary.removed_orphans or summary.removed_temporary):
        return
    with sessions() as session, session.begin():
        for key in summary.removed_orphans:
            parsed = parse_instance_key(key)
            audit.append(session, actor=actor, role="operator", action="store.orphan-removed",
                         study_instance_uid=parsed[0] if parsed else "",
                         detail=f"object={key} grace_minutes={summary.grace_minutes:g}")
        if summary.removed_temporary:
            audit.append(session, actor=actor, role="operator", action="store.temporary-removed",
                         detail=f"files={len(summary.removed_temporary)} grace_minutes={summary.grace_minutes:g} "
                                f"first={summary.removed_temporary[0]}")
    log.info("repair removed %d orphan(s) and %d temporary file(s)", len(summary.removed_orphans),
             len(summary.removed_temporary))
