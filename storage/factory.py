"""Build an object store from a URL (the one configuration string an operator sets)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import SplitResult, parse_qs, unquote, urlsplit

from storage.base import ObjectStore
from storage.filesystem import FilesystemStore

if TYPE_CHECKING:  # the minio SDK costs half a second to import: only a process that opens an S3 store pays it
    from storage.s3 import S3Store

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_S3_SCHEMES = {"s3": None, "s3+http": False, "s3+https": True}
_S3_PARAMS = {"secure", "region", "connect_timeout", "read_timeout", "retries", "cooldown"}


def open_store(url: str) -> ObjectStore:
    """Open the store a URL names.

    * a path without a scheme (``/srv/pacs``, ``data/objects``) or ``file:///abs/path`` —
      :class:`FilesystemStore`
    * ``s3://ACCESS:SECRET@host:port/bucket[?secure=true&region=x]`` and
      ``s3+https://...`` (TLS) / ``s3+http://...`` — :class:`S3Store`.
      Credentials are percent-decoded, so encode ``@ : / %`` in them. Optional
      query parameters ``connect_timeout``, ``read_timeout`` (seconds) and
      ``retries`` tune how fast an unreachable server is reported.
    * several endpoints of one store, comma-separated:
      ``s3://ACCESS:SECRET@host1:9000,host2:9000/bucket`` — a request that cannot reach one
      (refused, reset, timed out, each endpoint tried ``retries`` + 1 times) goes to the next;
      ``cooldown`` (seconds, default 30) is how long a failed endpoint sits out.
    """
    if not isinstance(url, str) or not url.strip():
        raise ValueError("storage URL is empty")
    s3_scheme = url.partition("://")[0].lower()
    if s3_scheme in _S3_SCHEMES:
        return _open_s3(url, _split_s3(url), _S3_SCHEMES[s3_scheme])
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if not scheme or url.startswith("/"):
        return FilesystemStore(Path(url))
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"file URL must be file:///absolute/path, got {url!r}")
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise ValueError(f"file URL must hold an absolute path, got {url!r}")
        return FilesystemStore(Path(path))
    raise ValueError(
        f"unsupported storage URL scheme {parts.scheme!r}: use a filesystem path, file:///path, "
        "s3://ACCESS:SECRET@host:port/bucket or s3+https://..."
    )


def _split_s3(url: str) -> SplitResult:
    """``urlsplit`` of an S3 URL whose host part may be a list: some Python versions refuse a netloc with
    several bracketed IPv6 addresses, so the netloc (up to the first ``/ ? #``) is cut out by hand."""
    scheme, _, rest = url.partition("://")
    ends = [i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0]
    end = min(ends, default=len(rest))
    return urlsplit(f"{scheme}://host{rest[end:]}")._replace(netloc=rest[:end])


def _masked(url: str) -> str:
    """The URL with the password replaced, for error messages (works with a list of hosts too)."""
    parts = _split_s3(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    if not at or not colon:
        return url
    return parts._replace(netloc=f"{user}:***@{hosts}").geturl()


def s3_endpoints(hosts: str) -> list[str]:
    """``host:port`` endpoints from the host part of an S3 URL: one, or several separated by commas.

    IPv6 addresses are written in brackets (``[::1]:9000``); duplicates and empty entries are errors.
    """
    endpoints: list[str] = []
    for item in hosts.split(","):
        item = item.strip()
        if not item:
            raise ValueError("empty host in the endpoint list")
        parts = urlsplit(f"//{item}")
        try:
            host, port = parts.hostname, parts.port
        except ValueError as exc:
            raise ValueError(f"invalid port in {item!r}") from exc
        if not host or parts.username is not None or parts.path or parts.query:
            raise ValueError(f"invalid host {item!r}")
        host_part = f"[{host}]" if ":" in host else host
        endpoint = f"{host_part}:{port}" if port else host_part
        if endpoint in endpoints:
            raise ValueError(f"endpoint {endpoint} is listed twice")
        endpoints.append(endpoint)
    return endpoints


def _open_s3(url: str, parts: SplitResult, scheme_secure: bool | None) -> S3Store:
    from storage.s3 import S3Store

    shown = _masked(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if not hosts:
        raise ValueError(f"storage URL has no host: {shown}")
    try:
        endpoints = s3_endpoints(hosts)
    except ValueError as exc:
        raise ValueError(f"{exc} in storage URL {shown}") from exc
    username, colon, password = userinfo.partition(":")
    if not at or not colon:
        raise ValueError(f"storage URL needs credentials (s3://ACCESS:SECRET@host:port/bucket): {shown}")
    bucket = parts.path.strip("/")
    if not bucket or "/" in bucket:
        raise ValueError(f"storage URL must name exactly one bucket as its path: {shown}")

    query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
    unknown = set(query) - _S3_PARAMS
    if unknown:
        raise ValueError(f"unknown storage URL parameter(s) {sorted(unknown)} in {shown}")
    params = {name: values[-1] for name, values in query.items()}

    secure = scheme_secure
    if "secure" in params:
        flag = params["secure"].lower()
        if flag not in _TRUE | _FALSE:
            raise ValueError(f"secure must be true or false, got {params['secure']!r}")
        if scheme_secure is not None and scheme_secure != (flag in _TRUE):
            raise ValueError(f"secure={params['secure']} contradicts the URL scheme in {shown}")
        secure = flag in _TRUE

    try:
        return S3Store(
            endpoint=endpoints,
            access_key=unquote(username),
            secret_key=unquote(password),
            bucket=bucket,
            secure=bool(secure),
            region=params.get("region") or None,
            connect_timeout=float(params.get("connect_timeout", 3.0)),
            read_timeout=float(params.get("read_timeout", 30.0)),
            retries=int(params.get("retries", 1)),
            cooldown=float(params.get("cooldown", 30.0)),
        )
    except ValueError as exc:
        raise ValueError(f"invalid storage URL {shown}: {exc}") from exc
