"""Roles and what each may do (SPEC §1, §7). The table below is the policy; nothing else grants rights."""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    ADMIN = "admin"
    RADIOLOGIST = "radiologist"
    TECHNOLOGIST = "technologist"
    CLINICIAN = "clinician"
    EMR = "emr"  # a service account of an EMR or a gateway
    PATIENT = "patient"


class Capability(StrEnum):
    STUDY_SEARCH = "study.search"  # QIDO-RS, FHIR ImagingStudy search, study lists
    STUDY_READ = "study.read"  # WADO-RS/URI, metadata, rendered images, FHIR Patient read
    STUDY_STORE = "study.store"  # STOW-RS
    REPORT_READ = "report.read"
    REPORT_WRITE = "report.write"
    ORDER_MANAGE = "order.manage"
    STUDY_RECONCILE = "study.reconcile"  # the reconciliation queue: list and resolve held objects
    SHARE_CREATE = "share.create"
    CONSULT = "consult"  # teleconsultation: ask another facility about a study, answer, close (pacs.consults)
    STUDY_CORRECT = "study.correct"  # correct patient/study attributes, move series (pacs.studies.corrections)
    STUDY_REJECT = "study.reject"  # IOCM rejection and restore (pacs.studies.rejection; radiologists: quality only)
    STUDY_DELETE = "study.delete"  # delete studies and rejected objects, retention (pacs.studies.deletion)
    STUDY_EXPORT = "study.export"  # download a study as a zip with a DICOMDIR (pacs.studies.archive_zip)
    STUDY_SEND = "study.send"  # send a study to a registered DICOM peer (pacs.studies.send)
    AUDIT_READ = "audit.read"
    ADMIN = "admin"  # users, tokens, configuration
    OPS_METRICS = "ops.metrics"  # read /metrics from outside PACS_METRICS_ALLOW (no patient data; pacs.metrics)


ROLE_CAPABILITIES: dict[Role, frozenset[Capability]] = {
    Role.ADMIN: frozenset(Capability),
    Role.RADIOLOGIST: frozenset({Capability.STUDY_SEARCH, Capability.STUDY_READ, Capability.STUDY_STORE,
                                 Capability.REPORT_READ, Capability.REPORT_WRITE, Capability.SHARE_CREATE,
                                 Capability.CONSULT, Capability.STUDY_REJECT, Capability.STUDY_EXPORT,
                                 Capability.STUDY_SEND}),
    Role.TECHNOLOGIST: frozenset({Capability.STUDY_SEARCH, Capability.STUDY_READ, Capability.STUDY_STORE,
                                  Capability.ORDER_MANAGE, Capability.STUDY_RECONCILE, Capability.STUDY_CORRECT,
                                  Capability.STUDY_REJECT, Capability.STUDY_EXPORT, Capability.STUDY_SEND}),
    Role.CLINICIAN: frozenset({Capability.STUDY_SEARCH, Capability.STUDY_READ, Capability.REPORT_READ,
                               Capability.SHARE_CREATE, Capability.CONSULT, Capability.STUDY_EXPORT}),
    Role.EMR: frozenset({Capability.STUDY_SEARCH, Capability.STUDY_READ, Capability.STUDY_STORE,
                         Capability.REPORT_READ, Capability.ORDER_MANAGE}),
    # A patient reads their own reports; images only when the token grants them (--images).
    Role.PATIENT: frozenset({Capability.REPORT_READ}),
}

PATIENT_IMAGE_GRANT = frozenset({Capability.STUDY_SEARCH, Capability.STUDY_READ})


def capabilities_of(role: Role, *, images_granted: bool = False) -> frozenset[Capability]:
    caps = ROLE_CAPABILITIES[role]
    if role is Role.PATIENT and images_granted:
        caps = caps | PATIENT_IMAGE_GRANT
    return caps


def parse_role(value: str) -> Role:
    try:
        return Role(value.strip().lower())
    except ValueError:
        raise ValueError(f"unknown role {value[:32]!r}; one of: {', '.join(r.value for r in Role)}") from None
