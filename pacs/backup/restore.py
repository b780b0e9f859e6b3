"""`pacs backup restore DIR`: into an empty index and an empty store, after the whole backup is verified.

Nothing is written before the backup has been read back whole and found intact and both targets found empty
(a restore never merges into a running archive). Then the objects go first, the index last (as the ingest
does: an object before the row that references it); the restored index's row counts and audit trail head are
compared with the manifest; an index older than this code's schema is migrated.
"""

from __future__ import annotations

import sqlite3
import time
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Engine

from pacs import audit
from pacs.backup import postgres, sqlite
from pacs.backup.create import index_kind
from pacs.backup.facts import read_facts, table_names
from pacs.backup.layout import BackupDamaged, BackupError, BackupRefused, Manifest, read_manifest
from pacs.backup.objects import check_store_reachable, restore_objects, store_is_empty
from pacs.backup.verify import verify_backup
from pacs.db import migrate
from pacs.db.engine import make_engine, make_session_factory
from pacs.maintenance import NoProgress, ProgressSink
from pacs.settings import Settings
from storage import ObjectStore, open_store


@dataclass
class RestoreSummary:
    folder: str
    index_kind: str
    tables: dict[str, int]
    objects: int
    object_bytes: int
    migrated_from: list[str]  # the backup's revisions when the index was migrated, else empty
    missing_at_creation: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_revisions(manifest: Manifest) -> list[str]:
    revisions = [str(r) for r in manifest.index["alembic_revisions"]]
    if not revisions:
        raise BackupRefused("the backup's index has no schema revision: not a pacs index")
    scripts = ScriptDirectory.from_config(migrate.alembic_config("sqlite://"))
    for revision in revisions:
        try:
            known = scripts.get_revision(revision)
        except CommandError:
            known = None
        if known is None:
            raise BackupRefused(f"the backup's index is at schema revision {revision}, which this pacs does not know: "
                                f"it was made by a newer version (pacs {manifest.data.get('pacs_version')}); "
                                "restore it with that version or newer")
    return revisions


def _index_is_empty(engine: Engine, kind: str) -> bool:
    if kind == "sqlite":  # not through the engine: connecting would create the file
        path = sqlite.database_path(engine)
        if not path.exists():
            return True
        with closing(sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)) as conn:
            return conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0] == 0
    with engine.connect() as conn:
        return not table_names(conn)


def _compare(manifest: Manifest, engine: Engine) -> None:
    with engine.connect() as conn:
        facts = read_facts(conn)
    expected = {str(k): int(v) for k, v in manifest.index["tables"].items()}
    if facts.tables != expected:
        differ = sorted(n for n in set(expected) | set(facts.tables) if expected.get(n) != facts.tables.get(n))
        raise BackupError(f"the restored index differs from the backup's in table(s) {', '.join(differ)}")
    if facts.audit_last_hash != manifest.index.get("audit_last_hash", ""):
        raise BackupError("the restored audit trail does not end with the backup's last hash")


def restore_backup(settings: Settings, folder: Path, *, actor: str = "",
                   progress: ProgressSink | None = None) -> RestoreSummary:
    """Restore the backup in ``folder`` into the (empty) index and store ``settings`` name."""
    progress = progress or NoProgress()
    started = time.monotonic()
    manifest = read_manifest(folder)
    revisions = _check_revisions(manifest)
    engine = make_engine(settings.effective_database_url)
    try:
        kind = index_kind(engine.dialect.name)
        if kind != manifest.index_kind:
            raise BackupRefused(f"the backup holds a {manifest.index_kind} index and the target index is {kind}: "
                                "restore into the same kind of index")
        tool = postgres.check_restore_tools(engine, manifest.index) if kind == "postgresql" else None
        if not _index_is_empty(engine, kind):
            shown = engine.url.render_as_string(hide_password=True)
            raise BackupRefused(f"the target index {shown} is not empty: restore "
                                "needs an empty database (create a new one, or point PACS_DATABASE_URL / "
                                "PACS_DATA_DIR at one)")
        store: ObjectStore = open_store(settings.effective_storage_url)
        check_store_reachable(store)
        if not store_is_empty(store):
            raise BackupRefused(f"the target object store {store.describe()} is not empty: restore needs an empty "
                                "bucket or folder")
        verified = verify_backup(folder, progress)
        if not verified.intact:
            raise BackupDamaged(verified.problems)

        try:
            restored_bytes = restore_objects(folder, store, verified.objects, progress)
        except BackupDamaged as exc:  # changed since it was verified: part of it is in the store now
            raise BackupError(f"{exc} (since it was verified); the target store holds part of the backup") from exc
        progress.phase("index", None)
        if tool is not None:
            postgres.restore(engine, manifest.index_path, tool)
        else:
            sqlite.restore(engine, manifest.index_path)
        progress.advance(1, manifest.index_path.stat().st_size)
        _compare(manifest, engine)
        migrated: list[str] = []
        if set(revisions) != migrate.head_revisions():
            migrate.upgrade(engine)
            migrated = revisions
        audit.record(make_session_factory(engine), action="backup.restore", actor=actor, role="operator",
                     source_address="cli", detail=f"folder={folder.resolve()} created_at="
                     f"{manifest.data.get('created_at', '')} migrated_from={','.join(migrated) or '-'}")
        return RestoreSummary(str(folder), kind, dict(manifest.index["tables"]), verified.objects, restored_bytes,
                              migrated, verified.missing_at_creation, round(time.monotonic() - started, 3))
    finally:
        engine.dispose()
