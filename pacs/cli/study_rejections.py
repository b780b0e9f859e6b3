"""`pacs study reject`, `pacs study restore` and `pacs study rejected` (IHE IOCM, pacs.studies.rejection), run as
the operator (an archive-wide admin, audited as ``os:<account>``)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from pacs.cli.common import cli_principal, operation, out
from pacs.cli.studies import retention_app, study_app  # noqa: F401

SeriesOption = Annotated[list[str] | None, typer.Option("--series", help="A Series Instance UID of the study "
                                                        "(repeat the option for several)")]
InstanceOption = Annotated[list[str] | None, typer.Option("--instance", help="A SOP Instance UID of the study "
                                                          "(repeat the option for several)")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON")]


@study_app.command("reject")
def reject(
    study: Annotated[str, typer.Argument(help="Study Instance UID")],
    reason: Annotated[str, typer.Option("--reason", help="quality, patient-safety, incorrect-worklist-entry or "
                                        "retention-expired")],
    series: SeriesOption = None,
    instance: InstanceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Reject a whole study, or the listed series/instances of it (IHE IOCM).

    A rejection note (a Key Object Selection document titled with the reason) is stored in the study; the
    rejected instances disappear from every query and retrieve at once, and a re-send of them is refused.
    They stay in the store until deleted after their retention (`pacs study restore` brings them back).
    """
    from pacs.studies import rejection

    with operation() as ctx:
        result = rejection.reject(ctx, cli_principal(), study, reason, series=series, instances=instance)
    if as_json:
        out.print_json(json.dumps({"study_instance_uid": result.study_instance_uid, "reason": result.reason,
                                   "note_sop_instance_uid": result.note_sop_instance_uid,
                                   "rejected": result.rejected}))
        return
    out.print(f"rejected {len(result.rejected)} instance(s) of study {study} ({reason}); "
              f"rejection note {result.note_sop_instance_uid}")


@study_app.command("restore")
def restore(
    study: Annotated[str, typer.Argument(help="Study Instance UID")],
    series: SeriesOption = None,
    instance: InstanceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Restore rejected instances that are not deleted yet (the whole study's, or the listed ones)."""
    from pacs.studies import rejection

    with operation() as ctx:
        result = rejection.restore(ctx, cli_principal(), study, series=series, instances=instance)
    if as_json:
        out.print_json(json.dumps({"study_instance_uid": result.study_instance_uid, "restored": result.restored,
                                   "notes_deleted": result.notes_deleted, "notes_created": result.notes_created}))
        return
    out.print(f"restored {len(result.restored)} instance(s) of study {study}")


@study_app.command("rejected")
def rejected(
    study: Annotated[str, typer.Option("--study", help="Only this study")] = "",
    reason: Annotated[str, typer.Option("--reason", help="Only this reason")] = "",
    limit: Annotated[int, typer.Option(min=1, max=5000)] = 1000,
    as_json: JsonOption = False,
) -> None:
    """List rejected instances not yet deleted: study, series, instance, reason, when and by whom."""
    from pacs import audit
    from pacs.studies import rejection

    principal = cli_principal()
    with operation() as ctx:
        with ctx.read_sessions() as session:
            items = rejection.list_rejected(session, principal, study_uid=study or None, reason=reason or None,
                                            limit=limit)
        audit.record(ctx.sessions, action="instance.rejected-list", actor=principal.subject,
                     role=principal.role.value, study_instance_uid=study,
                     detail=f"cli: {len(items)} rejected instance(s)" + (f" reason={reason}" if reason else ""))
    if as_json:
        out.print_json(json.dumps([{"study_instance_uid": i.study_instance_uid,
                                    "series_instance_uid": i.series_instance_uid,
                                    "sop_instance_uid": i.sop_instance_uid, "reason": i.reason,
                                    "note_sop_instance_uid": i.note_sop_instance_uid,
                                    "rejected_at": i.rejected_at.isoformat(), "rejected_by": i.rejected_by}
                                   for i in items]))
        return
    table = Table("study", "series", "instance", "reason", "when", "by")
    for i in items:
        table.add_row(i.study_instance_uid, i.series_instance_uid, i.sop_instance_uid, i.reason,
                      i.rejected_at.isoformat(timespec="seconds"), i.rejected_by)
    out.print(table)
    out.print(f"{len(items)} rejected instance(s)")
