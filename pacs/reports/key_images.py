"""Key images of a study as a DICOM Key Object Selection document (TID 2010, "Of Interest").

Built with highdicom's :class:`highdicom.ko.KeyObjectSelectionDocument`, which takes patient and
study from the evidence. A KOS's Current Requested Procedure Evidence Sequence lists exactly the
instances its content references (PS3.3 C.17.2), so the selected instances' own datasets are the
evidence handed to highdicom; an instance can only be selected when its dataset is among the
caller's evidence and belongs to the evidence study (the first dataset's study).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from highdicom.ko import KeyObjectSelection, KeyObjectSelectionDocument
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import UID

from pacs.errors import InvalidInput

__all__ = ["build_key_object_selection"]

_TYPE2_FROM_EVIDENCE = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyID", "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName",
)


def build_key_object_selection(
    evidence: Sequence[Dataset],
    selected: Sequence[tuple[str, str, str]],
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int = 9902,
    instance_number: int = 1,
    description: str = "",
) -> Dataset:
    """A KOS (document title (113000, DCM, "Of Interest")) referencing ``selected`` instances.

    ``evidence``: datasets (read without pixel data) of the study's instances, including every
    selected one; the first dataset's study is the document's study.
    ``selected``: (series instance UID, SOP instance UID, SOP class UID) of each key image, in
    display order; repeats are dropped.

    Raises :class:`pacs.errors.InvalidInput` when nothing is selected, when a selected instance is
    not among the evidence or belongs to another study, or when its UIDs disagree with its dataset.
    """
    if not evidence:
        raise InvalidInput("a key object selection needs the study's instances as evidence")
    if not selected:
        raise InvalidInput("a key object selection needs at least one selected instance")
    for label, uid in (("series instance UID", series_instance_uid), ("SOP instance UID", sop_instance_uid)):
        if not uid or not UID(uid).is_valid:
            raise InvalidInput(f"invalid key object selection {label} {uid!r}")
    study_uid = str(evidence[0].get("StudyInstanceUID", ""))
    if not study_uid:
        raise InvalidInput("the first evidence dataset has no StudyInstanceUID")
    by_sop = {str(ds.get("SOPInstanceUID", "")): ds for ds in evidence}

    references: list[Dataset] = []
    seen: set[str] = set()
    for series_uid, sop_uid, sop_class_uid in selected:
        if sop_uid in seen:
            continue
        seen.add(sop_uid)
        ds = by_sop.get(sop_uid)
        if ds is None:
            raise InvalidInput(f"selected instance {sop_uid} is not among the evidence of study {study_uid}")
        if str(ds.get("StudyInstanceUID", "")) != study_uid:
            raise InvalidInput(
                f"selected instance {sop_uid} belongs to study {ds.get('StudyInstanceUID')}, not {study_uid}"
            )
        if str(ds.get("SeriesInstanceUID", "")) != series_uid or str(ds.get("SOPClassUID", "")) != sop_class_uid:
            raise InvalidInput(f"selected instance {sop_uid}: series or SOP class differ from its dataset")
        references.append(ds)

    first = copy.deepcopy(references[0])  # highdicom reads these Type 2 attributes unguarded
    for keyword in _TYPE2_FROM_EVIDENCE:
        if keyword not in first:
            setattr(first, keyword, "")
    references[0] = first

    try:
        content = KeyObjectSelection(
            document_title=codes.DCM.OfInterest,
            referenced_objects=references,
            description=description.strip() or None,
        )
        return KeyObjectSelectionDocument(
            evidence=references,
            content=content,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=instance_number,
            manufacturer="Filmless PACS",
            specific_character_set="ISO_IR 192",
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise InvalidInput(f"cannot build the key object selection: {exc}") from exc
