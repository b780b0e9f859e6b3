"""A study (or one series) as a zip with a DICOMDIR, streamed: ``GET /api/studies/{study}/archive.zip``, ``pacs
study export``.

Layout (a PS3.10 file-set, what a CD burner or a viewer's "import DICOMDIR" expects)::

    DICOMDIR
    DICOM/P0000001/S0000001/X0000001/I0000001     each object as stored: preamble, File Meta, dataset
    DICOM/P0000001/S0000001/X0000001/I0000002
    DICOM/P0000001/S0000001/X0000002/I0000001     X: one folder per series (in Series Number order)

:func:`plan_export` checks the principal's scope (an unknown study and one outside the scope are both
:class:`~pacs.errors.NotFound`), reads the index once and builds the DICOMDIR (:mod:`pacs.studies.dicomdir`)
before the first byte is sent, and audits the export. :func:`zip_stream` then writes the zip as a sequence of
chunks: the stdlib :mod:`zipfile` writing to an unseekable sink (entries are STORED, each followed by a data
descriptor with its CRC and sizes; ZIP64 where an entry or the archive passes 4 GiB), every object copied from
the store in :data:`storage.base.CHUNK_SIZE` pieces. Memory stays at a chunk or two whatever the study's size;
nothing is spooled to disk. A non-image object's DICOMDIR record needs its header: read from the store stream up
to its pixel data (``stop_before_pixels``), the rest never read.

Only the principal's own studies (and those shared with its facility) are exported: not one it borrows through a
consult or as a linked person's prior (:func:`pacs.security.access.study_condition` with ``borrowed=False``).

Should an object be missing from the store half-way, the stream stops with an error instead of ending in a zip
whose DICOMDIR names a file it does not hold (a client sees a truncated download; the log says which object).
"""

from __future__ import annotations

import io
import logging
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session

from pacs import audit
from pacs.context import AppContext
from pacs.db.models import Instance, Patient, Series, Study
from pacs.errors import InvalidInput, NotFound
from pacs.security.access import authorize, study_condition
from pacs.security.principal import Principal
from pacs.security.roles import Capability
from pacs.studies import dicomdir
from storage import ObjectStore
from storage.base import CHUNK_SIZE
from storage.keys import is_valid_uid

log = logging.getLogger(__name__)

DICOMDIR_NAME = "DICOMDIR"
ROOT = "DICOM"
_LOOKBACK = 64 * 1024  # how far back a header read may seek (pydicom rewinds a few bytes to peek at an element)
_MAX_PER_LEVEL = 9_999_999  # 7 digits after the one-letter prefix of a File ID component


@dataclass(frozen=True)
class ZipEntry:
    name: str  # the path in the zip: the File ID's components joined by "/"
    object_key: str
    size: int
    sop_instance_uid: str


@dataclass
class ExportPlan:
    """What one export sends: the DICOMDIR (already encoded) and the stored objects, in zip order."""

    study_instance_uid: str
    series_instance_uid: str | None
    patient_id: str
    dicomdir: bytes
    entries: list[ZipEntry] = field(default_factory=list)

    @property
    def object_bytes(self) -> int:
        """The objects' and the DICOMDIR's bytes (the zip adds ~150 bytes per entry)."""
        return len(self.dicomdir) + sum(e.size for e in self.entries)

    @property
    def filename(self) -> str:
        """A download name (UIDs are digits and dots: safe in a header and on any file system)."""
        series = f"-series-{self.series_instance_uid}" if self.series_instance_uid else ""
        return f"study-{self.study_instance_uid}{series}.zip"


@dataclass(frozen=True)
class _Row:
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    instance_number: int | None
    object_key: str
    size: int


def plan_export(ctx: AppContext, principal: Principal, study_instance_uid: str, *,
                series_instance_uid: str | None = None) -> ExportPlan:
    """Check, read and describe an export of a study (or of one of its series); audited as ``study.export``.

    Raises NotFound for an unknown study or series, one outside the principal's scope, or one with no current
    instance (all rejected); InvalidInput for a malformed UID; Forbidden without ``study.export``.
    """
    authorize(principal, Capability.STUDY_EXPORT)
    for uid in (study_instance_uid, series_instance_uid):
        if uid is not None and not is_valid_uid(uid):
            raise InvalidInput(f"invalid UID {uid[:70]!r}")
    with ctx.read_sessions() as session:
        study, patient, series = _read_study(session, principal, study_instance_uid, series_instance_uid)
        instances = _read_instances(session, [s.id for s in series])
        patient_id = patient.patient_id if patient else ""
        patient_root = dicomdir.patient_record(patient_id, patient.patient_name if patient else "")
        study_date = study.study_date or study.created_at.strftime("%Y%m%d")
        study_node = patient_root.add(dicomdir.study_record(
            study.study_instance_uid, study_date=study_date, study_time=study.study_time, study_id=study.study_id,
            accession_number=study.accession_number, description=study.study_description))
        series_rows = [(s.series_instance_uid, s.modality, s.series_number, s.series_description, s.id)
                       for s in series]
    if len(series_rows) > _MAX_PER_LEVEL:
        raise InvalidInput("too many series for one file-set")
    plan = ExportPlan(study_instance_uid, series_instance_uid, patient_id, b"")
    for s_number, (series_uid, modality, series_number, description, series_id) in enumerate(series_rows, 1):
        rows = instances.get(series_id, [])
        if not rows:
            continue
        if len(rows) > _MAX_PER_LEVEL:
            raise InvalidInput("too many instances in one series for one file-set")
        node = study_node.add(dicomdir.series_record(series_uid, modality=modality,
                                                     series_number=series_number if series_number is not None
                                                     else s_number, description=description))
        for i_number, row in enumerate(rows, 1):
            parts = dicomdir.file_id(ROOT, "P0000001", "S0000001", f"X{s_number:07d}", f"I{i_number:07d}")
            ref = dicomdir.FileReference(parts, row.sop_class_uid, row.sop_instance_uid, row.transfer_syntax_uid)
            node.add(_leaf(ctx.store, ref, row, study_date, i_number))
            plan.entries.append(ZipEntry("/".join(parts), row.object_key, row.size, row.sop_instance_uid))
    if not plan.entries:  # every instance rejected (or moved) since the counts were read
        raise NotFound(f"no series {series_instance_uid} in study {study_instance_uid}" if series_instance_uid
                       else f"no study {study_instance_uid}")
    plan.dicomdir = dicomdir.encode_dicomdir([patient_root])
    with ctx.sessions() as session, session.begin():
        audit.append(session, action="study.export", actor=principal.subject, role=principal.role.value,
                     source_address=principal.source_address, patient_id=patient_id,
                     study_instance_uid=study_instance_uid,
                     detail=f"zip with DICOMDIR: {len(plan.entries)} object(s), {plan.object_bytes} bytes"
                     + (f", series {series_instance_uid}" if series_instance_uid else ""))
    return plan


def _read_study(session: Session, principal: Principal, study_uid: str,
                series_uid: str | None) -> tuple[Study, Patient | None, list[Series]]:
    study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid,
                                                study_condition(principal.scope, borrowed=False))).one_or_none()
    if study is None or study.number_of_instances <= 0:
        raise NotFound(f"no study {study_uid}")
    stmt = select(Series).where(Series.study_fk == study.id)  # a series without current instances is skipped
    if series_uid is not None:
        stmt = stmt.where(Series.series_instance_uid == series_uid)
    series = list(session.scalars(stmt))
    if not series:
        raise NotFound(f"no series {series_uid} in study {study_uid}" if series_uid else f"no study {study_uid}")
    series.sort(key=lambda s: (s.series_number is None, s.series_number or 0, s.series_instance_uid))
    patient = session.get(Patient, study.patient_fk)
    return study, patient, series


def _read_instances(session: Session, series_ids: list[int]) -> dict[int, list[_Row]]:
    out: dict[int, list[_Row]] = {}
    rows = session.execute(select(Instance.series_fk, Instance.sop_instance_uid, Instance.sop_class_uid,
                                  Instance.transfer_syntax_uid, Instance.instance_number, Instance.object_key,
                                  Instance.size).where(Instance.series_fk.in_(series_ids)))
    for r in rows:
        out.setdefault(r.series_fk, []).append(_Row(r.sop_instance_uid, r.sop_class_uid, r.transfer_syntax_uid,
                                                    r.instance_number, r.object_key, r.size))
    for group in out.values():
        group.sort(key=lambda r: (r.instance_number is None, r.instance_number or 0, r.sop_instance_uid))
    return out


def _leaf(store: ObjectStore, ref: dicomdir.FileReference, row: _Row, study_date: str,
          ordinal: int) -> dicomdir.DirectoryRecord:
    """The instance's leaf record: IMAGE from the index; other types from the object's header."""
    number = row.instance_number if row.instance_number is not None else ordinal
    record_type = dicomdir.leaf_record_type(row.sop_class_uid)
    if record_type == "IMAGE":
        return dicomdir.image_record(ref, instance_number=number)
    with store.open(row.object_key) as stream:
        header = dcmread(_ForwardReader(stream), stop_before_pixels=True)
    header.decode()  # text values as str, whatever the object's Specific Character Set (the record is UTF-8)
    return dicomdir.leaf_record(record_type, ref, header, instance_number=number, fallback_date=study_date)


class _ForwardReader(io.RawIOBase):
    """A store stream as the seekable file :func:`pydicom.dcmread` wants, without copying it: seeks forward by
    reading on, backward within the last :data:`_LOOKBACK` bytes read (all pydicom needs to peek at the next
    element); an object's bytes past the point where parsing stops are never read."""

    def __init__(self, stream: BinaryIO) -> None:
        super().__init__()
        self._stream = stream
        self._window = bytearray()  # the bytes [_start, _start + len(_window)) of the object, already read
        self._start = 0
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        end = self._start + len(self._window)
        want = None if size is None or size < 0 else self._pos + size
        while want is None or end < want:
            chunk = self._stream.read(CHUNK_SIZE if want is None else max(min(CHUNK_SIZE, want - end), 1))
            if not chunk:
                break
            self._window += chunk
            end += len(chunk)
        offset = self._pos - self._start
        data = bytes(self._window[offset:] if want is None else self._window[offset:want - self._start])
        self._pos += len(data)
        if (keep := self._pos - _LOOKBACK) > self._start:
            del self._window[:keep - self._start]
            self._start = keep
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset += self._pos
        elif whence != io.SEEK_SET:
            raise OSError("a store stream cannot seek from its end")
        if offset < self._start:
            raise OSError(f"cannot seek back to {offset}: only the last {_LOOKBACK} bytes read are kept")
        while offset > self._pos and self.read(min(CHUNK_SIZE, offset - self._pos)):
            pass
        self._pos = offset if offset <= self._start + len(self._window) else self._pos
        return self._pos


# -- the zip ---------------------------------------------------------------------------------------------


class _ChunkSink:
    """A write-only, unseekable file for :class:`zipfile.ZipFile`: collects what it writes until taken."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def write(self, data: bytes) -> int:
        self._buffer += data
        return len(data)

    def flush(self) -> None:
        pass

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def take(self) -> bytes:
        data = bytes(self._buffer)
        self._buffer.clear()
        return data


def _info(name: str, size: int, when: tuple[int, int, int, int, int, int]) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=when)
    info.compress_type = zipfile.ZIP_STORED  # DICOM pixel data is mostly compressed already or barely compresses
    info.external_attr = 0o644 << 16
    info.file_size = size  # lets zipfile choose ZIP64 for an entry of 4 GiB or more before writing it
    return info


def zip_stream(store: ObjectStore, plan: ExportPlan, *, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """The export as zip bytes, in pieces of about ``chunk_size`` (one object chunk at a time in memory); never
    an empty piece (an empty body message could end a chunked HTTP response early)."""
    when = time.localtime()[:6]
    sink = _ChunkSink()
    archive = zipfile.ZipFile(sink, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True)  # type: ignore[call-overload]
    with archive:
        with archive.open(_info(DICOMDIR_NAME, len(plan.dicomdir), when), mode="w") as target:
            target.write(plan.dicomdir)
        yield sink.take()
        for entry in plan.entries:
            try:
                with store.open(entry.object_key) as source, \
                        archive.open(_info(entry.name, entry.size, when), mode="w") as target:
                    while chunk := source.read(chunk_size):
                        target.write(chunk)
                        yield sink.take()
            except Exception:
                log.error("export of study %s stopped at %s (object %s)", plan.study_instance_uid,
                          entry.sop_instance_uid, entry.object_key)
                raise
            if sink.pending:
                yield sink.take()
    if sink.pending:
        yield sink.take()
