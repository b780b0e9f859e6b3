"""Object store on an S3-compatible server (SeaweedFS, MinIO, AWS) through the ``minio`` SDK."""

from __future__ import annotations

import contextlib
import io
import os
import re
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, BinaryIO

import certifi
import urllib3
from minio import Minio
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError
from urllib3.exceptions import HTTPError as Urllib3Error

from storage.base import CHUNK_SIZE, ObjectInfo, normalize_source
from storage.errors import ObjectNotFound, StorageError, StorageUnavailable
from storage.keys import validate_key, validate_prefix

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

#: Part size for streams of unknown length (and the cap for known ones): each part is held in memory.
PART_SIZE = 16 * 1024 * 1024
_MAX_PARTS = 10_000

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchObject"})
_TRANSIENT_CODES = frozenset({"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout"})


class _ResponseReader(io.RawIOBase):
    """Streams a get_object response; closing it closes and releases the HTTP connection."""

    def __init__(self, response: urllib3.BaseHTTPResponse, store: S3Store, key: str) -> None:
        super().__init__()
        self._response = response
        self._store = store
        self._key = key

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        with self._store._errors(self._key):
            data = self._response.read(len(view))
        n = len(data)
        view[:n] = data
        return n

    def close(self) -> None:
        if not self.closed:
            try:
                self._response.close()
                self._response.release_conn()
            finally:
                super().close()


class S3Store:
    """One bucket of an S3 server; the bucket is created on first use if missing."""

    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        secure: bool = False,
        region: str | None = None,
        connect_timeout: float = 3.0,
        read_timeout: float = 30.0,
        retries: int = 1,
    ) -> None:
        if not _BUCKET_RE.match(bucket) or ".." in bucket:
            raise ValueError(f"invalid S3 bucket name: {bucket!r}")
        self.endpoint = endpoint
        self.access_key = access_key
        self.bucket = bucket
        self.secure = secure
        self.region = region
        # Short timeouts and few retries on purpose: minio's default client waits
        # 5 minutes and retries 5 times, and a C-STORE must fail fast when S3 is down.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            retries=urllib3.Retry(total=retries, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
            maxsize=16,
            cert_reqs="CERT_REQUIRED",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        )
        self._client = Minio(
            endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=region,
            http_client=http,
        )
        self._bucket_ready = False
        self._bucket_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"S3Store({self.describe()!r})"

    def describe(self) -> str:
        scheme = "s3+https" if self.secure else "s3"
        return f"{scheme}://{self.access_key}:***@{self.endpoint}/{self.bucket}"

    # -- error translation -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        """Translate minio/urllib3 exceptions; the caller's own stream errors pass through."""
        try:
            yield
        except S3Error as exc:
            raise self._translate_s3_error(exc, key) from exc
        except ServerError as exc:
            raise StorageUnavailable(f"S3 server error (HTTP {exc.status_code}) for {key!r}: {exc}") from exc
        except InvalidResponseError as exc:
            status = getattr(exc, "_code", None)
            cls = StorageUnavailable if not isinstance(status, int) or status >= 500 else StorageError
            raise cls(f"unexpected S3 response for {key!r}: {exc}") from exc
        except Urllib3Error as exc:
            raise StorageUnavailable(f"S3 server {self.endpoint} unreachable: {exc}") from exc
        except MinioException as exc:
            raise StorageError(f"S3 error for {key!r}: {exc}") from exc

    def _translate_s3_error(self, exc: S3Error, key: str) -> StorageError:
        if exc.code in _NOT_FOUND_CODES:
            return ObjectNotFound(key)
        if exc.code == "NoSuchBucket":
            self._bucket_ready = False  # recreated on the next call
            return StorageUnavailable(f"S3 bucket {self.bucket!r} does not exist (any more)")
        status = getattr(exc.response, "status", None)
        if exc.code in _TRANSIENT_CODES or (isinstance(status, int) and status >= 500):
            return StorageUnavailable(f"S3 server error for {key!r}: {exc.code}: {exc.message}")
        return StorageError(f"S3 error for {key!r}: {exc.code}: {exc.message}")

    # -- bucket ----------------------------------------------------------------------------------

    def ensure_bucket(self) -> None:
        """Create the bucket if missing; thread-safe, and retried on the next call after a failure."""
        if self._bucket_ready:
            return
        with self._bucket_lock:
            if self._bucket_ready:
                return
            with self._errors(f"bucket {self.bucket}"):
                if not self._client.bucket_exists(self.bucket):
                    try:
                        self._client.make_bucket(self.bucket, location=self.region)
                    except S3Error as exc:
                        if exc.code != "BucketAlreadyOwnedByYou":  # lost a race with another process
                            raise
            self._bucket_ready = True

    def ping(self) -> None:
        try:
            with self._errors(f"bucket {self.bucket}"):
                present = self._client.bucket_exists(self.bucket)
            if not present:
                self._bucket_ready = False
                self.ensure_bucket()
        except StorageUnavailable:
            raise
        except StorageError as exc:  # e.g. bad credentials: reachable but not usable
            raise StorageUnavailable(str(exc)) from exc

    # -- operations ------------------------------------------------------------------------------

    def put(
        self,
        key: str,
        data: bytes | BinaryIO,
        length: int | None = None,
        content_type: str = "application/octet-stream",
    ) -> None:
        validate_key(key)
        source, n = normalize_source(data, length)
        self.ensure_bucket()
        # minio holds one part in memory; it picks the part size itself only for huge objects.
        part_size = PART_SIZE if n is None or n <= PART_SIZE * _MAX_PARTS else 0
        with self._errors(key):
            self._client.put_object(
                self.bucket,
                key,
                source,
                length=-1 if n is None else n,
                content_type=content_type,
                part_size=part_size,
            )

    def open(self, key: str) -> BinaryIO:
        validate_key(key)
        self.ensure_bucket()
        with self._errors(key):
            response = self._client.get_object(self.bucket, key)
        return io.BufferedReader(_ResponseReader(response, self, key), buffer_size=CHUNK_SIZE)

    def get_bytes(self, key: str) -> bytes:
        validate_key(key)
        self.ensure_bucket()
        with self._errors(key):
            response = self._client.get_object(self.bucket, key)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

    def size(self, key: str) -> int:
        validate_key(key)
        self.ensure_bucket()
        with self._errors(key):
            stat = self._client.stat_object(self.bucket, key)
        if stat.size is None:
            raise StorageError(f"S3 server returned no size for {key!r}")
        return stat.size

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except ObjectNotFound:
            return False
        return True

    def delete(self, key: str) -> None:
        validate_key(key)
        self.ensure_bucket()
        with self._errors(key):
            self._client.remove_object(self.bucket, key)  # S3 DELETE of a missing key succeeds

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        validate_prefix(prefix)
        self.ensure_bucket()
        return self._walk(prefix)

    def _walk(self, prefix: str) -> Iterator[ObjectInfo]:
        """List one '/'-level at a time and sort it ourselves, recursing into sub-prefixes.

        S3 promises keys in byte order, but SeaweedFS (like other filer-backed
        servers) returns a recursive listing in directory-walk order, which puts
        ``dicom/1.2.3/...`` before ``dicom/1.2.3.4/...`` although '.' < '/'.
        Sorting each level by name, with sub-prefixes keeping their trailing '/',
        yields true byte order on any server, holding one level in memory at a
        time, at the cost of one LIST request per "folder".
        """
        with self._errors(prefix or "/"):
            level = [
                obj
                for obj in self._client.list_objects(self.bucket, prefix=prefix or None, recursive=False)
                if obj.object_name and obj.object_name != prefix
            ]
        level.sort(key=lambda obj: obj.object_name or "")
        for obj in level:
            name = obj.object_name or ""
            if name.endswith("/"):  # a common prefix (or a directory-marker object): descend
                yield from self._walk(name)
            else:
                yield ObjectInfo(
                    key=name,
                    size=obj.size or 0,
                    last_modified=obj.last_modified,
                )
