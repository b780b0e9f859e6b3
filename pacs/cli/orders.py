"""`pacs order`: imaging orders that feed the Modality Worklist (add, list, cancel)."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated

import typer
from rich.table import Table

from pacs.cli.common import fail, open_context, out, transaction
from pacs.cli.formatting import json_default

order_app = typer.Typer(help="RIS orders: what the Modality Worklist offers to modalities.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(order_app, name="order")


@order_app.command("add")
def add(
    patient_id: Annotated[str, typer.Option("--patient-id", help="Patient ID")],
    patient_name: Annotated[str, typer.Option("--patient-name", help="Family^Given, e.g. 'Nguyễn^Văn An'")],
    modality: Annotated[str, typer.Option(help="CT, MR, CR, DX, US, MG...")],
    station_ae: Annotated[str, typer.Option("--station-ae", help="AE title of the modality that will perform it")],
    date: Annotated[str, typer.Option(help="Scheduled start date, YYYYMMDD")],
    time: Annotated[str, typer.Option(help="Scheduled start time, HHMM or HHMMSS")],
    procedure: Annotated[str, typer.Option(help="Requested procedure description, e.g. 'CT CHEST'")],
    accession: Annotated[str, typer.Option(help="Accession number (default: generated)")] = "",
    procedure_id: Annotated[str, typer.Option("--procedure-id", help="Requested Procedure ID (default: "
                                              "the accession number)")] = "",
    step_id: Annotated[str, typer.Option("--step-id", help="Scheduled Procedure Step ID (default: the "
                                         "accession number)")] = "",
    birth_date: Annotated[str, typer.Option("--birth-date", help="Patient birth date, YYYYMMDD")] = "",
    sex: Annotated[str, typer.Option(help="Patient sex: M, F or O")] = "",
    referring_physician: Annotated[str, typer.Option("--referring-physician", help="Family^Given")] = "",
    performing_physician: Annotated[str, typer.Option("--performing-physician", help="Family^Given")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print the order as JSON")] = False,
) -> None:
    """Schedule an imaging order: it appears on the worklist of --station-ae."""
    from pacs.ris.orders import NewOrder, create_order

    new = NewOrder(patient_id=patient_id, patient_name=patient_name, modality=modality, station_ae_title=station_ae,
                   start_date=date, start_time=time, procedure_description=procedure, accession_number=accession,
                   requested_procedure_id=procedure_id, scheduled_procedure_step_id=step_id,
                   patient_birth_date=birth_date, patient_sex=sex, referring_physician_name=referring_physician,
                   performing_physician_name=performing_physician)
    with transaction() as session:
        order = create_order(session, new)
    if as_json:
        out.print_json(json.dumps(asdict(order), default=json_default))
        return
    out.print(f"order {order.accession_number}: {order.patient_name} ({order.patient_id}), {order.modality} "
              f"{order.requested_procedure_description} on {order.scheduled_station_ae_title} "
              f"{order.scheduled_start_date} {order.scheduled_start_time}; study {order.study_instance_uid}")


@order_app.command("list")
def list_(
    state: Annotated[str, typer.Option(help="Only this state: scheduled, in-progress, completed, discontinued")] = "",
    date: Annotated[str, typer.Option(help="Only this scheduled date, YYYYMMDD")] = "",
    station_ae: Annotated[str, typer.Option("--station-ae", help="Only this station AE title")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """List orders by scheduled date and time."""
    from pacs.errors import PacsError
    from pacs.ris.orders import list_orders

    ctx = open_context()
    try:
        with ctx.sessions() as session:
            orders = list_orders(session, state or None, date or None, station_ae or None)
    except PacsError as exc:
        raise fail(exc) from exc
    finally:
        ctx.close()
    if as_json:
        out.print_json(json.dumps([asdict(o) for o in orders], default=json_default))
        return
    table = Table("accession", "patient id", "patient name", "modality", "station", "date", "time", "procedure",
                  "state")
    for o in orders:
        table.add_row(o.accession_number, o.patient_id, o.patient_name, o.modality, o.scheduled_station_ae_title,
                      o.scheduled_start_date, o.scheduled_start_time, o.requested_procedure_description, o.state)
    out.print(table)


@order_app.command("cancel")
def cancel(accession: Annotated[str, typer.Argument(help="Accession number")]) -> None:
    """Discontinue an order that has not finished: it leaves the worklist."""
    from pacs.ris.orders import cancel_order

    with transaction() as session:
        order = cancel_order(session, accession)
    out.print(f"order {order.accession_number} {order.state}")
