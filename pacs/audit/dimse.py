"""Audit rows for DIMSE requests and refused associations (SPEC §7): one row per request, never per match.

The DIMSE adapter (:mod:`dicom_scp.audit`) fills a :class:`DimseRequest` while the request is
answered (the identifier's keys, the studies and patients of what was matched or sent) and calls
:func:`record_request` once with the final status. This module decides what the row says:

- actor: the calling AE title; role ``ae`` (query/retrieve) or ``modality`` (worklist, MPPS);
  source address ``host:port``;
- outcome from the final status's category: Success → ``success``; Warning and Cancel →
  ``warning`` (some sub-operations failed, or the peer stopped early); Failure → ``failure``;
- patient and study: the ones the request names (a single Patient ID without wildcards, a single
  Study Instance UID), else the single one that was matched or sent; the patient of a single study
  is looked up in the index when nothing else names it. Several studies: their count and the first
  UIDs go into the detail;
- detail: ``k=v`` fields: model, level, the identifier's matching keys (values included: this is an
  access log; cut to :data:`MAX_KEYS_CHARS`), number of return keys, matches or sub-operation
  counts, the move destination, the final status and its error comment.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pynetdicom.status import code_to_category
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pacs.ae_access import service_of
from pacs.audit import trail
from pacs.charset import assumes_utf8, utf8_text
from pacs.db.models import Patient, Study
from storage.keys import is_valid_uid, parse_instance_key

ROLE_AE = "ae"
ROLE_MODALITY = "modality"

ASSOCIATION_REJECTED = "dimse.association-rejected"

MAX_VALUE_CHARS = 64  # one key's value in the detail
MAX_KEYS_CHARS = 800  # all keys together
MAX_TRACKED = 1000  # distinct studies / patients remembered per request (beyond: "more than")
SHOWN_UIDS = 3  # UIDs listed when a request touched several studies
_LOOKUP_LIMIT = 20  # studies whose patients are looked up when the matches do not say


@dataclass
class Subjects:
    """Distinct study UIDs and patient IDs seen in matches or sent objects, in first-seen order, bounded."""

    studies: dict[str, None] = field(default_factory=dict)
    patients: dict[str, None] = field(default_factory=dict)
    more_studies: bool = False
    more_patients: bool = False

    def add(self, study_uid: object = "", patient_id: object = "") -> None:
        if isinstance(study_uid, str) and study_uid and study_uid not in self.studies:
            if len(self.studies) < MAX_TRACKED:
                self.studies[study_uid] = None
            else:
                self.more_studies = True
        if isinstance(patient_id, str) and patient_id and patient_id not in self.patients:
            if len(self.patients) < MAX_TRACKED:
                self.patients[patient_id] = None
            else:
                self.more_patients = True


@dataclass
class DimseRequest:
    """What one DIMSE request asked for and what it touched, gathered while it is answered."""

    action: str
    calling_ae: str
    address: str
    role: str = ROLE_AE
    model: str = ""
    level: str = ""
    keys: list[tuple[str, str]] = field(default_factory=list)  # matching keys with a value
    return_keys: int = 0  # keys sent empty: asked to be returned
    requested_patient_id: str = ""
    requested_study_uids: tuple[str, ...] = ()
    matched: Subjects = field(default_factory=Subjects)
    matches: int | None = None  # C-FIND / worklist: Pending responses sent
    planned: int | None = None  # C-MOVE / C-GET: sub-operations announced
    attempted: int = 0  # C-MOVE / C-GET: sub-operations started (objects handed to the sender)
    destination: str = ""  # C-MOVE: TITLE or TITLE@host:port
    extra: dict[str, str] = field(default_factory=dict)  # further k=v detail fields (MPPS)
    problem: str = ""  # why there was no final response, or the identifier could not be read

    def read_identifier(self, ds: Dataset, assume_utf8_for_latin1: bool = True) -> None:
        """The level, the keys, and the patient / studies the identifier names (text read as the
        service read it: :mod:`pacs.charset`)."""
        self.level = _text(ds.get("QueryRetrieveLevel", "")).upper()
        keys, self.return_keys = identifier_keys(ds, assume_utf8_for_latin1)
        self.keys = [(k, v) for k, v in keys if k not in ("QueryRetrieveLevel", "SpecificCharacterSet")]
        named = dict(self.keys)
        patient = named.get("PatientID", "")
        if patient and not any(c in patient for c in "*?\\"):
            self.requested_patient_id = patient
        studies = tuple(dict.fromkeys(u for u in named.get("StudyInstanceUID", "").split("\\") if u))
        self.requested_study_uids = tuple(u for u in studies if is_valid_uid(u))

    def add_sent_object(self, object_key: str) -> None:
        """A retrieve sub-operation started for the stored object at ``object_key``: its study was sent."""
        parsed = parse_instance_key(object_key) if object_key else None
        if parsed is not None:
            self.matched.add(parsed[0])


@dataclass(frozen=True)
class FinalStatus:
    """The final response: its status, Error Comment and (retrieves) sub-operation counts."""

    code: int | None  # None: no final response was sent
    comment: str = ""
    completed: int | None = None
    failed: int | None = None
    warning: int | None = None
    remaining: int | None = None


def outcome_of(code: int | None) -> str:
    if code is None:
        return "failure"
    category = code_to_category(code)
    if category == "Success":
        return "success"
    if category in ("Warning", "Cancel"):
        return "warning"
    return "failure"


def identifier_keys(ds: Dataset, assume_utf8_for_latin1: bool = True, *,
                    _inherited: bool | None = None) -> tuple[list[tuple[str, str]], int]:
    """``(keyword, value)`` for the elements with a value (items of a sequence flattened) and the
    number of elements sent empty. Undecodable values read ``<undecodable>``; never raises.

    Text is read with the rule of :mod:`pacs.charset` (UTF-8 under a Latin-1 label), as the services do."""
    keys: list[tuple[str, str]] = []
    empty = 0
    try:
        tags = list(ds.keys())
        # a sequence item without a Specific Character Set of its own reads as its parent does
        utf8_fallback = (assumes_utf8(ds, assume_utf8_for_latin1)
                         if _inherited is None or "SpecificCharacterSet" in ds else _inherited)
    except Exception:
        return [("identifier", "<undecodable>")], 0
    for tag in tags:
        if tag.element == 0 or tag.is_private:
            continue
        keyword = keyword_for_tag(tag) or str(tag)
        try:
            as_utf8 = utf8_text(ds.get_item(tag)) if utf8_fallback else None
            if as_utf8 is not None:
                keys.append((keyword, as_utf8.strip(" \x00")))
                continue
            elem = ds[tag]
            if elem.VR == "SQ":
                items = elem.value or []
                if not items:
                    empty += 1
                for item in items[:1]:
                    child_keys, child_empty = identifier_keys(item, assume_utf8_for_latin1, _inherited=utf8_fallback)
                    keys += child_keys
                    empty += child_empty
                continue
            value = _text(elem.value)
        except Exception:
            keys.append((keyword, "<undecodable>"))
            continue
        if value:
            keys.append((keyword, value))
        else:
            empty += 1
    return keys, empty


def format_keys(keys: Iterable[tuple[str, str]]) -> str:
    parts = []
    for keyword, value in keys:
        value = value.replace("\n", " ").replace("\r", " ")
        if len(value) > MAX_VALUE_CHARS:
            value = value[: MAX_VALUE_CHARS - 3] + "..."
        parts.append(f"{keyword}={value}")
    text = "; ".join(parts)
    return text if len(text) <= MAX_KEYS_CHARS else text[: MAX_KEYS_CHARS - 3] + "..."


def record_request(sessions: sessionmaker[Session], read_sessions: sessionmaker[Session], request: DimseRequest,
                   final: FinalStatus) -> None:
    """Write the request's one audit row (raises what the database raises; the caller logs it)."""
    patient_id, study_uid, subject_detail = _subjects(read_sessions, request)
    trail.record(sessions, action=request.action, actor=request.calling_ae, role=request.role,
                 outcome=outcome_of(final.code), source_address=request.address, patient_id=patient_id,
                 study_instance_uid=study_uid, detail=_detail(request, final, subject_detail))


def record_association_rejected(sessions: sessionmaker[Session], *, calling_ae: str, address: str, reason: str,
                                reject: tuple[int, int, int] | None, services: Iterable[str]) -> None:
    """The row for an association the network policy rejected (A-ASSOCIATE-RJ)."""
    fields = [f"services={','.join(sorted(set(services))) or '-'}"]
    if reject is not None:
        fields.append("reject=" + "/".join(str(v) for v in reject))
    fields.append(f"reason={reason}")
    trail.record(sessions, action=ASSOCIATION_REJECTED, actor=calling_ae, role=ROLE_AE, outcome="failure",
                 source_address=address, detail=" ".join(fields))


def record_mpps_request(sessions: sessionmaker[Session], read_sessions: sessionmaker[Session], request: DimseRequest,
                        sop_instance_uid: str, attributes: Dataset, final: FinalStatus) -> None:
    """The row of an MPPS N-CREATE / N-SET: the step's status, modality and series count as requested, and
    the patient and study of the step as stored (linked to its order's study) when it is known."""
    from pacs.ris.models import PerformedProcedureStep  # the RIS tables are a layer above this module's

    request.extra["sop"] = sop_instance_uid or "-"
    named = dict(identifier_keys(attributes)[0])
    if named.get("PerformedProcedureStepStatus"):
        request.extra["step_status"] = named["PerformedProcedureStepStatus"].replace(" ", "_")
    if named.get("Modality"):
        request.extra["modality"] = named["Modality"]
    series = attributes.get("PerformedSeriesSequence") if "PerformedSeriesSequence" in attributes else None
    if series is not None:
        request.extra["series"] = str(len(series))
    request.requested_patient_id = named.get("PatientID", "")
    study = named.get("StudyInstanceUID", "")
    if sop_instance_uid:
        with read_sessions() as session:
            step = session.scalars(select(PerformedProcedureStep).where(
                PerformedProcedureStep.sop_instance_uid == sop_instance_uid)).one_or_none()
            if step is not None:
                request.requested_patient_id = step.patient_id or request.requested_patient_id
                study = step.study_instance_uid or study
                if step.accession_number:
                    request.extra["accession"] = step.accession_number
    if study:
        request.requested_study_uids = (study,)
    record_request(sessions, read_sessions, request, final)


def services_of(abstract_syntaxes: Iterable[str]) -> list[str]:
    """The services (``pacs.ae_access.Service``) an association asked for, for a rejection's row."""
    services = []
    for uid in abstract_syntaxes:
        try:
            services.append(str(service_of(uid)))
        except Exception:
            services.append("unknown")
    return services


def patients_of_studies(session: Session, study_uids: Iterable[str]) -> list[str]:
    """The distinct Patient IDs of these studies (as indexed)."""
    uids = list(study_uids)
    if not uids:
        return []
    rows = session.scalars(select(Patient.patient_id).join(Study, Study.patient_fk == Patient.id)
                           .where(Study.study_instance_uid.in_(uids)).distinct())
    return sorted({r for r in rows if r})


def _subjects(read_sessions: sessionmaker[Session], request: DimseRequest) -> tuple[str, str, list[str]]:
    """(patient_id, study_uid, detail fields) by the rules in the module docstring."""
    matched = request.matched
    detail: list[str] = []
    studies = list(matched.studies)
    more_studies = matched.more_studies
    if len(request.requested_study_uids) == 1:
        study_uid = request.requested_study_uids[0]
    elif len(studies) == 1 and not more_studies:
        study_uid = studies[0]
    else:
        study_uid = ""
        listed = studies or list(request.requested_study_uids)
        if listed:
            count = f"{len(listed)}+" if more_studies else str(len(listed))
            detail.append(f"studies={count} first={','.join(listed[:SHOWN_UIDS])}")
    patient_id = request.requested_patient_id
    if not patient_id:
        patients = list(matched.patients)
        if len(patients) == 1 and not matched.more_patients:
            patient_id = patients[0]
        elif patients:
            detail.append(f"patients={len(patients)}{'+' if matched.more_patients else ''}")
        else:
            candidates = [study_uid] if study_uid else (studies or list(request.requested_study_uids))
            if candidates and len(candidates) <= _LOOKUP_LIMIT and not more_studies:
                with read_sessions() as session:
                    found = patients_of_studies(session, candidates)
                if len(found) == 1:
                    patient_id = found[0]
                elif found:
                    detail.append(f"patients={len(found)}")
    return patient_id, study_uid, detail


def _detail(request: DimseRequest, final: FinalStatus, subject_detail: list[str]) -> str:
    fields: list[str] = []
    if request.model:
        fields.append(f"model={request.model}")
    if request.level:
        fields.append(f"level={request.level}")
    if request.destination:
        fields.append(f"destination={request.destination}")
    if request.keys or request.model or request.level:  # a query / retrieve identifier (MPPS: extra fields)
        fields.append(f"keys=[{format_keys(request.keys)}]")
    if request.return_keys:
        fields.append(f"returns={request.return_keys}")
    fields += [f"{k}={v}" for k, v in request.extra.items()]
    if request.matches is not None:
        fields.append(f"matches={request.matches}")
    # A refusal is announced as one sub-operation that failed (pynetdicom's contract): no counts then.
    refused = request.attempted == 0 and outcome_of(final.code) == "failure"
    if request.planned is not None and not refused:
        fields.append(f"planned={request.planned}")
        for name in ("completed", "failed", "warning", "remaining"):
            value = getattr(final, name)
            if value is not None:
                fields.append(f"{name}={value}")
    fields += subject_detail
    fields.append(f"status=0x{final.code:04X}" if final.code is not None else "status=none")
    if final.comment:
        fields.append(f"error={final.comment}")
    if request.problem:
        fields.append(f"problem={request.problem}")
    return " ".join(fields)


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple) and not isinstance(value, Sequence):
        return "\\".join(str(v) for v in value).strip(" \x00")
    if isinstance(value, bytes):
        return "<binary>" if value else ""
    return str(value).strip(" \x00")
