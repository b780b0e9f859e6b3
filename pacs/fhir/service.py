"""FHIR reads, searches and creates, inside an access scope.

ImagingStudy and Patient go through the query engine: every query carries the asker's
:class:`~pacs.security.principal.AccessScope` (the engine adds the SQL restriction), and a read by id also
asks :func:`~pacs.security.access.may_see_study`. DiagnosticReport (:mod:`.diagnostic_report`) and
ServiceRequest (:mod:`.service_request`) query the report and order tables with the same scope. Anything
outside the scope is :class:`~pacs.errors.NotFound`, exactly like something that does not exist.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from pacs import audit
from pacs.errors import IndexUnavailable, NotFound
from pacs.fhir import diagnostic_report as reports
from pacs.fhir import resources
from pacs.fhir import service_request as orders
from pacs.fhir.ids import PatientRef, decode_patient_id, study_uid_from_id
from pacs.fhir.search import Search, SearchError
from pacs.query.attributes import Level, Root
from pacs.query.engine import Query, QueryEngine, Row
from pacs.security.access import may_see_study
from pacs.security.principal import AccessScope, Principal

STUDY_RETURNS = ("StudyDate", "AccessionNumber", "StudyDescription", "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
                 "NumberOfStudyRelatedInstances", "PatientID", "IssuerOfPatientID", "InstitutionName")
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
    """``public_base``: the server's public base URL, for the absolute URLs in resources (DICOMweb endpoint,
    viewer link, report PDF); ``write_sessions`` are needed only to create (ServiceRequest)."""

    def __init__(self, engine: QueryEngine, read_sessions: sessionmaker[Session], public_base: str = "",
                 write_sessions: sessionmaker[Session] | None = None) -> None:
        self._engine = engine
        self._sessions = read_sessions
        self._write_sessions = write_sessions
        self._base = public_base

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
        viewer = resources.viewer_url(self._base, uid["StudyInstanceUID"]) if self._base else ""
        return resources.imaging_study(study, list(series), list(instances), dicomweb_root, viewer)

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
        with self._read() as session:
            return may_see_study(session, scope, study_uid, hide_empty=True)  # ImagingStudy: images only

    # -- DiagnosticReport ---------------------------------------------------------------------------

    def read_report(self, fhir_id: str, principal: Principal, version: str | None = None) -> Found:
        """The newest version of a report the principal may see, or the one numbered ``version`` (vread)."""
        published = self._report_versions(fhir_id, principal)
        if version is not None:
            published = [p for p in published if p.resource["meta"]["versionId"] == version]
            if not published:
                raise NotFound(f"DiagnosticReport {fhir_id[:20]} has no version {version[:12]!r} you may see")
        newest = published[-1]
        return Found(newest.resource, newest.patient_id, newest.study_instance_uid)

    def report_history(self, fhir_id: str, principal: Principal) -> tuple[dict[str, Any], Found]:
        """The ``history`` Bundle of a report (its versions the principal may see, newest first)."""
        published = self._report_versions(fhir_id, principal)
        bundle = resources.history_bundle([p.resource for p in reversed(published)], f"{self._base}/fhir")
        return bundle, Found(bundle, published[-1].patient_id, published[-1].study_instance_uid)

    def search_reports(self, search: Search, principal: Principal) -> Page:
        with self._read() as session:
            found, total = reports.search_reports(session, principal.scope, reports.published_states(principal),
                                                  search, self._base)
        return Page([p.resource for p in found], total, [(p.study_instance_uid, p.patient_id) for p in found])

    def _report_versions(self, fhir_id: str, principal: Principal) -> list[reports.PublishedReport]:
        report_id = reports.report_id_from_fhir(fhir_id)
        if report_id is None:
            raise NotFound("no such DiagnosticReport")
        with self._read() as session:
            try:
                return reports.read_versions(session, principal.scope, reports.published_states(principal),
                                             report_id, self._base)
            except NotFound:
                raise NotFound("no such DiagnosticReport") from None

    # -- ServiceRequest -----------------------------------------------------------------------------

    def read_service_request(self, fhir_id: str, scope: AccessScope) -> Found:
        with self._read() as session:
            order = orders.read_order(session, scope, fhir_id)
        return Found(orders.service_request(order), order.patient_id, order.linked_study_instance_uid)

    def search_service_requests(self, search: Search, scope: AccessScope) -> Page:
        with self._read() as session:
            rows, total = orders.search_orders(session, scope, search)
            found = [(orders.service_request(r), r.patient_id, r.linked_study_instance_uid) for r in rows]
        return Page([f[0] for f in found], total, [(study, patient) for _, patient, study in found])

    def create_service_request(self, payload: object, principal: Principal, detail: str = "") -> Found:
        """Create the order a posted ServiceRequest describes; its audit row commits with it."""
        if self._write_sessions is None:
            raise IndexUnavailable("this process cannot create orders")
        new = orders.new_order(orders.parse_service_request(payload), principal)
        try:
            with self._write_sessions() as session, session.begin():
                order = orders.place_order(session, new)
                audit.append(session, action="order.create", actor=principal.subject, role=principal.role.value,
                             source_address=principal.source_address, patient_id=order.patient_id,
                             study_instance_uid=order.study_instance_uid,
                             detail=f"{detail} FHIR ServiceRequest: order {order.accession_number} {order.modality} "
                             f"{order.priority}".strip())
        except SQLAlchemyError as exc:
            raise IndexUnavailable("index database unavailable") from exc
        return Found(orders.service_request(order), order.patient_id, order.study_instance_uid)

    @contextmanager
    def _read(self) -> Iterator[Session]:
        try:
            with self._sessions() as session:
                yield session
        except SQLAlchemyError as exc:
            raise IndexUnavailable("index database unavailable") from exc
