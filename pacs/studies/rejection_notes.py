"""IHE IOCM rejection notes: Key Object Selection documents whose title is a CID 7011 rejection reason.

:func:`build_rejection_note` makes the note of a rejection decided here (highdicom's
:class:`~highdicom.ko.KeyObjectSelectionDocument`, like the key images of :mod:`pacs.reports.key_images`);
:func:`read_rejection_note` recognises one among received objects (ours, a modality's, another PACS's) and
lists what it rejects. Both are pure: the index side is :mod:`pacs.studies.rejection`.

A note references every rejected instance twice, as IOCM asks: in its content tree (TID 2010) and in the
Current Requested Procedure Evidence Sequence; the evidence is what is read back (PS3.3 C.17.2: it lists
exactly the instances the content references).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from pacs.errors import InvalidInput
from pacs.studies.models import REASON_BY_CODE, REASON_CODES

KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"
NOTE_SERIES_NUMBER = 9911  # rejection notes' own series (key images use 9902)

_TYPE2_FROM_EVIDENCE = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyID", "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName",
)
_PATIENT_STUDY = (*_TYPE2_FROM_EVIDENCE, "IssuerOfPatientID", "StudyDescription", "SpecificCharacterSet")


@dataclass(frozen=True)
class Reference:
    """One instance a note rejects."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str = ""


@dataclass(frozen=True)
class RejectionNoteContent:
    """What a received rejection note says."""

    reason: str  # one of pacs.studies.models.REASON_CODES
    references: tuple[Reference, ...]  # in evidence order, repeats dropped


def title_code(reason: str) -> Code:
    """The document title of a note for ``reason`` (CID 7011, scheme DCM)."""
    if reason not in REASON_CODES:
        raise InvalidInput(f"unknown rejection reason {reason!r}: one of {', '.join(REASON_CODES)}")
    value, meaning = REASON_CODES[reason]
    return Code(value, "DCM", meaning)


def build_rejection_note(
    header: Dataset,
    references: Sequence[Reference],
    reason: str,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
) -> Dataset:
    """A rejection note for ``references`` (all of ``header``'s study).

    ``header``: one stored object of the study (read without pixel data); the note's patient and study
    attributes are taken from it. The evidence handed to highdicom is a minimal dataset per reference
    (its UIDs over the header's patient/study), so rejecting a large study never reads every object.
    """
    if not references:
        raise InvalidInput("a rejection note needs at least one rejected instance")
    study_uid = str(header.get("StudyInstanceUID", ""))
    base = Dataset()
    for keyword in _PATIENT_STUDY:
        if keyword in header:
            setattr(base, keyword, copy.deepcopy(header[keyword].value))
        elif keyword in _TYPE2_FROM_EVIDENCE:
            setattr(base, keyword, "")
    base.StudyInstanceUID = study_uid
    evidence: list[Dataset] = []
    seen: set[str] = set()
    for ref in references:
        if ref.sop_instance_uid in seen:
            continue
        if ref.study_instance_uid != study_uid:
            raise InvalidInput(f"instance {ref.sop_instance_uid} is not of study {study_uid}")
        seen.add(ref.sop_instance_uid)
        ds = copy.deepcopy(base)
        ds.SeriesInstanceUID = ref.series_instance_uid
        ds.SOPInstanceUID = ref.sop_instance_uid
        ds.SOPClassUID = ref.sop_class_uid
        evidence.append(ds)
    # highdicom (~20 MB per process) loads when a note is made, not with every ingest that checks for one
    from highdicom.ko import KeyObjectSelection, KeyObjectSelectionDocument

    try:
        content = KeyObjectSelection(document_title=title_code(reason), referenced_objects=evidence)
        return KeyObjectSelectionDocument(
            evidence=evidence,
            content=content,
            series_instance_uid=series_instance_uid,
            series_number=NOTE_SERIES_NUMBER,
            sop_instance_uid=sop_instance_uid,
            instance_number=1,
            manufacturer="Filmless PACS",
            specific_character_set="ISO_IR 192",
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise InvalidInput(f"cannot build the rejection note: {exc}") from exc


def rejection_reason(ds: Dataset | None, sop_class_uid: str) -> str | None:
    """The reason when ``ds`` is a rejection note (a KOS titled with a CID 7011 code of scheme DCM), else None."""
    if sop_class_uid != KEY_OBJECT_SELECTION or ds is None:
        return None
    try:
        title = ds.get("ConceptNameCodeSequence")
        if not title:
            return None
        item = title[0]
        if str(item.get("CodingSchemeDesignator", "")).strip() != "DCM":
            return None
        return REASON_BY_CODE.get(str(item.get("CodeValue", "")).strip())
    except (AttributeError, TypeError, ValueError, KeyError, IndexError):
        return None


def read_rejection_note(ds: Dataset, sop_class_uid: str) -> RejectionNoteContent | None:
    """What a rejection note rejects (None when ``ds`` is not one). Malformed references are skipped."""
    reason = rejection_reason(ds, sop_class_uid)
    if reason is None:
        return None
    references: list[Reference] = []
    seen: set[str] = set()
    for study_item in ds.get("CurrentRequestedProcedureEvidenceSequence") or []:
        study_uid = str(study_item.get("StudyInstanceUID", "")).strip()
        for series_item in study_item.get("ReferencedSeriesSequence") or []:
            series_uid = str(series_item.get("SeriesInstanceUID", "")).strip()
            for sop_item in series_item.get("ReferencedSOPSequence") or []:
                sop_uid = str(sop_item.get("ReferencedSOPInstanceUID", "")).strip()
                if not sop_uid or sop_uid in seen:
                    continue
                seen.add(sop_uid)
                references.append(Reference(study_uid, series_uid, sop_uid,
                                            str(sop_item.get("ReferencedSOPClassUID", "")).strip()))
    return RejectionNoteContent(reason, tuple(references))
