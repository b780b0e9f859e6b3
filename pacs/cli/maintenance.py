"""`pacs reindex` and `pacs check`, added to the main command line by :func:`register`.

The helpers of :mod:`pacs.cli.main` are imported inside the commands: ``main`` imports this module at its
end, so a module-level import here would be circular.
"""

from __future__ import annotations

import json
import os
from types import TracebackType
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from pacs.cli.common import console, ensure_schema, load_settings, out


def register(app: typer.Typer) -> None:
    app.command("reindex")(reindex_command)
    app.command("check")(check_command)


class _RichProgress:
    """A :class:`pacs.maintenance.ProgressSink` drawn as one rich bar per phase (on stderr)."""

    def __init__(self, console: Console) -> None:
        self._progress = Progress(TextColumn("[bold]{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[mb]:.1f} MB"), TimeElapsedColumn(), console=console)
        self._task: TaskID | None = None
        self._mb = 0.0

    def __enter__(self) -> _RichProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._finish()
        self._progress.__exit__(kind, exc, tb)

    def _finish(self) -> None:
        if self._task is not None:
            done = next(t.completed for t in self._progress.tasks if t.id == self._task)
            self._progress.update(self._task, total=done, completed=done)

    def phase(self, name: str, total: int | None = None) -> None:
        self._finish()
        self._mb = 0.0
        self._task = self._progress.add_task(name, total=total, mb=0.0)

    def advance(self, count: int = 1, nbytes: int = 0) -> None:
        if self._task is not None:
            self._mb += nbytes / 1e6
            self._progress.update(self._task, advance=count, mb=self._mb)


def reindex_command(
    force: Annotated[bool, typer.Option("--force", help="Run into a non-empty index: add only what it lacks")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON")] = False,
) -> None:
    """Rebuild the index from the object store (disaster recovery).

    Exit status: 0 every stored instance is indexed; 1 some objects could not be (corrupt, unparseable,
    unreadable: listed); 2 refused (a non-empty index without --force) or a server is unavailable.
    """
    from sqlalchemy.exc import SQLAlchemyError

    from pacs.context import AppContext
    from pacs.db import migrate
    from pacs.maintenance.reindex import IndexNotEmpty, reindex
    from storage import StorageUnavailable

    settings = load_settings()
    ctx = AppContext.create(settings)
    try:
        ensure_schema(settings, upgrade=not migrate.current_revisions(ctx.engine))
        with _RichProgress(console) as bar:
            summary = reindex(ctx.sessions, ctx.store, force=force, progress=bar,
                              assume_utf8_for_latin1=settings.assume_utf8_for_latin1, actor=os.environ.get("USER", ""),
                              modifying_system=settings.ae_title)
    except IndexNotEmpty as exc:
        console.print(f"[red]refused:[/red] {exc}")
        raise typer.Exit(2) from exc
    except (StorageUnavailable, SQLAlchemyError) as exc:
        what = "object store" if isinstance(exc, StorageUnavailable) else "index database"
        console.print(f"[red]{what} unavailable:[/red] {str(exc).splitlines()[0][:300]}\n"
                      "batches committed so far stay indexed: run `pacs reindex --force` again to finish")
        raise typer.Exit(2) from exc
    finally:
        ctx.close()
    if as_json:
        out.print_json(json.dumps(summary.as_dict()))
    else:
        table = Table("", "count")
        for name in ("objects", "instances", "versions", "skipped_existing", "thumbnails_linked", "fragments_linked",
                     "tasks_armed"):
            table.add_row(name.replace("_", " "), str(getattr(summary, name)))
        out.print(table)
        for key in summary.corrupt:
            out.print(f"[red]corrupt (SHA-256 differs from its key), not indexed[/red] {key}", soft_wrap=True)
        for key, reason in summary.unparseable + summary.unreadable:
            out.print(f"[red]not indexed[/red] {key}: {reason}", soft_wrap=True)
        for key in summary.ignored:
            out.print(f"[yellow]ignored (not an instance key)[/yellow] {key}", soft_wrap=True)
        for row in summary.ambiguous_order:
            out.print(f"[yellow]written in the same instant as another object, may differ from ingest's[/yellow] {row}",
                      soft_wrap=True)
        out.print(f"{summary.bytes_read / 1e6:.1f} MB read in {summary.seconds:.1f} s")
    raise typer.Exit(0 if summary.complete else 1)


def check_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary and problems as JSON")] = False,
    repair: Annotated[bool, typer.Option("--repair", help="Remove the orphans and temporary files found that are "
                                         "older than the grace period and that no index row points at (audited)")]
    = False,
    grace_minutes: Annotated[float, typer.Option("--grace-minutes", min=1, help="With --repair: leave what was "
                                                 "written less than this long ago (a write may be in flight)")]
    = 60.0,
) -> None:
    """Verify every indexed object in the store (exists, size, SHA-256), and every object held in the
    reconciliation queue, and list unindexed objects.

    Errors: an indexed or held object missing, of another size, corrupt or unreadable. Warnings: orphans (objects
    under dicom/ no index row references, left by an ingest that died before its index commit; objects under
    reconciliation/ no queue row names) and
    temporary files (.tmp-* of interrupted writes). --repair removes those warnings' files once older
    than --grace-minutes, never an object an index row points at, and prints what it removed.

    Also warns (without changing the exit status) about index and store files that group or others
    may read or write.

    Exit status: 0 no error (warnings listed); 1 errors found (listed); 2 a server is unavailable.
    """
    from sqlalchemy.exc import SQLAlchemyError

    from pacs.aes import unchecked_aes
    from pacs.context import AppContext
    from pacs.maintenance.check import ProblemKind, check
    from pacs.maintenance.repair import RepairSummary, repair_refusal
    from pacs.maintenance.repair import repair as collect
    from storage import StorageUnavailable

    settings = load_settings()
    ensure_schema(settings, upgrade=False)
    ctx = AppContext.create(settings)
    try:
        with _RichProgress(console) as bar:
            summary = check(ctx.sessions, ctx.store, progress=bar)
        repaired: RepairSummary | None = None
        if repair:
            from datetime import timedelta

            orphans = [p.key for p in summary.problems if p.kind is ProblemKind.ORPHAN]
            refusal = repair_refusal(len(summary.errors), summary.checked, summary.listed, len(orphans))
            if refusal:
                console.print(f"[red]--repair refused:[/red] {refusal}")
                raise typer.Exit(1)
            repaired = collect(ctx.sessions, ctx.store, orphans, grace=timedelta(minutes=grace_minutes),
                               actor=os.environ.get("USER", ""))
        with ctx.read_sessions() as session:  # registered AEs anyone can pose as: a warning, not a problem
            unchecked = [r.ae_title for r in unchecked_aes(session)]
    except (StorageUnavailable, SQLAlchemyError) as exc:
        what = "object store" if isinstance(exc, StorageUnavailable) else "index database"
        console.print(f"[red]{what} unavailable:[/red] {str(exc).splitlines()[0][:300]}")
        raise typer.Exit(2) from exc
    finally:
        ctx.close()
    if as_json:
        out.print_json(json.dumps({**summary.as_dict(), **({"repair": repaired.as_dict()} if repaired else {})}))
    else:
        for problem in summary.problems:
            colour = "red" if problem in summary.errors else "yellow"
            out.print(f"[{colour}]{problem.kind.value}[/{colour}] {problem.key}: {problem.detail}", soft_wrap=True)
        for warning in summary.lax_modes:
            out.print(f"[yellow]warning: {warning}[/yellow]", soft_wrap=True)
        counts = ", ".join(f"{n} {kind}" for kind, n in sorted(summary.counts().items())) or "no problems"
        out.print(f"checked {summary.checked} objects ({summary.bytes_read / 1e6:.1f} MB), listed {summary.listed} "
                  f"under dicom/ and reconciliation/ in {summary.seconds:.1f} s: {counts}")
        if repaired is not None:
            for key in repaired.removed_orphans:
                out.print(f"removed orphan {key}", soft_wrap=True)
            for path in repaired.removed_temporary:
                out.print(f"removed temporary file {path}", soft_wrap=True)
            for key, why in repaired.kept:
                out.print(f"[yellow]kept[/yellow] {key}: {why}", soft_wrap=True)
            out.print(f"repair: removed {len(repaired.removed_orphans)} orphan(s) and "
                      f"{len(repaired.removed_temporary)} temporary file(s) older than {grace_minutes:g} min")
    if unchecked:
        console.print(f"[yellow]warning: AE titles believed from any address (no host check, no TLS certificate): "
                      f"{', '.join(unchecked)}[/yellow] — `pacs ae identity TITLE --check-host`", soft_wrap=True)
    raise typer.Exit(0 if summary.ok else 1)
