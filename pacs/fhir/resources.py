"""FHIR R4 JSON resources built from index rows (pure functions; no database).

Elements without a value are left out (FHIR allows no empty strings or arrays). Dates: DICOM DA
``YYYYMMDD`` becomes ``YYYY-MM-DD``; ``started`` is the Study Date only, because a FHIR dateTime with a
time needs a time zone that the index does not hold.

The viewer link (IHE Invoke Image Display style): ImagingStudy and DiagnosticReport carry the extension
:data:`VIEWER_URL_EXTENSION` whose ``valueUrl`` is the stable, public ``{base}/viewer/studies/{uid}``
(which redirects to the OHIF viewer; the viewer then asks for the user's own token). An extension,
because R4 has no element for it: ``ImagingStudy.endpoint`` names the DICOMweb service (R5 adds an
``ihe-iid`` endpoint type for this), and DiagnosticReport has no endpoint at all.
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
#: Our extension for the per-study viewer URL (``valueUrl``); see the module docstring.
VIEWER_URL_EXTENSION = "https://filmless-pacs.example/fhir/StructureDefinition/viewer-url"
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


def fhir_instant(value: datetime | None) -> str | None:
    """A FHIR instant (UTC, milliseconds); a naive datetime (SQLite) is taken as UTC."""
    if value is None:
        return None
    aware = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return aware.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _compact(resource: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if v not in (None, "", [], {})}


def compact(resource: dict[str, Any]) -> dict[str, Any]:
    """The resource without empty elements (FHIR allows no empty strings, arrays or objects)."""
    return _compact(resource)


def viewer_url(public_base: str, study_instance_uid: str) -> str:
    """The stable viewer URL of a study (``GET /viewer/studies/{uid}``, public, no patient data)."""
    return f"{public_base}/viewer/studies/{study_instance_uid}"


def viewer_extension(url: str) -> list[dict[str, Any]]:
    return [{"url": VIEWER_URL_EXTENSION, "valueUrl": url}] if url else []


def accession_identifier(accession: str) -> dict[str, Any]:
    """An accession number as FHIR names one: an identifier of type ACSN (v2-0203)."""
    return {"use": "usual", "type": {"coding": [{"system": V2_0203, "code": "ACSN"}]}, "value": accession}


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


def imaging_study(study: Row, series: Iterable[Row], instances: Iterable[Row], dicomweb_root: str,
                  viewer: str = "") -> dict[str, Any]:
    """An ImagingStudy from a STUDY-level row, its SERIES rows and its IMAGE rows (query-engine keywords);
    ``viewer``: the study's viewer URL (:func:`viewer_url`), for the viewer-url extension."""
    uid = str(study["StudyInstanceUID"])
    by_series: dict[str, list[Row]] = {}
    for row in instances:
        by_series.setdefault(str(row["SeriesInstanceUID"]), []).append(row)
    series_out = [_series(row, by_series.get(str(row["SeriesInstanceUID"]), []))
                  for row in sorted(series, key=lambda r: (r.get("SeriesNumber") is None, r.get("SeriesNumber") or 0,
                                                           str(r["SeriesInstanceUID"])))]
    identifiers = [{"use": "official", "system": DICOM_UID_SYSTEM, "value": f"urn:oid:{uid}"}]
    if study.get("AccessionNumber"):
        identifiers.append(accession_identifier(str(study["AccessionNumber"])))
    modalities = [m for m in str(study.get("ModalitiesInStudy") or "").split("\\") if m]
    subject = patient_fhir_id(str(study.get("PatientID") or ""), str(study.get("IssuerOfPatientID") or ""))
    return _compact({
        "resourceType": "ImagingStudy",
        "id": study_fhir_id(uid),
        "contained": [endpoint(dicomweb_root)],
        "extension": viewer_extension(viewer),
        "identifier": identifiers,
        "status": "available",
        "modality": [{"system": DCM_SYSTEM, "code": m} for m in modalities],
        "subject": {"reference": f"Patient/{subject}"},
        "started": fhir_date(study.get("StudyDate")),
        # the hospital the study belongs to (a person's priors come from several: pacs.persons)
        "location": {"display": str(study["InstitutionName"])} if study.get("InstitutionName") else None,
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
    sex = str(row.get("PatientSex") or "").strip().upper()
    return _compact({
        "resourceType": "Patient",
        "id": patient_fhir_id(patient_id, issuer),
        "identifier": [patient_identifier(patient_id, issuer)],
        "name": [n for n in [human_name(str(row.get("PatientName") or ""))] if n],
        "gender": _GENDER.get(sex, "unknown") if sex else None,
        "birthDate": fhir_date(row.get("PatientBirthDate")),
    })


def patient_identifier(patient_id: str, issuer: str) -> dict[str, Any]:
    """A Patient ID as an MR identifier: an OID or URN issuer is the system, another issuer the assigner."""
    identifier: dict[str, Any] = {"use": "usual", "type": {"coding": [{"system": V2_0203, "code": "MR"}]}}
    if issuer.startswith("urn:"):
        identifier["system"] = issuer
    elif issuer and all(part.isdigit() for part in issuer.split(".")):
        identifier["system"] = f"urn:oid:{issuer}"
    identifier["value"] = patient_id
    if issuer and "system" not in identifier:
        identifier["assigner"] = {"display": issuer}
    return _compact(identifier)


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


def history_bundle(versions: list[dict[str, Any]], fhir_base: str) -> dict[str, Any]:
    """A ``history`` Bundle of one resource's versions (newest first, each with ``meta.versionId``).

    Version 1 is announced as its creation (POST, 201), later ones as updates (PUT, 200)."""
    entries = []
    for resource in versions:
        kind, fhir_id, vid = resource["resourceType"], resource["id"], resource["meta"]["versionId"]
        created = vid == "1"
        entries.append({
            "fullUrl": f"{fhir_base}/{kind}/{fhir_id}",
            "resource": resource,
            "request": {"method": "POST" if created else "PUT", "url": kind if created else f"{kind}/{fhir_id}"},
            "response": _compact({"status": "201 Created" if created else "200 OK",
                                  "location": f"{kind}/{fhir_id}/_history/{vid}", "etag": f'W/"{vid}"',
                                  "lastModified": resource["meta"].get("lastUpdated")}),
        })
    return _compact({"resourceType": "Bundle", "type": "history", "total": len(entries), "entry": entries})


def operation_outcome(code: str, message: str, severity: str = "error") -> dict[str, Any]:
    """``code`` from the FHIR issue-type value set (invalid, not-found, not-supported, transient...)."""
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": severity, "code": code, "diagnostics": message}]}


def _param(name: str, kind: str, doc: str) -> dict[str, str]:
    return {"name": name, "type": kind, "documentation": doc}


_CONTROL = [_param("_count", "number", f"page size (default 50, at most {MAX_COUNT}; 0: the total only)"),
            _param("_offset", "number", "index of the first match to return (the next/previous links use it)"),
            _param("_summary", "token", "count (the total only) or false; other values are refused")]
_PATIENT = [_param("patient.identifier", "token", "patient identifier ([urn:oid:issuer|]PatientID); "
                   "also subject.identifier, subject:Patient.identifier"),
            _param("patient", "reference", "Patient/{id}; also subject")]
_STRICTNESS = ("Searches are strict: an unknown or unsupported search parameter (or modifier, or _format other "
               "than JSON) is answered 400 with an OperationOutcome naming it, unless the request has "
               "'Prefer: handling=lenient', which ignores unknown parameters (they are left out of the Bundle's "
               "self link; an unsupported modifier or chain on a supported parameter is refused either way). "
               "Comma-separated values are alternatives; each parameter but date may be given once. "
               "ImagingStudy and DiagnosticReport carry the extension " + VIEWER_URL_EXTENSION
               + " (valueUrl: the study's stable viewer URL, IHE Invoke Image Display style).")


def _resource(kind: str, interactions: tuple[str, ...], params: list[dict[str, str]],
              **extra: Any) -> dict[str, Any]:
    return {"type": kind, "interaction": [{"code": code} for code in interactions], **extra,
            "searchParam": [*params, *_CONTROL]}


def capability_statement(fhir_base: str) -> dict[str, Any]:
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": datetime.now(UTC).date().isoformat(),
        "kind": "instance",
        "software": {"name": "Filmless PACS", "version": pacs.__version__},
        "implementation": {"description": "Filmless PACS FHIR R4 facade over the image archive and its RIS",
                           "url": fhir_base},
        "fhirVersion": FHIR_VERSION,
        "format": ["json"],
        "rest": [{
            "mode": "server",
            "documentation": _STRICTNESS,
            "security": {"description": "Every request needs Authorization: Bearer <token>; results are limited "
                         "to the studies (and orders) the token's facility or patient may see; DiagnosticReport "
                         "needs report.read, ServiceRequest create needs order.manage"},
            "resource": [
                _resource("ImagingStudy", ("read", "search-type"), [
                    *_PATIENT,
                    _param("identifier", "token", "urn:dicom:uid|urn:oid:{StudyInstanceUID}, or an accession number "
                           "(identifier:of-type: http://terminology.hl7.org/CodeSystem/v2-0203|ACSN|{value})"),
                    _param("started", "date", "study date (eq, ge, le, gt, lt); alias: date"),
                    _param("modality", "token", "a modality of the study"),
                    _param("_id", "token", "the ImagingStudy id (the Study Instance UID)")]),
                _resource("Patient", ("read", "search-type"), [
                    _param("identifier", "token", "[urn:oid:issuer|]PatientID"),
                    _param("_id", "token", "the Patient id")]),
                _resource("DiagnosticReport", ("read", "vread", "history-instance", "search-type"), [
                    *_PATIENT,
                    _param("study", "reference", "ImagingStudy/{id} or a Study Instance UID (R5's study); "
                           "alias: imaging-study"),
                    _param("identifier", "token", "the accession number"),
                    _param("status", "token", "preliminary, final or amended (the newest version the caller "
                           "may see)"),
                    _param("date", "date", "the study date (eq, ge, le, gt, lt)"),
                    _param("category", "token", "http://loinc.org|LP29684-5 (every report here)"),
                    _param("code", "token", "http://loinc.org|18748-4 (every report here)"),
                    _param("_id", "token", "the DiagnosticReport id (r{report number})")],
                    versioning="versioned", readHistory=True),
                _resource("ServiceRequest", ("read", "search-type", "create"), [
                    *_PATIENT,
                    _param("identifier", "token", "an accession number or placer order number; identifier:of-type "
                           "takes http://terminology.hl7.org/CodeSystem/v2-0203|ACSN|{value} or …|PLAC|{value}"),
                    _param("status", "token", "active (scheduled or in progress), completed or revoked"),
                    _param("_id", "token", "the ServiceRequest id (the accession number, see the docs)")]),
            ],
        }],
    }
