"""What a backup folder holds, its manifest, and the errors of `pacs backup`.

A backup is one folder::

    DIR/index.pgdump        the index: `pg_dump --format=custom` (PostgreSQL) or
    DIR/index.sqlite3       a copy made with SQLite's online backup API (embedded mode)
    DIR/index-objects.jsonl the objects that index references, as it recorded them (key, size, sha256)
    DIR/objects/<key>       every object of the store, one file per key
    DIR/objects.jsonl       what was copied: one JSON line per object (key, size, sha256), in key order
    DIR/MANIFEST.json       written last: a folder without it is an interrupted (or running) backup

The manifest carries the SHA-256 of the index file and of both lists, so every byte of the backup is covered
by a hash that `pacs backup verify` checks; nothing in the folder is trusted before that.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pacs.errors import PacsError

FORMAT = "filmless-pacs-backup/1"
MANIFEST = "MANIFEST.json"
OBJECTS_DIR = "objects"
OBJECTS_LIST = "objects.jsonl"
REFERENCES_LIST = "index-objects.jsonl"
INDEX_FILES = {"postgresql": "index.pgdump", "sqlite": "index.sqlite3"}
#: what `pacs backup create` writes; a folder holding any of these but no manifest is an incomplete backup
PARTS = (OBJECTS_DIR, OBJECTS_LIST, REFERENCES_LIST, *INDEX_FILES.values())
#: keys of missing objects kept in the manifest (the count is always exact)
MAX_LISTED_MISSING = 100
#: the manifest's fields that verify and restore rely on, and their types
_REQUIRED: dict[str, dict[str, type | tuple[type, ...]]] = {
    "index": {"kind": str, "sha256": str, "size": int, "alembic_revisions": list, "tables": dict},
    "objects": {"count": int, "bytes": int, "list_sha256": str},
    "references": {"count": int, "list_sha256": str, "missing": int},
}


class BackupError(PacsError):
    """A backup could not be made, checked or restored; the message says why."""


class BackupRefused(BackupError):
    """Refused before anything was written: not a backup, an incomplete one, a non-empty target, a missing or
    too old PostgreSQL client (exit status 2)."""


class BackupDamaged(BackupError):
    """The backup's files do not match its manifest (changed, truncated, missing): restore refuses it."""

    def __init__(self, problems: list[str]) -> None:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        super().__init__(f"the backup is damaged ({len(problems)} problem(s)): {shown}")
        self.problems = problems


@dataclass(frozen=True)
class Manifest:
    """The parsed MANIFEST.json (``data`` is the whole document, as written)."""

    folder: Path
    data: dict[str, Any]

    @property
    def index(self) -> dict[str, Any]:
        return dict(self.data["index"])

    @property
    def objects(self) -> dict[str, Any]:
        return dict(self.data["objects"])

    @property
    def references(self) -> dict[str, Any]:
        return dict(self.data["references"])

    @property
    def index_kind(self) -> str:
        return str(self.index["kind"])

    @property
    def index_path(self) -> Path:
        return self.folder / INDEX_FILES[self.index_kind]


def read_manifest(folder: Path) -> Manifest:
    """The manifest of the backup in ``folder``; :class:`BackupRefused` naming what is wrong otherwise."""
    if not folder.is_dir():
        raise BackupRefused(f"{folder} is not a folder")
    path = folder / MANIFEST
    if not path.is_file():
        present = [p for p in PARTS if (folder / p).exists()]
        if present:
            raise BackupRefused(f"{folder} is an incomplete backup: it has {', '.join(present)} but no {MANIFEST} "
                                "(the backup was interrupted or is still running); make a new one")
        raise BackupRefused(f"{folder} is not a pacs backup (no {MANIFEST}; `pacs backup create` makes one)")
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BackupRefused(f"{path} is unreadable: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else None
        raise BackupRefused(f"{path} is not a manifest of this backup format ({FORMAT}; found {found!r})")
    for section, fields in _REQUIRED.items():
        part = data.get(section)
        wrong = [name for name, kind in fields.items() if not isinstance(part, dict) or not isinstance(
            part.get(name), kind) or isinstance(part.get(name), bool)]
        if wrong:
            raise BackupRefused(f"{path} lacks a valid {section}.{wrong[0]}: not a complete manifest")
    kind = data["index"]["kind"]
    if kind not in INDEX_FILES:
        raise BackupRefused(f"{path} names an unknown index kind {kind!r}")
    return Manifest(folder, data)


def write_manifest(folder: Path, data: dict[str, Any]) -> None:
    """Write MANIFEST.json atomically and durably (temporary file, fsync, rename, fsync of the folder)."""
    tmp = folder / f".{MANIFEST}.tmp"
    with tmp.open("w", encoding="utf-8") as out:
        json.dump({"format": FORMAT, **data}, out, indent=2, sort_keys=True)
        out.write("\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, folder / MANIFEST)
    fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
