"""Data at rest is the archive's owner's alone (SPEC §7): file modes at start-up and in ``pacs check``.

Every ``pacs`` command sets an owner-only umask (0o077) before it does anything else, so whatever
it creates — the data folder, the SQLite index and its WAL, objects of the filesystem store, their
folders and temporary files, derived thumbnails and metadata, secrets — is 0700 (folders) or 0600
(files), whatever the umask of the shell or unit that started it. An archive created by an older
release (0755 folders, 0644 files) is not changed behind the operator's back: ``pacs check``
reports what group or others may read or write (:func:`lax_modes`), with the command that fixes it.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

OWNER_ONLY_UMASK = 0o077
GROUP_OTHER_BITS = 0o077
EXAMPLES = 3  # paths named per warning; a store of millions of files gets one line, not millions
SQLITE_SUFFIXES = ("", "-wal", "-shm", "-journal")


def restrict_new_files() -> int:
    """Owner-only umask for this process and its children; returns the previous one."""
    return os.umask(OWNER_ONLY_UMASK)


@dataclass(frozen=True)
class LaxModes:
    """Entries under ``root`` (or ``root`` itself) that group or others may access."""

    root: str
    count: int
    examples: tuple[str, ...]

    def message(self) -> str:
        if self.examples == (self.root,):
            return (f"{self.root} is open to group or others (patient data is the owner's only): "
                    f"chmod go-rwx {self.root}")
        shown = ", ".join(self.examples) + (", …" if self.count > len(self.examples) else "")
        return (f"{self.count} file(s)/folder(s) under {self.root} are open to group or others ({shown}); "
                f"patient data is the owner's only: chmod -R go-rwx {self.root}")


def lax_modes(files: Iterable[Path], trees: Iterable[Path]) -> list[LaxModes]:
    """What group or others may access: each of ``files`` (and folders) itself, and ``trees`` whole.

    Symbolic links are not followed; paths that do not exist are skipped.
    """
    out: list[LaxModes] = []
    for path in files:
        if _is_lax(path):
            out.append(LaxModes(str(path), 1, (str(path),)))
    for root in trees:
        count, examples = 0, list[str]()
        for path in _walk(root):
            if _is_lax(path):
                count += 1
                if len(examples) < EXAMPLES:
                    examples.append(str(path))
        if count:
            out.append(LaxModes(str(root), count, tuple(examples)))
    return out


def archive_paths(database_url: str, store_root: Path | None) -> tuple[list[Path], list[Path]]:
    """(single paths, trees) to check: the SQLite index, its WAL files and its folder (the data folder in
    the embedded layout), and the filesystem store's whole tree. PostgreSQL and S3 keep their own."""
    files: list[Path] = []
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        db = Path(url.database).absolute()
        files += [db.parent, *(db.with_name(db.name + suffix) for suffix in SQLITE_SUFFIXES)]
    trees = [store_root.absolute()] if store_root is not None else []
    return files, trees


def _is_lax(path: Path) -> bool:
    try:
        mode = path.lstat().st_mode
    except OSError:
        return False
    return not stat.S_ISLNK(mode) and bool(mode & GROUP_OTHER_BITS)


def _walk(root: Path) -> Iterator[Path]:
    if not root.is_dir():
        return
    yield root
    for folder, dirnames, filenames in os.walk(root):
        base = Path(folder)
        for name in (*dirnames, *filenames):
            yield base / name


def archive_warnings(sessions: sessionmaker[Session], store: object) -> list[str]:
    """``pacs check``'s warnings about lax modes of the index and store behind ``sessions`` and ``store``."""
    bind = sessions.kw.get("bind")
    url = str(bind.url.render_as_string(hide_password=False)) if bind is not None else "postgresql://"
    root = getattr(store, "root", None)  # a FilesystemStore's folder; S3 has none
    files, trees = archive_paths(url, root if isinstance(root, Path) else None)
    return [lax.message() for lax in lax_modes(files, trees)]
