"""FHIR R4 JSON resources built from index rows (pure functions; no database).

Elements without a value are left out (FHIR allows no empty strings or arrays). Dates: DICOM DA
``YYYYMMDD`` becomes ``YYYY-MM-DD``; ``started`` is the Study Date only, because a FHIR dateTime with a
time needs a time zone that the index does not hold.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import UTC, date, datetime
from typing import Any

import pacs
from pacs.fhir.ids import patient_fhir_id, study_fhir_id
from pacs.fhir.search import DCM_SYSTEM, DICOM_UID_SYSTEM, MAX_COUNT, V2_0203

FHIR_VERSION = "4.0.1"
FHIR_JSON = "application/fhir+json"
ENDPOINT_ID = "dicomweb"
_DA_RE = re.compile(r"^(\d{4})(\d{2})(\d{2})$")
_GENDER = {"M": "male", "F": "female", "O": "other"}

Row = Mapping[str, Any]


def fhir_date(value: object) -> str | None:
    match = _DA_RE.match(str(value or "").strip())
    if not match:
        return None
    try:
        return date(*map(int, match.groups())).isoformat()
    except ValueError:
        return None


def _compact(resource: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if v not in (None, "", [], {})}


def endpoint(dicomweb_root: str) -> dict[str, Any]:
    """The DICOMweb endpoint of the archive (WADO-RS, and QIDO-RS / STOW-RS at the same root)."""
    return {
        "resourceType": "Endpoint",
        "id": ENDPOINT_ID,
        "status": "active",
        "connectionType": {"system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
                           "code": "dicom-wado-rs"},
        "name": "DICOMweb",
        "payloadType": [{"text": "DICOM"}],
        "payloadMimeType": ["application/dicom"],
        "address": dicomweb_root,
    }


def imaging_study(study: Row, series: Iterable[Row], instances: Iterable[Row], dicomweb_root: str) -> dict[str, Any]:
    """An ImagingStudy from a STUDY-level row, its SERIES rows and its IMAGE rows (query-engine keywords)."""
    uid = str(study["StudyInstanceUID"])
    by_series: dict[str, list[Row]] = {}
    for row in instances:
        by_series.setdefault(str(row["SeriesInstanceUID"]), []).append(row)
    series_out = [_series(row, by_series.get(str(row["SeriesInstanceUID"]), []))
                  for row in sorted(series, key=lambda r: (r.get("SeriesNumber") is None, r.get("SeriesNumber") or 0,
                                                           str(r["SeriesInstanceUID"])))]
    identifiers = [{"use": "official", "system": DICOM_UID_SYSTEM, "value": f"urn:oid:{uid}"}]
    if study.get("AccessionNumber"):
        identifiers.append({"use": "usual", "type": {"coding": [{"system": V2_0203, "code": "ACSN"}]},
                            "value": str(study["AccessionNumber"])})
    modalities = [m for m in str(study.get("ModalitiesInStudy") or "").split("\\") if m]
    subject = patient_fhir_id(str(study.get("PatientID") or ""), str(study.get("IssuerOfPatientID") or ""))
    return _compact({
        "resourceType": "ImagingStudy",
        "id": study_fhir_id(uid),
        "contained": [endpoint(dicomweb_root)],
        "identifier": identifiers,
        "status": "available",
        "modality": [{"system": DCM_SYSTEM, "code": m} for m in modalities],
        "subject": {"reference": f"Patient/{subject}"},
        "started": fhir_date(study.get("StudyDate")),
        "endpoint": [{"reference": f"#{ENDPOINT_ID}"}],
        "numberOfSeries": study.get("NumberOfStudyRelatedSeries"),
        "numberOfInstances": study.get("NumberOfStudyRelatedInstances"),
        "description": study.get("StudyDescription"),
        "series": series_out,
    })


def _series(row: Row, instances: list[Row]) -> dict[str, Any]:
    ordered = sorted(instances, key=lambda r: (r.get("InstanceNumber") is None, r.get("InstanceNumber") or 0,
                                               str(r["SOPInstanceUID"])))
    body_part = str(row.get("BodyPartExamined") or "")
    return _compact({
        "uid": str(row["SeriesInstanceUID"]),
        "number": row.get("SeriesNumber"),
        "modality": {"system": DCM_SYSTEM, "code": str(row.get("Modality") or "") or "OT"},
        "description": row.get("SeriesDescription"),
        "numberOfInstances": row.get("NumberOfSeriesRelatedInstances"),
        "bodySite": {"display": body_part} if body_part else None,
        "started": fhir_date(row.get("SeriesDate")),
        "instance": [_compact({"uid": str(i["SOPInstanceUID"]),
                               "sopClass": {"system": "urn:ietf:rfc:3986", "code": f"urn:oid:{i['SOPClassUID']}"},
                               "number": i.get("InstanceNumber")}) for i in ordered],
    })


def patient(row: Row) -> dict[str, Any]:
    """A Patient from a PATIENT-level row."""
    patient_id, issuer = str(row.get("PatientID") or ""), str(row.get("IssuerOfPatientID") or "")
    identifier: dict[str, Any] = {"use": "usual", "type": {"coding": [{"system": V2_0203, "code": "MR"}]}}
    if issuer.startswith("urn:"):
        identifier["system"] = issuer
    elif issuer and all(part.isdigit() for part in issuer.split(".")):
        identifier["system"] = f"urn:oid:{issuer}"
    identifier["value"] = patient_id
    if issuer and "system" not in identifier:
        identifier["assigner"] = {"display": issuer}
    sex = str(row.get("PatientSex") or "").strip().upper()
    return _compact({
        "resourceType": "Patient",
        "id": patient_fhir_id(patient_id, issuer),
        "identifier": [_compact(identifier)],
        "name": [n for n in [human_name(str(row.get("PatientName") or ""))] if n],
        "gender": _GENDER.get(sex, "unknown") if sex else None,
        "birthDate": fhir_date(row.get("PatientBirthDate")),
    })


def human_name(pn: str) -> dict[str, Any]:
    """A DICOM PN (``family^given^middle^prefix^suffix``, first component group) as a HumanName."""
    alphabetic = pn.split("=", 1)[0].strip()
    if not alphabetic:
        return {}
    parts = [p.strip() for p in alphabetic.split("^")] + [""] * 5
    family, given, middle, prefix, suffix = parts[:5]
    return _compact({
        "text": " ".join(p for p in (prefix, family, given, middle, suffix) if p),
        "family": family,
        "given": [g for g in (given, middle) if g],
        "prefix": [prefix] if prefix else [],
        "suffix": [suffix] if suffix else [],
    })


def bundle(resources: list[dict[str, Any]], total: int, fhir_base: str, links: dict[str, str]) -> dict[str, Any]:
    return _compact({
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "link": [{"relation": relation, "url": url} for relation, url in links.items()],
        "entry": [{"fullUrl": f"{fhir_base}/{r['resourceType']}/{r['id']}", "resource": r,
                   "search": {"mode": "match"}} for r in resources],
    })


def operation_outcome(code: str, message: str, severity: str = "error") -> dict[str, Any]:
    """``code`` from the FHIR issue-type value set (invalid, not-found, not-supported, transient...)."""
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": severity, "code": code, "diagnostics": message}]}


def capability_statement(fhir_base: str) -> dict[str, Any]:
    def param(name: str, kind: str, doc: str) -> dict[str, str]:
        return {"name": name, "type": kind, "documentation": doc}

    paging = [param("_count", "number", f"page size (at most {MAX_COUNT})"),
              param("_offset", "number", "index of the first match to return")]
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": datetime.now(UTC).date().isoformat(),
        "kind": "instance",
        "software": {"name": "Filmless PACS", "version": pacs.__version__},
        "implementation": {"description": "Filmless PACS FHIR R4 facade over the image archive", "url": fhir_base},
        "fhirVersion": FHIR_VERSION,
        "format": ["json"],
        "rest": [{
            "mode": "server",
            "security": {"description": "Every request needs Authorization: Bearer <token>; results are limited "
                         "to the studies the token's facility or patient may see"},
            "resource": [
                {"type": "ImagingStudy", "interaction": [{"code": "read"}, {"code": "search-type"}],
                 "searchParam": [
                     param("patient.identifier", "token", "patient identifier ([urn:oid:issuer|]PatientID)"),
                     param("patient", "reference", "Patient/{id}"),
                     param("identifier", "token", "urn:dicom:uid|urn:oid:{StudyInstanceUID}, or an accession number"),
                     param("started", "date", "study date (eq, ge, le, gt, lt); alias: date"),
                     param("modality", "token", "a modality of the study"),
                     param("_id", "token", "the ImagingStudy id (the Study Instance UID)"), *paging]},
                {"type": "Patient", "interaction": [{"code": "read"}, {"code": "search-type"}],
                 "searchParam": [param("identifier", "token", "[urn:oid:issuer|]PatientID"),
                                 param("_id", "token", "the Patient id"), *paging]},
            ],
        }],
    }
