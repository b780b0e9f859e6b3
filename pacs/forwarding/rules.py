"""Forwarding rules (`pacs forward add|list|remove`) and queueing matched instances at ingest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from sqlalchemy import Table, delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pacs.aes import validate_ae_title
from pacs.db.dml import affected_rows
from pacs.db.models import ApplicationEntity, ForwardJob, ForwardRule
from pacs.db.prepared import Prepared
from pacs.errors import Conflict, InvalidInput, NotFound
from pacs.jobs import JobState, utcnow
from storage.keys import is_valid_uid

if TYPE_CHECKING:
    from pacs.ingest import IngestSource
    from pacs.ingest.parsing import ReceivedObject


@dataclass(frozen=True)
class RuleRecord:
    name: str
    destination_ae: str
    source_ae: str
    modality: str
    body_part_examined: str
    sop_class_uid: str
    enabled: bool


@dataclass(frozen=True)
class RuleMatch:
    """The attributes of one received instance that rules are matched against."""

    source_ae: str
    modality: str
    body_part_examined: str
    sop_class_uid: str


def rule_matches(rule: RuleRecord, subject: RuleMatch) -> bool:
    """Empty rule fields match anything; modality and body part ignore case, AE titles and UIDs do not."""
    return (
        (not rule.source_ae or rule.source_ae == subject.source_ae.strip())
        and (not rule.modality or rule.modality.upper() == subject.modality.strip().upper())
        and (not rule.body_part_examined
             or rule.body_part_examined.upper() == subject.body_part_examined.strip().upper())
        and (not rule.sop_class_uid or rule.sop_class_uid == subject.sop_class_uid)
    )


def destinations_for(rules: list[RuleRecord], subject: RuleMatch) -> dict[str, str]:
    """Destination AE → name of the first enabled rule sending ``subject`` there.

    Never the AE the instance came from: sending it back would be pointless, and between two
    archives forwarding to each other it would be a loop.
    """
    out: dict[str, str] = {}
    for rule in rules:
        if (rule.enabled and rule.destination_ae not in out and rule.destination_ae != subject.source_ae.strip()
                and rule_matches(rule, subject)):
            out[rule.destination_ae] = rule.name
    return out


_rule = cast(Table, ForwardRule.__table__).c
# prebuilt on the table: ingest runs it for every object it indexes (on the driver's cursor, pacs.db.prepared)
_ENABLED_RULES = Prepared(select(_rule.id, _rule.name, _rule.destination_ae, _rule.source_ae, _rule.modality,
                                 _rule.body_part_examined, _rule.sop_class_uid)
                          .where(_rule.enabled.is_(True)).order_by(_rule.id))


def queue_forwards(session: Session, obj: ReceivedObject, source: IngestSource, sha256: str) -> int:
    """Add a pending job per destination whose rule matches ``obj``; returns how many.

    Called by ingest inside its index transaction, so a job exists exactly when the instance
    version it names was committed. Costs one query over the (small) rule table when nothing
    matches. A version that was current before (A-B-A re-sends) re-arms its old job.
    """
    rows = _ENABLED_RULES.all(session.connection(), {})
    if not rows:
        return 0
    rule_ids = {name: rule_id for rule_id, name, *_rest in rows}
    rules = [RuleRecord(name, destination, source_ae, modality, body_part, sop_class, True)
             for _id, name, destination, source_ae, modality, body_part, sop_class in rows]
    subject = RuleMatch(source.calling_ae, str(obj.series.get("modality") or ""),
                        str(obj.series.get("body_part_examined") or ""), obj.sop_class_uid)
    targets = destinations_for(rules, subject)
    if not targets:
        return 0
    now = utcnow()
    existing = {j.destination_ae: j for j in session.scalars(
        select(ForwardJob).where(ForwardJob.sop_instance_uid == obj.sop_instance_uid, ForwardJob.sha256 == sha256,
                                 ForwardJob.destination_ae.in_(targets)))}
    for destination, rule_name in targets.items():
        job = existing.get(destination)
        if job is None:
            session.add(ForwardJob(rule_id=rule_ids[rule_name], destination_ae=destination,
                                   sop_instance_uid=obj.sop_instance_uid, sha256=sha256, state=JobState.PENDING,
                                   attempts=0, next_attempt_at=now, last_error=""))
        else:
            job.rule_id, job.state, job.attempts, job.next_attempt_at, job.last_error = (
                rule_ids[rule_name], JobState.PENDING, 0, now, "")
    return len(targets)


def add_rule(session: Session, name: str, destination_ae: str, *, source_ae: str = "", modality: str = "",
             body_part_examined: str = "", sop_class_uid: str = "") -> RuleRecord:
    """Add an enabled rule; the destination must be a registered AE with a host and port."""
    name = name.strip()
    if not 1 <= len(name) <= 64 or not name.isprintable():
        raise InvalidInput(f"invalid rule name {name!r}: 1-64 printable characters")
    destination_ae = validate_ae_title(destination_ae)
    source_ae = validate_ae_title(source_ae) if source_ae.strip() else ""
    modality, body_part_examined, sop_class_uid = (modality.strip().upper(), body_part_examined.strip().upper(),
                                                   sop_class_uid.strip())
    if len(modality) > 16 or len(body_part_examined) > 64:
        raise InvalidInput("modality is at most 16 characters, body part at most 64")
    if sop_class_uid and not is_valid_uid(sop_class_uid):
        raise InvalidInput(f"invalid SOP Class UID {sop_class_uid!r}")
    ae = session.scalars(select(ApplicationEntity).where(ApplicationEntity.ae_title == destination_ae)).one_or_none()
    if ae is None:
        raise InvalidInput(f"destination {destination_ae} is not a registered AE: `pacs ae add {destination_ae} "
                           "HOST PORT` first")
    if not ae.host or not 1 <= ae.port <= 65535:
        raise InvalidInput(f"destination {destination_ae} has no host/port to send to")
    row = ForwardRule(name=name, destination_ae=destination_ae, source_ae=source_ae, modality=modality,
                      body_part_examined=body_part_examined, sop_class_uid=sop_class_uid, enabled=True)
    session.add(row)
    try:
        session.flush()
    except IntegrityError as exc:
        raise Conflict(f"a forwarding rule named {name!r} already exists") from exc
    return _record(row)


def list_rules(session: Session) -> list[RuleRecord]:
    return [_record(r) for r in session.scalars(select(ForwardRule).order_by(ForwardRule.name))]


def remove_rule(session: Session, name: str) -> None:
    """Remove a rule; jobs it queued stay queued (their rule_id becomes NULL)."""
    if not affected_rows(session, delete(ForwardRule).where(ForwardRule.name == name)):
        raise NotFound(f"no forwarding rule named {name!r}")


def _record(row: ForwardRule) -> RuleRecord:
    return RuleRecord(row.name, row.destination_ae, row.source_ae, row.modality, row.body_part_examined,
                      row.sop_class_uid, row.enabled)
