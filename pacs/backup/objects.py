"""The objects of a backup: copy the store into ``DIR/objects``, check them, put them back.

Everything streams one object at a time in 1 MiB chunks (never a study in memory), and the lists are read and
written one line at a time in key order, so comparing two of them is a merge, not a set held in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, BinaryIO

from pacs.backup.layout import MAX_LISTED_MISSING, OBJECTS_DIR, OBJECTS_LIST, BackupDamaged, BackupError
from pacs.maintenance import NoProgress, ProgressSink
from storage import ObjectNotFound, ObjectStore, StorageError
from storage.base import CHUNK_SIZE
from storage.filesystem import FilesystemStore
from storage.keys import validate_key

_CONTENT_TYPES = {".dcm": "application/dicom", ".jpg": "image/jpeg", ".json": "application/json"}


@dataclass(frozen=True)
class Entry:
    """One line of a list: an object's key, size and SHA-256 (hex)."""

    key: str
    size: int
    sha256: str

    def line(self) -> str:
        return json.dumps({"key": self.key, "size": self.size, "sha256": self.sha256}, separators=(",", ":")) + "\n"


@dataclass
class CopySummary:
    count: int = 0
    bytes: int = 0
    list_sha256: str = ""


@dataclass
class Missing:
    """References of the index with no identical object in the backup."""

    count: int = 0
    keys: list[str] = field(default_factory=list)

    def add(self, key: str) -> None:
        self.count += 1
        if len(self.keys) < MAX_LISTED_MISSING:
            self.keys.append(key)


class HashingReader:
    """Reads a stream through, counting its bytes and hashing them."""

    def __init__(self, source: BinaryIO) -> None:
        self._source = source
        self._hash = hashlib.sha256()
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(size)
        self._hash.update(data)
        self.count += len(data)
        return data

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()


class ListWriter:
    """Writes a list one line at a time and hashes what it wrote."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._hash = hashlib.sha256()

    def write(self, entry: Entry) -> None:
        line = entry.line()
        self._out.write(line)
        self._hash.update(line.encode("utf-8"))

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()


def read_list(path: Path, *, strictly_increasing: bool = True) -> Iterator[Entry]:
    """The entries of a list file in key order; :class:`BackupDamaged` on a malformed or unordered line."""
    previous = ""
    with path.open("r", encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            try:
                raw = json.loads(line)
                entry = Entry(validate_key(raw["key"]), int(raw["size"]), str(raw["sha256"]))
            except (ValueError, KeyError, TypeError) as exc:
                raise BackupDamaged([f"{path.name} line {number} is malformed: {exc}"]) from exc
            if entry.key < previous or (strictly_increasing and entry.key == previous):
                raise BackupDamaged([f"{path.name} line {number} is out of key order"])
            previous = entry.key
            yield entry


def file_sha256(path: Path, progress: ProgressSink | None = None) -> tuple[int, str]:
    """Size and SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as src:
        while chunk := src.read(CHUNK_SIZE):
            digest.update(chunk)
            size += len(chunk)
            if progress is not None:
                progress.advance(0, len(chunk))
    return size, digest.hexdigest()


def store_is_empty(store: ObjectStore) -> bool:
    return next(iter(store.list("")), None) is None


def content_type(key: str) -> str:
    return next((t for suffix, t in _CONTENT_TYPES.items() if key.endswith(suffix)), "application/octet-stream")


def copy_store(store: ObjectStore, folder: Path, progress: ProgressSink | None = None) -> CopySummary:
    """Copy every object of ``store`` into ``folder/objects`` and list them in ``folder/objects.jsonl``.

    The list records what was read (its size and SHA-256 as copied), in the store's key order. An object
    deleted between the listing and its copy is left out (a study deleted while the backup runs).
    """
    progress = progress or NoProgress()
    target = FilesystemStore(folder / OBJECTS_DIR)
    summary = CopySummary()
    progress.phase("objects", None)
    with (folder / OBJECTS_LIST).open("w", encoding="utf-8") as out:
        writer = ListWriter(out)
        for info in store.list(""):
            try:
                with store.open(info.key) as src:
                    reader = HashingReader(src)
                    target.put(info.key, reader)  # type: ignore[arg-type]  # read() is all put uses
            except ObjectNotFound:
                continue  # deleted since it was listed; if the dumped index references it, find_missing says so
            writer.write(Entry(info.key, reader.count, reader.sha256))
            summary.count += 1
            summary.bytes += reader.count
            progress.advance(1, reader.count)
        out.flush()
        os.fsync(out.fileno())
    summary.list_sha256 = writer.sha256
    return summary


def find_missing(references: Path, objects: Path) -> Missing:
    """References (key, size, SHA-256 as the index holds them) with no identical object in the objects list."""
    missing = Missing()
    copied = read_list(objects)
    current = next(copied, None)
    for ref in read_list(references, strictly_increasing=False):
        while current is not None and current.key < ref.key:
            current = next(copied, None)
        if current is None or current.key != ref.key or current.size != ref.size or current.sha256 != ref.sha256:
            missing.add(ref.key)
    return missing


def verify_objects(folder: Path, progress: ProgressSink | None = None) -> tuple[int, int, list[str]]:
    """Read back every object the list names: (objects, bytes, problems); files no line names are problems too."""
    progress = progress or NoProgress()
    if not (folder / OBJECTS_DIR).is_dir():
        return 0, 0, [f"the folder {OBJECTS_DIR}/ is missing"]
    files = FilesystemStore(folder / OBJECTS_DIR)  # exists: constructing it writes nothing
    problems: list[str] = []
    count = nbytes = 0
    listed = iter(files.list(""))
    present = next(listed, None)
    try:
        for entry in read_list(folder / OBJECTS_LIST):
            while present is not None and present.key < entry.key:
                problems.append(f"unlisted file objects/{present.key}")
                present = next(listed, None)
            if present is None or present.key != entry.key:
                problems.append(f"missing file objects/{entry.key}")
                continue
            present = next(listed, None)
            size, sha = file_sha256(folder / OBJECTS_DIR / entry.key)
            count += 1
            nbytes += size
            progress.advance(1, size)
            if size != entry.size:
                problems.append(f"objects/{entry.key}: {size} bytes, listed with {entry.size}")
            elif sha != entry.sha256:
                problems.append(f"objects/{entry.key}: SHA-256 differs from the list (changed or corrupt)")
    except BackupDamaged as exc:
        problems.extend(exc.problems)
    except (OSError, StorageError) as exc:
        problems.append(f"objects unreadable: {exc}")
    while present is not None:
        problems.append(f"unlisted file objects/{present.key}")
        present = next(listed, None)
    return count, nbytes, problems


def restore_objects(folder: Path, store: ObjectStore, total: int, progress: ProgressSink | None = None) -> int:
    """Put every listed object into ``store``, checking each one's size and SHA-256 on the way; returns bytes.

    An object that does not match its line (the backup changed after it was verified) is removed from the
    store again and the restore stops with :class:`BackupDamaged`.
    """
    progress = progress or NoProgress()
    files = FilesystemStore(folder / OBJECTS_DIR)
    progress.phase("objects", total)
    nbytes = 0
    for entry in read_list(folder / OBJECTS_LIST):
        with files.open(entry.key) as src:
            reader = HashingReader(src)
            store.put(entry.key, reader, length=entry.size,  # type: ignore[arg-type]  # read() is all put uses
                      content_type=content_type(entry.key))
        if reader.count != entry.size or reader.sha256 != entry.sha256:
            store.delete(entry.key)
            raise BackupDamaged([f"objects/{entry.key} changed while it was restored"])
        nbytes += entry.size
        progress.advance(1, entry.size)
    return nbytes


def check_store_reachable(store: ObjectStore) -> None:
    """Raise :class:`BackupError` when the store cannot be used (a clearer message than a listing error)."""
    try:
        store.ping()
    except StorageError as exc:
        raise BackupError(f"object store {store.describe()} unavailable: {exc}") from exc
