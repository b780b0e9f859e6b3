"""Upload of DICOM files and zips over HTTP (``POST /api/studies/upload``), stored exactly as STOW-RS stores.

The body — one zip (``application/zip``), one DICOM file (``application/dicom``) or a form
(``multipart/form-data``) with any number of files, each a DICOM file or a zip — is received in full into
temporary files first (:class:`UploadFiles`; a zip needs seeking, and a refused upload must store nothing).
The request size limit (``PACS_MAX_REQUEST_BYTES``) bounds it while it arrives. Then every zip is checked
before anything is unpacked: readable central directory, at most ``PACS_UPLOAD_MAX_FILES`` entries in the
whole upload, their declared sizes together at most ``PACS_UPLOAD_MAX_UNPACKED_BYTES``, and a zip of more
than 64 MiB unpacked at most ``PACS_UPLOAD_MAX_ZIP_RATIO`` times its packed size. Entries are read through
:mod:`zipfile`, which never returns more than an entry's declared size and checks each CRC; only stored and
deflated entries are read (bzip2/LZMA inflate without a bound per read: refused, as are encrypted entries and
a zip inside a zip). Entry names are shown in the answer and never used as paths: nothing is written by name.

Each file (or zip entry) becomes one part of a :class:`pacs.dicomweb.stow.PartSpool` and the spool goes to
:meth:`pacs.dicomweb.stow.StowService.store`, the STOW-RS per-part path (File Meta check, size limit, the one
ingest function with the principal's user, role and facility). A zip that turns out to be corrupt while it is
unpacked (a CRC mismatch, a broken deflate stream) refuses the whole upload before the first part is stored.

The answer lists every file: ``stored``, ``duplicate`` (identical content already stored; said only to a
principal who may see that study, to anyone else it is ``stored``) or ``refused`` with the STOW-RS Failure
Reason and its text (a file that is not DICOM is refused, not fatal), with totals.
"""

from __future__ import annotations

import logging
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import IO, Any

from pacs import audit
from pacs.context import AppContext
from pacs.dicomweb.stow import PartSpool, StowItem, StowService
from pacs.errors import InvalidInput
from pacs.ingest import Ingestor, IngestSource
from pacs.security.access import authorize, may_see_study
from pacs.security.principal import Principal
from pacs.security.roles import Capability
from pacs.settings import Settings
from storage.base import CHUNK_SIZE

log = logging.getLogger(__name__)

ZIP_TYPES = frozenset({"application/zip", "application/x-zip-compressed"})
RATIO_FLOOR_BYTES = 64 * 1024 * 1024  # below this a zip's ratio is not checked (a small zip is no bomb)
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_READABLE = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED})
_NAME_CHARS = 255


@dataclass(frozen=True)
class UploadLimits:
    max_files: int
    max_unpacked_bytes: int
    max_ratio: float
    max_object_bytes: int

    @classmethod
    def from_settings(cls, s: Settings) -> UploadLimits:
        return cls(s.upload_max_files, s.upload_max_unpacked_bytes, s.upload_max_zip_ratio, s.max_object_bytes)


def shown_name(name: str) -> str:
    """A client-given name as the answer shows it: printable, at most 255 characters (never a path here)."""
    return "".join(c if c.isprintable() else "?" for c in name)[:_NAME_CHARS]


# -- receiving ---------------------------------------------------------------------------------------------


@dataclass
class UploadedFile:
    number: int
    name: str  # as the client named it (shown only)
    path: Path  # our temporary file, named by number
    size: int = 0
    declared_zip: bool = False  # sent as application/zip: it must be one


class UploadFiles:
    """The received files, each in its own temporary file under one temporary folder; a
    :class:`~pacs.dicomweb.multipart_reader.PartSink` for ``multipart/form-data`` (form fields without a file
    name are ignored). Close it when done: the folder goes."""

    def __init__(self, max_files: int) -> None:
        self.max_files = max_files
        self.files: list[UploadedFile] = []
        self._folder = tempfile.TemporaryDirectory(prefix="pacs-upload-")
        self._current: IO[bytes] | None = None

    def begin_file(self, name: str, content_type: str = "") -> None:
        if len(self.files) >= self.max_files:
            raise InvalidInput(f"more than {self.max_files} files in one upload")
        number = len(self.files) + 1
        path = Path(self._folder.name, f"{number:06d}")
        declared_zip = content_type.split(";", 1)[0].strip().lower() in ZIP_TYPES
        self.files.append(UploadedFile(number, shown_name(name) or f"file {number}", path, 0, declared_zip))
        self._current = path.open("wb")

    def begin_part(self, headers: dict[str, str]) -> None:
        name = _form_filename(headers.get("content-disposition", ""))
        if name is not None:
            self.begin_file(name, headers.get("content-type", ""))

    def part_data(self, data: bytes) -> None:
        if self._current is not None and data:
            self._current.write(data)
            self.files[-1].size += len(data)

    def end_part(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None

    def close(self) -> None:
        self.end_part()
        self._folder.cleanup()


def _form_filename(disposition: str) -> str | None:
    """The file name of a form-data part (RFC 7578; ``filename*`` too), None for a plain field."""
    if not disposition:
        return None
    message = Message()
    message["content-disposition"] = disposition
    name = message.get_filename()
    if name is None:
        return None
    try:  # header bytes arrive as latin-1; browsers put UTF-8 names there
        return name.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return name


# -- what happened to each file -----------------------------------------------------------------------------


STORED, DUPLICATE, REFUSED = "stored", "duplicate", "refused"


@dataclass(frozen=True)
class FileOutcome:
    file: str  # the uploaded file's name
    entry: str  # the path inside the zip ("" for a file uploaded as it is)
    status: str  # stored / duplicate / refused
    sop_instance_uid: str = ""
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    reason: str = ""  # refused: the STOW-RS Failure Reason (hex), or "" when refused before the ingest
    message: str = ""

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"file": self.file, "status": self.status}
        if self.entry:
            out["entry"] = self.entry
        for key in ("sop_instance_uid", "study_instance_uid", "series_instance_uid", "reason", "message"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        return out


@dataclass
class UploadResult:
    files: list[FileOutcome] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for f in self.files if f.status == status)

    @property
    def studies(self) -> list[str]:
        return sorted({f.study_instance_uid for f in self.files if f.status != REFUSED and f.study_instance_uid})

    def as_json(self) -> dict[str, Any]:
        return {"totals": {"files": len(self.files), STORED: self.count(STORED), DUPLICATE: self.count(DUPLICATE),
                           REFUSED: self.count(REFUSED)},
                "studies": self.studies, "files": [f.as_json() for f in self.files]}

    def summary(self) -> str:
        studies = f" studies={','.join(self.studies)[:1500]}" if self.studies else ""
        return (f"files={len(self.files)} stored={self.count(STORED)} duplicate={self.count(DUPLICATE)} "
                f"refused={self.count(REFUSED)}{studies}")


# -- unpacking and storing -------------------------------------------------------------------------------------


@dataclass
class _Unpacked:
    """The spool's parts in upload order, with what each is; a slot is a part number or an outcome decided
    before the ingest (an entry that is not read)."""

    spool: PartSpool
    slots: list[int | FileOutcome] = field(default_factory=list)
    names: dict[int, tuple[str, str]] = field(default_factory=dict)  # part number → (file, entry)
    entries: int = 0
    unpacked_bytes: int = 0


def store_upload(ctx: AppContext, ingestor: Ingestor, principal: Principal, files: UploadFiles, *,
                 address: str = "") -> UploadResult:
    """Unpack and store an upload; InvalidInput (nothing stored) for a bad zip or one over the limits."""
    authorize(principal, Capability.STUDY_STORE)
    if not files.files:
        raise InvalidInput("the upload holds no file (send application/zip, application/dicom or "
                           "multipart/form-data with one or more files)")
    limits = UploadLimits.from_settings(ctx.settings)
    unpacked = _Unpacked(PartSpool(limits.max_object_bytes))
    try:
        for upload in files.files:
            _add_file(unpacked, upload, limits)
        source = IngestSource("upload", user=principal.subject, role=principal.role.value,
                              address=address or principal.source_address, facility=principal.facility)
        service = StowService(ingestor, ctx.read_sessions, max_object_bytes=limits.max_object_bytes,
                              max_inflated_bytes=ctx.settings.max_inflated_bytes,
                              assume_utf8_for_latin1=ctx.settings.assume_utf8_for_latin1)
        stow = service.store(unpacked.spool, source)
    finally:
        unpacked.spool.close()
    items = {item.number: item for item in stow.items}
    with ctx.read_sessions() as session:
        visible = {uid for uid in {i.study_instance_uid for i in stow.items if i.duplicate and i.study_instance_uid}
                   if may_see_study(session, principal.scope, uid)}
    result = UploadResult([slot if isinstance(slot, FileOutcome)
                           else _outcome(unpacked.names[slot], items[slot], visible) for slot in unpacked.slots])
    refused = result.count(REFUSED)
    audit.record(ctx.sessions, action="study.upload", actor=principal.subject, role=principal.role.value,
                 source_address=address or principal.source_address,
                 outcome="success" if not refused else "partial" if refused < len(result.files) else "failure",
                 study_instance_uid=result.studies[0] if len(result.studies) == 1 else "", detail=result.summary())
    return result


def _outcome(name: tuple[str, str], item: StowItem, visible_duplicates: set[str]) -> FileOutcome:
    if not item.stored:
        reason = f"{item.failure_reason:04X}" if item.failure_reason is not None else ""
        return FileOutcome(*name, REFUSED, item.sop_instance_uid, "", "", reason, item.comment)
    status = DUPLICATE if item.duplicate and item.study_instance_uid in visible_duplicates else STORED
    return FileOutcome(*name, status, item.sop_instance_uid, item.study_instance_uid, item.series_instance_uid,
                       message=item.comment)


def _is_zip(path: Path) -> bool:
    """Zip magic at the start, and not a DICOM file (a DICOM preamble may hold anything, a zip header too)."""
    with path.open("rb") as fh:
        head = fh.read(132)
    return head[:4] in _ZIP_MAGIC and head[128:132] != b"DICM"


def _add_file(unpacked: _Unpacked, upload: UploadedFile, limits: UploadLimits) -> None:
    if not _is_zip(upload.path):
        if upload.declared_zip:
            raise InvalidInput(f"{upload.name} is sent as a zip but is not one: nothing was stored")
        _count(unpacked, limits, 1, 0)
        with upload.path.open("rb") as fh:
            _add_part(unpacked, (upload.name, ""), fh, fh.read(CHUNK_SIZE))
        return
    try:
        with zipfile.ZipFile(upload.path) as archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
            _check_zip(upload, members, unpacked, limits)
            for member in members:
                _add_member(unpacked, upload, archive, member)
    except InvalidInput:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as exc:
        raise InvalidInput(f"{upload.name} is not a readable zip ({_reason(exc)}): nothing was stored") from exc


def _reason(exc: Exception) -> str:
    text = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
    return text


def _count(unpacked: _Unpacked, limits: UploadLimits, entries: int, size: int) -> None:
    unpacked.entries += entries
    unpacked.unpacked_bytes += size
    if unpacked.entries > limits.max_files:
        raise InvalidInput(f"more than {limits.max_files} files in one upload (zip entries included): "
                           "nothing was stored")
    if unpacked.unpacked_bytes > limits.max_unpacked_bytes:
        raise InvalidInput(f"the upload unpacks to more than {limits.max_unpacked_bytes} bytes: nothing was stored")


def _check_zip(upload: UploadedFile, members: list[zipfile.ZipInfo], unpacked: _Unpacked,
               limits: UploadLimits) -> None:
    """The limits, from the central directory alone (before any entry is read)."""
    unpacked_size = sum(m.file_size for m in members)
    packed_size = sum(m.compress_size for m in members)
    _count(unpacked, limits, len(members), unpacked_size)
    if unpacked_size > RATIO_FLOOR_BYTES and unpacked_size > limits.max_ratio * max(packed_size, 1):
        raise InvalidInput(f"{upload.name} unpacks to {unpacked_size} bytes from {packed_size}: more than "
                           f"{limits.max_ratio:g} times its size (a zip bomb?): nothing was stored")


def _add_member(unpacked: _Unpacked, upload: UploadedFile, archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> None:
    name = (upload.name, shown_name(member.filename))
    if member.flag_bits & 0x1:
        unpacked.slots.append(FileOutcome(*name, REFUSED, message="encrypted zip entry: not read"))
        return
    if member.compress_type not in _READABLE:
        unpacked.slots.append(FileOutcome(*name, REFUSED, message=f"zip compression method {member.compress_type} "
                                          "is not supported (stored or deflated only): not read"))
        return
    with archive.open(member) as fh:
        first = fh.read(CHUNK_SIZE)
        if first[:4] in _ZIP_MAGIC and first[128:132] != b"DICM":
            unpacked.slots.append(FileOutcome(*name, REFUSED, message="a zip inside a zip is not unpacked"))
            return
        _add_part(unpacked, name, fh, first)


def _add_part(unpacked: _Unpacked, name: tuple[str, str], fh: IO[bytes], first: bytes) -> None:
    """Copy one file into the spool as a STOW-RS part (the spool keeps at most the object size limit)."""
    spool = unpacked.spool
    spool.begin_part({})
    number = spool.parts[-1].number
    chunk = first
    while chunk:
        spool.part_data(chunk)
        chunk = fh.read(CHUNK_SIZE)
    spool.end_part()
    unpacked.names[number] = name
    unpacked.slots.append(number)
