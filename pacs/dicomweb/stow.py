"""STOW-RS (PS3.18 10.5) as transport-free logic: received parts in, one ingest per part, the response out.

The HTTP route streams the request body through :class:`~pacs.dicomweb.multipart_reader.MultipartReader`
into a :class:`PartSpool` (one temporary file for the whole body, in memory up to
:data:`SPOOL_MEMORY_BYTES`; each part is an offset and a length in it). Only when the whole body has
arrived, within the request size limit and well formed, does :class:`StowService` hand the parts, one
at a time, to the same :meth:`pacs.ingest.Ingestor.ingest` that C-STORE uses. So a refused request (413,
400, 408, a client that goes away) stores nothing, and an acknowledged instance is, as for C-STORE, in the
object store and the index before the response says so.

What a part must be: a DICOM PS3.10 file (``application/dicom``: preamble, ``DICM``, File Meta
Information, dataset). A part that starts directly with its File Meta group (what ``pydicom.dcmwrite``
writes for a dataset built in memory, and so what ``dicomweb-client`` sends for one) is given the
128-byte preamble and ``DICM`` prefix; nothing else is changed. A bare dataset without File Meta
Information is refused (its transfer syntax would be a guess).

The response (PS3.18 Annex I, DICOM JSON): Retrieve URL (0008,1190) of the study, Referenced SOP
Sequence (0008,1199) for stored instances (with their Retrieve URL), Failed SOP Sequence (0008,1198)
with Failure Reason (0008,1197) for the others. PS3.18 has no attribute for a reason text, so each
failed item also carries Error Comment (0000,0902): the same text, at most 64 characters, that a
modality gets in its C-STORE response. Failure Reason values (PS3.18 Table I.2-2 ranges; the same codes
as our C-STORE statuses, see the README):

====== ===============================================================================================
A700   the object store is unavailable (retry later)
A701   the index database is unavailable (retry later)
A702   the part is larger than ``PACS_MAX_OBJECT_BYTES``
A900   the dataset does not match: its StudyInstanceUID is not the study in the URL; or policy ``reject``
       and a different object with this SOP Instance UID is stored
C000   not a DICOM PS3.10 file (no File Meta Information, not DICOM at all), or not ``application/dicom``
C001   a UID that is not digits and dots, has a component with a leading zero, or is longer than 64 characters
C002   truncated
C003   a required identifier (SOP Class/Instance, Study, Series UID) is missing
C004   not a storable instance (a DICOMDIR)
0110   processing failure (an unexpected error; the server log has it)
====== ===============================================================================================

Warning Reason (0008,1196) of a stored instance: ``B000`` when it was stored but held for reconciliation
(not filed in the study it names: :mod:`pacs.reconciliation`), with an Error Comment saying why. Only a
sender that may read that study is told; for anyone else a held instance is listed exactly as a stored one
(same Retrieve URL, built from the object's own UIDs), so the response never says whether another
facility's study exists.

HTTP status (PS3.18 Table 10.5.3-1): 200 all stored, 202 some stored and some failed (or a warning), 409 none
stored.
"""

from __future__ import annotations

import io
import logging
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pydicom.filereader import _read_file_meta_info, read_preamble
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from pacs.db.models import Instance, Series
from pacs.dicomweb.multipart_reader import MultipartError
from pacs.dimse_status import PROCESSING_FAILURE  # a part that failed unexpectedly (a bug, logged)
from pacs.ingest import Ingestor, IngestOutcome, IngestSource, IngestStatus
from pacs.ingest.parsing import DEFAULT_MAX_INFLATED_BYTES, PREAMBLE, ObjectRejected, parse_received
from pacs.ingest.statuses import (
    CANNOT_UNDERSTAND,
    DATASET_DOES_NOT_MATCH,
    OUT_OF_RESOURCES_TOO_LARGE,
    error_comment,
    store_status,
)
from storage.keys import is_valid_uid

log = logging.getLogger(__name__)

SPOOL_MEMORY_BYTES = 1024 * 1024  # a request body is kept in memory up to this, in a temporary file beyond
MAX_PARTS = 100_000  # parts in one request (each costs a small record while the body is read)
DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"


def failure_reason(outcome: IngestOutcome) -> int | None:
    """The Failure Reason for an ingest outcome (the C-STORE status); None when it is stored (or already was)."""
    return None if outcome.ok else store_status(outcome)


# -- receiving: the whole body in one spool file ----------------------------------------------------


@dataclass
class SpooledPart:
    number: int  # 1-based, in request order
    content_type: str  # as the part's header says ("" when it has none)
    offset: int  # where its bytes start in the spool
    kept: int = 0  # bytes kept in the spool
    size: int = 0  # bytes received (more than ``kept`` when the part was too large)

    @property
    def too_large(self) -> bool:
        return self.size > self.kept


class PartSpool:
    """A :class:`~pacs.dicomweb.multipart_reader.PartSink` that writes every part into one spooled file.

    A part beyond ``max_part_bytes`` keeps only its first ``max_part_bytes`` (enough to name it in the
    response) and is refused later; the rest of it is counted and dropped. Close it when done.
    """

    def __init__(self, max_part_bytes: int, memory_bytes: int = SPOOL_MEMORY_BYTES) -> None:
        self.max_part_bytes = max_part_bytes
        self.parts: list[SpooledPart] = []
        self._file = tempfile.SpooledTemporaryFile(max_size=memory_bytes, prefix="pacs-stow-")  # noqa: SIM115
        self._end = 0
        self._current: SpooledPart | None = None

    def begin_part(self, headers: dict[str, str]) -> None:
        if len(self.parts) >= MAX_PARTS:
            raise MultipartError(f"more than {MAX_PARTS} parts in one request")
        self._current = SpooledPart(len(self.parts) + 1, headers.get("content-type", ""), self._end)
        self.parts.append(self._current)

    def part_data(self, data: bytes) -> None:
        part = self._current
        if part is None:
            raise MultipartError("part data outside a part")
        part.size += len(data)
        room = self.max_part_bytes - part.kept
        if room > 0:
            piece = data if len(data) <= room else data[:room]
            self._file.write(piece)
            part.kept += len(piece)
            self._end += len(piece)

    def end_part(self) -> None:
        self._current = None

    def read(self, part: SpooledPart, limit: int | None = None) -> bytes:
        self._file.seek(part.offset)
        return self._file.read(part.kept if limit is None else min(limit, part.kept))

    def close(self) -> None:
        self._file.close()


# -- what happened to each part -----------------------------------------------------------------------


@dataclass(frozen=True)
class StowItem:
    number: int
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    study_instance_uid: str = ""
    failure_reason: int | None = None  # None: stored
    comment: str = ""
    series_instance_uid: str = ""  # stored instances: for their Retrieve URL
    warning_reason: int | None = None  # stored instances: B000 held for reconciliation (told to who may read it)
    duplicate: bool = False  # stored before with identical content (the ingest's idempotent success)

    @property
    def stored(self) -> bool:
        return self.failure_reason is None


@dataclass
class StowResult:
    items: list[StowItem] = field(default_factory=list)
    study_instance_uid: str | None = None  # the study in the request's URL

    @property
    def stored(self) -> list[StowItem]:
        return [i for i in self.items if i.stored]

    @property
    def failed(self) -> list[StowItem]:
        return [i for i in self.items if not i.stored]

    @property
    def http_status(self) -> int:
        """PS3.18 Table 10.5.3-1: 200 all stored, 202 some (or with warnings), 409 none."""
        if not self.failed:
            return 202 if any(i.warning_reason is not None for i in self.items) else 200
        return 202 if self.stored else 409

    @property
    def studies(self) -> list[str]:
        return sorted({i.study_instance_uid for i in self.stored if i.study_instance_uid})

    def response(self, dicomweb_root: str) -> dict[str, Any]:
        """The Store Instances Response Module (PS3.18 Annex I) as DICOM JSON; ``dicomweb_root`` is the
        absolute URL of ``/dicom-web`` (no trailing slash)."""
        study = self.study_instance_uid or (self.studies[0] if len(self.studies) == 1 else None)
        body: dict[str, Any] = {"00081190": _ur(f"{dicomweb_root}/studies/{study}" if study else None)}
        if self.failed:
            body["00081198"] = {"vr": "SQ", "Value": [_failed_item(i) for i in self.failed]}
        if self.stored:
            body["00081199"] = {"vr": "SQ", "Value": [_stored_item(i, dicomweb_root) for i in self.stored]}
        return body

    def summary(self) -> str:
        reasons = sorted({f"{i.failure_reason:04X}" for i in self.failed})
        return (f"parts={len(self.items)} stored={len(self.stored)} failed={len(self.failed)}"
                + (f" reasons={','.join(reasons)}" if reasons else "")
                + (f" studies={','.join(self.studies)[:1500]}" if self.studies else ""))


def _ui(value: str) -> dict[str, Any]:
    return {"vr": "UI", "Value": [value]} if value else {"vr": "UI"}


def _ur(value: str | None) -> dict[str, Any]:
    return {"vr": "UR", "Value": [value]} if value else {"vr": "UR"}


def _failed_item(item: StowItem) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if item.comment:
        out["00000902"] = {"vr": "LO", "Value": [error_comment(item.comment)]}
    out["00081150"] = _ui(item.sop_class_uid)
    out["00081155"] = _ui(item.sop_instance_uid)
    out["00081197"] = {"vr": "US", "Value": [item.failure_reason]}
    return out


def _stored_item(item: StowItem, root: str) -> dict[str, Any]:
    url = None
    if item.series_instance_uid:
        url = (f"{root}/studies/{item.study_instance_uid}/series/{item.series_instance_uid}"
               f"/instances/{item.sop_instance_uid}")
    out: dict[str, Any] = {}
    if item.warning_reason is not None and item.comment:
        out["00000902"] = {"vr": "LO", "Value": [error_comment(item.comment)]}
    out.update({"00081150": _ui(item.sop_class_uid), "00081155": _ui(item.sop_instance_uid), "00081190": _ur(url)})
    if item.warning_reason is not None:
        out["00081196"] = {"vr": "US", "Value": [item.warning_reason]}
    return out


# -- storing -----------------------------------------------------------------------------------------


def as_part10(data: bytes) -> bytes | None:
    """``data`` as a PS3.10 file: itself, or with the preamble and ``DICM`` prefix added in front of a File
    Meta group that starts the data; None when there is no File Meta Information at all."""
    if data[128:132] == b"DICM":
        return data
    if len(data) >= 12 and data[:2] == b"\x02\x00" and data[4:6].isalpha() and data[4:6].isupper():
        return PREAMBLE + data  # group 0002 in Explicit VR Little Endian, without the preamble
    return None


def _meta_uids(data: bytes) -> tuple[str, str]:
    """(SOP Class UID, SOP Instance UID) from a PS3.10 file's File Meta Information, when they are valid UIDs."""
    try:
        fh = io.BytesIO(data[:65536])
        read_preamble(fh, False)
        meta = _read_file_meta_info(fh)
        values = (str(meta.get("MediaStorageSOPClassUID", "")).strip(" \x00"),
                  str(meta.get("MediaStorageSOPInstanceUID", "")).strip(" \x00"))
    except Exception:  # whatever is wrong with it, the ingest's refusal says
        return "", ""
    sop_class, sop = values
    return (sop_class if is_valid_uid(sop_class) else "", sop if is_valid_uid(sop) else "")


class StowService:
    """Stores the spooled parts of one STOW-RS request through the ingest service."""

    def __init__(self, ingestor: Ingestor, read_sessions: sessionmaker[Session], *, max_object_bytes: int,
                 max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES, assume_utf8_for_latin1: bool = True) -> None:
        self._ingestor = ingestor
        self._read_sessions = read_sessions
        self._max_bytes = max_object_bytes
        self._max_inflated = max_inflated_bytes
        self._utf8 = assume_utf8_for_latin1

    def store(self, spool: PartSpool, source: IngestSource, study_instance_uid: str | None = None) -> StowResult:
        """Ingest each part in request order (one part's bytes in memory at a time)."""
        result = StowResult(study_instance_uid=study_instance_uid)
        for part in spool.parts:
            try:
                item = self._store_part(spool, part, source, study_instance_uid)
            except Exception:  # the ingest never raises by contract; anything else must not lose the others
                log.exception("STOW-RS part %d failed unexpectedly", part.number)
                item = StowItem(part.number, failure_reason=PROCESSING_FAILURE,
                                comment="processing failure (see the server log)")
            result.items.append(item)
        self._add_series(result)
        return result

    def _store_part(self, spool: PartSpool, part: SpooledPart, source: IngestSource,
                    study_instance_uid: str | None) -> StowItem:
        media_type = part.content_type.split(";", 1)[0].strip().lower()
        if media_type not in ("", DICOM):
            return StowItem(part.number, failure_reason=CANNOT_UNDERSTAND,
                            comment=f"part {part.number} is {media_type[:30]}, not {DICOM}")
        if part.too_large:
            sop_class, sop = _meta_uids(spool.read(part, 65536))
            return StowItem(part.number, sop_class, sop, failure_reason=OUT_OF_RESOURCES_TOO_LARGE,
                            comment=f"object of {part.size} bytes exceeds {self._max_bytes}")
        raw = spool.read(part)
        data = as_part10(raw)
        if data is None:
            return self._no_file_meta(raw, part.number)
        del raw
        if study_instance_uid is not None:
            mismatch = self._study_mismatch(data, part.number, study_instance_uid)
            if mismatch is not None:
                return mismatch
        outcome = self._ingestor.ingest(data, source)
        reason = failure_reason(outcome)
        sop_class, sop = outcome.sop_class_uid, outcome.sop_instance_uid
        if reason is not None and not sop:
            sop_class, sop = _meta_uids(data)
        if reason is None:  # stored (or held): the Retrieve URL from the object's own UIDs, whichever it was
            return StowItem(part.number, sop_class, sop, outcome.study_instance_uid, None,
                            outcome.message if outcome.warn else "", outcome.series_instance_uid,
                            store_status(outcome) if outcome.warn else None,
                            outcome.status is IngestStatus.DUPLICATE)
        return StowItem(part.number, sop_class, sop, outcome.study_instance_uid, reason, outcome.message)

    def _parse(self, data: bytes) -> Any:
        return parse_received(data, max_bytes=self._max_bytes, assume_utf8_for_latin1=self._utf8,
                              max_inflated_bytes=self._max_inflated)

    def _no_file_meta(self, data: bytes, number: int) -> StowItem:
        """Refuse a part without File Meta Information, saying whether it is a bare dataset or not DICOM."""
        try:
            obj = self._parse(data)
        except ObjectRejected as exc:
            message = exc.message if exc.message.startswith("not a DICOM") else f"not a DICOM file: {exc.message}"
            return StowItem(number, failure_reason=CANNOT_UNDERSTAND, comment=message)
        return StowItem(number, obj.sop_class_uid, obj.sop_instance_uid, failure_reason=CANNOT_UNDERSTAND,
                        comment="no File Meta Information: STOW-RS takes DICOM PS3.10 files")

    def _study_mismatch(self, data: bytes, number: int, study_instance_uid: str) -> StowItem | None:
        try:
            obj = self._parse(data)
        except ObjectRejected:
            return None  # the ingest refuses it and says why
        if obj.study_instance_uid == study_instance_uid:
            return None
        log.warning("STOW-RS part %d: study %s is not the request's %s", number, obj.study_instance_uid,
                    study_instance_uid)
        return StowItem(number, obj.sop_class_uid, obj.sop_instance_uid, obj.study_instance_uid,
                        DATASET_DOES_NOT_MATCH, "StudyInstanceUID differs from the study in the request URL")

    def _add_series(self, result: StowResult) -> None:
        """The Series Instance UID of each stored instance the ingest did not name, for its Retrieve URL."""
        sops = [i.sop_instance_uid for i in result.stored if not i.series_instance_uid]
        if not sops:
            return
        series: dict[str, str] = {}
        try:
            with self._read_sessions() as session:
                for chunk in _chunks(sops, 500):
                    rows = session.execute(select(Instance.sop_instance_uid, Series.series_instance_uid)
                                           .join(Series, Series.id == Instance.series_fk)
                                           .where(Instance.sop_instance_uid.in_(chunk)))
                    series.update({sop: uid for sop, uid in rows})
        except SQLAlchemyError as exc:  # stored all the same: the Retrieve URLs stay empty (Type 2)
            log.error("cannot read series of stored instances: %s", str(exc).splitlines()[0][:200])
        result.items = [StowItem(i.number, i.sop_class_uid, i.sop_instance_uid, i.study_instance_uid,
                                 i.failure_reason, i.comment, series.get(i.sop_instance_uid, ""), i.warning_reason,
                                 i.duplicate)
                        if i.stored and not i.series_instance_uid else i for i in result.items]


def _chunks(values: list[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(values), size):
        yield values[start:start + size]
