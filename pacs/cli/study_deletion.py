"""`pacs study delete`, `pacs retention sweep|due|delete` (pacs.studies.deletion, pacs.studies.retention), run as
the operator (an archive-wide admin, audited as ``os:<account>``). Deleting asks for confirmation unless --yes."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from pacs.cli.common import cli_principal, console, open_context, operation, out
from pacs.cli.studies import retention_app, study_app

ReasonOption = Annotated[str, typer.Option("--reason", help="Why (required): written to the audit trail")]
YesOption = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON")]


def _confirm(question: str, yes: bool) -> None:
    if not yes and not typer.confirm(question, default=False, err=True):
        console.print("nothing deleted")
        raise typer.Exit(1)


@study_app.command("delete")
def delete(
    study: Annotated[str, typer.Argument(help="Study Instance UID of the study to delete")],
    reason: ReasonOption = "",
    yes: YesOption = False,
    as_json: JsonOption = False,
) -> None:
    """Delete a study for good (audited with the reason); orders are kept, unlinked.

    Its index rows, every stored version of its objects, thumbnails and metadata, reports, key images, share links
    and consults go."""
    from pacs.studies import deletion
    from pacs.studies.common import check_reason

    with operation() as ctx:
        check_reason(reason, "deletion")
        _confirm(f"Delete study {study} and all its objects for good?", yes)
        result = deletion.delete_study(ctx, cli_principal(), study, reason)
    if as_json:
        out.print_json(json.dumps(result.as_dict()))
    else:
        out.print(f"deleted study {study} ({result.counts()}); {result.objects_deleted} object(s) removed")


@study_app.command("delete-rejected")
def delete_rejected(
    sops: Annotated[list[str], typer.Argument(help="SOP Instance UIDs of rejected instances")],
    reason: ReasonOption = "",
    yes: YesOption = False,
) -> None:
    """Delete rejected instances now, before their retention ends (they can no longer be restored)."""
    from pacs.studies import deletion
    from pacs.studies.common import check_reason

    with operation() as ctx:
        check_reason(reason, "deletion")
        _confirm(f"Delete {len(sops)} rejected instance(s) for good?", yes)
        done = deletion.delete_rejected(ctx, cli_principal(), sops, reason)
    for item in done:
        out.print(f"study {item.study_instance_uid}: {item.counts()}")


@retention_app.command("sweep")
def sweep(as_json: JsonOption = False) -> None:
    """Delete now the rejected instances whose retention (PACS_REJECTION_RETENTION_DAYS) has passed."""
    from pacs.studies.retention import sweep_rejected

    ctx = open_context()
    try:
        result = sweep_rejected(ctx)
    finally:
        ctx.close()
    if as_json:
        out.print_json(json.dumps({"instances": result.instances, "objects_deleted": result.objects_deleted,
                                   "studies": [item.as_dict() for item in result.deleted]}))
        return
    out.print(f"deleted {result.instances} rejected instance(s) of {len(result.deleted)} stud(ies), "
              f"{result.objects_deleted} object(s) removed")


@retention_app.command("due")
def due(
    facility: Annotated[str | None, typer.Option(help="Only this facility's studies")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 100,
    offset: Annotated[int, typer.Option(min=0)] = 0,
    as_json: JsonOption = False,
) -> None:
    """List the studies due for deletion under PACS_STUDY_RETENTION_YEARS (nothing is deleted)."""
    from pacs.studies.retention import list_due

    with operation() as ctx:
        page = list_due(ctx, cli_principal(), facility=facility, limit=limit, offset=offset)
    if as_json:
        out.print_json(json.dumps({"total": page.total, "studies": [s.as_dict() for s in page.items]}))
        return
    table = Table("study", "patient", "facility", "date", "images", "kept (years)")
    for s in page.items:
        table.add_row(s.study_instance_uid, f"{s.patient_name} ({s.patient_id})", s.facility or "-",
                      s.study_date or (s.received_at.date().isoformat() if s.received_at else ""),
                      str(s.instances), str(s.retention_years))
    out.print(table)
    out.print(f"{page.total} stud(ies) due" + (f", showing {offset + 1}-{offset + len(page.items)}"
                                              if page.items else ""))


@retention_app.command("delete")
def delete_due(
    studies: Annotated[list[str], typer.Argument(help="Study Instance UIDs (from `pacs retention due`)")],
    reason: ReasonOption = "",
    yes: YesOption = False,
    as_json: JsonOption = False,
) -> None:
    """Delete the given studies if they are due under the retention policy; the others are refused and listed."""
    from pacs.studies import deletion
    from pacs.studies.common import check_reason
    from pacs.studies.retention import delete_due as delete_due_studies

    deleted: list[deletion.StudyDeletion] = []
    refused: list[tuple[str, str]] = []
    with operation() as ctx:
        check_reason(reason, "deletion")
        _confirm(f"Delete {len(studies)} stud(ies) due under the retention policy, for good?", yes)
        with Progress(TextColumn("[bold]deleting"), BarColumn(), MofNCompleteColumn(), console=console) as bar:
            task = bar.add_task("deleting", total=len(studies))
            for uid in studies:  # one at a time, so the bar moves; each is checked again and audited on its own
                result = delete_due_studies(ctx, cli_principal(), [uid], reason)
                deleted += result.deleted
                refused += result.refused
                bar.advance(task)
    if as_json:
        out.print_json(json.dumps({"deleted": [d.as_dict() for d in deleted],
                                   "refused": [{"study_instance_uid": u, "message": m} for u, m in refused]}))
    else:
        for d in deleted:
            out.print(f"deleted {d.study_instance_uid} ({d.counts()})")
        for uid, why in refused:
            console.print(f"[yellow]refused {uid}[/yellow]: {why}")
    if refused:
        raise typer.Exit(1)
