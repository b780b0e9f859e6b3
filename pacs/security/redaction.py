"""Keeping credentials out of the audit trail, the logs and ``pacs config show`` (issue 12, finding 10).

A client may put a credential in a URL (``?access_token=…``, a pre-signed ``X-Amz-Signature``, an OAuth
``code``); the audit trail records request URLs and is append-only, so a secret written there can never be
removed. :func:`redact_text` is the one rule, applied by the audit writer (:func:`pacs.audit.append`, to
every row) and by the log filter (:class:`RedactingLogFilter`, on the HTTP server's loggers):

- the value of a ``name=value`` pair whose name is a credential's (:func:`is_secret_name`) becomes ``***``;
- the password of a URL's user information (``scheme://user:password@host``) becomes ``***``;
- bearer credentials themselves (our ``pacs_…`` API tokens, JWTs) become ``***`` wherever they appear.
- a share link's path ``/s/<token>`` becomes ``/s/<redacted>`` (the token is the credential).

:func:`mask_url` is the same rule for one configured URL (``pacs config show``).
"""

from __future__ import annotations

import logging
import re
from urllib.parse import urlsplit, urlunsplit

MASK = "***"

# Parameter names (lower case, without "-", "_" and ".") that carry a credential: these exact names, or
# names ending with one of the suffixes (x-amz-security-token, client_secret, api_key, X-Amz-Signature).
_SECRET_NAMES = frozenset({"code", "key", "sig", "pwd", "pass", "auth", "authorization", "session", "sessionid",
                           "jwt", "bearer", "ticket", "otp", "csrf"})
_SECRET_SUFFIXES = ("token", "password", "passwd", "secret", "apikey", "accesskey", "secretkey", "privatekey",
                    "signature", "credential", "credentials", "passphrase")

# name=value inside a query string or free text: the name starts a word (after ?, &, ;, space, quote or a
# line start); the value runs to the next separator.
_PAIR = re.compile(r"(?P<lead>(?:^|[?&;,\s\"'(]))(?P<name>[A-Za-z0-9_.\-]{1,64})=(?P<value>[^&;,\s\"'#)]*)")
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<password>[^@/\s]*)@")
_BEARER = re.compile(r"\b(?:pacs_[A-Za-z0-9_\-]{16,}|eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]*)")
_BEARER_WORD = re.compile(r"(?i)\b(bearer\s+)[^\s,;\"']+")
# a share link's path carries its token (pacs.sharing): /s/<token>[/…] prints as /s/<redacted>[/…]
_SHARE_PATH = re.compile(r"/s/[A-Za-z0-9_\-.~%]+")
SHARE_PATH_MASK = "/s/<redacted>"


def is_secret_name(name: str) -> bool:
    """Whether a query parameter (or form field) of this name carries a credential."""
    bare = re.sub(r"[-_.]", "", name).lower()
    return bare in _SECRET_NAMES or bare.endswith(_SECRET_SUFFIXES)


def redact_text(text: str) -> str:
    """``text`` with every credential it visibly carries replaced by ``***`` (see the module docstring)."""
    if not text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    text = _PAIR.sub(lambda m: f"{m['lead']}{m['name']}={MASK}" if is_secret_name(m["name"]) and m["value"]
                     else m[0], text)
    text = _BEARER_WORD.sub(lambda m: f"{m[1]}{MASK}", text)
    text = _SHARE_PATH.sub(SHARE_PATH_MASK, text)
    return _BEARER.sub(MASK, text)


def mask_url(url: str, *, keep_user: bool = True) -> str:
    """A configured URL for display: the password (and, unless ``keep_user``, the whole user information)
    replaced by ``***``, and credential query parameters masked (``?password=``, ``?token=``)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact_text(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, has_password, _ = userinfo.partition(":")
        if not keep_user:
            userinfo = MASK
        elif has_password:
            userinfo = f"{user}:{MASK}"
        netloc = f"{userinfo}@{host}"
    query = "&".join(_mask_pair(pair) for pair in parts.query.split("&")) if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, redact_text(parts.fragment)))


def _mask_pair(pair: str) -> str:
    name, eq, value = pair.partition("=")
    return f"{name}={MASK}" if eq and value and is_secret_name(name) else pair


class RedactingLogFilter(logging.Filter):
    """Rewrites a log record's message through :func:`redact_text` (the access log prints request URLs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is logging's problem, not ours
            return True
        redacted = redact_text(message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


# The loggers that print request lines or URLs: uvicorn's access and error logs, and our own.
REDACTED_LOGGERS = ("uvicorn.access", "uvicorn.error", "uvicorn", "viewer_api", "pacs", "dicom_scp", "workers")


def install_log_redaction() -> None:
    """Attach the filter to the loggers that may print a request URL and to the root logger's handlers
    (records propagated from any other logger pass through those). Idempotent."""
    targets: list[logging.Filterer] = [logging.getLogger(name) for name in REDACTED_LOGGERS]
    targets += logging.getLogger().handlers
    for target in targets:
        if not any(isinstance(f, RedactingLogFilter) for f in target.filters):
            target.addFilter(RedactingLogFilter())
