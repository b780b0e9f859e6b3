"""`pacs forward`: rules that send received instances to other DICOM nodes, and their queue."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated

import typer
from rich.table import Table

from pacs.cli.common import open_context, out, transaction
from pacs.cli.formatting import json_default, table_time

forward_app = typer.Typer(help="Forwarding rules: send received instances to other DICOM nodes (C-STORE).",
                          no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(forward_app, name="forward")


@forward_app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="Unique rule name")],
    to: Annotated[str, typer.Option("--to", help="Destination: a registered AE (`pacs ae add`)")],
    source_ae: Annotated[str, typer.Option("--source-ae", help="Only instances sent by this AE")] = "",
    modality: Annotated[str, typer.Option(help="Only this modality (CT, MR, ...; any case)")] = "",
    body_part: Annotated[str, typer.Option("--body-part", help="Only this Body Part Examined (any case)")] = "",
    sop_class: Annotated[str, typer.Option("--sop-class", help="Only this SOP Class UID")] = "",
) -> None:
    """Forward newly received instances that match (empty criteria match anything) to --to."""
    from pacs.forwarding.rules import add_rule

    with transaction() as session:
        rule = add_rule(session, name, to, source_ae=source_ae, modality=modality, body_part_examined=body_part,
                        sop_class_uid=sop_class)
    out.print(f"rule {rule.name}: {_criteria(rule) or 'every instance'} → {rule.destination_ae}")


@forward_app.command("list")
def list_(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False) -> None:
    """List forwarding rules."""
    from pacs.forwarding.rules import list_rules

    ctx = open_context()
    try:
        with ctx.sessions() as session:
            rules = list_rules(session)
    finally:
        ctx.close()
    if as_json:
        out.print_json(json.dumps([asdict(r) for r in rules]))
        return
    table = Table("name", "to", "source AE", "modality", "body part", "SOP class", "enabled")
    for r in rules:
        table.add_row(r.name, r.destination_ae, r.source_ae or "*", r.modality or "*", r.body_part_examined or "*",
                      r.sop_class_uid or "*", "yes" if r.enabled else "no")
    out.print(table)


@forward_app.command("remove")
def remove(name: str) -> None:
    """Remove a rule (instances it already queued are still sent)."""
    from pacs.forwarding.rules import remove_rule

    with transaction() as session:
        remove_rule(session, name)
    out.print(f"removed rule {name}")


@forward_app.command("queue")
def queue(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False) -> None:
    """Per destination: pending, sent and failed instances, the oldest pending one, the last error."""
    from pacs.forwarding.delivery import queue_stats

    ctx = open_context()
    try:
        with ctx.sessions() as session:
            stats = queue_stats(session)
    finally:
        ctx.close()
    if as_json:
        out.print_json(json.dumps([asdict(s) for s in stats], default=json_default))
        return
    table = Table("destination", "pending", "sent", "failed", "oldest pending", "next attempt", "last error")
    for s in stats:
        table.add_row(s.destination_ae, str(s.pending), str(s.sent), str(s.failed), table_time(s.oldest_pending),
                      table_time(s.next_attempt_at), s.last_error[:80])
    out.print(table)


@forward_app.command("retry")
def retry(
    destination: Annotated[str, typer.Option("--destination", help="Only this destination AE")] = "",
) -> None:
    """Queue failed deliveries again (the running sender picks them up within its poll interval)."""
    from pacs.forwarding.delivery import retry_failed

    ctx = open_context()
    try:
        with ctx.sessions() as session, session.begin():
            n = retry_failed(session, destination or None)
    finally:
        ctx.close()
    out.print(f"{n} failed deliver{'y' if n == 1 else 'ies'} queued again")


def _criteria(rule: object) -> str:
    parts = [(label, getattr(rule, attr)) for label, attr in (
        ("source AE", "source_ae"), ("modality", "modality"), ("body part", "body_part_examined"),
        ("SOP class", "sop_class_uid"))]
    return ", ".join(f"{label} {value}" for label, value in parts if value)
