"""The object store interface shared by every backend."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, BinaryIO, Protocol, runtime_checkable

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

#: Read/write granularity used when copying streams (filesystem writes, S3 reads).
CHUNK_SIZE = 1024 * 1024


@dataclass(frozen=True)
class ObjectInfo:
    """One entry of a listing."""

    key: str
    size: int
    last_modified: datetime


@runtime_checkable
class ObjectStore(Protocol):
    """A flat key → bytes store; keys are validated by :func:`storage.keys.validate_key`.

    Every method validates its key before touching the backend and raises only
    :mod:`storage.errors` exceptions (``InvalidKey`` is also a ``ValueError``).
    """

    def put(
        self,
        key: str,
        data: bytes | BinaryIO,
        length: int | None = None,
        content_type: str = "application/octet-stream",
        *,
        durable: bool = True,
    ) -> None:
        """Store ``data`` under ``key``; durable and visible atomically when this returns.

        ``data`` is bytes or a readable binary stream. For a stream, ``length``
        (if given) is the exact number of bytes to read from it; a shorter
        stream raises ``ValueError`` and stores nothing. Overwriting an
        existing key replaces it; a concurrent reader sees the old or the new
        object, never a mix or a partial one.

        ``durable=False`` is for objects that can be made again from others (a DICOM JSON fragment): visible
        atomically, and its name as durable as any put's, but a backend may skip forcing its bytes to disk: after
        a power cut it may read empty or with a hole of zeros (never another object's bytes). Its readers must
        check what they read.
        """
        ...

    def open(self, key: str) -> BinaryIO:
        """A readable stream over the object that does not load it whole; close it after use."""
        ...

    def get_bytes(self, key: str) -> bytes:
        """The whole object in memory."""
        ...

    def exists(self, key: str) -> bool:
        """Whether ``key`` names a stored object."""
        ...

    def size(self, key: str) -> int:
        """Size in bytes; ``ObjectNotFound`` if missing."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object; deleting a missing key is not an error. Once this returns the removal lasts: a
        power cut does not bring the object back (callers mark a deletion done right after)."""
        ...

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Objects whose key starts with ``prefix`` (plain string prefix), recursively, sorted by key.

        Streams: the listing is never held in memory as a whole. The prefix is
        validated eagerly (``InvalidKey``), backend errors surface while iterating.
        """
        ...

    def ping(self) -> None:
        """Check that the store can be reached and used; ``StorageUnavailable`` otherwise."""
        ...

    def describe(self) -> str:
        """Human-readable location for logs and health pages, with secrets masked."""
        ...


class _ExactLengthReader(io.RawIOBase):
    """Reads exactly ``length`` bytes from ``source``; running short is the caller's bug (ValueError).

    Both backends use this so that a declared length means the same thing
    everywhere (minio would raise a bare ``OSError``, the filesystem would
    silently store a truncated object).
    """

    def __init__(self, source: BinaryIO, length: int) -> None:
        super().__init__()
        self._source = source
        self._remaining = length
        self._length = length

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0 or size > self._remaining:
            size = self._remaining
        out = bytearray()
        while len(out) < size:
            data = self._source.read(size - len(out))
            if not data:
                done = self._length - self._remaining + len(out)
                raise ValueError(f"stream ended after {done} of the {self._length} bytes declared")
            out += data
        self._remaining -= len(out)
        return bytes(out)

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)


def normalize_source(data: bytes | BinaryIO, length: int | None) -> tuple[BinaryIO, int | None]:
    """Turn ``put``'s ``data``/``length`` into a stream plus its exact length (None: unknown)."""
    if isinstance(data, bytes | bytearray | memoryview):
        raw = bytes(data)
        if length is not None and length != len(raw):
            raise ValueError(f"length={length} does not match the {len(raw)} bytes given")
        return io.BytesIO(raw), len(raw)
    if not callable(getattr(data, "read", None)):
        raise TypeError(f"data must be bytes or a readable binary stream, not {type(data).__name__}")
    if length is None:
        return data, None
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    # typing.BinaryIO is nominal: a RawIOBase is not one, though it has every method put's readers call
    return _ExactLengthReader(data, length), length  # type: ignore[return-value]
