"""A report version as a DICOM Comprehensive SR following TID 2000 "Basic Diagnostic Imaging Report".

The document is built with highdicom's typed constructors, which validate as they go: patient and
study attributes are copied from the evidence (the study's own instances), never typed in again
from the report; the report supplies only what a radiologist said and who said it.

Content tree (PS3.16 TID 2000 / TID 2002)::

    CONTAINER (18748-4, LN, "Diagnostic Imaging Report")                  [TID 2000, SEPARATE]
      HAS CONCEPT MOD  CODE (121049, DCM, "Language of Content Item and Descendants")  [TID 1204]
      HAS OBS CONTEXT  CODE (121005, DCM, "Observer Type") = (121006, DCM, "Person")  [TID 1002]
      HAS OBS CONTEXT  PNAME (121008, DCM, "Person Observer Name")                    [TID 1003]
      HAS OBS CONTEXT  TEXT (121009, DCM, "Person Observer's Organization Name")
      CONTAINS CONTAINER (121070, DCM, "Findings")
        CONTAINS TEXT (121071, DCM, "Finding")
      CONTAINS CONTAINER (121072, DCM, "Impressions")
        CONTAINS TEXT (121073, DCM, "Impression")
      CONTAINS CONTAINER (121078, DCM, "Addendum")                       (amended versions only)
        CONTAINS TEXT (111021, DCM, "Description of Change")

Every date and time in the document comes from the version (signed_at, else created_at), so
rebuilding the same version gives the same content. DICOM dates and times carry no offset and are
read as local time, so they are written in the facility's time zone; the verification DateTime
carries its UTC offset explicitly.

DICOM text values lose trailing spaces on reading (PS3.5 6.2), so :func:`report_text_from_sr`
returns the signed text with trailing spaces at its very end removed; everything else (Vietnamese
diacritics, line breaks, inner spacing) is exact, since the document is written in UTF-8
(ISO_IR 192).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from highdicom.sr import (
    CodedConcept,
    ComprehensiveSR,
    ContainerContentItem,
    ContentSequence,
    LanguageOfContentItemAndDescendants,
    ObserverContext,
    PersonObserverIdentifyingAttributes,
    RelationshipTypeValues,
    TextContentItem,
)
from highdicom.valuerep import check_person_name
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import UID

from pacs.errors import InvalidInput
from pacs.reports.document import REPORT_TIMEZONE, ReportDocument

__all__ = [
    "DIAGNOSTIC_IMAGING_REPORT",
    "build_report_sr",
    "report_text_from_sr",
]

DIAGNOSTIC_IMAGING_REPORT = CodedConcept("18748-4", "LN", "Diagnostic Imaging Report")
FINDINGS_SECTION = CodedConcept("121070", "DCM", "Findings")
FINDING = CodedConcept("121071", "DCM", "Finding")
IMPRESSIONS_SECTION = CodedConcept("121072", "DCM", "Impressions")
IMPRESSION = CodedConcept("121073", "DCM", "Impression")
ADDENDUM_SECTION = CodedConcept("121078", "DCM", "Addendum")
DESCRIPTION_OF_CHANGE = CodedConcept("111021", "DCM", "Description of Change")

# CID 5000 "Languages" (extensible; RFC 5646 tags).
_LANGUAGES: dict[str, CodedConcept] = {
    "vi": CodedConcept("vi-VN", "RFC5646", "Vietnamese (Viet Nam)"),
    "en": CodedConcept("en-US", "RFC5646", "English (United States)"),
}

# Codes a lenient reader accepts for each narrative part (DCM headings and elements, LOINC sections).
_FINDINGS_CODES = {("121070", "DCM"), ("121071", "DCM"), ("59776-5", "LN")}
_IMPRESSION_CODES = {("121072", "DCM"), ("121073", "DCM"), ("19005-8", "LN")}

# Type 2 attributes highdicom reads from the first evidence dataset with plain attribute access.
_TYPE2_FROM_EVIDENCE = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyID", "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName",
)

_LO_MAX = 64


def build_report_sr(
    doc: ReportDocument,
    evidence: Sequence[Dataset],
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int = 9901,
    instance_number: int = 1,
    institution_name: str = "",
    manufacturer: str = "Filmless PACS",
    predecessor: tuple[str, str, str] | None = None,
) -> Dataset:
    """The Comprehensive SR of one report version, ready for ``dcmwrite(..., enforce_file_format=True)``.

    ``evidence``: datasets of the study's own instances, read without pixel data; at least one must
    belong to ``doc.study_instance_uid`` (patient and study attributes are taken from it). Instances
    of other studies are recorded as Pertinent Other Evidence.

    ``predecessor``: (series instance UID, SOP instance UID, SOP class UID) of the SR this version
    replaces (the previous signed version when amending, or the preliminary one when signing); it
    becomes the Predecessor Documents Sequence.

    Raises :class:`pacs.errors.InvalidInput` when the inputs cannot make a valid document.
    """
    if doc.status not in ("preliminary", "final", "amended"):
        raise InvalidInput(f"a {doc.status!r} report version is never published as an SR")
    _check_uid(series_instance_uid, "SR series instance UID")
    _check_uid(sop_instance_uid, "SR SOP instance UID")
    study_evidence = _study_evidence_first(doc, evidence)

    moment = _document_moment(doc)
    local = moment.astimezone(REPORT_TIMEZONE)
    observer_name = _person_name(doc.signed_by_name or doc.signed_by or doc.author_name or doc.author)
    organization = _long_string(doc.facility_name or institution_name or doc.facility or manufacturer)

    previous_versions = [_predecessor_dataset(predecessor, study_evidence[0].StudyInstanceUID)] if predecessor else None
    try:
        content = _content_tree(doc, observer_name, organization)
        sr = ComprehensiveSR(
            evidence=study_evidence,
            content=content,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=instance_number,
            manufacturer=_long_string(manufacturer),
            is_complete=True,
            is_final=doc.signed,
            is_verified=doc.signed,
            institution_name=_long_string(institution_name) or None,
            verifying_observer_name=observer_name if doc.signed else None,
            verifying_organization=organization if doc.signed else None,
            previous_versions=previous_versions,
            record_evidence=True,
            specific_character_set="ISO_IR 192",
            content_date=local.date(),
            content_time=local.time().replace(microsecond=0),
            series_description=_long_string(_series_description(doc)),
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise InvalidInput(f"cannot build the report SR: {exc}") from exc

    # highdicom stamps the verification with the wall clock; the signature's moment is the version's.
    if doc.signed:
        sr.VerifyingObserverSequence[0].VerificationDateTime = local.strftime("%Y%m%d%H%M%S%z")
    return sr


def report_text_from_sr(ds: Dataset) -> tuple[str, str]:
    """(findings, impression) of a report SR, read leniently.

    Accepts the tree :func:`build_report_sr` writes and the common variants: TEXT items named with
    the DCM section/element codes or the LOINC section codes, directly under the root or inside a
    section container. Several TEXT items of one part are joined with a line break.
    """
    findings: list[str] = []
    impression: list[str] = []
    for item in ds.get("ContentSequence", []):
        code = _concept(item)
        if item.get("ValueType") == "CONTAINER":
            texts = list(_texts(item))
            if code in _FINDINGS_CODES:
                findings.extend(texts)
            elif code in _IMPRESSION_CODES:
                impression.extend(texts)
        elif item.get("ValueType") == "TEXT":
            if code in _FINDINGS_CODES:
                findings.append(str(item.TextValue))
            elif code in _IMPRESSION_CODES:
                impression.append(str(item.TextValue))
    return "\n".join(findings), "\n".join(impression)


def _content_tree(doc: ReportDocument, observer_name: str, organization: str) -> ContainerContentItem:
    root = ContainerContentItem(name=DIAGNOSTIC_IMAGING_REPORT, is_content_continuous=False, template_id="2000")
    items = ContentSequence()
    language = _LANGUAGES.get(doc.language)
    if language is not None:
        items.extend(LanguageOfContentItemAndDescendants(language))
    observer = ObserverContext(
        observer_type=codes.cid270.Person,
        observer_identifying_attributes=PersonObserverIdentifyingAttributes(
            name=observer_name, organization_name=organization or None,
        ),
    )
    items.extend(observer)
    for heading, element, text in (
        (FINDINGS_SECTION, FINDING, doc.findings),
        (IMPRESSIONS_SECTION, IMPRESSION, doc.impression),
        (ADDENDUM_SECTION, DESCRIPTION_OF_CHANGE, doc.amend_reason if doc.status == "amended" else ""),
    ):
        if text.strip():
            items.append(_section(heading, element, text))
    root.ContentSequence = items
    return root


def _section(heading: CodedConcept, element: CodedConcept, text: str) -> ContainerContentItem:
    section = ContainerContentItem(
        name=heading, is_content_continuous=False, relationship_type=RelationshipTypeValues.CONTAINS,
    )
    section.ContentSequence = ContentSequence([
        TextContentItem(name=element, value=text, relationship_type=RelationshipTypeValues.CONTAINS),
    ])
    return section


def _study_evidence_first(doc: ReportDocument, evidence: Sequence[Dataset]) -> list[Dataset]:
    """The evidence with the report's study first, its first item completed for highdicom.

    highdicom takes patient and study from ``evidence[0]`` and reads its Type 2 attributes with
    plain attribute access; modalities do omit some, so a copy of that one dataset gets them empty.
    """
    if not evidence:
        raise InvalidInput("an SR needs at least one instance of the study as evidence")
    for ds in evidence:
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
            if not ds.get(keyword):
                raise InvalidInput(f"an evidence dataset has no {keyword}")
    study_uid = doc.study_instance_uid or str(evidence[0].StudyInstanceUID)
    own = [ds for ds in evidence if ds.StudyInstanceUID == study_uid]
    if not own:
        raise InvalidInput(f"no evidence dataset belongs to the report's study {study_uid}")
    first = copy.deepcopy(own[0])
    for keyword in _TYPE2_FROM_EVIDENCE:
        if keyword not in first:
            setattr(first, keyword, "")
    others = [ds for ds in evidence if ds.StudyInstanceUID != study_uid]
    return [first, *own[1:], *others]


def _predecessor_dataset(predecessor: tuple[str, str, str], study_instance_uid: str) -> Dataset:
    series_uid, sop_uid, sop_class_uid = predecessor
    for value, label in ((series_uid, "predecessor series UID"), (sop_uid, "predecessor SOP instance UID"),
                         (sop_class_uid, "predecessor SOP class UID")):
        _check_uid(value, label)
    ds = Dataset()
    ds.StudyInstanceUID = study_instance_uid
    ds.SeriesInstanceUID = series_uid
    ds.SOPInstanceUID = sop_uid
    ds.SOPClassUID = sop_class_uid
    return ds


def _document_moment(doc: ReportDocument) -> datetime:
    """When the version became what it is: signed_at, else (preliminary) created_at, else now.

    A preliminary version has no moment of its own in :class:`ReportDocument`; its creation stands in.
    """
    moment = doc.signed_at or doc.created_at
    if moment is None:
        if doc.signed:
            raise InvalidInput("a signed report version has no signing time")
        moment = datetime.now(UTC)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment


def _person_name(name: str) -> str:
    """A DICOM PN for a person known by a display name.

    A value already in PN form (with ``^``) is kept. A display name cannot be split into family and
    given names without guessing the name order, so it becomes the family name component whole
    (``"Trần Thị B^"``), which every viewer displays as typed.
    """
    name = " ".join(name.split())
    if not name:
        raise InvalidInput("a report SR needs the name of its observer")
    pn = name if "^" in name else f"{name}^"
    try:
        check_person_name(pn)
    except ValueError as exc:
        raise InvalidInput(f"invalid observer name {name!r}: {exc}") from exc
    if "\\" in pn or any(len(group) > _LO_MAX for group in pn.split("=")):
        raise InvalidInput(f"invalid observer name {name!r}: at most 64 characters, no backslash")
    return pn


def _long_string(value: str) -> str:
    """A display-only LO value (institution, organization, description) cut to 64 characters."""
    return " ".join(value.replace("\\", "/").split())[:_LO_MAX]


def _series_description(doc: ReportDocument) -> str:
    return f"Report {doc.report_id} v{doc.version} ({doc.status})"


def _check_uid(value: str, label: str) -> None:
    if not value or not UID(value).is_valid:
        raise InvalidInput(f"invalid {label} {value!r}")


def _concept(item: Dataset) -> tuple[str, str] | None:
    names = item.get("ConceptNameCodeSequence")
    if not names:
        return None
    return str(names[0].get("CodeValue", "")), str(names[0].get("CodingSchemeDesignator", ""))


def _texts(container: Dataset) -> Iterable[str]:
    for child in container.get("ContentSequence", []):
        if child.get("ValueType") == "TEXT":
            yield str(child.TextValue)
