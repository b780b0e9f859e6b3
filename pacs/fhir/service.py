"""FHIR reads and searches over the index, through the query engine and inside an access scope.

Every query carries the asker's :class:`~pacs.security.principal.AccessScope` (the engine adds the SQL
restriction), and a read by id also asks :func:`~pacs.security.policy.may_see_study`: a study or patient
outside the scope is :class:`~pacs.errors.NotFound`, exactly like one that does not exist.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from pacs.errors import IndexUnavailable, NotFound
from pacs.fhir import resources
from pacs.fhir.ids import PatientRef, decode_patient_id, study_uid_from_id
from pacs.fhir.search import Search, SearchError
from pacs.query.attributes import Level, Root
from pacs.query.engine import Query, QueryEngine, Row
from pacs.security.policy import may_see_study
from pacs.security.principal import AccessScope

STUDY_RETURNS = ("StudyDate", "AccessionNumber", "StudyDescription", "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
                 "NumberOfStudyRelatedInstances", "PatientID", "IssuerOfPatientID")
SERIES_RETURNS = ("SeriesNumber", "Modality", "SeriesDescription", "BodyPartExamined", "SeriesDate",
                  "NumberOfSeriesRelatedInstances")
IMAGE_RETURNS = ("SOPClassUID", "InstanceNumber")
PATIENT_RETURNS = ("IssuerOfPatientID", "PatientName", "PatientBirthDate", "PatientSex")
_RESOLVE_LIMIT = 1000  # patients sharing a long Patient ID's prefix, checked against its digest


@dataclass(frozen=True)
class Page:
    resources: list[dict[str, Any]]
    total: int
    subjects: list[tuple[str, str]] = field(default_factory=list)  # (study UID, patient ID) for the audit trail


@dataclass(frozen=True)
class Found:
    resource: dict[str, Any]
    patient_id: str
    study_instance_uid: str = ""


class FhirService:
    def __init__(self, engine: QueryEngine, read_sessions: sessionmaker[Session]) -> None:
        self._engine = engine
        self._sessions = read_sessions

    # -- ImagingStudy -------------------------------------------------------------------------------

    def search_studies(self, search: Search, scope: AccessScope, dicomweb_root: str) -> Page:
        filters = dict(search.filters)
        if search.matches_nothing:
            return Page([], 0)
        if search.patient_ref is not None:
            identity = self._resolve_patient(search.patient_ref, scope)
            if identity is None:
                return Page([], 0)
            patient_id, issuer = identity
            if any(c in patient_id for c in "*?"):
                raise SearchError("this patient's ID contains * or ?, which a search cannot match exactly")
            filters["PatientID"] = patient_id
            if issuer:
                filters["IssuerOfPatientID"] = issuer
        query = Query(Level.STUDY, Root.STUDY_ROOT, filters, STUDY_RETURNS, limit=search.count,
                      offset=search.offset, scope=scope)
        result = self._engine.search(query)
        total = result.count()
        rows = list(result) if search.count else []
        studies = [self._imaging_study(row, scope, dicomweb_root) for row in rows]
        return Page(studies, total, [(str(r["StudyInstanceUID"]), str(r.get("PatientID") or "")) for r in rows])

    def read_study(self, fhir_id: str, scope: AccessScope, dicomweb_root: str) -> Found:
        uid = study_uid_from_id(fhir_id)
        if uid is None or not self._may_see(scope, uid):
            raise NotFound("no such ImagingStudy")
        rows = list(self._engine.search(Query(Level.STUDY, Root.STUDY_ROOT, {"StudyInstanceUID": uid},
                                              STUDY_RETURNS, scope=scope)))
        if not rows:
            raise NotFound("no such ImagingStudy")
        return Found(self._imaging_study(rows[0], scope, dicomweb_root), str(rows[0].get("PatientID") or ""), uid)

    def _imaging_study(self, study: Row, scope: AccessScope, dicomweb_root: str) -> dict[str, Any]:
        uid = {"StudyInstanceUID": str(study["StudyInstanceUID"])}
        series = self._engine.search(Query(Level.SERIES, Root.STUDY_ROOT, uid, SERIES_RETURNS, scope=scope))
        instances = self._engine.search(Query(Level.IMAGE, Root.STUDY_ROOT, uid, IMAGE_RETURNS, relational=True,
                                              scope=scope))
        return resources.imaging_study(study, list(series), list(instances), dicomweb_root)

    # -- Patient ------------------------------------------------------------------------------------

    def search_patients(self, search: Search, scope: AccessScope) -> Page:
        if search.matches_nothing:
            return Page([], 0)
        if search.patient_ref is not None:
            found = self._patient_rows(search.patient_ref, scope)
            page = found[search.offset:search.offset + search.count]
            return Page([resources.patient(r) for r in page], len(found),
                        [("", str(r.get("PatientID") or "")) for r in page])
        query = Query(Level.PATIENT, Root.PATIENT_ROOT, search.filters, PATIENT_RETURNS, limit=search.count,
                      offset=search.offset, scope=scope)
        result = self._engine.search(query)
        total = result.count()
        rows = list(result) if search.count else []
        return Page([resources.patient(r) for r in rows], total, [("", str(r.get("PatientID") or "")) for r in rows])

    def read_patient(self, fhir_id: str, scope: AccessScope) -> Found:
        ref = decode_patient_id(fhir_id)
        rows = self._patient_rows(ref, scope) if ref is not None else []
        if not rows:
            raise NotFound("no such Patient")
        return Found(resources.patient(rows[0]), str(rows[0].get("PatientID") or ""))

    def _patient_rows(self, ref: PatientRef, scope: AccessScope) -> list[Row]:
        """The PATIENT rows (in scope) an id names: at most one for an exact id. The query finds a superset
        (a long id's Patient ID prefix, wildcard characters inside an ID, an empty ID matching everything,
        of which the first ``_RESOLVE_LIMIT`` rows are looked at); the exact identity is checked here."""
        filters = {"PatientID": ref.patient_id if ref.exact else ref.patient_id + "*"}
        if ref.exact and ref.issuer:
            filters["IssuerOfPatientID"] = ref.issuer
        query = Query(Level.PATIENT, Root.PATIENT_ROOT, filters, PATIENT_RETURNS, limit=_RESOLVE_LIMIT, scope=scope)
        return [r for r in self._engine.search(query)
                if ref.matches(str(r.get("PatientID") or ""), str(r.get("IssuerOfPatientID") or ""))]

    def _resolve_patient(self, ref: PatientRef, scope: AccessScope) -> tuple[str, str] | None:
        rows = self._patient_rows(ref, scope)
        if not rows:
            return None
        return str(rows[0].get("PatientID") or ""), str(rows[0].get("IssuerOfPatientID") or "")

    def _may_see(self, scope: AccessScope, study_uid: str) -> bool:
        try:
            with self._sessions() as session:
                return may_see_study(session, scope, study_uid)
        except SQLAlchemyError as exc:
            raise IndexUnavailable("index database unavailable") from exc
