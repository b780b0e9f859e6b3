"""Object store on an S3-compatible server (SeaweedFS, MinIO, AWS) through the ``minio`` SDK.

The store may name several endpoints of the same object store (SeaweedFS S3 gateways on one filer, the nodes
of a distributed MinIO): one client per endpoint, and a request that fails at the connection level (refused,
reset, timed out) is sent again to the next endpoint; an S3 error answer is never (:mod:`storage.failover`).
Sending a put again is safe: a put is idempotent (the same key with the same bytes; the archive's instance
keys are content-addressed, ``storage.keys``), and the bytes are replayed from the start: ``bytes`` as they
are, a seekable stream by seeking back, any other stream spooled first (to disk past one part).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, TypeVar

import certifi
import urllib3
from minio import Minio
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError
from urllib3.exceptions import HTTPError as Urllib3Error

from storage.base import CHUNK_SIZE, ObjectInfo, normalize_source
from storage.errors import ObjectNotFound, StorageError, StorageUnavailable
from storage.failover import DEFAULT_COOLDOWN_S, EndpointPool, is_connection_error
from storage.keys import validate_key, validate_prefix

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

#: Part size for streams of unknown length (and the cap for known ones): each part is held in memory.
PART_SIZE = 16 * 1024 * 1024
_MAX_PARTS = 10_000

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchObject"})
_TRANSIENT_CODES = frozenset({"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout"})

T = TypeVar("T")


@dataclass(frozen=True)
class _Endpoint:
    index: int
    name: str
    client: Minio


class _ResponseReader(io.RawIOBase):
    """Streams a get_object response; closing it closes and releases the HTTP connection."""

    def __init__(self, response: urllib3.BaseHTTPResponse, store: S3Store, key: str,
                 on_connection_error: Callable[[BaseException], None] | None = None) -> None:
        super().__init__()
        self._response = response
        self._store = store
        self._key = key
        self._on_connection_error = on_connection_error

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        with self._store._errors(self._key):
            try:
                data = self._response.read(len(view))
            except Exception as exc:  # mid-stream: no failover, but the next requests go elsewhere
                if self._on_connection_error is not None and is_connection_error(exc):
                    self._on_connection_error(exc)
                raise
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
    """One bucket of an S3 server reached through one or several endpoints; the bucket is created on first use.

    ``endpoint`` is ``host:port`` or a sequence of them (equivalent endpoints of one store). Each endpoint is
    tried ``retries`` + 1 times by urllib3 before the next one is tried; ``cooldown`` is how long a failed
    endpoint sits out (:class:`storage.failover.EndpointPool`).
    """

    def __init__(
        self,
        endpoint: str | Sequence[str],
        access_key: str,
        secret_key: str,
        bucket: str,
        secure: bool = False,
        region: str | None = None,
        connect_timeout: float = 3.0,
        read_timeout: float = 30.0,
        retries: int = 1,
        cooldown: float = DEFAULT_COOLDOWN_S,
    ) -> None:
        if not _BUCKET_RE.match(bucket) or ".." in bucket:
            raise ValueError(f"invalid S3 bucket name: {bucket!r}")
        endpoints = (endpoint,) if isinstance(endpoint, str) else tuple(endpoint)
        if not endpoints or not all(endpoints):
            raise ValueError("at least one S3 endpoint (host:port) is needed")
        if cooldown < 0:
            raise ValueError(f"cooldown must be >= 0 seconds, got {cooldown}")
        self.endpoints = endpoints
        self.endpoint = ",".join(endpoints)  # as written in the URL
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
        self._endpoints = [
            _Endpoint(index, name, Minio(name, access_key=access_key, secret_key=secret_key, secure=secure,
                                         region=region, http_client=http))
            for index, name in enumerate(endpoints)
        ]
        # one endpoint: no pool, every call goes straight to its client as it always did
        self._pool = EndpointPool(endpoints, cooldown) if len(endpoints) > 1 else None
        self._bucket_ready = False
        self._bucket_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"S3Store({self.describe()!r})"

    def describe(self) -> str:
        scheme = "s3+https" if self.secure else "s3"
        return f"{scheme}://{self.access_key}:***@{self.endpoint}/{self.bucket}"

    def endpoint_status(self) -> list[tuple[str, bool]]:
        """Each endpoint and whether it is in use (False: it failed lately and sits out its cool-down)."""
        return self._pool.status() if self._pool is not None else [(self.endpoints[0], True)]

    # -- failover --------------------------------------------------------------------------------

    def _call(self, key: str, operation: Callable[[_Endpoint], T]) -> T:
        """``operation`` on one endpoint; on a connection-level failure, again on the next endpoint.

        Errors come out translated (:meth:`_errors`): the last endpoint's when all failed. An S3 answer,
        even an error answer, ends the call: the endpoint works, and the others would answer the same.
        """
        pool = self._pool
        if pool is None:
            with self._errors(key):
                return operation(self._endpoints[0])
        order = pool.order()
        with self._errors(key):
            for attempt, index in enumerate(order):
                try:
                    result = operation(self._endpoints[index])
                except Exception as exc:
                    if not is_connection_error(exc):
                        if isinstance(exc, MinioException):
                            pool.succeeded(index)  # it answered
                        raise
                    pool.failed(index, exc)
                    if attempt == len(order) - 1:
                        raise
                    continue
                pool.succeeded(index)
                return result
        raise AssertionError("unreachable: the loop returns or raises")

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
            if len(self.endpoints) == 1:
                raise StorageUnavailable(f"S3 server {self.endpoint} unreachable: {exc}") from exc
            raise StorageUnavailable(f"every S3 endpoint of {self.endpoint} failed; the last: {exc}") from exc
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
            self._call(f"bucket {self.bucket}", self._create_bucket)
            self._bucket_ready = True

    def _create_bucket(self, endpoint: _Endpoint) -> None:
        if not endpoint.client.bucket_exists(self.bucket):
            try:
                endpoint.client.make_bucket(self.bucket, location=self.region)
            except S3Error as exc:
                # lost a race with another process (or our own first attempt on an endpoint that then failed)
                if exc.code != "BucketAlreadyOwnedByYou":
                    raise

    def ping(self) -> None:
        try:
            present = self._call(f"bucket {self.bucket}", lambda ep: ep.client.bucket_exists(self.bucket))
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
        *,
        durable: bool = True,  # an acknowledged S3 PUT is as durable as the server makes it, either way
    ) -> None:
        validate_key(key)
        source, n = normalize_source(data, length)  # checks data and length before any request
        self.ensure_bucket()
        if self._pool is None:
            self._call(key, lambda ep: self._put_object(ep.client, key, source, n, content_type))
            return
        with _replayable(data, length) as fresh:
            self._call(key, lambda ep: self._put_object(ep.client, key, *fresh(), content_type))

    def _put_object(self, client: Minio, key: str, source: BinaryIO, n: int | None, content_type: str) -> None:
        # minio holds one part in memory; it picks the part size itself only for huge objects.
        part_size = PART_SIZE if n is None or n <= PART_SIZE * _MAX_PARTS else 0
        client.put_object(
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
        response, endpoint = self._call(key, lambda ep: (ep.client.get_object(self.bucket, key), ep))
        pool = self._pool
        on_error = None if pool is None else (lambda exc: pool.failed(endpoint.index, exc))
        return io.BufferedReader(_ResponseReader(response, self, key, on_error), buffer_size=CHUNK_SIZE)

    def get_bytes(self, key: str) -> bytes:
        validate_key(key)
        self.ensure_bucket()
        return self._call(key, self._read_whole(key))

    def _read_whole(self, key: str) -> Callable[[_Endpoint], bytes]:
        def read(endpoint: _Endpoint) -> bytes:
            response = endpoint.client.get_object(self.bucket, key)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        return read

    def size(self, key: str) -> int:
        validate_key(key)
        self.ensure_bucket()
        stat = self._call(key, lambda ep: ep.client.stat_object(self.bucket, key))
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
        # S3 DELETE of a missing key succeeds, so deleting again on another endpoint is safe
        self._call(key, lambda ep: ep.client.remove_object(self.bucket, key))

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
        level = self._call(prefix or "/", lambda ep: [
            obj
            for obj in ep.client.list_objects(self.bucket, prefix=prefix or None, recursive=False)
            if obj.object_name and obj.object_name != prefix
        ])
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


def _position(stream: object) -> int | None:
    """The stream's position if it can seek back to it, else None."""
    try:
        if stream.seekable():  # type: ignore[attr-defined]
            position = stream.tell()  # type: ignore[attr-defined]
            return position if isinstance(position, int) else None
    except (AttributeError, OSError, ValueError):
        pass
    return None


@contextlib.contextmanager
def _replayable(data: bytes | BinaryIO, length: int | None) -> Iterator[Callable[[], tuple[BinaryIO, int | None]]]:
    """A function that gives ``put``'s bytes from their start each time it is called (one call per endpoint).

    ``bytes`` and seekable streams cost nothing; any other stream is copied into a spool first (memory up to
    one part, a temporary file past it), so a whole study is never held in memory.
    """
    if isinstance(data, bytes | bytearray | memoryview):
        yield lambda: normalize_source(data, length)
        return
    start = _position(data)
    if start is not None:
        seekable: BinaryIO = data

        def from_start() -> tuple[BinaryIO, int | None]:
            seekable.seek(start)
            return normalize_source(seekable, length)

        yield from_start
        return
    with tempfile.SpooledTemporaryFile(max_size=PART_SIZE) as spool:
        source, _ = normalize_source(data, length)
        shutil.copyfileobj(source, spool, CHUNK_SIZE)
        size = spool.tell()

        def from_spool() -> tuple[BinaryIO, int | None]:
            spool.seek(0)
            return spool, size  # type: ignore[return-value]  # an IO[bytes], not the nominal BinaryIO

        yield from_spool
