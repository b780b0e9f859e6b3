"""Object storage for the archive: one small interface, a filesystem and an S3 implementation."""

from storage.base import ObjectInfo, ObjectStore
from storage.errors import InvalidKey, ObjectNotFound, StorageError, StorageUnavailable
from storage.factory import open_store

__all__ = [
    "InvalidKey",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectStore",
    "StorageError",
    "StorageUnavailable",
    "open_store",
]
