"""`pacs study export` (a zip with a DICOMDIR, pacs.studies.archive_zip) and `pacs study send` (to a registered
DICOM peer through the forwarding queue, pacs.studies.send), run as the operator (an archive-wide admin,
audited as ``os:<account>``)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)

from pacs.cli.common import cli_principal, console, fail, open_context, out
from pacs.cli.studies import retention_app, study_app  # noqa: F401
from pacs.errors import PacsError


@study_app.command("export")
def export(
    study: Annotated[str, typer.Argument(help="Study Instance UID")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The zip file to write (replaced if it exists)")],
    series: Annotated[str | None, typer.Option("--series", help="Only this Series Instance UID of the study")] = None,
) -> None:
    """Write a study (or one series) as a zip with a DICOMDIR: the objects as stored, under DICOM/.

    The same zip as GET /api/studies/{study}/archive.zip, written as it is made (the study is never held in
    memory). The file appears under its name only when complete.
    """
    from pacs.studies.archive_zip import plan_export, zip_stream

    ctx = open_context()
    partial = output.with_name(output.name + ".part")
    try:
        plan = plan_export(ctx, cli_principal(), study, series_instance_uid=series)
        with Progress(TextColumn("[bold]exporting"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                      TimeElapsedColumn(), console=console) as bar, partial.open("wb") as fh:
            task = bar.add_task("export", total=plan.object_bytes + 200 * (len(plan.entries) + 1))  # + zip headers
            for chunk in zip_stream(ctx.store, plan):
                fh.write(chunk)
                bar.advance(task, len(chunk))
        partial.replace(output)
    except PacsError as exc:
        raise fail(exc) from exc
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        ctx.close()
    out.print(f"{output}: {len(plan.entries)} object(s) of study {study} with a DICOMDIR "
              f"({output.stat().st_size} bytes)")


@study_app.command("send")
def send_study(
    study: Annotated[str, typer.Argument(help="Study Instance UID")],
    to: Annotated[str, typer.Option("--to", help="Destination: a registered AE (`pacs ae add`) with host and port")],
    series: Annotated[list[str] | None, typer.Option("--series", help="Only this Series Instance UID (repeat the "
                                                     "option for several)")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Show progress until every instance is sent or failed")] = False,
    timeout: Annotated[float, typer.Option("--timeout", help="With --wait: give up waiting after this many "
                                           "seconds (delivery goes on)")] = 3600.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON")] = False,
) -> None:
    """Send a study (or some of its series) to a DICOM peer: C-STORE through the forwarding queue.

    The instances are queued here; `pacs serve` (or `pacs worker` when scaled) delivers them, with retries,
    also after a restart. Sending again re-sends everything.
    """
    from pacs.studies.send import queue_send, send_progress

    ctx = open_context()
    principal = cli_principal()
    try:
        queued = queue_send(ctx, principal, study, to, series=series)
        if not as_json:
            out.print(f"queued {queued.queued} instance(s) of study {study} for {queued.destination}")
        if not wait:
            if as_json:
                out.print_json(json.dumps({"queued": queued.queued, "destination": queued.destination}))
            return
        deadline = time.monotonic() + timeout
        with Progress(TextColumn(f"[bold]sending to {queued.destination}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[failed]} failed"), TimeElapsedColumn(), console=console,
                      disable=as_json) as bar:
            task = bar.add_task("send", total=queued.queued, failed=0)
            while True:
                with ctx.read_sessions() as session:
                    state = send_progress(session, principal, study, destination=queued.destination,
                                          series=series).of(queued.destination)
                bar.update(task, completed=state.sent + state.failed, failed=state.failed)
                if state.pending == 0 or time.monotonic() > deadline:
                    break
                time.sleep(1.0)
    except PacsError as exc:
        raise fail(exc) from exc
    finally:
        ctx.close()
    if as_json:
        out.print_json(json.dumps({"queued": queued.queued, "destination": queued.destination,
                                   "pending": state.pending, "sent": state.sent, "failed": state.failed}))
    else:
        out.print(f"{state.sent} sent, {state.failed} failed, {state.pending} pending"
                  + (f"; last error: {state.last_error}" if state.last_error else ""))
    if state.pending:
        console.print("[yellow]still pending: delivery goes on in `pacs serve` / `pacs worker`[/yellow]")
        raise typer.Exit(2)
    if state.failed:
        raise typer.Exit(1)
