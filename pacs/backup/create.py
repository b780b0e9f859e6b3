"""`pacs backup create DIR`: the index first, then every object, then the manifest.

Order and consistency: the index is dumped from one snapshot, then the store is copied. Objects are
content-addressed and never change, and the ingest writes an object before its index row commits, so every
object the dumped index references is already in the store when the copy starts; the backup checks that it
copied each one as indexed (key, size, SHA-256) and records any it could not (deleted meanwhile, or already
missing: `pacs check` on the live archive says why). Objects written after the dump are copied too: restored,
they are orphans that `pacs check` lists and `pacs reindex --force` indexes. A quiesced archive gives a backup
whose restore `pacs check` finds clean.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection

import pacs
from pacs import audit
from pacs.backup import postgres, sqlite
from pacs.backup.facts import ALEMBIC_TABLE, IndexFacts, read_facts, table_names, write_references
from pacs.backup.layout import (
    INDEX_FILES,
    OBJECTS_LIST,
    REFERENCES_LIST,
    BackupRefused,
    fsync_dir,
    write_manifest,
)
from pacs.backup.objects import Missing, check_store_reachable, copy_store, file_sha256, find_missing
from pacs.db.engine import make_engine, make_session_factory
from pacs.maintenance import NoProgress, ProgressSink
from pacs.settings import Settings
from storage import open_store


@dataclass
class CreateSummary:
    folder: str
    index_kind: str
    index_bytes: int
    tables: dict[str, int]
    objects: int
    object_bytes: int
    references: int
    missing: Missing = field(default_factory=Missing)
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        """Every object the index references is in the backup as indexed."""
        return self.missing.count == 0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "complete": self.complete}


def index_kind(dialect: str) -> str:
    if dialect not in INDEX_FILES:
        raise BackupRefused(f"`pacs backup` handles PostgreSQL and SQLite indexes, not {dialect}")
    return dialect


def prepare_folder(folder: Path) -> None:
    """Create ``folder``; refuse one that exists and holds anything (a backup is never mixed with other files)."""
    if folder.exists():
        if not folder.is_dir():
            raise BackupRefused(f"{folder} exists and is not a folder")
        if any(folder.iterdir()):
            raise BackupRefused(f"{folder} is not empty: give a new (or empty) folder for each backup")
    folder.mkdir(parents=True, exist_ok=True)


def create_backup(settings: Settings, folder: Path, *, actor: str = "",
                  progress: ProgressSink | None = None) -> CreateSummary:
    """Back up the index and the store ``settings`` name into ``folder`` (new or empty)."""
    progress = progress or NoProgress()
    started = time.monotonic()
    started_at = datetime.now(UTC)
    engine = make_engine(settings.effective_database_url)
    try:
        kind = index_kind(engine.dialect.name)
        if kind == "sqlite" and not sqlite.database_path(engine).is_file():  # connecting would create it
            raise BackupRefused(f"there is no index at {sqlite.database_path(engine)} (is PACS_DATA_DIR right?): "
                                "nothing to back up")
        with engine.connect() as conn:
            if ALEMBIC_TABLE not in table_names(conn):
                raise BackupRefused("the index has no pacs schema (is PACS_DATABASE_URL right?): nothing to back up")
        store = open_store(settings.effective_storage_url)
        check_store_reachable(store)
        prepare_folder(folder)
        # in the trail before the dump, so the backup holds the record of its own making
        audit.record(make_session_factory(engine), action="backup.create", actor=actor, role="operator",
                     source_address="cli", detail=f"folder={folder.resolve()}")

        def read(conn: Connection) -> tuple[IndexFacts, int, str]:
            facts = read_facts(conn)
            count, list_sha = write_references(conn, folder / REFERENCES_LIST)
            return facts, count, list_sha

        index_path = folder / INDEX_FILES[kind]
        progress.phase("index", None)
        dump = postgres.dump if kind == "postgresql" else sqlite.dump
        (facts, ref_count, ref_sha), tool_info = dump(engine, index_path, read)
        index_size, index_sha = file_sha256(index_path)
        progress.advance(1, index_size)
        copied = copy_store(store, folder, progress)
        missing = find_missing(folder / REFERENCES_LIST, folder / OBJECTS_LIST)
        fsync_dir(folder)
        summary = CreateSummary(str(folder), kind, index_size, facts.tables, copied.count, copied.bytes, ref_count,
                                missing, round(time.monotonic() - started, 3))
        write_manifest(folder, {
            "pacs_version": pacs.__version__,
            "created_at": started_at.isoformat(),
            "finished_at": datetime.now(UTC).isoformat(),
            "source": {"index": engine.url.render_as_string(hide_password=True), "store": store.describe()},
            "index": {"kind": kind, "file": index_path.name, "size": index_size, "sha256": index_sha,
                      "alembic_revisions": facts.alembic_revisions, "tables": facts.tables,
                      "audit_rows": facts.audit_rows, "audit_last_hash": facts.audit_last_hash, **tool_info},
            "objects": {"list": OBJECTS_LIST, "count": copied.count, "bytes": copied.bytes,
                        "list_sha256": copied.list_sha256},
            "references": {"list": REFERENCES_LIST, "count": ref_count, "list_sha256": ref_sha,
                           "missing": missing.count, "missing_keys": missing.keys},
        })
        return summary
    finally:
        engine.dispose()
