"""Modality Performed Procedure Step (PS3.4 F.7): what a modality reports it did, and the order state that follows.

A step is created IN PROGRESS (N-CREATE) and updated (N-SET) until it is COMPLETED or
DISCONTINUED, after which it may no longer change. A step is linked to an order through its
Scheduled Step Attributes Sequence: the Accession Number (with the Requested Procedure ID when
given), else the Study Instance UID the worklist handed out. A step that names no known order is
kept unlinked (unscheduled work). Only the first item that names an order is linked: one step
performed for several orders (the IHE "group case") moves only that order.

The order's state follows its steps (:func:`order_state_for`): in progress while any step is,
completed once a step completed, discontinued when every step was discontinued. What the modality
reports wins over the plan, so a step started for a cancelled order brings it back as in progress.

Who may move an order (issue 12, finding 2):

- a step is linked only to an order inside the creating AE's scope (:mod:`pacs.ae_scope`: an order of
  its facility, any order for an archive-wide AE). An order of another facility is treated exactly like
  an unknown one: the step is kept unlinked (unscheduled work) and the order does not change, and the
  modality gets the same answer either way (no oracle);
- a step is updated (N-SET) only by the AE title that created it (``calling_ae_title``, recorded at
  N-CREATE); to any other AE the step does not exist (``NoSuchStep``);
- unregistered AEs cannot reach this service at all: the association policy
  (:mod:`pacs.ae_access`) accepts MPPS only from registered AEs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pacs.errors import Conflict, InvalidInput, NotFound
from pacs.ris.models import (
    COMPLETED,
    DISCONTINUED,
    IN_PROGRESS,
    STEP_COMPLETED,
    STEP_FINAL_STATES,
    STEP_IN_PROGRESS,
    STEP_STATES,
    ImagingOrder,
    PerformedProcedureStep,
    PerformedSeries,
)
from pacs.ris.scope import order_condition
from pacs.security.principal import UNRESTRICTED, AccessScope
from storage.keys import is_valid_uid


class DuplicateStep(Conflict):
    """An N-CREATE for a SOP Instance UID that already exists."""


class NoSuchStep(NotFound):
    """An N-SET for a step this archive never created."""


class StepFinal(Conflict):
    """An N-SET on a step that is already COMPLETED or DISCONTINUED."""


class InvalidStep(InvalidInput):
    """An attribute value a step cannot take (a bad status, a malformed UID)."""


@dataclass(frozen=True)
class StepRecord:
    sop_instance_uid: str
    state: str
    performed_station_ae_title: str
    order_accession_number: str | None
    order_state: str | None
    series_instance_uids: tuple[str, ...]


def next_step_state(current: str, requested: str | None) -> str:
    """The step state after an N-SET asking for ``requested`` (None: status not in the modification list)."""
    if current in STEP_FINAL_STATES:
        raise StepFinal(f"the performed procedure step is {current} and may no longer be updated")
    if requested is None:
        return current
    if requested not in STEP_STATES:
        raise InvalidStep(f"invalid Performed Procedure Step Status {requested!r}")
    return requested


def order_state_for(current: str, step_states: list[str]) -> str:
    """The order's state given the states of all steps linked to it."""
    if not step_states:
        return current
    if STEP_IN_PROGRESS in step_states:
        return IN_PROGRESS
    if STEP_COMPLETED in step_states:
        return COMPLETED
    return DISCONTINUED


def create_step(session: Session, sop_instance_uid: str, attributes: Dataset, calling_ae: str = "", *,
                scope: AccessScope = UNRESTRICTED) -> StepRecord:
    """Record an N-CREATE: a new step IN PROGRESS, linked to its order (if inside ``scope``), which
    becomes in progress."""
    if not is_valid_uid(sop_instance_uid):
        raise InvalidStep(f"invalid SOP Instance UID {sop_instance_uid[:80]!r}")
    status = text(attributes, "PerformedProcedureStepStatus")
    if status != STEP_IN_PROGRESS:
        raise InvalidStep(f"a performed procedure step is created IN PROGRESS, not {status or 'empty'!r}")
    if session.scalar(select(PerformedProcedureStep.id)
                      .where(PerformedProcedureStep.sop_instance_uid == sop_instance_uid)) is not None:
        raise DuplicateStep(f"performed procedure step {sop_instance_uid} already exists")
    scheduled = _scheduled_steps(attributes)
    order = _linked_order(session, scheduled, scope)
    first = scheduled[0] if scheduled else {}
    step = PerformedProcedureStep(
        sop_instance_uid=sop_instance_uid,
        order_fk=order.id if order is not None else None,
        state=STEP_IN_PROGRESS,
        performed_procedure_step_id=text(attributes, "PerformedProcedureStepID", 16),
        performed_station_ae_title=text(attributes, "PerformedStationAETitle", 16) or calling_ae[:16],
        calling_ae_title=calling_ae[:16],
        modality=text(attributes, "Modality", 16),
        patient_id=text(attributes, "PatientID", 64),
        accession_number=(order.accession_number if order is not None else first.get("accession", ""))[:16],
        study_instance_uid=(order.study_instance_uid if order is not None else first.get("study", ""))[:64],
        start_date=text(attributes, "PerformedProcedureStepStartDate", 8),
        start_time=text(attributes, "PerformedProcedureStepStartTime", 16),
        end_date=text(attributes, "PerformedProcedureStepEndDate", 8),
        end_time=text(attributes, "PerformedProcedureStepEndTime", 16),
        n_create_json=json.dumps(dicom_json(attributes)),
        n_set_json="[]",
    )
    step.series = _performed_series(attributes)
    try:
        with session.begin_nested():
            session.add(step)
    except IntegrityError as exc:  # a concurrent N-CREATE of the same instance won the race
        raise DuplicateStep(f"performed procedure step {sop_instance_uid} already exists") from exc
    _sync_order(session, order)
    return _record(step, order)


def set_step(session: Session, sop_instance_uid: str, modification: Dataset, *,
             calling_ae: str | None = None) -> StepRecord:
    """Record an N-SET: update the step, and on COMPLETED or DISCONTINUED its order's state.

    ``calling_ae``: the AE title asking (DIMSE); the step must have been created by it, else it is
    answered as unknown. ``None`` (the command line, tests) skips that check.
    """
    step = session.scalars(select(PerformedProcedureStep)
                           .where(PerformedProcedureStep.sop_instance_uid == sop_instance_uid)
                           .with_for_update()).one_or_none()
    if step is None or (calling_ae is not None and step.calling_ae_title != calling_ae.strip()[:16]):
        raise NoSuchStep(f"no performed procedure step {sop_instance_uid[:80]}")
    requested = text(modification, "PerformedProcedureStepStatus") if "PerformedProcedureStepStatus" in \
        modification else None
    step.state = next_step_state(step.state, requested)
    for keyword, attr, limit in (("PerformedProcedureStepEndDate", "end_date", 8),
                                 ("PerformedProcedureStepEndTime", "end_time", 16)):
        if keyword in modification:
            setattr(step, attr, text(modification, keyword, limit))
    if "PerformedSeriesSequence" in modification:  # N-SET replaces a sequence as a whole
        series = _performed_series(modification)
        step.series.clear()
        session.flush()  # delete before insert: the same series is usually reported again
        step.series = series
    step.n_set_json = json.dumps([*json.loads(step.n_set_json or "[]"), dicom_json(modification)])
    session.flush()
    order = step.order
    _sync_order(session, order)
    return _record(step, order)


def get_step(session: Session, sop_instance_uid: str) -> StepRecord:
    step = session.scalars(select(PerformedProcedureStep)
                           .where(PerformedProcedureStep.sop_instance_uid == sop_instance_uid)).one_or_none()
    if step is None:
        raise NoSuchStep(f"no performed procedure step {sop_instance_uid[:80]}")
    return _record(step, step.order)


def _scheduled_steps(attributes: Dataset) -> list[dict[str, str]]:
    items = attributes.get("ScheduledStepAttributesSequence") or []
    return [{"accession": text(item, "AccessionNumber", 16), "procedure": text(item, "RequestedProcedureID", 16),
             "study": text(item, "StudyInstanceUID", 64)} for item in items]


def _linked_order(session: Session, scheduled: list[dict[str, str]], scope: AccessScope) -> ImagingOrder | None:
    """The first order the Scheduled Step Attributes name that is inside ``scope`` (others are unknown)."""
    for item in scheduled:
        stmt = select(ImagingOrder).where(order_condition(scope))
        if item["accession"]:
            stmt = stmt.where(ImagingOrder.accession_number == item["accession"])
            if item["procedure"]:
                stmt = stmt.where(ImagingOrder.requested_procedure_id == item["procedure"])
        elif item["study"]:
            stmt = stmt.where(ImagingOrder.study_instance_uid == item["study"])
        else:
            continue
        order = session.scalars(stmt.with_for_update()).one_or_none()
        if order is not None:
            return order
    return None


def _sync_order(session: Session, order: ImagingOrder | None) -> None:
    if order is None:
        return
    states = list(session.scalars(select(PerformedProcedureStep.state)
                                  .where(PerformedProcedureStep.order_fk == order.id)))
    new_state = order_state_for(order.state, states)
    if new_state != order.state:
        order.state = new_state
        session.flush()


def _performed_series(ds: Dataset) -> list[PerformedSeries]:
    out: dict[str, PerformedSeries] = {}
    for item in ds.get("PerformedSeriesSequence") or []:
        uid = text(item, "SeriesInstanceUID")
        if not is_valid_uid(uid):
            raise InvalidStep(f"invalid Series Instance UID {uid[:80]!r} in the Performed Series Sequence")
        images = len(item.get("ReferencedImageSequence") or []) + len(
            item.get("ReferencedNonImageCompositeSOPInstanceSequence") or [])
        out.setdefault(uid, PerformedSeries(series_instance_uid=uid, number_of_images=images,
                                            series_description=text(item, "SeriesDescription", 64)))
    return list(out.values())


def text(ds: Dataset, keyword: str, limit: int | None = None) -> str:
    """A received attribute as stripped text (multiple values joined with backslashes), cut to ``limit``."""
    try:
        value = ds.get(keyword)
    except Exception as exc:  # a value pydicom cannot decode
        raise InvalidStep(f"cannot read {keyword}: {exc}") from exc
    if value is None:
        return ""
    if isinstance(value, MultiValue):
        value = "\\".join(str(v) for v in value)
    result = str(value).strip(" \x00")
    return result[:limit] if limit else result


def dicom_json(ds: Dataset) -> dict[str, Any]:
    """The dataset as DICOM JSON (PS3.18 F.2), binary values inline, for the audit copy."""
    try:
        return ds.to_json_dict()
    except Exception as exc:
        raise InvalidStep(f"cannot read the attribute list: {exc}") from exc


def _record(step: PerformedProcedureStep, order: ImagingOrder | None) -> StepRecord:
    return StepRecord(step.sop_instance_uid, step.state, step.performed_station_ae_title,
                      order.accession_number if order is not None else None,
                      order.state if order is not None else None,
                      tuple(s.series_instance_uid for s in step.series))
