"""`pacs hl7`: the HL7 v2 MLLP listener (orders in) and the outbound queue (report results out)."""

from __future__ import annotations

import json
import signal
import threading
from dataclasses import asdict
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from pacs.cli.common import console, ensure_schema, fail, load_settings, open_context, out
from pacs.cli.formatting import json_default, table_time

if TYPE_CHECKING:
    from pacs.context import AppContext
    from pacs.hl7.listener import Hl7Listener

hl7_app = typer.Typer(help="HL7 v2 over MLLP: ORM^O01 orders in, ORU^R01 report results out.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(hl7_app, name="hl7")


@hl7_app.command("listen")
def listen() -> None:
    """Run only the MLLP listener and the outbound delivery (scaled deployments; `pacs serve` runs both)."""
    from pacs import metrics
    from pacs.context import AppContext
    from pacs.hl7.listener import Hl7Listener
    from pacs.hl7.outbound import Hl7Delivery
    from pacs.metrics_port import start_metrics_port

    settings = load_settings(role="hl7")
    if not settings.hl7_port:
        console.print("[red]PACS_HL7_PORT is 0: the HL7 listener is off[/red]")
        raise typer.Exit(2)
    ensure_schema(settings, upgrade=False)
    ctx = AppContext.create(settings)
    metrics.install(ctx, "hl7")
    start_metrics_port(settings)  # PACS_METRICS_PORT (0 = off): no HTTP API in this process
    delivery = Hl7Delivery(ctx).start()
    ctx.extras["hl7_delivery"] = delivery
    try:
        listener = Hl7Listener(ctx).start()
    except OSError as exc:
        delivery.stop()
        ctx.close()
        console.print(f"[red]cannot listen on {settings.hl7_host}:{settings.hl7_port}: {exc}[/red]")
        raise typer.Exit(1) from exc
    host, port = listener.server_address
    destinations = ", ".join(f"{n}={a}" for n, a in settings.hl7_destinations.items()) or "none"
    console.print(f"[green]HL7 MLLP listener ready[/green] on {host}:{port}; ORU^R01 destinations: {destinations}")
    try:
        _wait_for_signal()
    finally:
        listener.stop()
        delivery.stop()
        ctx.close()


@hl7_app.command("outbound")
def outbound(
    state: Annotated[str, typer.Option(help="Only this state: pending, sent or failed")] = "",
    limit: Annotated[int, typer.Option(help="At most this many rows, newest first")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """The outbound queue: each ORU^R01 with its destination, state, attempts and last error."""
    from pacs.errors import PacsError
    from pacs.hl7.outbound import list_outbound
    from pacs.jobs import JobState

    ctx = open_context()
    try:
        with ctx.read_sessions() as session:
            rows = list_outbound(session, state or None, limit=limit)
    except PacsError as exc:
        raise fail(exc) from exc
    finally:
        ctx.close()
    if as_json:
        out.print_json(json.dumps([asdict(r) for r in rows], default=json_default))
        return
    table = Table("id", "destination", "control id", "report", "state", "attempts", "next attempt", "ack",
                  "last error")
    for r in rows:
        table.add_row(str(r.id), r.destination, r.message_control_id, f"{r.report_id or '-'} v{r.report_version}",
                      r.state, str(r.attempts), table_time(r.next_attempt_at) if r.state == JobState.PENDING else "-",
                      r.ack_code or "-", r.last_error[:80])
    out.print(table)


@hl7_app.command("retry")
def retry(ids: Annotated[list[int] | None, typer.Argument(help="Only these ids (default: every failed one)")]
          = None) -> None:
    """Queue failed messages again with a fresh attempt count (the running sender picks them up)."""
    from pacs.cli.common import audit_config_change
    from pacs.hl7.outbound import retry_failed

    ctx = open_context()
    try:
        with ctx.sessions() as session, session.begin():
            n = retry_failed(session, ids or None)
            audit_config_change(session, "hl7.retry", f"ids={ids or 'all failed'} queued={n}")
    finally:
        ctx.close()
    out.print(f"{n} failed message{'' if n == 1 else 's'} queued again")


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()




def start_serve_listener(ctx: AppContext) -> Hl7Listener | None:
    """`pacs serve`'s MLLP listener, when ``hl7_port`` is non-zero. A busy port is reported, not fatal:
    the archive runs on without it (and says so)."""
    from pacs.hl7.listener import Hl7Listener

    settings = ctx.settings
    if not settings.hl7_port:
        return None
    try:
        return Hl7Listener(ctx).start()
    except OSError as exc:
        console.print(f"[red]HL7 listener not started on {settings.hl7_host}:{settings.hl7_port}: {exc}[/red]")
        return None
