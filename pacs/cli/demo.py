"""`pacs demo`: load a few made-up studies (Vietnamese patients, orders, a signed report) to look at."""

from __future__ import annotations

from typing import Annotated

import typer

from pacs.cli.common import console, ensure_schema, load_settings, out


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


def demo(
    facility: Annotated[str, typer.Option(
        "--facility", help="Put every demo study in this facility (default: two made-up facilities, "
        "BVTINH and TTYT-HUYEN)")] = "",
) -> None:
    """Load three made-up studies through the real ingest: a chest CT (20 slices) with a signed report in
    Vietnamese, a chest X-ray and an abdominal ultrasound, each with its order. Running it again adds nothing."""
    from rich.markup import escape

    from pacs.demo import FACILITY_NAMES, RADIOLOGIST_NAME, load_demo
    from pacs.security.bootstrap import CREDENTIAL_FILE

    settings = load_settings()
    ensure_schema(settings, upgrade=True)
    facilities = (facility, facility) if facility else ("BVTINH", "TTYT-HUYEN")
    result = load_demo(settings, facilities, progress=lambda step: console.print(f"[dim]loading {escape(step)}[/dim]"))
    for loaded in result.studies:
        study = loaded.study
        line = (f"{study.modality:<3} {study.patient_name.replace('^', ' ')} ({study.patient_id}), "
                f"{study.procedure}, accession {study.accession}, facility {study.facility}: "
                f"{loaded.stored} image(s) stored, {loaded.duplicates} already there; order {loaded.order}")
        if loaded.report == "signed":
            line += f"; report signed by {RADIOLOGIST_NAME}"
        elif loaded.report:
            line += "; its report was already there"
        out.print(escape(line), soft_wrap=True)
        for problem in loaded.other:
            out.print(f"[red]  {escape(problem)}[/red]")
    base = settings.public_url.rstrip("/") if settings.public_url else f"http://{settings.http_host}:{settings.http_port}"
    credential = settings.data_dir / CREDENTIAL_FILE
    out.print(f"\nOpen {base}/ and sign in as an administrator (the first `pacs serve` wrote user and password to "
              f"{credential}), or as a user you made with `pacs user add`. Studies list: {base}/ui/studies; "
              f"the viewer: {base}/ohif/.", soft_wrap=True)
    if not facility:
        names = ", ".join(f'"{code}": "{name}"' for code, name in FACILITY_NAMES.items())
        out.print(escape(f"Facility names on reports: PACS_FACILITY_NAMES='{{{names}}}'"), soft_wrap=True)
    if not result.ok:
        raise typer.Exit(1)
