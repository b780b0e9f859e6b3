"""Rebuild the index from the object store alone (disaster recovery): ``pacs reindex``.

The store holds every object ingest acknowledged, under ``dicom/{study}/{series}/{sop}/{sha256}.dcm``.
The index is rebuilt by *replaying* those objects through the same parser and index writer as ingest
(:func:`pacs.ingest.parsing.parse_received`, :func:`pacs.ingest.index_writer.index_instance`), oldest first
(the store's last-modified time, then the key):

* For each SOP Instance UID the most recently written object becomes current and the earlier ones
  prior versions, numbered in write order — exactly what ingest did when they arrived.
* Replaying in write order rather than key order also reproduces every "first seen wins" choice of the
  index writer: a patient's name when several objects share a Patient ID, a study's or a series'
  attributes, the order of Modalities in Study.
* The listing is spooled to a temporary SQLite file and sorted there, so neither the listing nor a
  study is ever held in memory. Objects are read one at a time, each once, and their SHA-256 checked
  against their key: a mismatch is reported as corrupt and not indexed.

Thumbnails already in the store are linked again; the derived work of the rest is armed in the outbox as
ingest arms it (published by the relay of the next `pacs serve` / `pacs scp`). Forwarding rules are not
applied: they are for objects as they arrive.

Limits:

* The order is only as fine as the store's clock: the filesystem store gives microseconds, S3 listings at best
  milliseconds and often whole seconds (SeaweedFS, the tests' server, does). Objects written in the same instant are
  replayed in key order, which may not be the order they arrived in; the rows where that can make a
  difference (which version is current, which object's values a new patient/study/series row took, the
  order of Modalities in Study) are listed in ``ReindexSummary.ambiguous_order``.
* A resend of content A after B (A, B, A) re-wrote A's key, so the store holds two objects and the
  rebuilt history is B then A.
* An object whose ingest failed after the put and whose clean-up failed too (an orphan for `pacs check`)
  is indexed like any other.
* The audit trail is not in the store; one audit event records the reindex itself.

Rejection notes (IHE IOCM, :mod:`pacs.studies.rejection`) are not indexed as instances: they are collected while
replaying and applied, in write order, after every instance is indexed, so the rebuilt index rejects what the
archive rejected (the notes in the store are the active rejections).
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import islice
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from pacs import audit
from pacs.db.models import DerivedTask, Instance, InstanceVersion, Patient, Series, Study
from pacs.derived.kinds import INSTANCE_DERIVED_KIND
from pacs.derived.outbox import INSTANCE_TASKS, SERIES_TASKS, arm_derived_tasks, record_fragment_made
from pacs.errors import PacsError
from pacs.ingest.index_writer import index_instance
from pacs.ingest.parsing import ObjectRejected, ReceivedObject, parse_received
from pacs.ingest.source import Correction
from pacs.maintenance import NoProgress, ProgressSink, as_utc
from pacs.studies import rejection
from pacs.studies.models import RejectedInstance, RejectionNote
from pacs.studies.rejection_notes import RejectionNoteContent
from pacs.studies.rewrite import correction_of
from storage import ObjectInfo, ObjectStore, StorageError, StorageUnavailable
from storage.keys import correction_marker_key, is_valid_uid, parse_instance_key, thumbnail_key

log = logging.getLogger(__name__)

INSTANCE_PREFIX = "dicom/"
THUMBNAIL_PREFIX = "derived/thumbnails/"
METADATA_PREFIX = "derived/metadata/"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


class IndexNotEmpty(PacsError):
    """Reindex was asked to rebuild into an index that already holds data (and ``force`` was not given)."""

    def __init__(self, instances: int, patients: int) -> None:
        super().__init__(
            f"the index already holds {instances} instances and {patients} patients: `pacs reindex` rebuilds an "
            "empty index (a fresh database after `pacs db upgrade`); use --force to add only what is missing")
        self.instances = instances


@dataclass
class ReindexSummary:
    objects: int = 0  # instance objects listed under dicom/
    instances: int = 0  # current instances indexed
    versions: int = 0  # prior versions indexed
    skipped_existing: int = 0  # with force: already referenced by the index, not read again
    bytes_read: int = 0
    thumbnails_linked: int = 0
    fragments_linked: int = 0  # instances whose stored DICOM JSON fragment is taken as current (no task armed)
    tasks_armed: int = 0
    corrupt: list[str] = field(default_factory=list)  # SHA-256 of the bytes differs from the key's
    unparseable: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (key, reason): e.g. deleted meanwhile
    ignored: list[str] = field(default_factory=list)  # keys under dicom/ that are not instance keys
    # "instance UID" / "patient ID/ISSUER" / "study UID" / "series UID": rows that depend on the order of
    # objects written in the same instant, which the store cannot tell (see the module docstring)
    ambiguous_order: list[str] = field(default_factory=list)
    rejection_notes: int = 0  # rejection notes applied again
    rejected: int = 0  # instances they rejected
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        """Every instance object listed was indexed (or was already)."""
        return not (self.corrupt or self.unparseable or self.unreadable)

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "complete": self.complete}


def reindex(
    sessions: sessionmaker[Session],
    store: ObjectStore,
    *,
    force: bool = False,
    assume_utf8_for_latin1: bool = True,
    batch_size: int = 200,
    progress: ProgressSink | None = None,
    actor: str = "",
    modifying_system: str = "PACS",
) -> ReindexSummary:
    """Index every object of ``store`` into an empty index (or, with ``force``, add what the index lacks).

    Commits every ``batch_size`` objects, so an interrupted run leaves a consistent, partial index:
    run it again with ``force`` to finish. Raises :class:`IndexNotEmpty`, ``StorageUnavailable`` and
    SQLAlchemy errors; everything about individual objects is in the summary. ``modifying_system``: this
    archive's AE title, which its corrected versions name in their Original Attributes Sequence
    (:func:`pacs.studies.rewrite.correction_of`): their values replace "first seen wins" as they did at ingest —
    only for a version whose correction marker (:func:`storage.keys.correction_marker_key`) is in the store.
    """
    progress = progress or NoProgress()
    started = time.monotonic()
    with sessions() as session:
        instances = session.scalar(select(func.count()).select_from(Instance)) or 0
        patients = session.scalar(select(func.count()).select_from(Patient)) or 0
    if (instances or patients) and not force:
        raise IndexNotEmpty(instances, patients)

    summary = ReindexSummary()
    replay = _Replay(store, summary, force=force, assume_utf8_for_latin1=assume_utf8_for_latin1,
                     modifying_system=modifying_system)
    with tempfile.TemporaryDirectory(prefix="pacs-reindex-") as tmp:
        spool = _Spool(Path(tmp) / "listing.sqlite3")
        try:
            progress.phase("listing")
            for info in store.list(INSTANCE_PREFIX):
                if parse_instance_key(info.key) is None:
                    summary.ignored.append(info.key)
                else:
                    spool.add(info)
                    summary.objects += 1
                progress.advance()
            progress.phase("indexing", summary.objects)
            rows = spool.oldest_first()
            while chunk := list(islice(rows, batch_size)):
                with sessions() as session, session.begin():
                    for written, key, size, tied in chunk:
                        replay.one(session, written, key, tied=tied)
                        progress.advance(1, size)
        finally:
            spool.close()
    _apply_rejection_notes(sessions, replay.notes, summary)
    summary.ambiguous_order = sorted(set(summary.ambiguous_order))
    _link_thumbnails(sessions, store, summary, progress, batch_size)
    _link_fragments(sessions, store, summary, progress, batch_size)
    _arm_derived_work(sessions, summary, batch_size)
    summary.seconds = round(time.monotonic() - started, 3)
    with sessions() as session, session.begin():
        audit.append(
            session, actor=actor, role="operator", action="index.reindex",
            outcome="success" if summary.complete else "partial",
            detail=(f"instances={summary.instances} versions={summary.versions} skipped={summary.skipped_existing} "
                    f"corrupt={len(summary.corrupt)} unparseable={len(summary.unparseable)} "
                    f"unreadable={len(summary.unreadable)} force={force}"),
        )
    return summary


class _Spool:
    """The listing in a temporary SQLite file, handed back sorted by write time then key."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path)
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("CREATE TABLE listing (written_us INTEGER NOT NULL, key TEXT NOT NULL, size INTEGER)")
        self._pending: list[tuple[int, str, int]] = []

    def add(self, info: ObjectInfo) -> None:
        self._pending.append(((as_utc(info.last_modified) - _EPOCH) // _US, info.key, info.size))
        if len(self._pending) >= 5000:
            self._flush()

    def _flush(self) -> None:
        self._db.executemany("INSERT INTO listing VALUES (?, ?, ?)", self._pending)
        self._pending.clear()

    def oldest_first(self) -> Iterator[tuple[datetime, str, int, bool]]:
        """(written, key, size, tied): ``tied`` when another object has the same write time."""
        self._flush()
        for written_us, key, size, same in self._db.execute(
                "SELECT *, COUNT(*) OVER (PARTITION BY written_us) FROM listing ORDER BY written_us, key"):
            yield _EPOCH + written_us * _US, key, size, same > 1

    def close(self) -> None:
        self._db.close()


class _Replay:
    """Indexes one stored object the way ingest indexed it when it arrived."""

    def __init__(self, store: ObjectStore, summary: ReindexSummary, *, force: bool,
                 assume_utf8_for_latin1: bool, modifying_system: str = "PACS") -> None:
        self._store = store
        self._modifying_system = modifying_system
        self._summary = summary
        self._force = force
        self._utf8 = assume_utf8_for_latin1
        self._tie_at: datetime | None = None
        self._tie_rows: dict[str, tuple[bool, tuple[object, ...]]] = {}
        self.notes: list[tuple[ReceivedObject, str, RejectionNoteContent]] = []  # (object, key, content)

    def one(self, session: Session, written: datetime, key: str, *, tied: bool = False) -> None:
        parsed = parse_instance_key(key)
        if parsed is None:  # unreachable: the listing spools instance keys only
            raise ValueError(f"not an instance key: {key!r}")
        study_uid, series_uid, sop_uid, key_sha = parsed
        current = session.scalars(select(Instance).where(Instance.sop_instance_uid == sop_uid)).one_or_none()
        if current is not None and self._force and _references(session, current, key):
            self._summary.skipped_existing += 1
            return
        if current is None and self._force and session.scalar(select(RejectedInstance.id).where(
                RejectedInstance.object_key == key)) is not None:
            self._summary.skipped_existing += 1  # rejected: indexed in rejected_instance
            return
        obj = self._read(key, key_sha, (study_uid, series_uid, sop_uid))
        if obj is None:
            return
        note = rejection.note_content(obj)
        if note is not None:  # applied after every instance is indexed
            self.notes.append((obj, key, note))
            return
        if tied:
            self._note_tie(session, written, obj)
        if current is not None:
            current_at = as_utc(current.received_at)
            if written < current_at:  # only with force: an older object the index lacks
                _add_prior_version(session, current, obj, key, key_sha, written)
                self._summary.versions += 1
                return
            if written == current_at:
                self._summary.ambiguous_order.append(f"instance {sop_uid}")
        # a corrected version (pacs.studies.corrections) applies its values, as it did when it was made
        fields = correction_of(obj.dataset, self._modifying_system) if obj.dataset is not None else None
        if fields is not None and not self._store.exists(correction_marker_key(sop_uid, key_sha)):
            fields = None  # no marker: not a version this archive made (a sender can forge the Original Attributes)
        correction = Correction(obj.study_instance_uid, "reindex", fields) if fields is not None else None
        index_instance(session, obj, object_key=key, sha256=key_sha, received_at=written, source="reindex",
                       source_ae="", source_address="", replaces=current, correction=correction)
        if current is None:
            self._summary.instances += 1
        else:
            self._summary.versions += 1

    def _note_tie(self, session: Session, written: datetime, obj: ReceivedObject) -> None:
        """Report the rows whose "first seen wins" values may differ from ingest's.

        Objects written in the same instant (S3 has whole seconds) are replayed in key order, which may not be
        the order ingest received them in. A patient, study or series row created by one of them takes that
        object's values; if another object of the same instant disagrees, the original may hold the other's.
        """
        if written != self._tie_at:
            self._tie_at, self._tie_rows = written, {}
        patient = (obj.patient["patient_id"], obj.patient["issuer_of_patient_id"])
        rows: list[tuple[str, type[Patient | Study | Series], dict[str, str], tuple[object, ...]]] = [
            (f"patient {'/'.join(patient)}", Patient, {"patient_id": patient[0], "issuer_of_patient_id": patient[1]},
             tuple(obj.patient.values())),
            (f"study {obj.study_instance_uid}", Study, {"study_instance_uid": obj.study_instance_uid},
             (*obj.study.values(), patient)),
            (f"series {obj.series_instance_uid}", Series, {"series_instance_uid": obj.series_instance_uid},
             (*obj.series.values(), obj.study_instance_uid)),
        ]
        for name, model, identity, values in rows:
            seen = self._tie_rows.get(name)
            if seen is None:
                existed = session.scalar(select(model.id).filter_by(**identity)) is not None
                self._tie_rows[name] = (existed, values)
                if model is Series and not existed:
                    self._note_new_series(obj)
                continue
            existed, first = seen
            if existed or first == values or (model is Patient and _compatible(first, values)):
                continue
            self._summary.ambiguous_order.append(name)

    def _note_new_series(self, obj: ReceivedObject) -> None:
        """Modalities in Study lists modalities in the order their series were created."""
        modality = (obj.series["modality"],)
        first = self._tie_rows.setdefault(f"modalities {obj.study_instance_uid}", (False, modality))[1]
        if first != modality:
            self._summary.ambiguous_order.append(f"study {obj.study_instance_uid}")

    def _read(self, key: str, key_sha: str, uids: tuple[str, str, str]) -> ReceivedObject | None:
        """The parsed object, or None (recorded in the summary) when it cannot be indexed."""
        try:
            data = self._store.get_bytes(key)
        except StorageUnavailable:
            raise
        except StorageError as exc:
            self._summary.unreadable.append((key, str(exc)))
            return None
        self._summary.bytes_read += len(data)
        if hashlib.sha256(data).hexdigest() != key_sha:
            log.warning("corrupt object %s: its SHA-256 differs from its key", key)
            self._summary.corrupt.append(key)
            return None
        try:
            obj = parse_received(data, max_bytes=len(data), assume_utf8_for_latin1=self._utf8,
                                 strict_uids=False)  # objects acknowledged before the leading-zero rule
        except ObjectRejected as exc:
            self._summary.unparseable.append((key, exc.message))
            return None
        held = (obj.study_instance_uid, obj.series_instance_uid, obj.sop_instance_uid)
        if held != uids:
            self._summary.unparseable.append((key, f"the object holds study/series/SOP {held}, not its key's"))
            return None
        return obj


def _apply_rejection_notes(sessions: sessionmaker[Session], notes: list[tuple[ReceivedObject, str,
                           RejectionNoteContent]], summary: ReindexSummary) -> None:
    """The stored rejection notes, in write order, each in its own transaction (one already applied is skipped)."""
    for obj, key, content in notes:
        with sessions() as session, session.begin():
            if session.scalar(select(RejectionNote.id).where(
                    RejectionNote.sop_instance_uid == obj.sop_instance_uid)) is not None:
                summary.skipped_existing += 1
                continue
            try:
                with session.begin_nested():
                    applied = rejection.apply_note(
                        session, study_uid=obj.study_instance_uid, note_sop_uid=obj.sop_instance_uid, content=content,
                        object_key=key, sha256=key.rsplit("/", 1)[-1].removesuffix(".dcm"), size=len(obj.data),
                        source=None)
            except rejection.NoteRefused as exc:
                summary.unparseable.append((key, f"rejection note not applied: {exc}"))
                continue
            summary.rejection_notes += 1
            summary.rejected += len(applied.rejected)


def _compatible(first: tuple[object, ...], other: tuple[object, ...]) -> bool:
    """Patient rows keep the first value of each field and fill blanks later: only two different values conflict."""
    return all(a == b or not a or not b for a, b in zip(first, other, strict=True))


def _references(session: Session, current: Instance, key: str) -> bool:
    """Whether the index already points at ``key`` (as the current object or a prior version)."""
    if current.object_key == key:
        return True
    found = session.scalar(select(InstanceVersion.id).where(
        InstanceVersion.sop_instance_uid == current.sop_instance_uid, InstanceVersion.object_key == key))
    return found is not None


def _add_prior_version(session: Session, current: Instance, obj: ReceivedObject, key: str, sha256: str,
                       written: datetime) -> None:
    """Insert an object older than the current one into the version history, renumbering it in write order.

    ``index_instance`` only ever appends a newer version; this is needed when ``--force`` finds an old
    object that an existing index lost.
    """
    session.add(InstanceVersion(sop_instance_uid=current.sop_instance_uid, version=0, object_key=key,
                                size=len(obj.data), sha256=sha256, transfer_syntax_uid=obj.transfer_syntax_uid,
                                received_at=written, replaced_at=written, source_ae=""))
    session.flush()
    history = sorted(
        session.scalars(select(InstanceVersion).where(InstanceVersion.sop_instance_uid == current.sop_instance_uid)),
        key=lambda v: (as_utc(v.received_at), v.id))
    for number, version in enumerate(history, start=1):
        version.version = number
        version.replaced_at = history[number].received_at if number < len(history) else current.received_at
    current.version = len(history) + 1


def _link_thumbnails(sessions: sessionmaker[Session], store: ObjectStore, summary: ReindexSummary,
                     progress: ProgressSink, batch_size: int) -> None:
    """Point instances at the thumbnails already in the store (``derived/thumbnails/{study}/{series}/{sop}.jpg``)."""
    progress.phase("thumbnails")
    pending: dict[str, str] = {}
    for info in store.list(THUMBNAIL_PREFIX):
        parts = info.key.split("/")  # series and study thumbnails have fewer segments
        sop_uid = parts[-1].removesuffix(".jpg")
        if len(parts) == 5 and is_valid_uid(sop_uid):
            pending[sop_uid] = info.key
        progress.advance()
        if len(pending) >= batch_size:
            _link_batch(sessions, pending, summary)
            pending = {}
    if pending:
        _link_batch(sessions, pending, summary)


def _link_batch(sessions: sessionmaker[Session], keys: dict[str, str], summary: ReindexSummary) -> None:
    with sessions() as session, session.begin():
        rows = session.execute(
            select(Instance, Series.series_instance_uid, Study.study_instance_uid)
            .join(Series, Series.id == Instance.series_fk).join(Study, Study.id == Series.study_fk)
            .where(Instance.sop_instance_uid.in_(list(keys)))
        ).all()
        for instance, series_uid, study_uid in rows:
            key = thumbnail_key(study_uid, series_uid, instance.sop_instance_uid)
            if keys[instance.sop_instance_uid] == key and instance.thumbnail_key != key:
                instance.thumbnail_key = key
                summary.thumbnails_linked += 1


def _link_fragments(sessions: sessionmaker[Session], store: ObjectStore, summary: ReindexSummary,
                    progress: ProgressSink, batch_size: int) -> None:
    """Take the DICOM JSON fragments already in the store (``derived/metadata/{study}/{series}/{sop}.json``, made at
    ingest, :mod:`pacs.ingest.fragment`) as current for instances with a single version: their rows are recorded
    done instead of armed (which would read and render every object again). The fragment's key does not name a
    version, so an instance with prior versions gets its fragment made again."""
    progress.phase("fragments")
    pending: list[str] = []
    for info in store.list(METADATA_PREFIX):
        parts = info.key.split("/")  # series documents have fewer segments
        sop_uid = parts[-1].removesuffix(".json")
        if len(parts) == 5 and is_valid_uid(sop_uid):
            pending.append(sop_uid)
        progress.advance()
        if len(pending) >= batch_size:
            _link_fragment_batch(sessions, pending, summary)
            pending = []
    if pending:
        _link_fragment_batch(sessions, pending, summary)


def _link_fragment_batch(sessions: sessionmaker[Session], sop_uids: list[str], summary: ReindexSummary) -> None:
    with sessions() as session, session.begin():
        rows = session.execute(select(Instance.sop_instance_uid, Instance.sha256)
                               .where(Instance.sop_instance_uid.in_(sop_uids), Instance.version == 1)).all()
        for sop_uid, sha256 in rows:
            record_fragment_made(session, sop_uid, sha256)
            summary.fragments_linked += 1


def _arm_derived_work(sessions: sessionmaker[Session], summary: ReindexSummary, batch_size: int) -> None:
    """Outbox rows, as ingest arms them, for instances with neither a thumbnail nor a fragment taken as current,
    and series without metadata.

    They stay ``pending`` until the outbox relay of a running ``pacs serve`` / ``pacs scp`` publishes them.
    """
    last_id = 0
    while True:
        with sessions() as session, session.begin():
            made = (select(DerivedTask.id).where(DerivedTask.kind == INSTANCE_DERIVED_KIND,
                                                 DerivedTask.subject_uid == Instance.sop_instance_uid,
                                                 DerivedTask.sha256 == Instance.sha256).exists())
            rows = session.execute(
                select(Instance.id, Instance.sop_instance_uid, Instance.sha256)
                .where(Instance.thumbnail_key.is_(None), ~made, Instance.id > last_id).order_by(Instance.id)
                .limit(batch_size)).all()
            for _, sop_uid, sha256 in rows:
                summary.tasks_armed += len(arm_derived_tasks(session, sop_uid, sha256, INSTANCE_TASKS))
        if not rows:
            break
        last_id = rows[-1][0]
    last_id = 0
    while True:
        with sessions() as session, session.begin():
            series = session.execute(
                select(Series.id, Series.series_instance_uid)
                .where(Series.metadata_key.is_(None), Series.id > last_id).order_by(Series.id)
                .limit(batch_size)).all()
            for _, series_uid in series:
                summary.tasks_armed += len(arm_derived_tasks(session, series_uid, "", SERIES_TASKS))
        if not series:
            break
        last_id = series[-1][0]
