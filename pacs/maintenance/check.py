"""Verify the object store against the index: ``pacs check``.

Two passes, both streaming and in short transactions:

1. every object the index references (current instances, prior versions, rejected instances and the
   rejection notes, :mod:`pacs.studies.rejection`, and the objects held in the reconciliation queue while a row
   pending or separated names them, :mod:`pacs.reconciliation`: acknowledged to their senders, and the only copy
   of a pending one) is read back in 1 MiB chunks and its existence, size and SHA-256 compared with the row;
2. the ``dicom/`` listing is compared with the index: an object no row references is an orphan (left by
   an ingest that died, or whose index commit failed and whose clean-up failed too, or by hand); so is the
   ``reconciliation/`` listing with the queue (an object no queue row names: a hold that died before its commit,
   or whose commit failed, until the retention sweep removes it); and the temporary files of interrupted writes
   (``.tmp-*``, filesystem store) are listed.

Problems in pass 1 are errors (an indexed object is not as acknowledged). Orphans and temporary files are
warnings: nothing acknowledged is affected, and ``pacs check --repair`` collects them after a grace period
(:mod:`pacs.maintenance.repair`). An ingest in flight while the check runs can show up as an orphan (its
object is written before its index row commits): that is what the grace period is for.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from enum import StrEnum

from sqlalchemy import ColumnElement, func, select, union_all
from sqlalchemy.orm import Session, sessionmaker

from pacs.db.models import Instance, InstanceVersion
from pacs.maintenance import NoProgress, ProgressSink, file_modes
from pacs.maintenance.repair import temporary_files
from pacs.reconciliation.models import PENDING, SEPARATED, ReconciliationItem
from pacs.studies.models import RejectedInstance, RejectionNote
from storage import ObjectNotFound, ObjectStore, StorageError, StorageUnavailable
from storage.base import CHUNK_SIZE
from storage.keys import RECONCILIATION_PREFIX, parse_instance_key, parse_reconciliation_key

INSTANCE_PREFIX = "dicom/"


class ProblemKind(StrEnum):
    MISSING = "missing"  # indexed, but not in the store
    SIZE = "size"  # stored with another size than indexed (truncated, appended to)
    CORRUPT = "corrupt"  # same size, different SHA-256
    UNREADABLE = "unreadable"  # the store refused to read it (not a transient outage)
    ORPHAN = "orphan"  # in the store under dicom/ (reconciliation/), referenced by no index (queue) row: a warning
    TEMPORARY = "temporary"  # a .tmp-* file of an interrupted write (a warning)


# the index rows that reference a stored object under dicom/ (rejected instances and rejection notes too)
_REFERENCING: tuple[type[Instance] | type[InstanceVersion] | type[RejectedInstance] | type[RejectionNote], ...] = (
    Instance, InstanceVersion, RejectedInstance, RejectionNote)

# the rows pass 1 verifies the objects of: every row of each of these, and the reconciliation queue's rows whose held
# copy is still kept (resolved by filing or discarding, the copy is removed, best effort: pacs.reconciliation)
_VERIFIED: tuple[tuple[type[Instance | InstanceVersion | RejectedInstance | RejectionNote | ReconciliationItem],
                       ColumnElement[bool] | None], ...] = (
    *((model, None) for model in _REFERENCING),
    (ReconciliationItem, ReconciliationItem.state.in_((PENDING, SEPARATED))),
)

WARNINGS = frozenset({ProblemKind.ORPHAN, ProblemKind.TEMPORARY})  # the archive is whole; --repair collects them


@dataclass(frozen=True)
class Problem:
    kind: ProblemKind
    key: str
    sop_instance_uid: str = ""
    detail: str = ""


@dataclass
class CheckSummary:
    checked: int = 0  # index rows whose object was verified
    bytes_read: int = 0
    listed: int = 0  # objects listed under dicom/ and reconciliation/
    problems: list[Problem] = field(default_factory=list)
    seconds: float = 0.0
    lax_modes: list[str] = field(default_factory=list)  # warnings, not problems (pacs.maintenance.file_modes)

    @property
    def ok(self) -> bool:
        """No error: every indexed object is in the store as indexed (orphans and temporary files are warnings)."""
        return not self.errors

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.kind not in WARNINGS]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.kind in WARNINGS]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for problem in self.problems:
            out[problem.kind.value] = out.get(problem.kind.value, 0) + 1
        return out

    def as_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "errors": len(self.errors), "warnings": len(self.warnings),
                "checked": self.checked, "bytes_read": self.bytes_read, "listed": self.listed,
                "counts": self.counts(), "problems": [asdict(p) for p in self.problems], "seconds": self.seconds,
                "lax_modes": self.lax_modes}


def check(sessions: sessionmaker[Session], store: ObjectStore, *, batch_size: int = 500,
          progress: ProgressSink | None = None) -> CheckSummary:
    """Verify every indexed object and list orphans; raises ``StorageUnavailable`` if the store goes away."""
    progress = progress or NoProgress()
    started = time.monotonic()
    summary = CheckSummary()
    with sessions() as session:
        total = sum(session.scalar(select(func.count()).select_from(model).where(*_kept(kept))) or 0
                    for model, kept in _VERIFIED)
    progress.phase("verifying", total)
    for model, kept in _VERIFIED:
        last_id = 0
        while True:
            with sessions() as session:
                rows = session.execute(
                    select(model.id, model.sop_instance_uid, model.object_key, model.size, model.sha256)
                    .where(model.id > last_id, *_kept(kept)).order_by(model.id).limit(batch_size)).all()
            if not rows:
                break
            last_id = rows[-1][0]
            for _, sop_uid, key, size, sha256 in rows:
                problem, nbytes = verify_object(store, key, size, sha256, sop_uid)
                summary.checked += 1
                summary.bytes_read += nbytes
                if problem is not None:
                    summary.problems.append(problem)
                progress.advance(1, nbytes)
    _find_orphans(sessions, store, summary, progress, batch_size)
    for tmp in temporary_files(store):
        summary.problems.append(Problem(ProblemKind.TEMPORARY, tmp.path, "",
                                        f"{tmp.size} bytes, written {tmp.modified.isoformat(timespec='seconds')}"))
    summary.lax_modes = file_modes.archive_warnings(sessions, store)
    summary.seconds = round(time.monotonic() - started, 3)
    return summary


def _kept(condition: ColumnElement[bool] | None) -> tuple[ColumnElement[bool], ...]:
    return () if condition is None else (condition,)


def verify_object(store: ObjectStore, key: str, size: int, sha256: str,
                  sop_uid: str = "") -> tuple[Problem | None, int]:
    """Stream one object through SHA-256; the problem found (or None) and the bytes read."""
    digest = hashlib.sha256()
    read = 0
    try:
        with store.open(key) as stream:
            while chunk := stream.read(CHUNK_SIZE):
                digest.update(chunk)
                read += len(chunk)
    except ObjectNotFound:
        return Problem(ProblemKind.MISSING, key, sop_uid, "indexed but not in the store"), read
    except StorageUnavailable:
        raise
    except StorageError as exc:
        return Problem(ProblemKind.UNREADABLE, key, sop_uid, str(exc)[:300]), read
    if read != size:
        return Problem(ProblemKind.SIZE, key, sop_uid, f"{read} bytes stored, {size} indexed"), read
    if digest.hexdigest() != sha256:
        return Problem(ProblemKind.CORRUPT, key, sop_uid, f"SHA-256 {digest.hexdigest()}, {sha256} indexed"), read
    return None, read


def _find_orphans(sessions: sessionmaker[Session], store: ObjectStore, summary: CheckSummary,
                  progress: ProgressSink, batch_size: int) -> None:
    """Objects under dicom/ that no index row references, looked up a batch of SOP UIDs at a time."""
    progress.phase("orphans")
    batch: list[tuple[str, str]] = []  # (key, sop uid)
    for info in store.list(INSTANCE_PREFIX):
        summary.listed += 1
        progress.advance()
        parsed = parse_instance_key(info.key)
        if parsed is None:
            summary.problems.append(Problem(ProblemKind.ORPHAN, info.key, "", "not an instance key"))
            continue
        batch.append((info.key, parsed[2]))
        if len(batch) >= batch_size:
            _orphans_in(sessions, batch, summary)
            batch = []
    if batch:
        _orphans_in(sessions, batch, summary)
    held: list[str] = []
    for info in store.list(RECONCILIATION_PREFIX):
        summary.listed += 1
        progress.advance()
        held.append(info.key)
        if len(held) >= batch_size:
            _held_orphans_in(sessions, held, summary)
            held = []
    if held:
        _held_orphans_in(sessions, held, summary)


def _orphans_in(sessions: sessionmaker[Session], batch: list[tuple[str, str]], summary: CheckSummary) -> None:
    sops = sorted({sop for _, sop in batch})
    query = union_all(
        select(Instance.object_key).where(Instance.sop_instance_uid.in_(sops)),
        select(InstanceVersion.object_key).where(InstanceVersion.sop_instance_uid.in_(sops)),
        select(RejectedInstance.object_key).where(RejectedInstance.sop_instance_uid.in_(sops)),
        select(RejectionNote.object_key).where(RejectionNote.sop_instance_uid.in_(sops)),
    )
    with sessions() as session:
        referenced = set(session.scalars(query))
    for key, sop_uid in batch:
        if key not in referenced:
            summary.problems.append(Problem(ProblemKind.ORPHAN, key, sop_uid, "referenced by no index row"))


def _held_orphans_in(sessions: sessionmaker[Session], keys: list[str], summary: CheckSummary) -> None:
    """Keys under reconciliation/ that no queue row names (held objects are keyed by their SHA-256, which the queue
    indexes)."""
    digests = {sha for key in keys if (sha := parse_reconciliation_key(key)) is not None}
    with sessions() as session:
        named = set(session.scalars(select(ReconciliationItem.object_key)
                                    .where(ReconciliationItem.sha256.in_(sorted(digests)))))
    for key in keys:
        if key not in named:
            summary.problems.append(Problem(ProblemKind.ORPHAN, key, "", "named by no reconciliation queue row"))
