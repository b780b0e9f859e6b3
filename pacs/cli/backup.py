"""`pacs backup create|verify|restore`, added to the main command line by :func:`register`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from pacs.cli.common import console, load_settings, operator, out

backup_app = typer.Typer(
    help="Back up the index and every stored object into a folder, check a backup, restore one into an empty "
         "archive. See deploy/backup.md for the procedures (nightly backups, big sites, the restore drill).",
    no_args_is_help=True)

FOLDER = Annotated[Path, typer.Argument(metavar="DIR", help="The backup folder", show_default=False)]
AS_JSON = Annotated[bool, typer.Option("--json", help="Print the summary as JSON")]


def register(app: typer.Typer) -> None:
    app.add_typer(backup_app, name="backup")


def _unavailable(exc: Exception, after: str = "") -> typer.Exit:
    from storage import StorageUnavailable

    what = "object store" if isinstance(exc, StorageUnavailable) else "index database"
    console.print(f"[red]{what} unavailable:[/red] {_first_line(exc)}{after}")
    return typer.Exit(2)


def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:300]


@backup_app.command("create")
def create_command(folder: FOLDER, as_json: AS_JSON = False) -> None:
    """Back up the index and every stored object into DIR (a new or empty folder); the archive keeps running.

    The archive is the one PACS_DATABASE_URL and PACS_STORAGE_URL name (embedded: PACS_DATA_DIR). The index is
    dumped first (PostgreSQL: pg_dump --format=custom, of the server's major version or newer; SQLite: the
    online backup API), then every object of the store is copied into DIR/objects and listed with its size
    and SHA-256, then DIR/MANIFEST.json is written: a folder without it is an interrupted backup.

    Exit status: 0 complete; 1 written, but some objects the index references were not in the store as
    indexed (listed: run `pacs check` on the archive); 2 refused or a server unavailable (nothing usable
    written).
    """
    from sqlalchemy.exc import SQLAlchemyError

    from pacs.backup import BackupError, BackupRefused, create_backup
    from pacs.cli.maintenance import _RichProgress
    from storage import StorageError, StorageUnavailable

    settings = load_settings()
    try:
        with _RichProgress(console) as bar:
            summary = create_backup(settings, folder, actor=f"os:{operator()}", progress=bar)
    except BackupRefused as exc:
        console.print(f"[red]refused:[/red] {exc}")
        raise typer.Exit(2) from exc
    except (StorageUnavailable, SQLAlchemyError) as exc:
        raise _unavailable(exc) from exc
    except (BackupError, StorageError, OSError) as exc:  # e.g. pg_dump failed, the backup's disk is full
        console.print(f"[red]backup failed:[/red] {_first_line(exc)}\n{folder} has no manifest: it is not a "
                      "usable backup")
        raise typer.Exit(2) from exc
    if as_json:
        out.print_json(json.dumps(summary.as_dict()))
    else:
        tables = summary.tables
        out.print(f"backup written to {folder}: {summary.index_kind} index ({summary.index_bytes / 1e6:.1f} MB; "
                  f"{tables.get('study', 0)} studies, {tables.get('instance', 0)} instances, "
                  f"{tables.get('report', 0)} reports, {tables.get('app_user', 0)} users, "
                  f"{tables.get('audit_event', 0)} audit rows), {summary.objects} objects "
                  f"({summary.object_bytes / 1e6:.1f} MB) in {summary.seconds:.1f} s", soft_wrap=True)
        for key in summary.missing.keys:
            out.print(f"[red]not in the store as indexed[/red] {key}", soft_wrap=True)
        if summary.missing.count:
            out.print(f"[red]{summary.missing.count} object(s) the index references were not in the store as "
                      "indexed[/red]: run `pacs check` on the archive", soft_wrap=True)
    raise typer.Exit(0 if summary.complete else 1)


@backup_app.command("verify")
def verify_command(folder: FOLDER, as_json: AS_JSON = False) -> None:
    """Check a backup without restoring it: its manifest, the index file, and every object read back and hashed.

    Exit status: 0 intact; 1 damaged (files changed, missing or added: listed) or incomplete from the start
    (objects the index referenced were not in the store when it was made); 2 not a backup, or an unfinished
    one (no manifest).
    """
    from pacs.backup import BackupRefused, verify_backup
    from pacs.cli.maintenance import _RichProgress

    try:
        with _RichProgress(console) as bar:
            summary = verify_backup(folder, progress=bar)
    except BackupRefused as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    if as_json:
        out.print_json(json.dumps(summary.as_dict()))
    else:
        for problem in summary.problems:
            out.print(f"[red]{problem}[/red]", soft_wrap=True)
        state = "intact" if summary.intact else f"DAMAGED: {len(summary.problems)} problem(s)"
        out.print(f"backup {folder} ({summary.manifest.data.get('created_at')}, "
                  f"{summary.manifest.index_kind} index): {summary.objects} objects "
                  f"({summary.bytes / 1e6:.1f} MB) read back: {state}", soft_wrap=True)
        if summary.missing_at_creation:
            out.print(f"[yellow]{summary.missing_at_creation} object(s) the index referenced were not in the "
                      "store when the backup was made (listed in MANIFEST.json)[/yellow]", soft_wrap=True)
    raise typer.Exit(0 if summary.intact and not summary.missing_at_creation else 1)


@backup_app.command("restore")
def restore_command(folder: FOLDER, as_json: AS_JSON = False) -> None:
    """Restore a backup into an EMPTY index and store, after verifying all of it.

    The targets are the index and store PACS_DATABASE_URL and PACS_STORAGE_URL name (embedded: a new
    PACS_DATA_DIR); no `pacs` process may run on them. First the whole backup is verified as by
    `pacs backup verify` and both targets are checked to be empty: nothing is written to a target that holds
    anything, or from a damaged backup. Then the objects are copied (each hashed again), the index is
    restored (PostgreSQL: pg_restore in one transaction), its row counts and audit trail head are compared
    with the manifest, and an index older than this pacs is migrated. Users, API tokens, reports and the audit
    trail come back; secrets kept outside the index (PACS_AUTH_SECRET, TLS keys, storage credentials) do not:
    see deploy/backup.md.

    Exit status: 0 restored; 1 the backup is damaged (refused, nothing written) or the restore failed
    part-way (empty both targets before trying again); 2 refused (not a backup, a target not empty, a
    missing or too old pg_restore) or a server unavailable.
    """
    from sqlalchemy.exc import SQLAlchemyError

    from pacs.backup import BackupDamaged, BackupError, BackupRefused, restore_backup
    from pacs.cli.maintenance import _RichProgress
    from storage import StorageError, StorageUnavailable

    settings = load_settings()
    try:
        with _RichProgress(console) as bar:
            summary = restore_backup(settings, folder, actor=f"os:{operator()}", progress=bar)
    except BackupRefused as exc:
        console.print(f"[red]refused:[/red] {exc}")
        raise typer.Exit(2) from exc
    except BackupDamaged as exc:
        for problem in exc.problems:
            console.print(f"[red]{problem}[/red]", soft_wrap=True)
        console.print(f"[red]refused:[/red] {exc}")
        raise typer.Exit(1) from exc
    except (StorageUnavailable, SQLAlchemyError) as exc:
        raise _unavailable(exc, after="\nif the restore had begun, empty the target index and store before trying "
                           "again") from exc
    except (BackupError, StorageError, OSError) as exc:
        console.print(f"[red]restore failed:[/red] {_first_line(exc)}\nempty the target index and store before "
                      "trying again")
        raise typer.Exit(1) from exc
    if as_json:
        out.print_json(json.dumps(summary.as_dict()))
    else:
        tables = summary.tables
        migrated = f"; index migrated from {', '.join(summary.migrated_from)}" if summary.migrated_from else ""
        out.print(f"restored {folder}: {tables.get('study', 0)} studies, {tables.get('instance', 0)} instances, "
                  f"{tables.get('report', 0)} reports, {tables.get('app_user', 0)} users, "
                  f"{tables.get('audit_event', 0)} audit rows, {summary.objects} objects "
                  f"({summary.object_bytes / 1e6:.1f} MB) in {summary.seconds:.1f} s{migrated}", soft_wrap=True)
        if summary.missing_at_creation:
            out.print(f"[yellow]{summary.missing_at_creation} object(s) the index referenced were already missing "
                      "when the backup was made: `pacs check` lists them[/yellow]", soft_wrap=True)
        out.print("next: `pacs check` and `pacs audit verify`, then start the servers", soft_wrap=True)
