"""Linking patient records into persons: automatically at ingest, by hand from `pacs patient ...`.

At ingest (:func:`link_at_ingest`, called by :mod:`pacs.ingest.index_writer`): a record whose national
identifiers are new or changed joins the person that holds them, or a new person. Identifiers only
accumulate on a record: an object without them changes nothing. When they point at two different persons
(or at another person than the one the record already belongs to) nothing is merged: the conflict is logged
and audited (``person.conflict``) for a human to resolve with :func:`link` or :func:`merge`. A record whose
birth date or sex contradicts the person's records (both known and different; sex ``O`` never contradicts)
is not linked either — a ``person.conflict`` too: a forged or mistyped national ID alone opens no one's
studies. Each record's conflict is audited once (when its identifiers change), not once per instance.

Manual changes (:func:`link`, :func:`unlink`, :func:`merge`) are audited (``person.link``, ``person.unlink``,
``person.merge``) with who and why, in their own transaction. An unlinked record gets a person of its own
(holding no identifier), so a later object of it does not link it back; a changed identifier on it is a
conflict again, for a human.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.orm import Session

from pacs import audit
from pacs.db.models import Patient, Study
from pacs.errors import Conflict, InvalidInput, NotFound
from pacs.persons.identifiers import NationalId, decode, encode, masked
from pacs.persons.models import Person, PersonIdentifier

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Actor:
    """Who makes a manual change, for the audit trail."""

    subject: str
    role: str = "operator"
    source_address: str = "cli"


# -- at ingest --------------------------------------------------------------------------------------------

def link_at_ingest(session: Session, patient: Patient, carried: Sequence[NationalId]) -> None:
    """Link ``patient`` (a row of the ingest transaction) by the national IDs the received object carries.

    No statement at all when it carries none, or none the record was not already linked with; otherwise one
    indexed look-up of the identifiers' holders, then the writes (a new person and its identifiers, or the
    record's link) — and an audit row only when the record joins a person that has other records.
    """
    if not carried:
        return
    known = decode(patient.national_ids)
    ids = tuple(sorted(set(known) | set(carried)))
    if ids == known:  # seen before: linked then, or a conflict audited then (once, not once per instance)
        return
    holders = _holders(session, ids)
    persons = set(holders.values()) | ({patient.person_fk} if patient.person_fk is not None else set())
    patient.national_ids = encode(ids)[:512]
    if len(persons) > 1:
        _conflict(session, patient, ids, holders)
        return
    if persons:
        person_id = persons.pop()
        if patient.person_fk is None:
            mismatch = _demographics_mismatch(session, patient, person_id)
            if mismatch:  # a national ID alone never links a record that contradicts the person's records
                _conflict(session, patient, ids, holders, because=mismatch)
                return
    else:
        person = Person(created_by="ingest")
        session.add(person)
        session.flush()
        person_id = person.id
    for system, value in ids:
        if (system, value) not in holders:
            session.add(PersonIdentifier(person_fk=person_id, system=system, value=value))
    joined = patient.person_fk is None and bool(holders)
    patient.person_fk = person_id
    session.flush()  # a concurrent ingest that made a person for the same identifier: IntegrityError, retried
    if joined:
        audit.append(session, action="person.link", actor="ingest", role="system", patient_id=patient.patient_id,
                     detail=f"record {_record(patient)} linked to person {person_id} by "
                     f"{', '.join(f'{s} {masked(v)}' for s, v in ids if (s, v) in holders)}")


def _holders(session: Session, ids: Sequence[NationalId]) -> dict[NationalId, int]:
    if not ids:
        return {}
    rows = session.execute(select(PersonIdentifier.system, PersonIdentifier.value, PersonIdentifier.person_fk)
                           .where(or_(*(and_(PersonIdentifier.system == s, PersonIdentifier.value == v)
                                        for s, v in ids))))
    return {(system, value): person for system, value, person in rows}


def _demographics_mismatch(session: Session, patient: Patient, person_id: int) -> str:
    """Why ``patient`` cannot be the person ``person_id`` whatever their shared national ID says: '' when
    nothing contradicts it.

    A national ID is only as trustworthy as whoever sent it: anyone who can store at facility F could send
    another person's ID, and F's clinicians would then see that person's studies of other facilities. So the
    record's birth date and sex are checked against the person's records: a birth date known on both sides
    and different, or a sex known on both sides and different (``O``, other, compares with nothing), vetoes
    the link. Unknown (empty) values veto nothing: modalities often send none."""
    birth, sex = patient.patient_birth_date.strip(), _sex(patient.patient_sex)
    if not birth and not sex:
        return ""
    rows = session.execute(select(Patient.patient_birth_date, Patient.patient_sex)
                           .where(Patient.person_fk == person_id, Patient.id != patient.id)).all()
    births = {b.strip() for b, _ in rows if b and b.strip()}
    sexes = {x for x in (_sex(s) for _, s in rows) if x}
    reasons = []
    if birth and births - {birth}:
        reasons.append("birth date differs")
    if sex and sexes - {sex}:
        reasons.append("sex differs")
    return " and ".join(reasons)


def _sex(value: str) -> str:
    """A known sex, upper case; '' for unknown or ``O`` (other: never a contradiction)."""
    value = (value or "").strip().upper()
    return "" if value in ("", "O") else value


def _conflict(session: Session, patient: Patient, ids: Sequence[NationalId], holders: dict[NationalId, int],
              because: str = "") -> None:
    named = ", ".join(f"{s} {masked(v)} → person {holders[(s, v)]}" for s, v in ids if (s, v) in holders)
    if because:
        detail = (f"record {_record(patient)} carries national identifiers of person(s) whose records do not match "
                  f"it ({because}): {named}; not linked — check the identifier, then `pacs patient link` if it "
                  "is the same person")
    else:
        detail = (f"record {_record(patient)} (person {patient.person_fk or 'none'}) carries national identifiers "
                  f"of another person: {named}; not merged — resolve with `pacs patient link` or "
                  "`pacs patient merge`")
    # the log names no patient (the audit row below does): the facility, and where to look
    log.warning("person conflict: a patient record of facility %s carries national identifiers of another "
                "person; not linked (see the person.conflict audit row)", patient.facility or "-")
    audit.append(session, action="person.conflict", actor="ingest", role="system", outcome="warning",
                 patient_id=patient.patient_id, detail=detail)


def _record(patient: Patient) -> str:
    issuer = f"^{patient.issuer_of_patient_id}" if patient.issuer_of_patient_id else ""
    return f"{patient.facility or '-'}/{patient.patient_id}{issuer}"


# -- looking up -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RecordView:
    patient_pk: int
    facility: str
    patient_id: str
    issuer: str
    patient_name: str
    birth_date: str
    studies: int


@dataclass(frozen=True)
class PersonView:
    person_id: int | None  # None: the record is linked to no person
    identifiers: tuple[NationalId, ...]
    records: tuple[RecordView, ...]


def find_record(session: Session, facility: str, patient_id: str, issuer: str | None = None) -> Patient:
    """The patient record of ``facility`` with this Patient ID (and issuer, when given): NotFound if none,
    InvalidInput when several issuers hold that ID there and none was named."""
    stmt = select(Patient).where(Patient.facility == facility.strip(), Patient.patient_id == patient_id.strip())
    if issuer is not None:
        stmt = stmt.where(Patient.issuer_of_patient_id == issuer.strip())
    found = list(session.scalars(stmt.limit(2)))
    if not found:
        raise NotFound(f"no patient record {patient_id!r} at facility {facility!r}"
                       + (f" with issuer {issuer!r}" if issuer is not None else ""))
    if len(found) > 1:
        raise InvalidInput(f"several records {patient_id!r} at facility {facility!r}: name the issuer (--issuer)")
    return found[0]


def person_of(session: Session, record: Patient) -> PersonView:
    """The record's person: its identifiers and every record linked to it, with study counts."""
    if record.person_fk is None:
        return PersonView(None, decode(record.national_ids), (_view(session, [record])[0],))
    records = list(session.scalars(select(Patient).where(Patient.person_fk == record.person_fk)
                                   .order_by(Patient.facility, Patient.id)))
    identifiers = tuple(sorted((s, v) for s, v in session.execute(
        select(PersonIdentifier.system, PersonIdentifier.value).where(PersonIdentifier.person_fk == record.person_fk))))
    return PersonView(record.person_fk, identifiers, tuple(_view(session, records)))


def _view(session: Session, records: list[Patient]) -> list[RecordView]:
    counts: dict[int, int] = {pk: n for pk, n in session.execute(
        select(Study.patient_fk, func.count(Study.id)).where(Study.patient_fk.in_([r.id for r in records]))
        .group_by(Study.patient_fk))}
    return [RecordView(r.id, r.facility, r.patient_id, r.issuer_of_patient_id, r.patient_name, r.patient_birth_date,
                       counts.get(r.id, 0)) for r in records]


# -- manual changes ---------------------------------------------------------------------------------------

def link(session: Session, record: Patient, other: Patient, actor: Actor, reason: str = "",
         force: bool = False) -> int:
    """Make ``other`` one person with ``record``; returns the person's id.

    When both already belong to persons, those persons are merged (their other records come along):
    refused when they hold different national identifiers of one system, unless ``force``.
    """
    if record.id == other.id:
        raise InvalidInput("a record cannot be linked to itself")
    if record.person_fk is not None and record.person_fk == other.person_fk:
        raise Conflict(f"both records already belong to person {record.person_fk}")
    if record.person_fk is None and other.person_fk is not None:
        record, other = other, record
    if record.person_fk is None:
        person = Person(created_by=actor.subject[:128])
        session.add(person)
        session.flush()
        record.person_fk = person.id
    target = record.person_fk
    assert target is not None
    merged = ""
    if other.person_fk is not None:
        _check_mergeable(session, target, other.person_fk, force)
        merged = f"; person {other.person_fk} merged into it"
        _move(session, other.person_fk, target)
    else:
        other.person_fk = target
    session.flush()
    audit.append(session, action="person.link", actor=actor.subject, role=actor.role,
                 source_address=actor.source_address, patient_id=other.patient_id,
                 detail=f"record {_record(other)} linked with {_record(record)} as person {target}{merged}"
                 + (" (forced)" if force and merged else "") + (f"; reason: {reason}" if reason else ""))
    return target


def unlink(session: Session, record: Patient, actor: Actor, reason: str = "") -> int:
    """Take ``record`` out of its person into a person of its own (holding no identifier); returns that id."""
    if record.person_fk is None:
        raise InvalidInput(f"record {_record(record)} is not linked to a person")
    old = record.person_fk
    others = session.scalar(select(func.count(Patient.id)).where(Patient.person_fk == old, Patient.id != record.id))
    if not others:
        raise InvalidInput(f"record {_record(record)} is the only record of person {old}: nothing to unlink")
    person = Person(created_by=actor.subject[:128])
    session.add(person)
    session.flush()
    record.person_fk = person.id
    session.flush()
    audit.append(session, action="person.unlink", actor=actor.subject, role=actor.role,
                 source_address=actor.source_address, patient_id=record.patient_id,
                 detail=f"record {_record(record)} unlinked from person {old} (now person {person.id})"
                 + (f"; reason: {reason}" if reason else ""))
    return person.id


def merge(session: Session, keep: int, gone: int, actor: Actor, reason: str, force: bool = False) -> int:
    """Merge person ``gone`` into person ``keep`` (records and identifiers); ``reason`` is required."""
    if not reason.strip():
        raise InvalidInput("a merge needs a reason (--reason)")
    if keep == gone:
        raise InvalidInput("a person cannot be merged with itself")
    for pid in (keep, gone):
        if session.get(Person, pid) is None:
            raise NotFound(f"no person {pid}")
    _check_mergeable(session, keep, gone, force)
    records = list(session.scalars(select(Patient).where(Patient.person_fk == gone)))
    _move(session, gone, keep)
    session.flush()
    audit.append(session, action="person.merge", actor=actor.subject, role=actor.role,
                 source_address=actor.source_address, patient_id=records[0].patient_id if records else "",
                 detail=f"person {gone} merged into person {keep} ({len(records)} records: "
                 f"{', '.join(_record(r) for r in records[:20])}){' (forced)' if force else ''}; reason: {reason}")
    return keep


def _check_mergeable(session: Session, keep: int, gone: int, force: bool) -> None:
    rows = session.execute(select(PersonIdentifier.person_fk, PersonIdentifier.system, PersonIdentifier.value)
                           .where(PersonIdentifier.person_fk.in_([keep, gone]))).all()
    held: dict[int, dict[str, set[str]]] = {keep: {}, gone: {}}
    for person, system, value in rows:
        held[person].setdefault(system, set()).add(value)
    clashes = sorted(s for s in held[keep] if s in held[gone] and held[keep][s] != held[gone][s])
    if clashes and not force:
        raise Conflict(f"persons {keep} and {gone} hold different national identifiers of {', '.join(clashes)}: "
                       "they look like two people (--force to merge anyway)")


def _move(session: Session, source: int, target: int) -> None:
    session.execute(update(Patient).where(Patient.person_fk == source).values(person_fk=target)
                    .execution_options(synchronize_session="fetch"))
    session.execute(update(PersonIdentifier).where(PersonIdentifier.person_fk == source)
                    .values(person_fk=target).execution_options(synchronize_session=False))
    session.execute(delete(Person).where(Person.id == source))
