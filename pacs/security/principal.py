"""Who is asking, and which studies they may see."""

from __future__ import annotations

from dataclasses import dataclass, field

from pacs.security.roles import ROLE_CAPABILITIES, Capability, Role


@dataclass(frozen=True)
class PatientKey:
    """One patient record: a Patient ID is unique only within its issuer, and (as modalities often send
    no issuer) within the facility that sent it — the identity of :class:`pacs.db.models.Patient`."""

    patient_id: str
    issuer: str
    facility: str


@dataclass(frozen=True)
class AccessScope:
    """The studies a principal may see. ``None`` in a field means "not restricted by this".

    - ``facilities``: studies acquired at one of these facilities, or shared with one of them;
    - ``patient_ids``: studies of patients with these IDs (kept for orders, which carry a bare ID);
    - ``patient``: studies of exactly this patient record (a patient's own token: ID, issuer and facility);
    - ``study_uids``: exactly these studies (a share link).
    All given restrictions apply together. ``linked_priors`` widens ``facilities``: also the other facilities'
    studies of a person with a study visible to them (:mod:`pacs.persons.scope`, ``priors_across_facilities``).
    ``consult_grants`` widens ``facilities`` too: also a study under an open consult to one of them
    (:mod:`pacs.consults.grants`). Only principals of roles that take part in consults (``Capability.CONSULT``:
    radiologists, clinicians, admins) get it — never a technologist, an EMR account, a patient or a DICOM AE:
    issue 14 grants the consulted facility's doctors exactly that study, not every account of the facility.
    """

    facilities: frozenset[str] | None = None
    patient_ids: frozenset[str] | None = None
    study_uids: frozenset[str] | None = None
    patient: PatientKey | None = None
    linked_priors: bool = False
    consult_grants: bool = False

    @property
    def unrestricted(self) -> bool:
        return self.facilities is None and self.patient_ids is None and self.study_uids is None \
            and self.patient is None


UNRESTRICTED = AccessScope()
# What a patient principal that is not bound to one patient record sees: nothing.
NOTHING = AccessScope(facilities=frozenset(), patient_ids=frozenset(), study_uids=frozenset())


@dataclass(frozen=True)
class Principal:
    subject: str  # user name, token name, OIDC subject, AE title
    role: Role
    capabilities: frozenset[Capability]
    scope: AccessScope = UNRESTRICTED
    kind: str = "user"  # user, token, oidc, session, ae
    facility: str = ""  # the facility the principal belongs to ("" = every facility)
    source_address: str = ""
    token_id: int | None = None
    extra: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    def can(self, capability: Capability) -> bool:
        return capability in self.capabilities


def scope_for(role: Role, facility: str, patient_id: str = "", issuer: str = "", *,
              linked_priors: bool = False) -> AccessScope:
    """The scope a role gets: a facility user sees that facility (plus shares); a patient their own studies.

    A patient principal is bound to one patient record — ID, issuer and facility together (issue 12,
    finding 5: the same local ID names different people at different hospitals). Without a facility or an
    ID it sees nothing; the CLI and the OIDC mapping refuse to make such a principal in the first place.
    ``linked_priors`` (:func:`pacs.persons.scope.priors_allowed`) is never given to a patient;
    ``consult_grants`` only to a facility principal of a role holding ``Capability.CONSULT``.
    """
    if role is Role.PATIENT:
        if not facility or not patient_id:
            return NOTHING
        return AccessScope(facilities=frozenset({facility}), patient_ids=frozenset({patient_id}),
                           patient=PatientKey(patient_id, issuer, facility))
    return AccessScope(facilities=frozenset({facility}) if facility else None,
                       linked_priors=linked_priors and bool(facility),
                       consult_grants=bool(facility) and Capability.CONSULT in ROLE_CAPABILITIES[role])
