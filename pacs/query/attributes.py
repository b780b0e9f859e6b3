"""The query keys the index can answer: for each DICOM keyword, its level, VR and index column.

One table serves C-FIND (PS3.4 C.6 Patient/Study Root) and QIDO-RS (PS3.18 10.6): a key is
available at its own level and every level below it (patient keys at study, series and image
level, and so on), which is what QIDO-RS needs and what a lenient C-FIND SCP offers.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Any

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import InstrumentedAttribute

from pacs.db.models import Instance, Patient, Series, Study
from pacs.query.matching import Column


class Level(StrEnum):
    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"

    @property
    def depth(self) -> int:
        return _DEPTH[self]


_DEPTH = {Level.PATIENT: 0, Level.STUDY: 1, Level.SERIES: 2, Level.IMAGE: 3}


class Root(StrEnum):
    """The information model: where the hierarchy starts."""

    PATIENT_ROOT = "PATIENT_ROOT"
    STUDY_ROOT = "STUDY_ROOT"

    @property
    def levels(self) -> tuple[Level, ...]:
        if self is Root.PATIENT_ROOT:
            return (Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE)
        return (Level.STUDY, Level.SERIES, Level.IMAGE)


class Matching(Enum):
    """How a key's value is matched (the matching types themselves are in pacs.query.matching)."""

    DEFAULT = "default"  # C.2.2.2 by VR: single value, wildcard, range, UID list
    PERSON_NAME = "person-name"  # folded column: case- and diacritic-insensitive (matching.person_name)
    FOLDED = "folded"  # free text matched on its folded column, so "chest" finds "Chest"
    MULTI_VALUED = "multi-valued"  # one value of a backslash-joined column (matching.multi_valued)
    RETURN_ONLY = "return-only"  # computed counts: returned, never matched (a value sent is ignored)


@dataclass(frozen=True)
class Attribute:
    keyword: str
    level: Level
    vr: str
    column: Column  # what is returned
    matching: Matching = Matching.DEFAULT
    match_column: Column | None = None  # what is matched, when not ``column`` (folded text)

    @property
    def matched_on(self) -> Column:
        return self.match_column if self.match_column is not None else self.column


# The ORM classes of each level and the unique key (PS3.4 C.6.1.1 / C.6.2.1) that identifies a row.
MODELS: dict[Level, type[Patient | Study | Series | Instance]] = {
    Level.PATIENT: Patient, Level.STUDY: Study, Level.SERIES: Series, Level.IMAGE: Instance,
}
UNIQUE_KEYS: dict[Level, str] = {
    Level.PATIENT: "PatientID",
    Level.STUDY: "StudyInstanceUID",
    Level.SERIES: "SeriesInstanceUID",
    Level.IMAGE: "SOPInstanceUID",
}
# How a level's table joins the level above it.
PARENT_JOINS: dict[Level, tuple[InstrumentedAttribute, InstrumentedAttribute]] = {
    Level.STUDY: (Study.patient_fk, Patient.id),
    Level.SERIES: (Series.study_fk, Study.id),
    Level.IMAGE: (Instance.series_fk, Series.id),
}


def _patient_total(column: Column | None, studies: ColumnElement[bool] | None = None) -> ColumnElement[Any]:
    """A correlated count over the patient's studies (PS3.4 C.3.4: Number of Patient Related ...);
    ``studies``: only the studies this condition allows (the asker's scope)."""
    aggregate = func.count(Study.id) if column is None else func.coalesce(func.sum(column), 0)
    conditions = [Study.patient_fk == Patient.id] + ([studies] if studies is not None else [])
    return select(aggregate).where(*conditions).correlate(Patient).scalar_subquery()


#: The patient-level counts, by keyword: the study column they sum (None: the studies are counted).
PATIENT_TOTALS: dict[str, Column | None] = {
    "NumberOfPatientRelatedStudies": None,
    "NumberOfPatientRelatedSeries": Study.number_of_series,
    "NumberOfPatientRelatedInstances": Study.number_of_instances,
}


def scoped_patient_total(keyword: str, studies: ColumnElement[bool]) -> ColumnElement:
    """The count ``keyword`` (one of :data:`PATIENT_TOTALS`) over the studies ``studies`` allows only, so
    that a patient's studies outside the asker's scope are not even counted."""
    return _patient_total(PATIENT_TOTALS[keyword], studies)


_A = Attribute
_ATTRIBUTES = [
    # Patient (C.6.1.1.2 / C.6.2.1.2 patient keys at study level in Study Root)
    _A("PatientID", Level.PATIENT, "LO", Patient.patient_id),
    _A("PatientName", Level.PATIENT, "PN", Patient.patient_name, Matching.PERSON_NAME, Patient.patient_name_search),
    _A("IssuerOfPatientID", Level.PATIENT, "LO", Patient.issuer_of_patient_id),
    _A("PatientBirthDate", Level.PATIENT, "DA", Patient.patient_birth_date),
    _A("PatientSex", Level.PATIENT, "CS", Patient.patient_sex),
    _A("NumberOfPatientRelatedStudies", Level.PATIENT, "IS", _patient_total(None), Matching.RETURN_ONLY),
    _A("NumberOfPatientRelatedSeries", Level.PATIENT, "IS", _patient_total(Study.number_of_series),
       Matching.RETURN_ONLY),
    _A("NumberOfPatientRelatedInstances", Level.PATIENT, "IS", _patient_total(Study.number_of_instances),
       Matching.RETURN_ONLY),
    # Study
    _A("StudyInstanceUID", Level.STUDY, "UI", Study.study_instance_uid),
    _A("StudyDate", Level.STUDY, "DA", Study.study_date),
    _A("StudyTime", Level.STUDY, "TM", Study.study_time),
    _A("AccessionNumber", Level.STUDY, "SH", Study.accession_number),
    _A("StudyID", Level.STUDY, "SH", Study.study_id),
    _A("StudyDescription", Level.STUDY, "LO", Study.study_description, Matching.FOLDED,
       Study.study_description_search),
    _A("ReferringPhysicianName", Level.STUDY, "PN", Study.referring_physician_name),
    # the institution a study belongs to, labelling other facilities' priors (pacs.persons): as the objects named
    # it, else the code of the facility it was filed under; returned only (matching it would change C-FIND)
    _A("InstitutionName", Level.STUDY, "LO", func.coalesce(func.nullif(Study.institution_name, ""), Study.facility),
       Matching.RETURN_ONLY),
    _A("ModalitiesInStudy", Level.STUDY, "CS", Study.modalities_in_study, Matching.MULTI_VALUED),
    _A("NumberOfStudyRelatedSeries", Level.STUDY, "IS", Study.number_of_series, Matching.RETURN_ONLY),
    _A("NumberOfStudyRelatedInstances", Level.STUDY, "IS", Study.number_of_instances, Matching.RETURN_ONLY),
    # Series
    _A("SeriesInstanceUID", Level.SERIES, "UI", Series.series_instance_uid),
    _A("Modality", Level.SERIES, "CS", Series.modality),
    _A("SeriesNumber", Level.SERIES, "IS", Series.series_number),
    _A("SeriesDescription", Level.SERIES, "LO", Series.series_description),
    _A("BodyPartExamined", Level.SERIES, "CS", Series.body_part_examined),
    _A("SeriesDate", Level.SERIES, "DA", Series.series_date),
    _A("SeriesTime", Level.SERIES, "TM", Series.series_time),
    _A("NumberOfSeriesRelatedInstances", Level.SERIES, "IS", Series.number_of_instances, Matching.RETURN_ONLY),
    # Image (composite object instance)
    _A("SOPInstanceUID", Level.IMAGE, "UI", Instance.sop_instance_uid),
    _A("SOPClassUID", Level.IMAGE, "UI", Instance.sop_class_uid),
    _A("InstanceNumber", Level.IMAGE, "IS", Instance.instance_number),
    _A("Rows", Level.IMAGE, "US", Instance.rows),
    _A("Columns", Level.IMAGE, "US", Instance.columns),
    _A("NumberOfFrames", Level.IMAGE, "IS", Instance.number_of_frames),
]
ATTRIBUTES: dict[str, Attribute] = {a.keyword: a for a in _ATTRIBUTES}

INTEGER_VRS = {"IS", "US", "UL", "SS", "SL"}


def attribute_at(keyword: str, level: Level) -> Attribute | None:
    """The attribute if ``keyword`` is a key at ``level`` (its own level or one above), else None."""
    attr = ATTRIBUTES.get(keyword)
    if attr is None or attr.level.depth > level.depth:
        return None
    return attr


def supported_keywords(level: Level) -> list[str]:
    """Every keyword a query at ``level`` can match and return (for conformance statements, includefield=all)."""
    return [a.keyword for a in _ATTRIBUTES if a.level.depth <= level.depth]
