"""Who may file what on ingest (C-STORE, STOW-RS, import): whose study an object joins, or why it does not.

Pure decision logic; :mod:`pacs.ingest` applies it inside the indexing transaction, with the rows locked.

A sender has a facility ("" = unrestricted: an admin, the command line, a registered AE without a
facility) and is *trusted* unless it is an unregistered DICOM peer. A study has an *owner*: a facility
and a patient (Patient ID + issuer). The rules, in order:

1. a series always stays in its study: an object naming an existing series under another study is refused;
2. an order pins its study: an object whose Study Instance UID is an order's belongs to the order's facility
   and patient, whatever exists in the index (so whoever sends a worklist's UID first owns nothing);
   otherwise an existing study's owner is its facility and its patient; a new UID has no owner yet and
   the object is filed, creating the study for the sender's facility (*provisional* when the sender is
   unregistered);
3. a provisional study (created by an unregistered peer, no order) is *claimed* by the first object of a
   trusted sender *of a facility*: that facility's exam wins, the unregistered peer's objects move to the
   reconciliation queue (:mod:`pacs.reconciliation`). An unrestricted sender (an admin, the command line,
   the archive's own report SR and key-image KOS, an archive-wide node) adds to the study without claiming
   it: signing a report on an unregistered modality's study must not take the study's images away (and a
   study someone has read — a report, key images, a claim — is no longer provisional);
4. an object for a study of a facility, from a sender that may not write for that facility (another
   facility, or an unregistered peer), is *held* for reconciliation in that facility's queue;
5. an object whose Patient ID differs from the owner's, or whose issuer differs when both have one (a
   modality often sends none), is *held* as well: it is never filed under another patient's study;
6. a new version of an existing instance (different content, same SOP Instance UID) needs a sender that may
   change the instance's current study: a trusted one of that facility (or unrestricted), or, for a study
   of no facility, an unregistered peer re-sending under the AE title that sent the current version (a
   modality correcting its own images); a facility-scoped sender may not move it to another study.

A held object is stored and acknowledged; only a sender that may read the study (trusted, of its facility or
unrestricted) is told, with a warning, that it was held (``Decision.warn``). Anyone else gets the answer a
new study would get, so a sender never learns whether another facility's study exists. Every refusal has
the same wording, whichever rule and whether or not the other facility's data exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

REFUSAL = "refused: this object would change a study, series or instance this sender may not change"

# reasons an object is held (pacs.reconciliation.models)
HELD_SENDER = "sender"
HELD_PATIENT = "patient"


@dataclass(frozen=True)
class Owner:
    """Whose study it is: a facility ("" = none) and a patient."""

    facility: str
    patient_id: str
    issuer_of_patient_id: str = ""


@dataclass(frozen=True)
class Existing:
    """What the index already holds for the object's UIDs (None: not there)."""

    study_facility: str | None  # the facility of the object's study
    series_study_uid: str | None  # the study the object's series belongs to
    instance_study_uid: str | None  # the study of the current version of the object's SOP instance
    instance_study_facility: str | None  # that study's facility
    instance_source_ae: str | None = None  # the AE title that sent the current version
    order: Owner | None = None  # the order whose Study Instance UID the object carries
    study_owner: Owner | None = None  # the existing study's facility and patient
    study_provisional: bool = False  # the existing study was created by an unregistered sender


@dataclass(frozen=True)
class Sender:
    facility: str  # "" = unrestricted
    trusted: bool  # False: an unregistered DICOM peer
    ae: str = ""
    resolving: bool = False  # someone of the study's facility filing a held object as it is (pacs.reconciliation)


class Verdict(StrEnum):
    FILE = "file"  # index it (creating the study when new)
    CLAIM = "claim"  # rule 3: move the provisional study's objects to reconciliation, then file
    HOLD = "hold"  # store it in the reconciliation queue of ``Decision.facility``
    REFUSE = "refuse"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    facility: str = ""  # FILE/CLAIM: the facility a new study (and patient row) is filed under; HOLD: whose queue
    reason: str = ""  # HOLD: HELD_SENDER or HELD_PATIENT
    expected: Owner | None = None  # HOLD: the owner the study expected
    warn: bool = False  # HOLD: the sender may read the study, so it is told the object was held
    provisional: bool = False  # FILE: a new study is provisional (the sender is unregistered)
    message: str = ""  # REFUSE: the refusal; HOLD: why, for the queue and the warning


def decide(existing: Existing, study_uid: str, sender: Sender, patient_id: str, issuer_of_patient_id: str,
           new_version: bool) -> Decision:
    """Where an object goes (see the module docstring for the rules)."""
    if existing.series_study_uid is not None and existing.series_study_uid != study_uid:
        return Decision(Verdict.REFUSE, message=REFUSAL)
    owner = existing.order or existing.study_owner
    if owner is None:
        return _file(existing, study_uid, sender, new_version, sender.facility, provisional=not sender.trusted)
    if existing.order is None and existing.study_provisional and sender.trusted and sender.facility \
            and not sender.resolving \
            and (not new_version or existing.instance_study_uid == study_uid):
        return Decision(Verdict.CLAIM, facility=sender.facility)
    reads_it = sender.trusted and sender.facility in ("", owner.facility)
    if not (owner.facility == "" or reads_it):
        return Decision(Verdict.HOLD, facility=owner.facility, reason=HELD_SENDER, expected=owner,
                        message="held for reconciliation: the sender may not write this study")
    if not sender.resolving and not same_patient(owner, patient_id, issuer_of_patient_id):
        return Decision(Verdict.HOLD, facility=owner.facility, reason=HELD_PATIENT, expected=owner, warn=reads_it,
                        message="held for reconciliation: Patient ID differs from the study's")
    return _file(existing, study_uid, sender, new_version, owner.facility or sender.facility)


def same_patient(owner: Owner, patient_id: str, issuer_of_patient_id: str) -> bool:
    """The same Patient ID, and the same issuer when both name one."""
    if patient_id.strip() != owner.patient_id.strip():
        return False
    issuer, expected = issuer_of_patient_id.strip(), owner.issuer_of_patient_id.strip()
    return not issuer or not expected or issuer == expected


def _file(existing: Existing, study_uid: str, sender: Sender, new_version: bool, facility: str,
          provisional: bool = False) -> Decision:
    refused = refusal(existing, study_uid, sender.facility, sender.trusted, new_version, sender.ae) \
        if new_version else None
    if refused is not None:
        return Decision(Verdict.REFUSE, message=refused)
    return Decision(Verdict.FILE, facility=facility, provisional=provisional)


def refusal(existing: Existing, study_uid: str, sender_facility: str, trusted: bool,
            new_version: bool, sender_ae: str = "") -> str | None:
    """Rules 1 and 6: the refusal message, or None when the sender may write this object's UIDs."""
    if existing.series_study_uid is not None and existing.series_study_uid != study_uid:
        return REFUSAL
    if not new_version:
        return None
    if not trusted:
        same_sender = bool(sender_ae) and existing.instance_source_ae == sender_ae
        return None if same_sender and existing.instance_study_facility in (None, "") \
            and existing.instance_study_uid in (None, study_uid) else REFUSAL
    if existing.instance_study_facility is not None and not _may_replace(existing.instance_study_facility,
                                                                         sender_facility):
        return REFUSAL
    if sender_facility and existing.instance_study_uid not in (None, study_uid):
        return REFUSAL
    return None


def _may_replace(study_facility: str, sender_facility: str) -> bool:
    return sender_facility == "" or study_facility == sender_facility
