"""`pacs`: run the servers, manage the index, register peers, import studies."""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from pacs.cli.common import audit_config_change, console, ensure_schema, fail, load_settings, open_context, out
from pacs.context import AppContext

app = typer.Typer(help="Filmless PACS/RIS: the DICOM archive of a province's hospitals.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
db_app = typer.Typer(help="Index database schema.", no_args_is_help=True)
ae_app = typer.Typer(help="Registered DICOM peers (application entities).", no_args_is_help=True)
config_app = typer.Typer(help="Configuration.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(ae_app, name="ae")
app.add_typer(config_app, name="config")


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


@app.command()
def serve() -> None:
    """Run everything in one process: DICOM SCP, HTTP API and workers (embedded defaults)."""
    import uvicorn

    from dicom_scp.server import start_scp
    from pacs.cli.hl7 import start_serve_listener
    from pacs.runtime import Pipeline
    from viewer_api.app import create_app

    settings = load_settings()
    ensure_schema(settings, upgrade=True)
    pipeline = Pipeline.start(settings)
    scp = start_scp(pipeline.ctx, pipeline.ingestor)
    pipeline.hl7_listener = start_serve_listener(pipeline.ctx)  # PACS_HL7_PORT (0 = off)
    _announce_initial_admin(pipeline.ctx)
    http_app = create_app(pipeline.ctx, pipeline.ingestor)
    console.print(f"[green]PACS ready[/green]: DICOM {settings.ae_title}@{settings.dicom_host}:"
                  f"{scp.server_address[1]}, HTTP http://{settings.http_host}:{settings.http_port}, "
                  f"index {pipeline.ctx.engine.url.render_as_string(hide_password=True)}, "
                  f"store {pipeline.ctx.store.describe()}, workers "
                  f"{'in-process' if settings.embedded_workers else 'celery'}"
                  + (f", DICOM TLS on port {scp.tls.server_address[1]}" if scp.tls else "")
                  + (f", HL7 MLLP on port {pipeline.hl7_listener.server_address[1]}" if pipeline.hl7_listener else ""))
    try:
        uvicorn.run(http_app, host=settings.http_host, port=settings.http_port, log_level="warning",
                    timeout_keep_alive=15, limit_concurrency=settings.http_max_connections)
    finally:
        scp.shutdown()
        pipeline.stop()


@app.command()
def scp() -> None:
    """Run the DICOM services only (several in scaled deployments); also relays derived work and commitment reports."""
    from dicom_scp.server import start_scp
    from pacs.runtime import Pipeline

    settings = load_settings()
    ensure_schema(settings, upgrade=False)
    pipeline = Pipeline.start(settings)
    server = start_scp(pipeline.ctx, pipeline.ingestor)
    tls = f", TLS on port {server.tls.server_address[1]}" if server.tls else ""
    console.print(f"[green]DICOM SCP ready[/green] {settings.ae_title}@{settings.dicom_host}:"
                  f"{server.server_address[1]}{tls}")
    try:
        _wait_for_signal()
    finally:
        server.shutdown()
        pipeline.stop()


@app.command()
def api() -> None:
    """Run the HTTP API only: DICOMweb, FHIR, auth, audit and the OHIF viewer (several behind a load balancer)."""
    import uvicorn

    from pacs.runtime import Pipeline
    from viewer_api.app import create_app

    settings = load_settings()
    ensure_schema(settings, upgrade=False)
    pipeline = Pipeline.start(settings)  # STOW-RS ingests like C-STORE: same outbox relay
    _announce_initial_admin(pipeline.ctx)
    console.print(f"[green]HTTP API ready[/green] http://{settings.http_host}:{settings.http_port}")
    try:
        uvicorn.run(create_app(pipeline.ctx, pipeline.ingestor), host=settings.http_host, port=settings.http_port,
                    log_level="warning", timeout_keep_alive=15, limit_concurrency=settings.http_max_connections)
    finally:
        pipeline.stop()


def _announce_initial_admin(ctx: AppContext) -> None:
    """First start: create the admin credential and say once where it is (SPEC §7)."""
    from pacs.security.bootstrap import ensure_initial_admin

    created = ensure_initial_admin(ctx)
    if created is not None:
        path, credential = created
        console.print(f"[bold yellow]first start: created the administrator account {credential.split(' / ')[0]}; "
                      f"its password is in {path} (mode 0600) — keep it safe, then delete the file[/bold yellow]")


@app.command()
def worker(
    concurrency: Annotated[int, typer.Option(help="Worker processes")] = 2,
) -> None:
    """Run a Celery worker: thumbnails, metadata documents, and forwarding delivery (needs PACS_BROKER_URL)."""
    settings = load_settings()
    if settings.embedded_workers:
        console.print("[red]PACS_BROKER_URL is not set: the embedded mode runs workers inside `pacs serve`[/red]")
        raise typer.Exit(2)
    ensure_schema(settings, upgrade=False)
    from workers.celery_app import app as celery_app

    celery_app.worker_main(["worker", "--loglevel", settings.log_level.upper(), "--concurrency",
                            str(concurrency), "-Q", settings.task_queue, "--without-gossip", "--without-mingle"])


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the index schema to the newest revision."""
    settings = load_settings()
    ensure_schema(settings, upgrade=True)
    out.print("index schema is current")


@ae_app.command("add")
def ae_add(
    ae_title: str,
    host: str,
    port: int,
    description: Annotated[str, typer.Option(help="Free text")] = "",
    store: Annotated[bool, typer.Option(help="May send C-STORE")] = True,
    query: Annotated[bool, typer.Option(help="May query (C-FIND)")] = True,
    retrieve: Annotated[bool, typer.Option(help="May retrieve (C-MOVE/C-GET) and be a C-MOVE destination")] = True,
    check_host: Annotated[bool, typer.Option(help="Accept this AE title only from HOST")] = False,
    facility: Annotated[str, typer.Option(help="Facility whose studies this AE sends (access scope of web users)")]
    = "",
) -> None:
    """Register a DICOM peer: AE title, host and port (a C-MOVE destination needs all three)."""
    from pacs.aes import add_ae
    from pacs.errors import PacsError

    ctx = open_context()
    try:
        with ctx.sessions() as session, session.begin():
            rec = add_ae(session, ae_title, host, port, description, store, query, retrieve, check_host, facility)
            audit_config_change(session, "config.ae-add",
                                f"ae={rec.ae_title} host={rec.host}:{rec.port} store={store} query={query} "
                                f"retrieve={retrieve} check_host={check_host} facility={facility}")
    except PacsError as exc:
        raise fail(exc) from exc
    out.print(f"registered {rec.ae_title} at {rec.host}:{rec.port}")


@ae_app.command("list")
def ae_list(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False) -> None:
    """List registered DICOM peers."""
    from dataclasses import asdict

    from pacs.aes import list_aes

    ctx = open_context()
    with ctx.read_sessions() as session:
        rows = list_aes(session)
    if as_json:
        out.print_json(json.dumps([asdict(r) for r in rows]))
        return
    table = Table("AE title", "host", "port", "store", "query", "retrieve", "host checked", "facility", "description")
    for r in rows:
        table.add_row(r.ae_title, r.host, str(r.port), _yn(r.allow_store), _yn(r.allow_query),
                      _yn(r.allow_retrieve), _yn(r.check_host), r.facility, r.description)
    out.print(table)


@ae_app.command("remove")
def ae_remove(ae_title: str) -> None:
    """Unregister a DICOM peer."""
    from pacs.aes import remove_ae
    from pacs.errors import PacsError

    ctx = open_context()
    try:
        with ctx.sessions() as session, session.begin():
            remove_ae(session, ae_title)
            audit_config_change(session, "config.ae-remove", f"ae={ae_title}")
    except PacsError as exc:
        raise fail(exc) from exc
    out.print(f"removed {ae_title}")


@config_app.command("show")
def config_show() -> None:
    """Print the effective configuration, secrets masked."""
    settings = load_settings()
    out.print_json(json.dumps(settings.masked(), default=str))


@app.command("import")
def import_(
    path: Annotated[Path, typer.Argument(help="A folder (walked recursively), a zip file or a single file")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON")] = False,
) -> None:
    """Import DICOM files through the same ingest as C-STORE; prints what was stored, duplicated, refused."""
    from pacs.importer import ImportSummary, collect, import_items
    from pacs.runtime import Pipeline

    settings = load_settings()
    ensure_schema(settings, upgrade=True)
    try:
        items = collect(path)
    except (FileNotFoundError, OSError) as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    pipeline = Pipeline.start(settings)
    summary = ImportSummary()
    try:
        with Progress(TextColumn("[bold]importing"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[mb]:.1f} MB"), TimeRemainingColumn(), console=console) as bar:
            task = bar.add_task("import", total=len(items), mb=0.0)
            done_bytes = 0
            for item, outcome in import_items(pipeline.ingestor, items, settings.max_object_bytes):
                summary.add(item.name, outcome)
                done_bytes += item.size
                bar.update(task, advance=1, mb=done_bytes / 1e6)
    finally:
        pipeline.stop()  # embedded mode: waits for the thumbnails of what was imported
    if as_json:
        out.print_json(json.dumps({"counts": dict(summary.counts), "rejected": summary.rejected,
                                   "failed": summary.failed}))
        raise typer.Exit(1 if summary.failed else 0)
    table = Table("outcome", "files")
    for status, count in sorted(summary.counts.items()):
        table.add_row(status, str(count))
    out.print(table)
    for name, reason in summary.rejected:
        out.print(f"[yellow]refused[/yellow] {name}: {reason}")
    for name, reason in summary.failed:
        out.print(f"[red]failed (import again later)[/red] {name}: {reason}")
    if summary.failed:
        raise typer.Exit(1)


@app.command()
def version() -> None:
    """Print the version."""
    import pacs

    out.print(pacs.__version__)


def _yn(flag: bool) -> str:
    return "yes" if flag else "no"


# --- command groups in their own modules (each adds itself with register(app)) ---
from pacs.cli import tasks as _tasks_cli  # noqa: E402

_tasks_cli.register(app)

from pacs.cli import forward as _forward_cli  # noqa: E402

_forward_cli.register(app)

from pacs.cli import maintenance as _maintenance_cli  # noqa: E402

_maintenance_cli.register(app)

from pacs.cli import orders as _orders_cli  # noqa: E402

_orders_cli.register(app)

from pacs.cli import security as _security_cli  # noqa: E402

_security_cli.register(app)

from pacs.cli import viewer as _viewer_cli  # noqa: E402

_viewer_cli.register(app)

from pacs.cli import hl7 as _hl7_cli  # noqa: E402

_hl7_cli.register(app)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
