"""Who sees a person's studies of other facilities (the "priors" rule).

The rule (setting ``priors_across_facilities``, a list of roles; default radiologist and clinician; ``[]``
turns it off): a principal of one of those roles, belonging to facility F, also sees the studies of other
facilities whose patient record belongs to a person who has at least one study visible to F — acquired at
F or shared with F (:class:`pacs.security.models.StudyShare`). Not transitively: a study that F sees only
as a prior does not open further persons.

Never: patients (their scope is one record of their own facility), share links (one study), principals of
other roles, and anyone when the setting is empty. EMR service accounts get it only when ``emr`` is listed:
an EMR shows whatever it fetched to whoever uses it, so the archive cannot tell whether that user is a
clinician allowed to see other hospitals' priors — opting in is the facility's decision.

A principal without a facility sees every facility already; the rule adds nothing to it.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import replace

from sqlalchemy import ColumnElement, exists, or_, select
from sqlalchemy.orm import Session, aliased

from pacs.db.models import Patient, Study
from pacs.security.models import StudyShare
from pacs.security.principal import AccessScope
from pacs.security.roles import Role

NO_PRIORS_ROLES = frozenset({Role.PATIENT})


def check_roles(values: Iterable[str]) -> list[str]:
    """The setting's value, checked: known roles, never ``patient``; ValueError otherwise."""
    out: list[str] = []
    for value in values:
        name = str(value).strip().lower()
        try:
            role = Role(name)
        except ValueError:
            raise ValueError(f"priors_across_facilities: unknown role {name!r}") from None
        if role in NO_PRIORS_ROLES:
            raise ValueError("priors_across_facilities: patients never see other facilities' studies")
        out.append(role.value)
    return out


def priors_allowed(roles: Collection[str], role: Role, facility: str) -> bool:
    """Whether a principal of ``role`` at ``facility`` gets the priors rule (``roles``: the setting)."""
    return bool(facility) and role not in NO_PRIORS_ROLES and role.value in {r.strip().lower() for r in roles}


def linked_priors_condition(facilities: Collection[str]) -> ColumnElement[bool]:
    """A condition on :class:`Study` rows: the study's record belongs to a person who has a study acquired at
    or shared with one of ``facilities``.

    Correlated on the study's own patient row: the database follows ``patient.id`` → ``patient.person_fk``
    (indexed) → the person's records → their studies (``study.patient_fk``, indexed), never a scan of the
    facility's studies. It adds no statement: it is part of the query's WHERE clause.
    """
    wanted = sorted(facilities)
    own = aliased(Patient)
    record = aliased(Patient)
    seen = aliased(Study)
    visible = or_(seen.facility.in_(wanted),
                  exists().where(StudyShare.study_fk == seen.id, StudyShare.facility.in_(wanted)))
    same_person = exists().where(record.person_fk == own.person_fk, seen.patient_fk == record.id, visible)
    return exists().where(own.id == Study.patient_fk, own.person_fk.is_not(None), same_person)


def same_person_records(session: Session, patient_pks: Collection[int]) -> dict[int, set[int]]:
    """For each record, the records of its person (itself included); a record with no person: itself."""
    out = {pk: {pk} for pk in patient_pks}
    if not patient_pks:
        return out
    mine = aliased(Patient)
    other = aliased(Patient)
    for pk, linked in session.execute(select(mine.id, other.id).join(other, other.person_fk == mine.person_fk)
                                      .where(mine.id.in_(sorted(patient_pks)), mine.person_fk.is_not(None))):
        out[pk].add(linked)
    return out


def without_priors(scope: AccessScope) -> AccessScope:
    """The scope without a person's studies of other facilities (priors to read, never work of this facility).
    Changes use ``borrowed=False`` of :func:`pacs.security.access.study_condition` (no priors, no consult's
    study); this keeps the consult grant, for the one change it allows: a consultant's own ``as_report`` draft
    (:func:`pacs.reports.lifecycle._visible_report`)."""
    return replace(scope, linked_priors=False) if scope.linked_priors else scope
