"""The SQLite index (embedded mode): copies made with SQLite's online backup API.

The backup API copies a consistent snapshot page by page while other processes keep reading and writing
(WAL), which a file copy does not. The copy is switched to a rollback journal so the backup is one file.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Connection, Engine, create_engine

from pacs.backup.layout import BackupRefused

T = TypeVar("T")


def database_path(engine: Engine) -> Path:
    """The file of a SQLite engine; :class:`BackupRefused` for an in-memory database."""
    name = engine.url.database
    if not name or name == ":memory:" or name.startswith("file::memory:"):
        raise BackupRefused("the index is an in-memory SQLite database: there is nothing to back up or restore into")
    return Path(name)


def _copy(source: Path, target: Path, *, source_read_only: bool) -> None:
    uri = source.resolve().as_uri() + ("?mode=ro" if source_read_only else "")
    with closing(sqlite3.connect(uri, uri=True)) as src, closing(sqlite3.connect(target)) as dst:
        src.execute("PRAGMA busy_timeout=30000")
        src.backup(dst)
        dst.execute("PRAGMA journal_mode=DELETE")
        dst.commit()


def dump(engine: Engine, path: Path, read: Callable[[Connection], T]) -> tuple[T, dict[str, str]]:
    """Copy the index into ``path``, then call ``read`` on a connection to that copy."""
    source = database_path(engine)
    if not source.is_file():
        raise BackupRefused(f"the index {source} does not exist: nothing to back up")
    _copy(source, path, source_read_only=False)
    copy = create_engine(f"sqlite:///{path}")
    try:
        with copy.connect() as conn:
            result = read(conn)
    finally:
        copy.dispose()
    return result, {"sqlite_version": sqlite3.sqlite_version}


def restore(engine: Engine, path: Path) -> None:
    """Copy the backup's index file into the (empty or missing) database file of ``engine``."""
    target = database_path(engine)
    target.parent.mkdir(parents=True, exist_ok=True)
    _copy(path, target, source_read_only=True)
