"""What a backup records about its index, read in the same snapshot as the dump.

- the Alembic revision(s), so a restore knows whether to migrate and refuses a backup newer than its code;
- the row count of every table and the audit trail's last hash, compared again after a restore;
- the objects the index references (the rows `pacs check` verifies), in key order, so the backup can prove
  it holds every one of them as indexed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Connection, column, func, inspect, select, table, union_all

from pacs.backup.objects import Entry, ListWriter
from pacs.db.models import AuditEvent
from pacs.maintenance.check import _REFERENCING  # the rows `pacs check` verifies: one definition for both

ALEMBIC_TABLE = "alembic_version"


@dataclass(frozen=True)
class IndexFacts:
    alembic_revisions: list[str]
    tables: dict[str, int]
    audit_rows: int
    audit_last_hash: str


def table_names(conn: Connection) -> list[str]:
    return sorted(inspect(conn).get_table_names())


def read_facts(conn: Connection) -> IndexFacts:
    """Revisions, row counts and audit trail head of the index ``conn`` sees (an empty revision list: no schema)."""
    names = table_names(conn)
    revisions: list[str] = []
    if ALEMBIC_TABLE in names:
        version = table(ALEMBIC_TABLE, column("version_num")).c.version_num
        revisions = sorted(conn.execute(select(version)).scalars())
    counts = {name: int(conn.execute(select(func.count()).select_from(table(name))).scalar_one()) for name in names}
    last_hash = ""
    if AuditEvent.__tablename__ in names:
        last_hash = conn.execute(select(AuditEvent.entry_hash).order_by(AuditEvent.id.desc()).limit(1)
                                 ).scalar_one_or_none() or ""
    return IndexFacts(revisions, counts, counts.get(AuditEvent.__tablename__, 0), last_hash)


def write_references(conn: Connection, path: Path) -> tuple[int, str]:
    """Write the objects the index references (key, size, SHA-256), in key order; returns (count, list SHA-256)."""
    present = set(table_names(conn))
    models = [m for m in _REFERENCING if m.__tablename__ in present]
    count = 0
    with path.open("w", encoding="utf-8") as out:
        writer = ListWriter(out)
        if models:
            rows = union_all(*(select(m.object_key.label("key"), m.size.label("size"), m.sha256.label("sha256"))
                               for m in models)).subquery()
            # byte order, as the store lists keys (PostgreSQL's default collation sorts '.' and '/' otherwise)
            key = rows.c.key.collate("C") if conn.dialect.name == "postgresql" else rows.c.key
            result = conn.execution_options(stream_results=True, yield_per=2000).execute(
                select(rows.c.key, rows.c.size, rows.c.sha256).order_by(key))
            for object_key, size, sha256 in result:
                writer.write(Entry(object_key, int(size or 0), sha256 or ""))
                count += 1
        out.flush()
        os.fsync(out.fileno())
    return count, writer.sha256
