"""The one access policy: may this principal do this, and which studies may it see.

Every HTTP route asks :func:`authorize` (through ``viewer_api.security.require``) and filters
data with :func:`study_condition`; DIMSE handlers keep their AE-level policy
(``pacs.ae_access``), which grants a registered AE the archive-wide scope.
"""

from __future__ import annotations

from sqlalchemy import ColumnElement, and_, false, or_, select, true
from sqlalchemy.orm import Session

from pacs.consults.grants import consult_grant
from pacs.db.models import Patient, Study
from pacs.errors import InvalidInput, NotFound, PacsError
from pacs.persons.scope import linked_priors_condition
from pacs.security.models import StudyShare
from pacs.security.principal import AccessScope, Principal
from pacs.security.roles import Capability


class Forbidden(PacsError):
    """Authenticated, but the role (or scope) does not allow it: HTTP 403."""


def authorize(principal: Principal, capability: Capability) -> None:
    if not principal.can(capability):
        raise Forbidden(f"role {principal.role.value} may not {capability.value}")


def study_condition(scope: AccessScope, *, borrowed: bool = True, hide_empty: bool = False) -> ColumnElement[bool]:
    """A SQL condition on :class:`Study` rows true exactly for the studies ``scope`` may see.

    ``borrowed=False`` leaves out what a facility only borrows — another facility's study under an open
    consult, a person's prior from another facility — for acts that pass a study on (a share link, a slip)
    or change it (a claim, key images, a report: :mod:`pacs.reports.lifecycle`). The consult grant applies only
    to a scope with ``consult_grants`` (:func:`pacs.security.principal.scope_for`: roles holding
    ``Capability.CONSULT``); AE scopes (:mod:`pacs.ae_scope`) never have it.

    ``hide_empty=True`` leaves out a study with no current instance (every one rejected or moved away,
    :mod:`pacs.studies.rejection`): for the paths that show a study *as images* — QIDO-RS and C-FIND
    (:mod:`pacs.query.engine`), FHIR ImagingStudy, WADO, the reading list. Everything else (its reports, share
    links, consults, amending, restoring or deleting it) still sees it: a patient keeps the signed result.
    """
    parts: list[ColumnElement[bool]] = [Study.number_of_instances > 0] if hide_empty else []
    if scope.facilities is not None:
        facilities = sorted(scope.facilities)
        # IN, not a correlated EXISTS: PostgreSQL hashes the few shared study ids once instead of probing
        # study_share for every study a list or a count walks (bench/index_scale.py: 765 -> 145 ms to count one
        # facility's 240,000 studies)
        shared = Study.id.in_(select(StudyShare.study_fk).where(StudyShare.facility.in_(facilities)))
        lent: list[ColumnElement[bool]] = []
        if borrowed:
            if scope.consult_grants:  # a doctor of a consulted facility: the consult's study, until it ends
                lent.append(consult_grant(facilities))  # (pacs.consults; never AEs, technologists, EMR accounts)
            if scope.linked_priors and facilities:
                # a person's studies of other facilities (pacs.persons.scope; setting priors_across_facilities)
                lent.append(linked_priors_condition(facilities))
        parts.append(or_(Study.facility.in_(facilities), shared, *lent))
    if scope.patient is not None:  # one patient record, and only the studies of its own facility (no shares)
        key = scope.patient
        record = select(Patient.id).where(Patient.patient_id == key.patient_id,
                                          Patient.issuer_of_patient_id == key.issuer, Patient.facility == key.facility)
        parts += [Study.patient_fk.in_(record), Study.facility == key.facility]
    elif scope.patient_ids is not None:
        patients = select(Patient.id).where(Patient.patient_id.in_(sorted(scope.patient_ids)))
        parts.append(Study.patient_fk.in_(patients))
    if scope.study_uids is not None:
        parts.append(Study.study_instance_uid.in_(sorted(scope.study_uids)))
    return and_(*parts) if parts else true()


def owned_study_condition(scope: AccessScope) -> ColumnElement[bool]:
    """The studies a principal may *change* (correct, move, reject, restore, delete): its own facility's — never one
    it only sees through a share, a consult or a person's priors —, every study for an archive-wide principal, none
    for a patient or a share link. (Reading, and passing a study on by link, slip or send, use
    :func:`study_condition`.)"""
    if scope.patient is not None or scope.patient_ids is not None or scope.study_uids is not None:
        return false()
    if scope.facilities is None:
        return true()
    return Study.facility.in_(sorted(scope.facilities))


def may_see_study(session: Session, scope: AccessScope, study_instance_uid: str, *, borrowed: bool = True,
                  hide_empty: bool = False) -> bool:
    """Whether the study exists and is inside ``scope`` (callers answer 404 either way, so a
    guessed UID tells nothing about other facilities' studies); ``borrowed``, ``hide_empty``: see
    :func:`study_condition`."""
    found = session.scalar(select(Study.id).where(Study.study_instance_uid == study_instance_uid,
                                                  study_condition(scope, borrowed=borrowed,
                                                                  hide_empty=hide_empty)).limit(1))
    return found is not None


def share_study(session: Session, study_instance_uid: str, facility: str, shared_by: str) -> StudyShare:
    facility = facility.strip()
    if not facility:
        raise InvalidInput("name the facility to share with")
    study_id = session.scalar(select(Study.id).where(Study.study_instance_uid == study_instance_uid))
    if study_id is None:
        raise NotFound(f"no study {study_instance_uid}")
    existing = session.scalars(select(StudyShare).where(StudyShare.study_fk == study_id,
                                                        StudyShare.facility == facility)).one_or_none()
    if existing is not None:
        return existing
    share = StudyShare(study_fk=study_id, facility=facility, shared_by=shared_by[:64])
    session.add(share)
    session.flush()
    return share
