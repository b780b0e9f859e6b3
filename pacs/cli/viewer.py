"""`pacs viewer`: install the OHIF web viewer that `pacs serve` / `pacs api` serve under /ohif/."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pacs.cli.common import console, fail, load_settings, out

viewer_app = typer.Typer(help="The OHIF web viewer served under /ohif/.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(viewer_app, name="viewer")


@viewer_app.command("install-ohif")
def install_ohif(
    from_tarball: Annotated[Path | None, typer.Option(
        "--from-tarball", help="Install from this @ohif/app tarball (offline; it must be the published one)")] = None,
    folder: Annotated[Path | None, typer.Option(
        "--dir", help="Install here instead of PACS_OHIF_DIR (default DATA_DIR/ohif)")] = None,
) -> None:
    """Download the pinned OHIF viewer with `npm pack` (or take --from-tarball), check it, and install it with
    our DICOMweb and sign-in configuration; replaces an earlier install."""
    from pacs.errors import PacsError
    from pacs.viewer import BASE_PATH, OHIF_PACKAGE, OHIF_VERSION
    from pacs.viewer.install import install_ohif as install

    settings = load_settings()
    target = folder or settings.effective_ohif_dir
    try:
        result = install(target, tarball=from_tarball, progress=lambda step: console.print(f"[dim]{step}[/dim]"))
    except PacsError as exc:
        raise fail(exc) from exc
    out.print(f"installed {OHIF_PACKAGE} {OHIF_VERSION} in {result.target} ({result.files} files, "
              f"{result.total_bytes / 1e6:.0f} MB); served at http://{settings.http_host}:{settings.http_port}"
              f"{BASE_PATH} (sign in at {BASE_PATH}login.html)")
