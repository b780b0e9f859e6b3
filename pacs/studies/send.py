"""Sending a study (or some of its series) to a registered DICOM peer: ``POST /api/studies/{study}/send``,
``pacs study send``.

Nothing is sent here: :func:`queue_send` puts one job per current instance in the forwarding queue (the
``forward_job`` table, :mod:`pacs.forwarding.delivery`), the same queue forwarding rules fill, so delivery
is C-STORE of each object as stored, over one association per batch, with retries and backoff, and survives
restarts. A job is per destination, instance and version (SHA-256): sending a study again puts its
existing jobs back to pending (a fresh attempt count), new instances get new jobs. :func:`send_progress`
counts the jobs of the study's current instances per state.

Who may send what: the principal needs ``study.send`` and must see the study as its own facility's (a study
only borrowed through a consult or as a person's prior is not this facility's to pass on; :func:`study_condition`
with ``borrowed=False``); the destination must be a registered AE with a host and port, and — as for a C-MOVE
destination (:func:`pacs.ae_scope.destination_scope`) — registered for a facility that may see the study
(its own or one it is shared with) or archive-wide. Otherwise the study would leave for a facility the archive
would not show it to: refused with 403 and a message that says what to do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import and_, func, select, update
from sqlalchemy.orm import Session

from pacs import audit
from pacs.ae_scope import destination_scope
from pacs.aes import MoveDestination, validate_ae_title
from pacs.context import AppContext
from pacs.db.models import ApplicationEntity, ForwardJob, Instance, Patient, Series, Study
from pacs.errors import InvalidInput, NotFound
from pacs.jobs import JobState, utcnow
from pacs.security.access import Forbidden, authorize, may_see_study, study_condition
from pacs.security.principal import Principal
from pacs.security.roles import Capability
from pacs.studies.common import chunks
from storage.keys import is_valid_uid

MAX_SERIES = 1000  # series named in one request


@dataclass(frozen=True)
class QueuedSend:
    study_instance_uid: str
    destination: str
    queued: int  # instances queued (new jobs and jobs put back to pending)


@dataclass(frozen=True)
class DestinationProgress:
    destination: str
    pending: int = 0
    sent: int = 0
    failed: int = 0
    last_error: str = ""


@dataclass(frozen=True)
class SendProgress:
    study_instance_uid: str
    total: int  # the study's (or the named series') current instances
    destinations: list[DestinationProgress] = field(default_factory=list)

    def of(self, destination: str) -> DestinationProgress:
        return next((d for d in self.destinations if d.destination == destination), DestinationProgress(destination))


def queue_send(ctx: AppContext, principal: Principal, study_instance_uid: str, destination: str, *,
               series: Sequence[str] | None = None) -> QueuedSend:
    """Queue the study's current instances (or those of ``series``) for ``destination``; audited
    ``study.send``. NotFound (study or series), InvalidInput (destination), Forbidden (destination's scope)."""
    authorize(principal, Capability.STUDY_SEND)
    _check_uids(study_instance_uid, series)
    title = validate_ae_title(destination)
    with ctx.sessions() as session, session.begin():
        study = _own_study(session, principal, study_instance_uid)
        ae = session.scalars(select(ApplicationEntity).where(ApplicationEntity.ae_title == title)).one_or_none()
        if ae is None:
            raise InvalidInput(f"destination {title} is not a registered AE (`pacs ae add {title} HOST PORT "
                               "--facility F`)")
        if not ae.host or not 1 <= ae.port <= 65535:
            raise InvalidInput(f"destination {title} has no host and port to send to")
        target = MoveDestination(ae.ae_title, ae.host, ae.port, ae.facility, ae.archive_wide)
        if not may_see_study(session, destination_scope(target), study_instance_uid, borrowed=False):
            whose = f"facility {ae.facility}" if ae.facility.strip() else "no facility"
            raise Forbidden(f"destination {title} is registered for {whose}, which may not see this study: share "
                            "the study with that facility, or choose a destination of the study's facility")
        instances = _current_instances(session, study, series)
        queued = _queue(session, title, instances)
        patient = session.get(Patient, study.patient_fk)
        audit.append(session, action="study.send", actor=principal.subject, role=principal.role.value,
                     source_address=principal.source_address, patient_id=patient.patient_id if patient else "",
                     study_instance_uid=study_instance_uid,
                     detail=f"to {title}@{ae.host}:{ae.port}: {queued} instance(s) queued"
                     + (f", series {','.join(series)}"[:1500] if series else ""))
    return QueuedSend(study_instance_uid, title, queued)


def send_progress(session: Session, principal: Principal, study_instance_uid: str, *,
                  destination: str | None = None, series: Sequence[str] | None = None) -> SendProgress:
    """Jobs of the study's current instances per destination (or for ``destination``) and state."""
    authorize(principal, Capability.STUDY_SEND)
    _check_uids(study_instance_uid, series)
    title = validate_ae_title(destination) if destination is not None else None
    study = _own_study(session, principal, study_instance_uid)
    instances = _current_instances(session, study, series)
    counts: dict[str, dict[str, int]] = {}
    errors: dict[str, str] = {}
    for chunk in chunks([sop for sop, _ in instances]):
        stmt = (select(ForwardJob.destination_ae, ForwardJob.state, func.count(), func.max(ForwardJob.last_error))
                .join(Instance, and_(Instance.sop_instance_uid == ForwardJob.sop_instance_uid,
                                     Instance.sha256 == ForwardJob.sha256))
                .where(ForwardJob.sop_instance_uid.in_(chunk)).group_by(ForwardJob.destination_ae, ForwardJob.state))
        if title is not None:
            stmt = stmt.where(ForwardJob.destination_ae == title)
        for dest, state, count, error in session.execute(stmt):
            by_state = counts.setdefault(dest, {})
            by_state[state] = by_state.get(state, 0) + count
            if error and state != JobState.SENT:
                errors[dest] = error
    if title is not None:
        counts.setdefault(title, {})
    return SendProgress(study_instance_uid, len(instances), [
        DestinationProgress(dest, states.get(JobState.PENDING, 0), states.get(JobState.SENT, 0),
                            states.get(JobState.FAILED, 0), errors.get(dest, "")[:500])
        for dest, states in sorted(counts.items())])


def _check_uids(study_instance_uid: str, series: Sequence[str] | None) -> None:
    if not is_valid_uid(study_instance_uid):
        raise InvalidInput(f"invalid StudyInstanceUID {study_instance_uid[:70]!r}")
    if series is not None:
        if len(series) > MAX_SERIES:
            raise InvalidInput(f"at most {MAX_SERIES} series in one request")
        bad = [uid for uid in series if not is_valid_uid(uid)]
        if bad:
            raise InvalidInput(f"invalid SeriesInstanceUID {bad[0][:70]!r}")


def _own_study(session: Session, principal: Principal, study_instance_uid: str) -> Study:
    study = session.scalars(select(Study).where(Study.study_instance_uid == study_instance_uid,
                                                study_condition(principal.scope, borrowed=False))).one_or_none()
    if study is None or study.number_of_instances <= 0:
        raise NotFound(f"no study {study_instance_uid}")
    return study


def _current_instances(session: Session, study: Study, series: Sequence[str] | None) -> list[tuple[str, str]]:
    """(SOP Instance UID, SHA-256) of the study's current instances, of ``series`` when given (each must be
    one of the study's series: NotFound otherwise)."""
    stmt = (select(Instance.sop_instance_uid, Instance.sha256, Series.series_instance_uid)
            .join(Series, Series.id == Instance.series_fk).where(Series.study_fk == study.id))
    rows = session.execute(stmt).all()
    if series is None:
        return [(r.sop_instance_uid, r.sha256) for r in rows]
    wanted = set(series)
    missing = wanted - {r.series_instance_uid for r in rows}
    if missing:
        raise NotFound(f"no series {sorted(missing)[0]} in study {study.study_instance_uid}")
    return [(r.sop_instance_uid, r.sha256) for r in rows if r.series_instance_uid in wanted]


def _queue(session: Session, destination: str, instances: list[tuple[str, str]]) -> int:
    """A pending job per instance version; existing ones (sent, failed or pending) back to pending, due now."""
    now = utcnow()
    for chunk in chunks(instances):
        existing = {(sop, sha): job_id for job_id, sop, sha in session.execute(
            select(ForwardJob.id, ForwardJob.sop_instance_uid, ForwardJob.sha256)
            .where(ForwardJob.destination_ae == destination,
                   ForwardJob.sop_instance_uid.in_([sop for sop, _ in chunk])))}
        reset = [existing[pair] for pair in chunk if pair in existing]
        if reset:
            session.execute(update(ForwardJob).where(ForwardJob.id.in_(reset))
                            .values(state=JobState.PENDING, attempts=0, next_attempt_at=now, last_error=""))
        session.add_all(ForwardJob(rule_id=None, destination_ae=destination, sop_instance_uid=sop, sha256=sha,
                                   state=JobState.PENDING, attempts=0, next_attempt_at=now, last_error="")
                        for sop, sha in chunk if (sop, sha) not in existing)
    session.flush()
    return len(instances)

