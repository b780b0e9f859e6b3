"""Who is asking, and which studies they may see."""

from __future__ import annotations

from dataclasses import dataclass, field

from pacs.security.roles import Capability, Role


@dataclass(frozen=True)
class AccessScope:
    """The studies a principal may see. ``None`` in a field means "not restricted by this".

    - ``facilities``: studies acquired at one of these facilities, or shared with one of them;
    - ``patient_ids``: studies of these patients (a patient's own token);
    - ``study_uids``: exactly these studies (a share link).
    All given restrictions apply together.
    """

    facilities: frozenset[str] | None = None
    patient_ids: frozenset[str] | None = None
    study_uids: frozenset[str] | None = None

    @property
    def unrestricted(self) -> bool:
        return self.facilities is None and self.patient_ids is None and self.study_uids is None


UNRESTRICTED = AccessScope()


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


def scope_for(role: Role, facility: str, patient_id: str = "") -> AccessScope:
    """The scope a role gets: a facility user sees that facility (plus shares); a patient their own studies."""
    facilities = frozenset({facility}) if facility else None
    patients = frozenset({patient_id}) if role is Role.PATIENT else None
    return AccessScope(facilities=facilities, patient_ids=patients)
