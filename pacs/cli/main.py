"""`pacs`: run the servers, manage the index, register peers, import studies."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from pacs.cli.common import (
    audit_config_change,
    console,
    ensure_schema,
    fail,
    load_settings,
    open_context,
    out,
    transaction,
)
from pacs.context import AppContext
from pacs.heap import freeze_startup_heap

if TYPE_CHECKING:
    from dicom_scp.server import Listeners
    from pacs.aes import AERecord
    from pacs.receiving_processes import ReceivingProcesses
    from pacs.runtime import Pipeline
    from pacs.settings import Settings

app = typer.Typer(help="Filmless PACS/RIS: the DICOM archive of a province's hospitals.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
db_app = typer.Typer(help="Index database schema.", no_args_is_help=True)
ae_app = typer.Typer(help="Registered DICOM peers (application entities).", no_args_is_help=True)
config_app = typer.Typer(help="Configuration.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(ae_app, name="ae")
app.add_typer(config_app, name="config")


@app.callback()
def _owner_only_files() -> None:
    # Before any command runs: what it creates (data folder, index, objects, secrets) is the owner's only.
    from pacs.maintenance.file_modes import restrict_new_files

    restrict_new_files()


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


DicomProcesses = Annotated[int | None, typer.Option(
    "--dicom-processes", min=0, max=64, show_default=False,
    help="DICOM receiving processes accepting from the DICOM port(s); the rest runs once in this process. "
    "Default: PACS_DICOM_PROCESSES; 0: the usable cores, up to 4 (see README)")]


@dataclass
class _DicomListening:
    """Where `pacs serve` / `pacs scp` receive DICOM: in this process (``listeners``) or in receiving
    processes (``receivers``, :mod:`pacs.receiving_processes`)."""

    port: int
    tls_port: int | None
    listeners: Listeners | None = None
    receivers: ReceivingProcesses | None = None
    exit_code: int = 0
    running: bool = False  # ready: a fatal failure from now on stops the command with SIGTERM
    drain_s: float = 0.0  # listeners in this process: how long stop() waits for open associations (PACS_DICOM_DRAIN_S)

    def describe(self) -> str:
        if self.receivers is None:
            return ""
        return f" ({self.receivers.count} receiving processes)"

    def wait_ready(self) -> None:
        """Several receiving processes: until each listens (they start while this process gets ready)."""
        from pacs import metrics

        if self.receivers is None:
            return
        try:
            self.receivers.wait_ready()
        except RuntimeError as exc:
            console.print(f"[red]{exc}[/red]")
            raise typer.Exit(1) from exc
        self.running = True
        metrics.install_receivers(self.receivers.pull_metrics)
        self.port, self.tls_port = self.receivers.port, self.receivers.tls_port

    def stop(self) -> None:
        if self.listeners is not None:
            left = self.listeners.close(self.drain_s)  # no new connection; the open associations may finish
            if left:
                console.print(f"[yellow]{left} DICOM association(s) still open after {self.drain_s:g} s: "
                              "aborted[/yellow]")
        if self.receivers is not None:
            self.receivers.stop()


def _start_pipeline(settings: Settings, receiving: _DicomListening | None) -> Pipeline:
    """This process's pipeline; the receiving processes already started are stopped if it cannot start."""
    from pacs.runtime import Pipeline

    try:
        return Pipeline.start(settings)
    except BaseException:
        if receiving is not None:
            receiving.stop()
        raise


def _start_receivers(settings: Settings, role: str, processes: int | None) -> _DicomListening | None:
    """``--dicom-processes`` over 1: start the receiving processes now, before this process starts any thread
    (they are forked, every module already imported: quick); None: the DICOM services run in this process."""
    from pacs.receiving_processes import ReceivingProcesses, effective_processes

    if processes is not None:
        settings = settings.model_copy(update={"dicom_processes": processes})
    count = effective_processes(settings)
    if count <= 1:
        return None
    listening = _DicomListening(settings.dicom_port, None)

    def fatal(why: str) -> None:  # a receiving process keeps dying: this command exits non-zero
        listening.exit_code = 1
        if listening.running:  # (while starting, wait_ready says so)
            console.print(f"[red]{why}[/red]")
            os.kill(os.getpid(), signal.SIGTERM)

    listening.receivers = ReceivingProcesses(settings, count, role=role, on_fatal=fatal).start()
    return listening


def _start_dicom(pipeline: Pipeline, receiving: _DicomListening | None) -> _DicomListening:
    """The DICOM listeners in this process, or the receiving processes' link to this one's relay and
    commitment reporter (:meth:`_DicomListening.wait_ready` then waits for them)."""
    from dicom_scp.server import start_scp

    if receiving is None:
        listeners = start_scp(pipeline.ctx, pipeline.ingestor)
        return _DicomListening(listeners.server_address[1], listeners.tls.server_address[1] if listeners.tls
                               else None, listeners=listeners, drain_s=pipeline.ctx.settings.dicom_drain_s)
    assert receiving.receivers is not None
    # until now their derived tasks wait for the relay's first sweep, which publishes every pending row
    receiving.receivers.on_tasks = pipeline.relay.notify
    if pipeline.commitment is not None:
        receiving.receivers.on_commitment = pipeline.commitment.wake
    return receiving


@app.command()
def serve(dicom_processes: DicomProcesses = None) -> None:
    """Run everything in one process: DICOM SCP, HTTP API and workers (embedded defaults).

    With --dicom-processes N (PACS_DICOM_PROCESSES) over 1, N processes receive DICOM on the same port(s)
    and this one runs the rest once: HTTP, relay, workers, forwarding, commitment reports, HL7, retention."""
    from pacs.cli.hl7 import start_serve_listener
    from viewer_api import http_server
    from viewer_api.app import create_app

    settings = load_settings(role="serve")
    ensure_schema(settings, upgrade=True)
    receiving = _start_receivers(settings, "serve", dicom_processes)
    pipeline = _start_pipeline(settings, receiving)
    try:
        dicom = _start_dicom(pipeline, receiving)
    except BaseException:
        if receiving is not None:
            receiving.stop()
        pipeline.stop()
        raise
    try:
        pipeline.hl7_listener = start_serve_listener(pipeline.ctx)  # PACS_HL7_PORT (0 = off)
        _announce_initial_admin(pipeline.ctx)
        http_app = create_app(pipeline.ctx, pipeline.ingestor)
        dicom.wait_ready()
    except BaseException:
        dicom.stop()
        pipeline.stop()
        raise
    console.print(f"[green]PACS ready[/green]: DICOM {settings.ae_title}@{settings.dicom_host}:"
                  f"{dicom.port}{dicom.describe()}, HTTP http://{settings.http_host}:{settings.http_port}, "
                  f"index {pipeline.ctx.engine.url.render_as_string(hide_password=True)}, "
                  f"store {pipeline.ctx.store.describe()}, workers "
                  f"{'in-process' if settings.embedded_workers else 'celery'}"
                  + (f", DICOM TLS on port {dicom.tls_port}" if dicom.tls_port else "")
                  + (f", HL7 MLLP on port {pipeline.hl7_listener.server_address[1]}" if pipeline.hl7_listener else ""))
    # uvicorn restores these handlers and raises the signal it caught again once it has stopped: with Python's
    # defaults SIGTERM would end this process there (exit status 143), before the DICOM associations in flight
    # are drained and the receiving processes, workers and relays are stopped
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    freeze_startup_heap()  # full garbage collections walk only what is made from now on (pacs.heap)
    try:
        http_server.run(http_app, settings)
    finally:
        dicom.stop()
        pipeline.stop()
    if dicom.exit_code:
        raise typer.Exit(dicom.exit_code)


@app.command()
def scp(dicom_processes: DicomProcesses = None) -> None:
    """Run the DICOM services only (several in scaled deployments); also relays derived work and commitment reports.

    With --dicom-processes N (PACS_DICOM_PROCESSES) over 1, N processes receive DICOM on the same port(s) and
    this one relays, reports and serves the metrics port for all of them."""
    from pacs import metrics
    from pacs.metrics_port import start_metrics_port

    settings = load_settings(role="scp")
    ensure_schema(settings, upgrade=False)
    receiving = _start_receivers(settings, "scp", dicom_processes)
    pipeline = _start_pipeline(settings, receiving)
    metrics.install(pipeline.ctx, "scp")
    metrics_port = start_metrics_port(settings)  # PACS_METRICS_PORT (0 = off): no HTTP API in this process
    try:
        dicom = _start_dicom(pipeline, receiving)
        dicom.wait_ready()
    except BaseException:
        if receiving is not None:
            receiving.stop()
        if metrics_port is not None:
            metrics_port.shutdown()
        pipeline.stop()
        raise
    tls = f", TLS on port {dicom.tls_port}" if dicom.tls_port else ""
    console.print(f"[green]DICOM SCP ready[/green] {settings.ae_title}@{settings.dicom_host}:"
                  f"{dicom.port}{dicom.describe()}{tls}")
    freeze_startup_heap()  # full garbage collections walk only what is made from now on (pacs.heap)
    try:
        _wait_for_signal()
    finally:
        dicom.stop()
        if metrics_port is not None:
            metrics_port.shutdown()
        pipeline.stop()
    if dicom.exit_code:
        raise typer.Exit(dicom.exit_code)


@app.command()
def api() -> None:
    """Run the HTTP API only: DICOMweb, FHIR, auth, audit and the OHIF viewer (several behind a load balancer)."""
    from pacs.runtime import Pipeline
    from viewer_api import http_server
    from viewer_api.app import create_app

    settings = load_settings(role="api")
    ensure_schema(settings, upgrade=False)
    pipeline = Pipeline.start(settings)  # STOW-RS ingests like C-STORE: same outbox relay
    _announce_initial_admin(pipeline.ctx)
    console.print(f"[green]HTTP API ready[/green] http://{settings.http_host}:{settings.http_port}")
    try:
        http_server.run(create_app(pipeline.ctx, pipeline.ingestor), settings)
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
    settings = load_settings(role="worker")
    if settings.embedded_workers:
        console.print("[red]PACS_BROKER_URL is not set: the embedded mode runs workers inside `pacs serve`[/red]")
        raise typer.Exit(2)
    ensure_schema(settings, upgrade=False)
    from workers.celery_app import app as celery_app

    if settings.log_format == "json":  # Celery's own log setup would replace the JSON lines with its text
        from celery.signals import setup_logging

        setup_logging.connect(lambda **_: None, weak=False)
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
    check_host: Annotated[bool, typer.Option(help="Believe this AE title only from HOST (an address, or a name "
                                             "resolved at each association). --no-check-host: from any address, "
                                             "so anyone on the network can pose as this AE (a warning is printed)")]
    = True,
    tls_subject: Annotated[str, typer.Option(help="Believe this AE title only over DICOM TLS with a client "
                                             "certificate (verified against PACS_TLS_CA_FILE) whose CN or DNS name "
                                             "is this, or whose SHA-256 fingerprint is this (sha256:...)")] = "",
    facility: Annotated[str, typer.Option(help="Facility of this AE: the studies it sends belong there, and it "
                                          "queries/retrieves only that facility's studies and orders "
                                          "(plus studies shared with it)")]
    = "",
    archive_wide: Annotated[bool, typer.Option("--archive-wide", help="Query/retrieve every facility's studies and "
                                               "orders (a province-level node); instead of --facility")] = False,
) -> None:
    """Register a DICOM peer: AE title, host and port (a C-MOVE destination needs all three).

    An AE with query or retrieve rights needs exactly one of --facility and --archive-wide (whose studies
    it may find, retrieve, commit and see on the worklist); a store-only AE (--no-query --no-retrieve)
    may have neither.

    The AE title is believed only from HOST unless --no-check-host; --tls-subject binds it to a TLS
    client certificate as well (the strong check, e.g. for modalities on DHCP: with --no-check-host).
    """
    from pacs.ae_scope import needs_scope_flag
    from pacs.aes import add_ae
    from pacs.errors import InvalidInput

    if why := needs_scope_flag(query, retrieve, facility, archive_wide):
        raise fail(InvalidInput(why))

    with transaction() as session:
        rec = add_ae(session, ae_title, host, port, description, store, query, retrieve, check_host, facility,
                     archive_wide=archive_wide, tls_subject=tls_subject)
        audit_config_change(session, "config.ae-add",
                            f"ae={rec.ae_title} host={rec.host}:{rec.port} store={store} query={query} "
                            f"retrieve={retrieve} check_host={check_host} facility={facility} "
                            f"archive_wide={archive_wide} tls_subject={rec.tls_subject}")
    out.print(f"registered {rec.ae_title} at {rec.host}:{rec.port}")
    _warn_identity(load_settings(), rec)


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
    table = Table("AE title", "host", "port", "store", "query", "retrieve", "identity checked", "facility",
                  "description")
    for r in rows:
        table.add_row(r.ae_title, r.host, str(r.port), _yn(r.allow_store), _yn(r.allow_query),
                      _yn(r.allow_retrieve), _identity(r), "* (archive-wide)" if r.archive_wide else r.facility,
                      r.description)
    out.print(table)
    unchecked = [r.ae_title for r in rows if not r.identity_checked]
    if unchecked:
        console.print(f"[yellow]warning:[/yellow] believed from any address (no host check, no TLS certificate): "
                      f"{', '.join(unchecked)} — `pacs ae identity TITLE --check-host`")


@ae_app.command("identity")
def ae_identity(
    ae_title: str,
    check_host: Annotated[bool | None, typer.Option("--check-host/--no-check-host", help="Believe this AE title "
                                                    "only from its registered host, or from any address")] = None,
    tls_subject: Annotated[str | None, typer.Option(help="TLS client certificate identity it must present (CN, "
                                                    "DNS name or sha256:fingerprint); '' removes it")] = None,
) -> None:
    """Change how a registered AE proves who it is (host check, TLS client certificate); others unchanged."""
    from pacs.aes import set_identity

    with transaction() as session:
        rec = set_identity(session, ae_title, check_host=check_host, tls_subject=tls_subject)
        audit_config_change(session, "config.ae-identity",
                            f"ae={rec.ae_title} check_host={rec.check_host} tls_subject={rec.tls_subject}")
    out.print(f"{rec.ae_title}: identity checked by {_identity(rec)}")
    _warn_identity(load_settings(), rec)


def _identity(r: AERecord) -> str:
    from rich.markup import escape

    checks = (["host"] if r.check_host else []) + ([f"TLS {escape(r.tls_subject)}"] if r.tls_subject else [])
    return " + ".join(checks) if checks else "[red]NONE[/red]"


def _warn_identity(settings: Settings, rec: AERecord) -> None:
    """Say what an operator must know after registering or changing an AE's identity check."""
    if not rec.identity_checked:
        console.print(f"[yellow]warning:[/yellow] {rec.ae_title} is believed from any address: anyone on the "
                      "network can call as it, store as it and use its query/retrieve rights")
    if rec.tls_subject and settings.tls_ca_file is None:
        console.print(f"[yellow]warning:[/yellow] {rec.ae_title} is bound to a TLS client certificate, but "
                      "PACS_TLS_CA_FILE is not set: no certificate is verified, so it is never recognized")


@ae_app.command("remove")
def ae_remove(ae_title: str) -> None:
    """Unregister a DICOM peer."""
    from pacs.aes import remove_ae

    with transaction() as session:
        remove_ae(session, ae_title)
        audit_config_change(session, "config.ae-remove", f"ae={ae_title}")
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
    wait: Annotated[bool | None, typer.Option(
        "--wait/--no-wait", help="Wait until the derived work of what was imported (thumbnails, metadata) is "
        "done. Default: wait when workers run in this process (no PACS_BROKER_URL); with a broker, report "
        "what remains for the `pacs worker` processes")] = None,
) -> None:
    """Import DICOM files through the same ingest as C-STORE; prints what was stored, duplicated, refused.

    Without a broker the derived work runs in this process, so it finishes that work before it exits
    (Ctrl-C stops waiting: what is left is run by the next `pacs serve`). With a broker it reports how
    many derived tasks remain (see `pacs tasks status`) unless --wait is given.
    """
    from pacs.ingest.importer import ImportSummary, collect, import_items
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
    armed: set[int] = set()  # derived tasks of what was imported
    if wait is None:
        wait = settings.embedded_workers
    try:
        with Progress(TextColumn("[bold]importing"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[mb]:.1f} MB"), TimeRemainingColumn(), console=console) as bar:
            task = bar.add_task("import", total=len(items), mb=0.0)
            done_bytes = 0
            for item, outcome in import_items(pipeline.ingestor, items, settings.max_object_bytes):
                summary.add(item.name, outcome)
                armed.update(outcome.derived_task_ids)
                done_bytes += item.size
                bar.update(task, advance=1, mb=done_bytes / 1e6)
        if wait:
            _drain_derived(pipeline, armed)
    finally:
        pipeline.stop()  # embedded mode: also runs what is already in this process's pool
    remaining = _still_to_run(settings, armed)
    if as_json:
        out.print_json(json.dumps({"counts": dict(summary.counts), "rejected": summary.rejected,
                                   "failed": summary.failed, "derived_tasks": len(armed),
                                   "derived_tasks_remaining": len(remaining)}))
        raise typer.Exit(1 if summary.failed else 0)
    table = Table("outcome", "files")
    for status, count in sorted(summary.counts.items()):
        table.add_row(status, str(count))
    out.print(table)
    for name, reason in summary.rejected:
        out.print(f"[yellow]refused[/yellow] {name}: {reason}")
    for name, reason in summary.failed:
        out.print(f"[red]failed (import again later)[/red] {name}: {reason}")
    if remaining:
        out.print(f"{len(remaining)} of {len(armed)} derived task(s) (thumbnails, metadata) still to run: "
                  "see `pacs tasks status`")
    if summary.failed:
        raise typer.Exit(1)


def _drain_derived(pipeline: Pipeline, armed: set[int]) -> None:
    """Wait for the imported objects' derived work; Ctrl-C stops waiting."""
    with Progress(TextColumn("[bold]derived work"), BarColumn(), MofNCompleteColumn(), console=console) as bar:
        task = bar.add_task("derived", total=len(armed))
        try:
            pipeline.drain(armed, on_progress=lambda left: bar.update(task, completed=len(armed) - left))
        except KeyboardInterrupt:
            console.print("[yellow]stopped waiting for derived work[/yellow]")


def _still_to_run(settings: Settings, armed: set[int]) -> set[int]:
    """The imported objects' derived tasks not yet done or failed (counted after this process stopped its own)."""
    from pacs.derived.lease import outstanding

    if not armed:
        return set()
    ctx = AppContext.create(settings)
    try:
        with ctx.read_sessions() as session:
            return outstanding(session, armed)
    finally:
        ctx.close()


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

from pacs.cli import patients as _patients_cli  # noqa: E402

_patients_cli.register(app)

from pacs.cli import studies as _studies_cli  # noqa: E402

_studies_cli.register(app)

from pacs.cli import backup as _backup_cli  # noqa: E402

_backup_cli.register(app)

from pacs.cli import demo as _demo_cli  # noqa: E402

_demo_cli.register(app)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
