"""Exceptions raised by every object store implementation.

Callers only ever see these: the implementations translate OS, urllib3 and
minio errors where they occur, so code above the storage layer can decide
"retry later" (``StorageUnavailable``) versus "this is a bug or bad input"
without knowing which backend is configured.
"""

from __future__ import annotations


class StorageError(Exception):
    """Any failure of the object store."""


class StorageUnavailable(StorageError):
    """The store cannot be reached or used right now (down, timeout, 5xx, disk full, I/O error).

    Transient by nature: the operation may succeed if retried later. A DICOM
    C-STORE handler maps this to an "out of resources" failure status.
    """


class ObjectNotFound(StorageError):
    """The requested key does not exist."""

    def __init__(self, key: str) -> None:
        super().__init__(f"object not found: {key!r}")
        self.key = key


class InvalidKey(StorageError, ValueError):
    """A key, key prefix or UID is malformed; nothing was read or written."""
