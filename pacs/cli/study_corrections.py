"""`pacs study correct` and `pacs study move` (pacs.studies.corrections), run as the operator (an archive-wide
admin, audited as ``os:<account>``)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from pacs.cli.common import cli_principal, console, operation, out
from pacs.cli.studies import retention_app, study_app  # noqa: F401

if TYPE_CHECKING:
    from pacs.studies.corrections import CorrectionResult

ReasonOption = Annotated[str, typer.Option("--reason", help="Why (required): written to the audit trail")]


@contextmanager
def _progress(label: str) -> Iterator[Callable[[int, int], None]]:
    with Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


@study_app.command("correct")
def correct(
    study: Annotated[str, typer.Argument(help="Study Instance UID of the study to correct")],
    reason: ReasonOption = "",
    name: Annotated[str | None, typer.Option(help="Patient name in DICOM PN form, e.g. 'Nguyễn^Văn^An'")] = None,
    patient_id: Annotated[str | None, typer.Option(help="Patient ID: a new one moves the study to that patient "
                                                   "record of its facility (created when new)")] = None,
    issuer: Annotated[str | None, typer.Option(help="Issuer of Patient ID ('' for none)")] = None,
    birth_date: Annotated[str | None, typer.Option(help="Birth date, YYYYMMDD")] = None,
    sex: Annotated[str | None, typer.Option(help="M, F or O")] = None,
    accession: Annotated[str | None, typer.Option(help="Accession Number")] = None,
    description: Annotated[str | None, typer.Option(help="Study Description")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON")] = False,
) -> None:
    """Correct a study's patient and study attributes.

    The stored objects are never changed: each object gets a corrected new version (the prior is kept and an
    admin can read it with GET /api/instances/{sop}/versions). A new name, birth date or sex is corrected in every
    study of that patient at the facility. Thumbnails and metadata are rebuilt by the server's workers, forwarding
    rules re-send. Running the same correction again finishes one that was interrupted.
    """
    from pacs.studies import corrections

    changes = corrections.StudyChanges(corrections.PatientChanges(name, patient_id, issuer, birth_date, sex),
                                       accession, description)
    with operation() as ctx, _progress("correcting") as progress:
        result = corrections.correct_study(ctx, cli_principal(), study, changes, reason, progress=progress)
    _print(result, as_json)


@study_app.command("move")
def move(
    uid: Annotated[str, typer.Argument(help="Series Instance UID (with --to-study) or Study Instance UID (with "
                                       "--to-patient)")],
    reason: ReasonOption = "",
    to_study: Annotated[str | None, typer.Option(help="Move the series UID to this study (same facility)")] = None,
    to_patient: Annotated[str | None, typer.Option(help="Move the study UID to this existing patient (Patient ID) "
                                                   "of its facility")] = None,
    issuer: Annotated[str, typer.Option(help="With --to-patient: the patient's Issuer of Patient ID")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON")] = False,
) -> None:
    """Move a series to the right study (--to-study), or a study to the right patient (--to-patient).

    Each object gets a new version carrying the target's Study Instance UID and patient/study attributes (the prior
    versions are kept); the index, thumbnails and metadata follow. Both must be of the same facility.
    """
    from pacs.studies import corrections

    if (to_study is None) == (to_patient is None):
        console.print("[red]give exactly one of --to-study (UID is a series) or --to-patient (UID is a study)[/red]")
        raise typer.Exit(2)
    with operation() as ctx, _progress("moving") as progress:
        if to_study is not None:
            result = corrections.move_series(ctx, cli_principal(), uid, to_study, reason, progress=progress)
        else:
            result = corrections.move_study(ctx, cli_principal(), uid, to_patient or "", issuer, reason,
                                            progress=progress)
    _print(result, as_json)


def _print(result: CorrectionResult, as_json: bool) -> None:
    if as_json:
        out.print_json(json.dumps(result.as_json(), ensure_ascii=False))
        return
    out.print(f"study {result.study_instance_uid}: {result.objects_rewritten} object(s) corrected, "
              f"{result.objects_unchanged} already correct, in {len(result.studies)} study(ies)")
    out.print(f"before: {json.dumps(result.before, ensure_ascii=False)}")
    out.print(f"after:  {json.dumps(result.after, ensure_ascii=False)}")
