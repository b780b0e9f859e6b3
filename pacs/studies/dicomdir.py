"""The DICOMDIR of an exported study: a Basic Directory (PS3.10 §8, PS3.3 Annex F) built from the index.

The records form the usual four-level tree, PATIENT → STUDY → SERIES → one leaf per instance, the leaf's type
chosen by SOP class (:func:`leaf_record_type`: IMAGE, SR DOCUMENT, KEY OBJECT DOC, PRESENTATION, …). PATIENT,
STUDY, SERIES and IMAGE records are made from index columns alone; the other leaf types need attributes the
index does not keep (an SR's Concept Name, a presentation state's Content Label): their records are made by
pydicom's :data:`pydicom.fileset.DIRECTORY_RECORDERS` from the object's header, read without its bulk data.

pydicom's :class:`~pydicom.fileset.FileSet` writes a DICOMDIR only together with a copy of every file on disk,
which an export streamed into a zip cannot use. :func:`encode_dicomdir` therefore writes the Directory Record
Sequence itself, the way ``FileSet`` does: every record's encoded length is known before any offset is (the
offsets are fixed-length UL values), so one pass computes where each record's Item starts (counted from the
first byte of the file, preamble included: PS3.3 F.3.2.1) and a second writes the file with them.

File IDs (:func:`file_id`) are at most 8 components of at most 8 characters from ``A-Z 0-9 _`` (PS3.10 §8.2,
8.5); the export names them, never the user or the object.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.fileset import DIRECTORY_RECORDERS
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, MediaStorageDirectoryStorage, generate_uid

log = logging.getLogger(__name__)

UTF8 = "ISO_IR 192"
_COMPONENT = re.compile(r"^[A-Z0-9_]{1,8}$")
MAX_FILE_ID_COMPONENTS = 8
_FIRST = 0x00041200  # Offset of the First Directory Record of the Root Directory Entity
_SEQUENCE = 0x00041220  # Directory Record Sequence
_SEQUENCE_HEADER = 12  # explicit VR: tag, "SQ", two reserved bytes, 32-bit length
_ITEM_HEADER = 8  # item tag and 32-bit length (items are written with their length, no delimiter)

# SOP class name (as pydicom knows it) → leaf record type (PS3.3 F.4); first match wins; anything else: IMAGE
_LEAF_BY_NAME: tuple[tuple[str, str], ...] = (
    ("Key Object Selection", "KEY OBJECT DOC"),
    ("Presentation State", "PRESENTATION"),
    ("Structured Display", "PRESENTATION"),
    ("SR Storage", "SR DOCUMENT"),
    ("Procedure Log", "SR DOCUMENT"),
    ("Report Storage", "SR DOCUMENT"),
    ("Waveform", "WAVEFORM"),
    ("Encapsulated", "ENCAP DOC"),
    ("RT Dose", "RT DOSE"),
    ("RT Structure Set", "RT STRUCTURE SET"),
    ("RT Plan", "RT PLAN"),
    ("RT Ion Plan", "RT PLAN"),
    ("Treatment Record", "RT TREAT RECORD"),
    ("Treatment Summary Record", "RT TREAT RECORD"),
    ("Raw Data", "RAW DATA"),
    ("Spatial Registration", "REGISTRATION"),
    ("Spatial Fiducials", "FIDUCIAL"),
    ("Real World Value Mapping", "VALUE MAP"),
    ("Spectroscopy", "SPECTROSCOPY"),
)
# Type 1 keys of leaf records that an object may lack or leave empty, and what the record says instead
_LEAF_DEFAULTS: dict[str, object] = {
    "InstanceNumber": 1, "ContentTime": "000000", "CompletionFlag": "PARTIAL", "VerificationFlag": "UNVERIFIED",
    "PresentationCreationTime": "000000", "ContentLabel": "UNNAMED", "StructureSetLabel": "UNNAMED",
    "RTPlanLabel": "UNNAMED", "DoseSummationType": "PLAN",
}
_LEAF_DATE_DEFAULTS = ("ContentDate", "PresentationCreationDate")


def leaf_record_type(sop_class_uid: str) -> str:
    """The Directory Record Type of an instance of ``sop_class_uid`` (PS3.3 F.4); IMAGE for image storage and
    for any class not named here."""
    name = UID(sop_class_uid).name if sop_class_uid else ""
    for part, record_type in _LEAF_BY_NAME:
        if part in name:
            return record_type
    return "IMAGE"


def file_id(*components: str) -> list[str]:
    """A Referenced File ID: 1-8 components of 1-8 characters ``A-Z 0-9 _`` (PS3.10 §8.2); ValueError else."""
    if not 1 <= len(components) <= MAX_FILE_ID_COMPONENTS or not all(_COMPONENT.match(c) for c in components):
        raise ValueError(f"not a PS3.10 File ID: {'/'.join(components)!r}")
    return list(components)


@dataclass
class DirectoryRecord:
    """One record and the records of the level below it (the Offset of Referenced Lower-Level Directory Entity)."""

    dataset: Dataset
    children: list[DirectoryRecord] = field(default_factory=list)
    offset: int = 0  # where its Item starts in the DICOMDIR file (set by encode_dicomdir)

    def add(self, child: DirectoryRecord) -> DirectoryRecord:
        self.children.append(child)
        return child


def _record(record_type: str, keys: Dataset) -> DirectoryRecord:
    ds = Dataset()
    ds.OffsetOfTheNextDirectoryRecord = 0
    ds.RecordInUseFlag = 0xFFFF
    ds.OffsetOfReferencedLowerLevelDirectoryEntity = 0
    ds.DirectoryRecordType = record_type
    for element in keys:
        ds.add(element)
    if _has_non_ascii(ds):
        ds.SpecificCharacterSet = UTF8
    return DirectoryRecord(ds)


def _has_non_ascii(ds: Dataset) -> bool:
    for element in ds.iterall():
        values = element.value if isinstance(element.value, list | tuple) else [element.value]
        if any(not str(v).isascii() for v in values if isinstance(v, str) or element.VR == "PN"):
            return True
    return False


def patient_record(patient_id: str, name: str) -> DirectoryRecord:
    """Only the keys of PS3.3 F.5.1 (more is allowed, but validators such as dciodvfy flag each one)."""
    keys = Dataset()
    keys.PatientName = name  # Type 2
    keys.PatientID = patient_id or "UNKNOWN"  # Type 1
    return _record("PATIENT", keys)


def study_record(study_instance_uid: str, *, study_date: str, study_time: str, study_id: str,
                 accession_number: str, description: str) -> DirectoryRecord:
    """Study Date, Time and ID are Type 1 in the record: an index that has none gets stand-ins (the date the
    archive received the study, midnight, "1")."""
    keys = Dataset()
    keys.StudyDate = study_date
    keys.StudyTime = study_time or "000000"
    keys.StudyDescription = description
    keys.StudyInstanceUID = study_instance_uid
    keys.StudyID = study_id or "1"
    keys.AccessionNumber = accession_number
    return _record("STUDY", keys)


def series_record(series_instance_uid: str, *, modality: str, series_number: int,
                  description: str = "") -> DirectoryRecord:
    keys = Dataset()
    keys.Modality = modality or "OT"
    keys.SeriesInstanceUID = series_instance_uid
    keys.SeriesNumber = series_number
    if description:
        keys.SeriesDescription = description
    return _record("SERIES", keys)


@dataclass(frozen=True)
class FileReference:
    """Where an instance is in the file-set and what it is (the leaf's Referenced … in File keys)."""

    file_id: Sequence[str]
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


def image_record(ref: FileReference, *, instance_number: int) -> DirectoryRecord:
    keys = Dataset()
    keys.InstanceNumber = instance_number
    return _referencing(_record("IMAGE", keys), ref)


def leaf_record(record_type: str, ref: FileReference, header: Dataset, *, instance_number: int,
                fallback_date: str) -> DirectoryRecord:
    """A non-IMAGE leaf from the object's ``header`` (pydicom's recorder for that type). Type 1 keys the object
    lacks get stand-ins (:data:`_LEAF_DEFAULTS`, ``fallback_date``); an object that still does not give the
    record its keys is listed as IMAGE (logged): every file of the export stays referenced."""
    header = Dataset(header)
    for keyword, value in _LEAF_DEFAULTS.items():
        if not header.get(keyword):
            setattr(header, keyword, instance_number if keyword == "InstanceNumber" else value)
    for keyword in _LEAF_DATE_DEFAULTS:
        if not header.get(keyword):
            setattr(header, keyword, fallback_date)
    try:
        keys = DIRECTORY_RECORDERS[record_type](header)
    except (KeyError, ValueError, AttributeError) as exc:
        log.warning("DICOMDIR: %s %s has no %s record keys (%s): listed as IMAGE", ref.sop_class_uid,
                    ref.sop_instance_uid, record_type, exc)
        return image_record(ref, instance_number=instance_number)
    if "ContentSequence" in keys:  # the recorders copy the whole content tree; the record keeps concept modifiers
        modifiers = [item for item in keys.ContentSequence if item.get("RelationshipType") == "HAS CONCEPT MOD"]
        if modifiers:  # (PS3.3 F.5.19, F.5.22: Content Sequence of SR DOCUMENT and KEY OBJECT DOC records)
            keys.ContentSequence = modifiers
        else:
            del keys.ContentSequence
    return _referencing(_record(record_type, keys), ref)


def _referencing(record: DirectoryRecord, ref: FileReference) -> DirectoryRecord:
    ds = record.dataset
    ds.ReferencedFileID = list(ref.file_id)
    ds.ReferencedSOPClassUIDInFile = ref.sop_class_uid
    ds.ReferencedSOPInstanceUIDInFile = ref.sop_instance_uid
    ds.ReferencedTransferSyntaxUIDInFile = ref.transfer_syntax_uid
    return record


def _walk(records: list[DirectoryRecord]) -> Iterator[DirectoryRecord]:
    """Records in the order the sequence holds them: each record, then the entity below it (pre-order)."""
    for record in records:
        yield record
        yield from _walk(record.children)


def _encoded_length(ds: Dataset) -> int:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return len(buffer.getvalue())


def encode_dicomdir(roots: list[DirectoryRecord], *, file_set_id: str = "") -> bytes:
    """The DICOMDIR file (Explicit VR Little Endian) whose root directory entity is ``roots``."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MediaStorageDirectoryStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.FileSetID = file_set_id
    ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.FileSetConsistencyFlag = 0
    ds.DirectoryRecordSequence = []

    head = _start(ds)
    write_dataset(head, ds[:_SEQUENCE])
    position = head.tell() + _SEQUENCE_HEADER
    ordered = list(_walk(roots))
    for record in ordered:  # the offsets' values do not change the lengths (fixed-length UL)
        record.offset = position
        position += _ITEM_HEADER + _encoded_length(record.dataset)
    for siblings in [roots, *(r.children for r in ordered)]:
        for n, record in enumerate(siblings):
            record.dataset.OffsetOfTheNextDirectoryRecord = siblings[n + 1].offset if n + 1 < len(siblings) else 0
            record.dataset.OffsetOfReferencedLowerLevelDirectoryEntity = (
                record.children[0].offset if record.children else 0)
    if roots:
        ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = roots[0].offset
        ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = roots[-1].offset
    ds.DirectoryRecordSequence = [r.dataset for r in ordered]

    out = _start(ds)
    write_dataset(out, ds)
    data = out.getvalue()
    if len(data) != position:  # the layout computed above is the layout written; anything else is a bug
        raise RuntimeError(f"DICOMDIR layout mismatch: {len(data)} bytes written, {position} computed")
    return data


def _start(ds: Dataset) -> DicomBytesIO:
    """A buffer holding the preamble, ``DICM`` and the File Meta Information, ready for the dataset."""
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    out.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(out, ds.file_meta, enforce_standard=True)
    return out
