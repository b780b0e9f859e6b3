"""`pacs patient`: one person, one record — show a record's person, link, unlink and merge (pacs.persons).

A record is named by its facility and Patient ID (and ``--issuer`` when that facility has the same ID under
several issuers); a person by the number `pacs patient show` prints. Every command is audited with the
operator's account (``person.read``, ``person.link``, ``person.unlink``, ``person.merge``).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from pacs.cli.common import operator, out, transaction

if TYPE_CHECKING:
    from pacs.persons.linking import Actor

patient_app = typer.Typer(help="Patient records and persons: which records of several facilities are one person.",
                          no_args_is_help=True)

Issuer = Annotated[str | None, typer.Option("--issuer", help="Issuer of Patient ID of the record (when the "
                                             "facility has this ID under several issuers; '' for none)")]
Reason = Annotated[str, typer.Option("--reason", help="Why (kept in the audit trail)")]


def register(app: typer.Typer) -> None:
    app.add_typer(patient_app, name="patient")


def _actor() -> Actor:
    from pacs.persons.linking import Actor

    return Actor(subject=f"os:{operator()}")


@patient_app.command("show")
def show(
    facility: Annotated[str, typer.Argument(help="Facility code of the record, e.g. HOSP-A")],
    patient_id: Annotated[str, typer.Argument(help="Patient ID at that facility")],
    issuer: Issuer = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """The person a record belongs to: national identifiers and every linked record with its study count."""
    from pacs import audit
    from pacs.persons.linking import find_record, person_of

    with transaction() as session:
        record = find_record(session, facility, patient_id, issuer)
        view = person_of(session, record)
        audit.append(session, action="person.read", actor=_actor().subject, role="operator",
                     source_address="cli", patient_id=record.patient_id,
                     detail=f"pacs patient show {facility}/{patient_id}: person {view.person_id or 'none'}, "
                     f"{len(view.records)} records")
    if as_json:
        out.print_json(json.dumps({"person": view.person_id,
                                   "identifiers": [{"system": s, "value": v} for s, v in view.identifiers],
                                   "records": [asdict(r) for r in view.records]}, ensure_ascii=False))
        return
    out.print(f"person {view.person_id if view.person_id is not None else '(not linked to a person)'}")
    for system, value in view.identifiers:
        out.print(f"  {system}: {value}")
    table = Table("facility", "patient ID", "issuer", "name", "birth date", "studies")
    for r in view.records:
        table.add_row(r.facility, r.patient_id, r.issuer, r.patient_name, r.birth_date, str(r.studies))
    out.print(table)


@patient_app.command("link")
def link(
    facility: Annotated[str, typer.Argument(help="Facility of the first record")],
    patient_id: Annotated[str, typer.Argument(help="Patient ID of the first record")],
    other_facility: Annotated[str, typer.Argument(help="Facility of the second record")],
    other_patient_id: Annotated[str, typer.Argument(help="Patient ID of the second record")],
    issuer: Issuer = None,
    other_issuer: Annotated[str | None, typer.Option("--other-issuer", help="Issuer of the second record")] = None,
    reason: Reason = "",
    force: Annotated[bool, typer.Option("--force", help="Link even when their persons hold different national "
                                        "identifiers of one system")] = False,
) -> None:
    """Make two records one person (their persons are merged when both have one)."""
    from pacs.persons.linking import find_record
    from pacs.persons.linking import link as link_records

    with transaction() as session:
        first = find_record(session, facility, patient_id, issuer)
        second = find_record(session, other_facility, other_patient_id, other_issuer)
        person = link_records(session, first, second, _actor(), reason, force)
    out.print(f"linked: {facility}/{patient_id} and {other_facility}/{other_patient_id} are person {person}")


@patient_app.command("unlink")
def unlink(
    facility: Annotated[str, typer.Argument(help="Facility of the record")],
    patient_id: Annotated[str, typer.Argument(help="Patient ID of the record")],
    issuer: Issuer = None,
    reason: Reason = "",
) -> None:
    """Take a record out of its person (it becomes a person of its own)."""
    from pacs.persons.linking import find_record
    from pacs.persons.linking import unlink as unlink_record

    with transaction() as session:
        person = unlink_record(session, find_record(session, facility, patient_id, issuer), _actor(), reason)
    out.print(f"unlinked: {facility}/{patient_id} is now person {person}")


@patient_app.command("merge")
def merge(
    person: Annotated[int, typer.Argument(help="The person to keep (a number from `pacs patient show`)")],
    other: Annotated[int, typer.Argument(help="The person merged into it (it disappears)")],
    reason: Annotated[str, typer.Option("--reason", help="Why: required, kept in the audit trail")],
    force: Annotated[bool, typer.Option("--force", help="Merge even when they hold different national "
                                        "identifiers of one system")] = False,
) -> None:
    """Merge two persons into one: all records of OTHER become PERSON's."""
    from pacs.persons.linking import merge as merge_persons

    with transaction() as session:
        kept = merge_persons(session, person, other, _actor(), reason, force)
    out.print(f"merged: person {other} into person {kept}")
