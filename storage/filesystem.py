"""Object store on a local (or mounted) filesystem: one file per key under ``root``."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from storage.base import CHUNK_SIZE, ObjectInfo, normalize_source
from storage.errors import ObjectNotFound, StorageError, StorageUnavailable
from storage.keys import is_valid_segment, validate_key, validate_prefix

#: Temp files live next to their target (so os.replace is atomic) and are never listed.
TMP_PREFIX = ".tmp-"

# Errors that say "the disk/mount is in trouble", not "your request is wrong".
_UNAVAILABLE_ERRNOS = frozenset(
    e
    for e in (
        errno.ENOSPC,
        errno.EIO,
        errno.EROFS,
        errno.ENOMEM,
        getattr(errno, "EDQUOT", None),
        getattr(errno, "ESTALE", None),
        getattr(errno, "ENOTCONN", None),
        getattr(errno, "ETIMEDOUT", None),
    )
    if e is not None
)
_MISSING_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR})


def _translate(exc: OSError, key: str, *, missing_is_not_found: bool = True) -> StorageError:
    if missing_is_not_found and exc.errno in _MISSING_ERRNOS:
        return ObjectNotFound(key)
    if exc.errno in _UNAVAILABLE_ERRNOS:
        return StorageUnavailable(f"filesystem store unavailable ({key!r}): {exc}")
    return StorageError(f"filesystem store error ({key!r}): {exc}")


@contextlib.contextmanager
def _os_errors(key: str, *, missing_is_not_found: bool = True) -> Iterator[None]:
    """Translate OSError raised by our own file operations (never the caller's stream)."""
    try:
        yield
    except OSError as exc:
        raise _translate(exc, key, missing_is_not_found=missing_is_not_found) from exc


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FilesystemStore:
    """Keys map to files below ``root``; writes go through a temp file + fsync + rename."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).absolute()
        with _os_errors(str(self.root), missing_is_not_found=False):
            self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"FilesystemStore({str(self.root)!r})"

    def describe(self) -> str:
        return f"file://{self.root}"

    def _path(self, key: str) -> Path:
        validate_key(key)
        return self.root.joinpath(*key.split("/"))

    # -- writing ---------------------------------------------------------------------------------

    def _make_parents(self, key: str, parent: Path) -> list[Path]:
        """Create the folders between root and ``parent``; the folders whose entries changed (to fsync).

        Deliberately never creates ``root`` itself: if the volume behind it has
        been unmounted we must fail, not quietly fill the disk underneath.
        The caller fsyncs the returned folders after its file's own fsyncs (not one by one here): the order of
        the fsyncs does not matter as long as all are done before ``put`` returns, and on a journalling
        filesystem the file's fsync has then already committed the new folders, so theirs cost little.
        """
        if parent.is_dir():
            return []
        if not self.root.is_dir():
            raise StorageUnavailable(f"filesystem store root is missing: {self.root}")
        changed: list[Path] = []
        current = self.root
        for part in parent.relative_to(self.root).parts:
            current = current / part
            try:
                os.mkdir(current)
            except FileExistsError:
                if not current.is_dir():
                    raise StorageError(f"key {key!r} conflicts with an existing object {current}") from None
                if current == parent:  # missing a moment ago: a concurrent put made it and may not have synced it
                    changed.append(current.parent)
                continue
            except OSError as exc:
                raise _translate(exc, key, missing_is_not_found=False) from exc
            changed.append(current.parent)
        return changed

    def _create_temp(self, key: str, parent: Path) -> tuple[Path, BinaryIO, list[Path]]:
        # A concurrent delete may prune a just-created empty folder: retry a few times.
        changed: list[Path] = []
        for attempt in range(3):
            changed += self._make_parents(key, parent)
            tmp = parent / f"{TMP_PREFIX}{uuid.uuid4().hex}"
            try:
                return tmp, open(tmp, "xb"), changed  # closed by put()
            except FileNotFoundError as exc:
                if attempt == 2:
                    raise _translate(exc, key, missing_is_not_found=False) from exc
            except OSError as exc:
                raise _translate(exc, key, missing_is_not_found=False) from exc
        raise AssertionError("unreachable")

    def put(
        self,
        key: str,
        data: bytes | BinaryIO,
        length: int | None = None,
        content_type: str = "application/octet-stream",
        *,
        durable: bool = True,
    ) -> None:
        """Write a temp file beside the target, fsync it, rename it over the target, then fsync the folder (and
        any folder made for it).

        ``durable=False`` skips only the file's own fsync. The folder's still makes the rename (and any earlier
        unlink or rename in that folder) last, so after a power cut the key names this object's bytes or a cut-short
        copy of them (empty, or a hole of zeros: ext4's default ``data=ordered``, XFS and btrfs never show another
        file's old blocks), never an earlier object under the same key, e.g. a deleted instance's fragment."""
        path = self._path(key)
        source, _ = normalize_source(data, length)
        tmp, out, new_folders = self._create_temp(key, path.parent)
        try:
            with out:
                while True:
                    chunk = source.read(CHUNK_SIZE)  # the caller's errors pass through untranslated
                    if not chunk:
                        break
                    with _os_errors(key, missing_is_not_found=False):
                        out.write(chunk)
                with _os_errors(key, missing_is_not_found=False):
                    out.flush()
                    if durable:
                        os.fsync(out.fileno())
            try:
                os.replace(tmp, path)
            except IsADirectoryError:
                raise StorageError(f"key {key!r} conflicts with an existing key prefix") from None
            except OSError as exc:
                raise _translate(exc, key, missing_is_not_found=False) from exc
            with _os_errors(key, missing_is_not_found=False):
                _fsync_dir(path.parent)
                for folder in reversed(new_folders):  # the deepest first: each entry, then the one above
                    _fsync_dir(folder)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def delete(self, key: str) -> None:
        """Unlink the file, then fsync its folder: once this returns, a power cut cannot bring the object back.

        Callers record a deletion as done right after (a tombstone marked gone, an index row removed); an unlink
        still only in memory would come back after a power cut as an object no row names, an orphan that ``pacs
        reindex`` would index again: a deleted instance back in the archive."""
        path = self._path(key)
        try:
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return
        except OSError as exc:
            if exc.errno == errno.EPERM and path.is_dir():  # unlink(2) on a folder: not an object
                return
            raise _translate(exc, key, missing_is_not_found=False) from exc
        with _os_errors(key, missing_is_not_found=False):
            self._sync_removal(path.parent)
        self._prune_empty_parents(path.parent)

    def _sync_removal(self, folder: Path) -> None:
        """fsync the folder a name was just removed from; pruned meanwhile by a concurrent delete, the nearest
        folder left above it (whose entry removal, journaled after the unlink, cannot last without it)."""
        while True:
            try:
                _fsync_dir(folder)
                return
            except FileNotFoundError:
                if folder == self.root:
                    raise
                folder = folder.parent

    def _prune_empty_parents(self, folder: Path) -> None:
        """Best effort: remove folders left empty by a delete, up to (not including) root."""
        while folder != self.root and self.root in folder.parents:
            try:
                os.rmdir(folder)
            except OSError:
                return
            folder = folder.parent

    # -- reading ---------------------------------------------------------------------------------

    def open(self, key: str) -> BinaryIO:
        path = self._path(key)
        with _os_errors(key):
            return open(path, "rb")  # the caller owns (and closes) the stream

    def get_bytes(self, key: str) -> bytes:
        with self.open(key) as f, _os_errors(key):
            return f.read()

    def _stat_file(self, key: str) -> os.stat_result:
        path = self._path(key)
        with _os_errors(key):
            st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise ObjectNotFound(key)
        return st

    def exists(self, key: str) -> bool:
        try:
            self._stat_file(key)
        except ObjectNotFound:
            return False
        return True

    def size(self, key: str) -> int:
        return self._stat_file(key).st_size

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        validate_prefix(prefix)
        head, _, partial = prefix.rpartition("/")
        folder = self.root.joinpath(*head.split("/")) if head else self.root
        return self._walk(folder, f"{head}/" if head else "", partial)

    def _walk(self, folder: Path | str, key_prefix: str, name_prefix: str) -> Iterator[ObjectInfo]:
        """Depth-first walk in key order; holds one folder's entries in memory at a time.

        Sorting folder entries as ``name + "/"`` (files as ``name``) makes the
        depth-first order equal the plain string order of the full keys, e.g.
        ``a-b`` < ``a.b`` < ``a/x`` (``-`` and ``.`` sort before ``/``).
        """
        try:
            with os.scandir(folder) as it:
                entries = [
                    (e.name + "/" if e.is_dir(follow_symlinks=False) else e.name, e)
                    for e in it
                    # Temp files start with '.', and stray files that no key could name are ignored.
                    if e.name.startswith(name_prefix) and is_valid_segment(e.name)
                ]
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            raise _translate(exc, key_prefix or "/", missing_is_not_found=False) from exc
        entries.sort(key=lambda pair: pair[0])
        for sort_name, entry in entries:
            if sort_name.endswith("/"):
                yield from self._walk(entry.path, key_prefix + sort_name, "")
            elif entry.is_file(follow_symlinks=False):
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:  # deleted while we were listing
                    continue
                except OSError as exc:
                    raise _translate(exc, key_prefix + entry.name, missing_is_not_found=False) from exc
                yield ObjectInfo(
                    key=key_prefix + entry.name,
                    size=st.st_size,
                    last_modified=datetime.fromtimestamp(st.st_mtime, tz=UTC),
                )

    def ping(self) -> None:
        """Write, fsync and remove a probe file: catches a missing mount, read-only or full disk."""
        if not self.root.is_dir():
            raise StorageUnavailable(f"filesystem store root is missing: {self.root}")
        probe = self.root / f"{TMP_PREFIX}ping-{uuid.uuid4().hex}"
        try:
            with open(probe, "xb") as f:
                f.write(b"ping")
                f.flush()
                os.fsync(f.fileno())
            os.unlink(probe)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(probe)
            raise StorageUnavailable(f"filesystem store not usable ({self.root}): {exc}") from exc
