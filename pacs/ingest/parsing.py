"""Turning received bytes into a validated, identified DICOM object — without changing the bytes.

Everything here is pure: no store, no database. The ingest service decides what to do
with the :class:`ReceivedObject` (or the :class:`ObjectRejected` reason) it gets back.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cache

import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import BaseTag
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pacs.charset import assumes_utf8, text_of
from pacs.raw_values import ascii_safe_charset, fast_path_available, int_of_raw, text_of_raw
from pacs.text import fold
from storage.keys import (  # also the DIMSE services' UID check (dicom_scp imports it from here)
    is_archived_uid,
    is_valid_uid,
)

PREAMBLE = b"\x00" * 128 + b"DICM"
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
DEFLATED = "1.2.840.10008.1.2.1.99"
_DEFLATED_UID = DEFLATED.encode("ascii")
_DEFLATED_SCAN_LIMIT = 8 * 1024**2  # objects up to this size are searched for _DEFLATED_UID
DEFAULT_MAX_INFLATED_BYTES = 512 * 1024**2  # a deflated dataset may inflate to at most this (PACS_MAX_INFLATED_BYTES)
_DEFER_SIZE = 64 * 1024  # values above this are skipped while parsing (never a second copy of pixel data)
_INFLATE_IN_CHUNK = 256 * 1024  # compressed bytes fed to zlib per step
_INFLATE_OUT_CHUNK = 4 * 1024**2  # inflated bytes produced per step (zlib's max_length)


class RejectReason(StrEnum):
    """Why an object was refused before anything was written."""

    NOT_DICOM = "not-dicom"
    TRUNCATED = "truncated"
    MISSING_ATTRIBUTE = "missing-attribute"
    INVALID_UID = "invalid-uid"
    TOO_LARGE = "too-large"
    MISMATCH = "mismatch"
    NOT_STORABLE = "not-storable"


class ObjectRejected(Exception):
    """The bytes cannot be archived; ``reason`` is machine-readable, the message is for people."""

    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class ReceivedObject:
    """A parsed object: the exact bytes to store and the attributes the index needs."""

    data: bytes  # Part-10 bytes as stored: preamble, File Meta Information, dataset as received
    transfer_syntax_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient: dict[str, str]
    study: dict[str, str]
    series: dict[str, str | int | None]
    instance: dict[str, int | None]
    # the parsed dataset (large values deferred, not loaded): later steps read more attributes from it instead
    # of parsing ``data`` again (the national identifiers, pacs.persons)
    dataset: Dataset | None = field(default=None, repr=False, compare=False)


def parse_received(
    data: bytes,
    *,
    max_bytes: int,
    assume_utf8_for_latin1: bool = True,
    expected_sop_instance_uid: str | None = None,
    expected_sop_class_uid: str | None = None,
    max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES,
    strict_uids: bool = True,
    plain_values: bool = True,
) -> ReceivedObject:
    """Validate and identify ``data`` (a Part-10 file or a bare dataset), or raise ObjectRejected.

    Hostile input never escapes as another exception: a deflated dataset is inflated step by step
    and refused as soon as it would exceed ``max_inflated_bytes`` (a decompression bomb is never
    inflated in full), lying lengths are refused as truncated or malformed, and anything pydicom
    trips over is refused as malformed.

    ``plain_values``: plain values are read from their raw bytes (:mod:`pacs.raw_values`, the same result);
    False reads every value through pydicom (the reference the tests compare with).
    """
    try:
        return _parse_received(data, max_bytes=max_bytes, assume_utf8_for_latin1=assume_utf8_for_latin1,
                               expected_sop_instance_uid=expected_sop_instance_uid,
                               expected_sop_class_uid=expected_sop_class_uid,
                               max_inflated_bytes=max_inflated_bytes, strict_uids=strict_uids,
                               plain_values=plain_values)
    except ObjectRejected:
        raise
    except MemoryError as exc:
        raise ObjectRejected(RejectReason.TOO_LARGE, "out of memory while parsing the object") from exc
    except Exception as exc:  # a parser bug on hostile input must be a refusal, not a crash
        raise ObjectRejected(RejectReason.NOT_DICOM, f"malformed DICOM: {_short(exc)}") from exc


def _parse_received(
    data: bytes,
    *,
    max_bytes: int,
    assume_utf8_for_latin1: bool,
    expected_sop_instance_uid: str | None,
    expected_sop_class_uid: str | None,
    max_inflated_bytes: int,
    strict_uids: bool,
    plain_values: bool = True,
) -> ReceivedObject:
    if len(data) > max_bytes:
        raise ObjectRejected(RejectReason.TOO_LARGE, f"object of {len(data)} bytes exceeds {max_bytes}")
    if len(data) < 8:
        raise ObjectRejected(RejectReason.NOT_DICOM, "not a DICOM object: fewer than 8 bytes")
    part10 = data if data[128:132] == b"DICM" else None
    ds = _read_dataset(part10 if part10 is not None else data, has_preamble=part10 is not None,
                       max_inflated_bytes=max_inflated_bytes)
    if part10 is None:
        part10 = _wrap_bare_dataset(data, ds)
    meta = ds.file_meta
    tsyntax = str(meta.get("TransferSyntaxUID", ""))
    if not tsyntax:
        raise ObjectRejected(RejectReason.NOT_DICOM, "File Meta Information has no Transfer Syntax UID")

    values = _Values(ds, assume_utf8_for_latin1, plain_values and fast_path_available())
    text, integer, decode = values.text, values.integer, values.decoded
    uids = {}
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        value = text(keyword)
        if not value:
            if keyword == "SOPClassUID" and str(meta.get("MediaStorageSOPClassUID", "")) == MEDIA_STORAGE_DIRECTORY:
                raise ObjectRejected(RejectReason.NOT_STORABLE, "a DICOMDIR is a media index, not an instance")
            raise ObjectRejected(RejectReason.MISSING_ATTRIBUTE, f"missing {keyword}")
        if not (is_valid_uid(value) if strict_uids else is_archived_uid(value)):
            raise ObjectRejected(RejectReason.INVALID_UID, f"invalid {keyword} {value[:70]!r}")
        uids[keyword] = value
    if not is_valid_uid(tsyntax):
        raise ObjectRejected(RejectReason.INVALID_UID, f"invalid Transfer Syntax UID {tsyntax[:70]!r}")
    if expected_sop_instance_uid and expected_sop_instance_uid != uids["SOPInstanceUID"]:
        raise ObjectRejected(
            RejectReason.MISMATCH,
            f"dataset SOP Instance UID {uids['SOPInstanceUID']} differs from the request's "
            f"{expected_sop_instance_uid}",
        )
    if expected_sop_class_uid and expected_sop_class_uid != uids["SOPClassUID"]:
        raise ObjectRejected(RejectReason.MISMATCH, "dataset SOP Class UID differs from the request's")

    values.start_decoding()
    patient_name = decode("PatientName")
    description = decode("StudyDescription")
    return ReceivedObject(
        data=part10,
        transfer_syntax_uid=tsyntax,
        sop_class_uid=uids["SOPClassUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        study_instance_uid=uids["StudyInstanceUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        patient={
            "patient_id": decode("PatientID")[:64],
            "issuer_of_patient_id": decode("IssuerOfPatientID")[:64],
            "patient_name": patient_name[:324],
            "patient_name_search": fold(patient_name)[:324],
            "patient_birth_date": text("PatientBirthDate")[:8],
            "patient_sex": text("PatientSex")[:16],
        },
        study={
            "study_date": text("StudyDate")[:8],
            "study_time": text("StudyTime")[:16],
            "accession_number": decode("AccessionNumber")[:64],
            "study_id": decode("StudyID")[:16],
            "study_description": description[:256],
            "study_description_search": fold(description)[:256],
            "referring_physician_name": decode("ReferringPhysicianName")[:324],
            "institution_name": decode("InstitutionName")[:256],
            "specific_character_set": "\\".join(_charsets(ds))[:128],
        },
        series={
            "modality": text("Modality")[:16],
            "series_number": integer("SeriesNumber"),
            "series_description": decode("SeriesDescription")[:256],
            "body_part_examined": text("BodyPartExamined")[:64],
            "series_date": text("SeriesDate")[:8],
            "series_time": text("SeriesTime")[:16],
            "station_name": decode("StationName")[:64],
        },
        instance={
            "instance_number": integer("InstanceNumber"),
            "rows": integer("Rows"),
            "columns": integer("Columns"),
            "number_of_frames": integer("NumberOfFrames"),
        },
        dataset=ds,
    )


def _read_dataset(data: bytes, *, has_preamble: bool, max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES) -> Dataset:
    """Parse every element (so truncation is noticed) without keeping a second copy of pixel data."""
    meta = _peek_file_meta(data, has_preamble) if _may_be_deflated(data) else None
    if meta is not None and str(meta[0].get("TransferSyntaxUID", "")).strip(" \x00") == DEFLATED:
        if not has_preamble:  # it would be wrapped under another transfer syntax: refuse
            raise ObjectRejected(RejectReason.NOT_DICOM, "deflated dataset without the DICM prefix")
        return _read_deflated(data, meta[0], meta[1], max_inflated_bytes)
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=not has_preamble, defer_size=_DEFER_SIZE)
    except (InvalidDicomError, EOFError) as exc:
        raise ObjectRejected(RejectReason.TRUNCATED if isinstance(exc, EOFError) else RejectReason.NOT_DICOM,
                             f"cannot parse DICOM: {_short(exc)}") from exc
    except Exception as exc:  # pydicom raises many types on malformed input
        raise ObjectRejected(RejectReason.NOT_DICOM, f"malformed or truncated DICOM: {_short(exc)}") from exc
    if not has_preamble and not (_has_tag(ds, 0x00080016) and _has_tag(ds, 0x00080018)):
        raise ObjectRejected(RejectReason.NOT_DICOM,
                             "not a DICOM object: no DICM prefix and no SOP Class/Instance UID")
    if str(getattr(ds.file_meta, "TransferSyntaxUID", "")) == DEFLATED:  # pydicom inflated it unbounded
        raise ObjectRejected(RejectReason.NOT_DICOM, "deflated dataset with unreadable File Meta Information")
    _check_complete(ds, data)
    if len(ds) == 0:
        raise ObjectRejected(RejectReason.NOT_DICOM, "not a DICOM object: no data elements")
    return ds


def _may_be_deflated(data: bytes) -> bool:
    """Could the File Meta Information name the Deflated transfer syntax?  Its UID's bytes must then occur in
    ``data``; looking for them costs far less than reading the File Meta Information a second time (``dcmread``
    reads it again), so the peek is skipped when they do not. A large object is peeked at without looking."""
    return len(data) > _DEFLATED_SCAN_LIMIT or _DEFLATED_UID in data


def _peek_file_meta(data: bytes, has_preamble: bool) -> tuple[FileMetaDataset, int] | None:
    """The File Meta Information and where the dataset starts; None when pydicom cannot read it
    (``dcmread`` then reports why)."""
    try:
        fh = io.BytesIO(data)
        read_preamble(fh, not has_preamble)
        meta = _read_file_meta_info(fh)
        return meta, fh.tell()
    except Exception:
        return None


def _read_deflated(data: bytes, meta: FileMetaDataset, offset: int, max_inflated_bytes: int) -> Dataset:
    """Inflate with a bound, then parse the inflated stream as Explicit VR Little Endian (PS3.5 A.5)."""
    inflated = inflate_bounded(memoryview(data)[offset:], max_inflated_bytes)
    try:
        ds = read_dataset(io.BytesIO(inflated), False, True, defer_size=_DEFER_SIZE)
    except EOFError as exc:
        raise ObjectRejected(RejectReason.TRUNCATED, f"cannot parse DICOM: {_short(exc)}") from exc
    except Exception as exc:
        raise ObjectRejected(RejectReason.NOT_DICOM, f"malformed or truncated DICOM: {_short(exc)}") from exc
    ds.file_meta = meta
    _check_complete(ds, inflated)  # offsets are in the inflated stream
    if len(ds) == 0:
        raise ObjectRejected(RejectReason.NOT_DICOM, "not a DICOM object: no data elements")
    return ds


def inflate_bounded(deflated: bytes | memoryview, limit: int) -> bytes:
    """Inflate a raw deflate stream step by step; refuse it once it would exceed ``limit`` bytes.

    At most ``limit`` plus one step of inflated bytes is ever held: a decompression bomb costs
    the time to inflate ``limit`` bytes, not its full size.
    """
    view = memoryview(deflated)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    pos = 0
    pending: bytes | memoryview = b""
    try:
        while not inflater.eof:
            if not pending:
                if pos >= len(view):
                    break  # all input consumed, stream not finished
                pending = view[pos:pos + _INFLATE_IN_CHUNK]
                pos += len(pending)
            piece = inflater.decompress(pending, min(_INFLATE_OUT_CHUNK, limit + 1 - len(out)))
            out += piece
            if len(out) > limit:
                raise ObjectRejected(RejectReason.NOT_DICOM,
                                     f"deflate bomb: dataset inflates past {limit} bytes")
            pending = inflater.unconsumed_tail
    except zlib.error as exc:
        raise ObjectRejected(RejectReason.NOT_DICOM, f"corrupt deflated dataset: {_short(exc)}") from exc
    if not inflater.eof:
        raise ObjectRejected(RejectReason.TRUNCATED, "truncated: the deflated dataset ends before its stream does")
    # Bytes after the end of the stream (a pad byte, some writers' gzip-style trailer) are ignored, as
    # pydicom and DCMTK do; they are stored as received all the same.
    return bytes(out)


def _check_complete(ds: Dataset, data: bytes) -> None:
    """Refuse objects that end before their last element does, or carry bytes no element accounts for.

    pydicom stops quietly at a partial element header, so completeness is checked here from the
    raw elements' offsets: the last element must end exactly where the received bytes end.
    """
    total = len(data)
    elements = list(ds.values())  # raw elements: offsets and lengths as read, nothing decoded
    if not elements:
        return
    last = elements[-1]
    tell = getattr(last, "value_tell", None)
    length = getattr(last, "length", None)
    if tell is None or length is None:
        return
    if length == 0xFFFFFFFF:  # undefined length: the value was read up to its 8-byte delimiter
        value = getattr(last, "value", None)
        if value is None:  # deferred: the object must end with a Sequence Delimitation Item
            trailer = _trailer(ds)
            if trailer is None:
                return
            if not data.endswith(trailer):
                raise ObjectRejected(RejectReason.TRUNCATED,
                                     f"truncated: element {last.tag} has no sequence delimiter at the end")
            return
        end = tell + len(value) + 8
    else:
        end = tell + length
    if end > total:
        raise ObjectRejected(RejectReason.TRUNCATED,
                             f"truncated: element {last.tag} ends at byte {end}, only {total} received")
    if end < total:
        raise ObjectRejected(RejectReason.TRUNCATED,
                             f"truncated or malformed: {total - end} trailing bytes are not a complete element")


_SEQ_DELIMITER_LE = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_SEQ_DELIMITER_BE = b"\xff\xfe\xe0\xdd\x00\x00\x00\x00"


def _trailer(ds: Dataset) -> bytes | None:
    encoding = getattr(ds, "original_encoding", None)
    if encoding is None:
        return None
    return _SEQ_DELIMITER_LE if encoding[1] else _SEQ_DELIMITER_BE


def _has_tag(ds: Dataset, tag: int) -> bool:
    return tag in ds._dict


def _wrap_bare_dataset(data: bytes, ds: Dataset) -> bytes:
    """Give a bare dataset (no preamble, no meta) File Meta Information; the dataset bytes stay as they are."""
    sop_class = _text(ds, "SOPClassUID")
    sop_instance = _text(ds, "SOPInstanceUID")
    if not sop_class or not sop_instance:
        raise ObjectRejected(RejectReason.NOT_DICOM, "not a DICOM object: no SOP Class/Instance UID")
    if not (is_valid_uid(sop_class) and is_valid_uid(sop_instance)):
        raise ObjectRejected(RejectReason.INVALID_UID, f"invalid SOP UID {sop_instance[:70]!r}")
    tsyntax = ImplicitVRLittleEndian if ds.original_encoding[0] else ExplicitVRLittleEndian
    if ds.original_encoding == (False, False):
        tsyntax = UID("1.2.840.10008.1.2.2")  # Explicit VR Big Endian
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = tsyntax
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    buf = DicomBytesIO()
    buf.write(PREAMBLE)
    write_file_meta_info(buf, meta, enforce_standard=True)
    buf.write(data)
    ds.file_meta = meta
    return buf.getvalue()


class _Values:
    """The values ingest reads: plain ones from their raw bytes (:mod:`pacs.raw_values`), others through pydicom
    (:func:`_text`, :func:`_int`, :func:`pacs.charset.text_of`: the same result, the reference)."""

    def __init__(self, ds: Dataset, assume_utf8_for_latin1: bool, plain: bool) -> None:
        self._ds = ds
        self._elements = ds._dict
        self._plain = plain
        self._assume_utf8_for_latin1 = assume_utf8_for_latin1
        self._utf8 = False  # assumes_utf8(ds, ...): see start_decoding
        self._text_ok = False  # ascii_safe_charset(ds)

    def start_decoding(self) -> None:
        """Read the Specific Character Set for :meth:`decoded` (where ingest always did: after the UIDs)."""
        self._utf8 = assumes_utf8(self._ds, self._assume_utf8_for_latin1)
        self._text_ok = self._plain and ascii_safe_charset(self._ds)

    def text(self, keyword: str) -> str:
        """:func:`_text`: a string or UID value, values joined with a backslash, '' when absent."""
        tag, vr = _tag_vr(keyword)
        raw = self._elements.get(tag)
        if raw is None:
            return ""
        if self._plain:
            text = text_of_raw(raw, vr, False)
            if text is not None:
                return text
        return _text(self._ds, keyword)

    def decoded(self, keyword: str) -> str:
        """:func:`pacs.charset.text_of` under the dataset's UTF-8 rule."""
        tag, vr = _tag_vr(keyword)
        raw = self._elements.get(tag)
        if raw is None:
            return ""
        if self._plain:
            text = text_of_raw(raw, vr, self._text_ok)
            if text is not None:
                return text
        return text_of(self._ds, keyword, self._utf8)

    def integer(self, keyword: str) -> int | None:
        """:func:`_int`: the first value as a 32-bit int, None when absent or not one."""
        tag, vr = _tag_vr(keyword)
        raw = self._elements.get(tag)
        if raw is None:
            return None
        if self._plain:
            plain, number = int_of_raw(raw, vr)
            if plain:
                return number if number is None or -(2**31) <= number < 2**31 else None
        return _int(self._ds, keyword)


@cache
def _tag_vr(keyword: str) -> tuple[BaseTag, str]:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return BaseTag(tag), dictionary_VR(tag)


def _charsets(ds: Dataset) -> list[str]:
    """The labels as received (the index stores them so; pacs.charset reads them for the rule)."""
    value = ds.get("SpecificCharacterSet", "")
    if isinstance(value, str):
        return [value] if value else []
    return [str(v) for v in value]


def _text(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword, "")
    except Exception:
        return ""
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value).strip(" \x00")
    return str(value).strip(" \x00")


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            return None
        if isinstance(value, pydicom.multival.MultiValue):
            value = value[0]
        number = int(value)
    except Exception:
        return None
    return number if -(2**31) <= number < 2**31 else None


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]
