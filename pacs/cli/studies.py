"""`pacs study`: manage stored studies — correct, move, reject, restore, delete, export, send (pacs.studies).

Each command is audited with the operator's account; the commands live in one module per operation
(``study_corrections``, ``study_rejections``, ``study_deletion``, ``study_transfers``), registered on
:data:`study_app` when this module is imported.
"""

from __future__ import annotations

import typer

study_app = typer.Typer(help="Manage stored studies: correct, move, reject, restore, delete, export, send.",
                        no_args_is_help=True)
retention_app = typer.Typer(help="Retention: what is due for deletion, and deleting it after confirmation.",
                            no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(study_app, name="study")
    app.add_typer(retention_app, name="retention")


# the commands, each module adding its own to study_app / retention_app
from pacs.cli import study_corrections, study_deletion, study_rejections, study_transfers  # noqa: E402, F401
