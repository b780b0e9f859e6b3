"""What the `pacs` commands share: consoles, settings from the environment, the schema check, the context."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from sqlalchemy.orm import Session

from pacs.context import AppContext
from pacs.settings import Settings

if TYPE_CHECKING:
    from pacs.security.principal import Principal

# soft_wrap: a message is one line however narrow the terminal (or 80 columns when piped to a file or a log:
# a warning cut in the middle of a setting's name cannot be found with grep); tables still fit the width
console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


def load_settings(role: str | None = None) -> Settings:
    """Settings from the environment, and logging set up for them (``role``: the server process this is, named
    in JSON log lines and in ``pacs_process_info``; one-shot commands are ``cli``)."""
    from pacs import logging_setup

    try:
        settings = Settings()
    except Exception as exc:
        console.print(f"[red]invalid configuration:[/red] {exc}")
        raise typer.Exit(2) from exc
    if role is not None:
        logging_setup.set_role(role)
    logging_setup.configure(settings.log_level, settings.log_format)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    from pacs.security.redaction import install_log_redaction

    install_log_redaction()  # no credential from a URL in any log line (issue 12, finding 10)
    return settings


def ensure_schema(settings: Settings, upgrade: bool) -> None:
    from pacs.db import migrate
    from pacs.db.engine import make_engine

    if not settings.database_url:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.effective_database_url)
    try:
        if upgrade:
            migrate.upgrade(engine)
        elif not migrate.is_current(engine):
            console.print("[red]the index schema is not current: run `pacs db upgrade` first[/red]")
            raise typer.Exit(2)
    finally:
        engine.dispose()


def open_context() -> AppContext:
    """Settings from the environment, a current schema, and the process's context: what most commands need."""
    settings = load_settings()
    ensure_schema(settings, upgrade=False)
    return AppContext.create(settings)


@contextmanager
def operation() -> Iterator[AppContext]:
    """The process's context for one command calling the core; a PacsError becomes the operator's message and
    exit 1; the context is closed either way."""
    from pacs.errors import PacsError

    ctx = open_context()
    try:
        yield ctx
    except PacsError as exc:
        raise fail(exc) from exc
    finally:
        ctx.close()


@contextmanager
def transaction() -> Iterator[Session]:
    """One write transaction of a command on the process's context (:func:`operation`; nothing of the transaction
    is kept when it fails)."""
    with operation() as ctx, ctx.sessions() as session, session.begin():
        yield session


def fail(exc: Exception) -> typer.Exit:
    """Print a PacsError for the operator and exit 1."""
    console.print(f"[red]{exc}[/red]")
    return typer.Exit(1)


def operator() -> str:
    """Who runs this command, for the audit trail (the OS account; sudo's caller when present)."""
    import getpass
    import os

    return os.environ.get("SUDO_USER") or getpass.getuser()


def cli_principal() -> Principal:
    """The operator running a command, as the principal the core's operations take: an archive-wide admin
    (whoever can run `pacs` on the server can read its index anyway), named ``os:<account>`` in the audit trail."""
    from pacs.security.principal import Principal
    from pacs.security.roles import Capability, Role

    return Principal(subject=f"os:{operator()}", role=Role.ADMIN, capabilities=frozenset(Capability), kind="cli",
                     source_address="cli")


def audit_config_change(session: Session, action: str, detail: str) -> None:
    """Audit a configuration change made from the command line, in the change's own transaction."""
    from pacs import audit

    audit.append(session, action=action, actor=f"os:{operator()}", role="operator", source_address="cli",
                 detail=detail)
