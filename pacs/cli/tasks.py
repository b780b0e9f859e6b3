"""`pacs tasks`: derived work (thumbnails, metadata documents) that is waiting, done or failed."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated

import typer
from rich.table import Table

from pacs.cli.common import open_context, out
from pacs.jobs import JobState

tasks_app = typer.Typer(help="Derived work: status, failed tasks, retry.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(tasks_app, name="tasks")


@tasks_app.command("status")
def status(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False) -> None:
    """Counts of derived tasks by kind and state (pending, queued, running, done, failed)."""
    from pacs.derived.admin import counts

    ctx = open_context()
    with ctx.sessions() as session:
        result = counts(session)
    if as_json:
        out.print_json(json.dumps(result))
        return
    states = [str(s) for s in (JobState.PENDING, JobState.QUEUED, JobState.RUNNING, JobState.DONE, JobState.FAILED)]
    table = Table("kind", *states)
    for kind, by_state in sorted(result.items()):
        table.add_row(kind, *(str(by_state.get(s, 0)) for s in states))
    out.print(table)


@tasks_app.command("failed")
def failed(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False) -> None:
    """List failed derived tasks with their last error."""
    from pacs.derived.admin import failed as list_failed

    ctx = open_context()
    with ctx.sessions() as session:
        rows = list_failed(session)
    if as_json:
        out.print_json(json.dumps([asdict(r) for r in rows], default=str))
        return
    table = Table("id", "kind", "subject", "attempts", "last error", "when")
    for r in rows:
        table.add_row(str(r.id), r.kind, r.subject_uid, str(r.attempts), r.last_error[:80], str(r.updated_at)[:19])
    out.print(table)


@tasks_app.command("retry")
def retry(
    ids: Annotated[list[int] | None, typer.Argument(help="Task ids (default: every failed task)")] = None,
) -> None:
    """Queue failed derived tasks again (the running server publishes them within its poll interval)."""
    from pacs.derived.admin import retry as retry_tasks

    ctx = open_context()
    with ctx.sessions() as session, session.begin():
        n = retry_tasks(session, ids or None)
    out.print(f"{n} task(s) queued again")
