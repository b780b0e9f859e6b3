"""Who may change what on ingest (C-STORE, STOW-RS, import): a sender never alters another facility's data.

Pure decision logic; :mod:`pacs.ingest` applies it inside the indexing transaction, with the rows locked.

A sender has a facility ("" = unrestricted: an admin, the command line, a registered AE without a
facility) and is *trusted* unless it is an unregistered DICOM peer. The rules:

1. a series always stays in its study: an object naming an existing series under another study is refused;
2. a study that belongs to a facility takes objects only from that facility or an unrestricted trusted
   sender (an unregistered peer cannot add to it);
3. a new version of an existing instance (different content, same SOP Instance UID) needs a sender that may
   change the instance's current study: a trusted one of that facility (or unrestricted), or, for a study
   of no facility, an unregistered peer re-sending under the AE title that sent the current version (a
   modality correcting its own images); a facility-scoped sender may not move it to another study.

Every refusal has the same wording, whichever rule and whether or not the other facility's data exists.
"""

from __future__ import annotations

from dataclasses import dataclass

REFUSAL = "refused: this object would change a study, series or instance this sender may not change"


@dataclass(frozen=True)
class Existing:
    """What the index already holds for the object's UIDs (None: not there)."""

    study_facility: str | None  # the facility of the object's study
    series_study_uid: str | None  # the study the object's series belongs to
    instance_study_uid: str | None  # the study of the current version of the object's SOP instance
    instance_study_facility: str | None  # that study's facility
    instance_source_ae: str | None = None  # the AE title that sent the current version


def refusal(existing: Existing, study_uid: str, sender_facility: str, trusted: bool,
            new_version: bool, sender_ae: str = "") -> str | None:
    """The refusal message, or None when the sender may write this object."""
    if existing.series_study_uid is not None and existing.series_study_uid != study_uid:
        return REFUSAL
    if existing.study_facility is not None and not _may_add(existing.study_facility, sender_facility, trusted):
        return REFUSAL
    if new_version:
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


def _may_add(study_facility: str, sender_facility: str, trusted: bool) -> bool:
    if not trusted:
        return study_facility == ""
    return sender_facility == "" or study_facility in ("", sender_facility)


def _may_replace(study_facility: str, sender_facility: str) -> bool:
    return sender_facility == "" or study_facility == sender_facility
