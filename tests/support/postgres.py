"""A throw-away database on the machine's real PostgreSQL server."""

from __future__ import annotations

import atexit
import contextlib
import os
import time
import uuid

import psycopg
from psycopg import sql

ADMIN_URL = os.environ.get("PACS_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")


def create_database() -> tuple[str, str]:
    """Create an empty database; returns (name, SQLAlchemy URL)."""
    name = f"pacs_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    base = ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    return name, f"{base}/{name}"


def drop_database(name: str) -> None:
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


_template: str | None = None  # this process's migrated template database (created on first use)


def create_migrated_database() -> tuple[str, str]:
    """A database with the newest schema, as `pacs db upgrade` leaves it: a copy (CREATE DATABASE ... TEMPLATE)
    of one database this test process migrated with the real migrations on first use, instead of running
    every migration again for each stack (tests/test_cli.py and tests/test_migrations.py run them as such)."""
    global _template
    if _template is None:
        from pacs.db import migrate
        from pacs.db.engine import make_engine

        name, url = create_database()
        engine = make_engine(url)
        try:
            migrate.upgrade(engine)
        finally:
            engine.dispose()  # a template must have no session open while it is copied
        atexit.register(_drop_quietly, name)
        _template = name
    name = f"pacs_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        for attempt in range(50):
            try:
                conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name),
                                                                            sql.Identifier(_template)))
                break
            except psycopg.errors.ObjectInUse:  # autovacuum visiting the template: copying needs it alone
                if attempt == 49:
                    raise
                time.sleep(0.1)
    base = ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    return name, f"{base}/{name}"


def _drop_quietly(name: str) -> None:
    with contextlib.suppress(psycopg.Error):
        drop_database(name)
