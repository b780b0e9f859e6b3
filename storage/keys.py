"""Object key layout, derived only from validated DICOM UIDs and digests.

Keys are the one place where data that arrived over the network (UIDs in a
C-STORE dataset) turns into paths on a disk, so they are validated twice:
UIDs here, and every key again by :func:`validate_key` inside each store
method, which guarantees nothing is ever written outside the store's root.
"""

from __future__ import annotations

import re
from typing import TypeGuard

from storage.errors import InvalidKey

#: PS3.5 §9.1: digits and dots, no empty component, and no leading zero in a component of
#: more than one digit (``1.02.3`` is not a UID: systems that compare components as numbers
#: would take it for ``1.2.3``). Every UID that arrives (C-STORE, STOW-RS, request parameters)
#: is checked with this rule by :func:`is_valid_uid`.
UID_RE = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")  # whole value: fullmatch
#: Keys are checked on charset only (:func:`_key_uid`): objects stored before the leading-zero
#: rule keep valid keys, so ``pacs reindex``/``pacs check`` still see them as instances (an
#: acknowledged object is never mistaken for an orphan) and their derived files can be built.
_KEY_UID_RE = re.compile(r"^[0-9]+(?:\.[0-9]+)*\Z")
UID_MAX_LEN = 64

SHA256_RE = re.compile(r"^[0-9a-f]{64}\Z")

KEY_MAX_LEN = 1024
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9._-]+\Z")
_PARTIAL_SEGMENT_RE = re.compile(r"^[A-Za-z0-9._-]*\Z")

_INSTANCE_KEY_RE = re.compile(
    r"^dicom/(?P<study>[0-9.]+)/(?P<series>[0-9.]+)/(?P<sop>[0-9.]+)/(?P<sha>[0-9a-f]{64})\.dcm\Z"
)


def _show(value: object, limit: int = 80) -> str:
    """repr() for error messages, truncated so hostile input cannot flood logs."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_valid_uid(s: object) -> TypeGuard[str]:
    """A UID as PS3.5 §9.1 defines it: digits and dots, no empty component, no leading zero in a
    component (``0`` alone is one), at most 64 characters; nothing else, not even a trailing newline. The one UID
    rule of the archive: keys, ingest, and the DIMSE shortcuts that must agree with pydicom's UI expression."""
    return isinstance(s, str) and 0 < len(s) <= UID_MAX_LEN and UID_RE.fullmatch(s) is not None


def is_archived_uid(s: object) -> TypeGuard[str]:
    """A UID the archive may already hold (digits and dots, at most 64 characters, leading zeros allowed):
    what ``pacs reindex`` accepts from objects acknowledged before the leading-zero rule, so a rebuilt
    index never turns them into orphans that ``pacs check --repair`` would collect."""
    return _key_uid(s)


def _key_uid(s: object) -> TypeGuard[str]:
    """The UID segments of a key: digits and dots, no empty component, at most 64 characters
    (leading zeros allowed: see ``_KEY_UID_RE``)."""
    return isinstance(s, str) and 0 < len(s) <= UID_MAX_LEN and _KEY_UID_RE.match(s) is not None


def require_uid(s: object, what: str) -> str:
    """Return ``s`` if it is a valid UID (:func:`is_valid_uid`), else raise ``InvalidKey`` naming ``what``."""
    if not is_valid_uid(s):
        raise InvalidKey(f"invalid {what}: {_show(s)}")
    return s


def _require_key_uid(s: object, what: str) -> str:
    """A key's UID segment: safe as a path segment (charset and length), leading zeros allowed."""
    if not _key_uid(s):
        raise InvalidKey(f"invalid {what}: {_show(s)}")
    return s


def _require_sha256(sha256_hex: object) -> str:
    if not isinstance(sha256_hex, str) or not SHA256_RE.match(sha256_hex):
        raise InvalidKey(f"invalid sha256 (need 64 lowercase hex digits): {_show(sha256_hex)}")
    return sha256_hex


def instance_key(study_uid: str, series_uid: str, sop_uid: str, sha256_hex: str) -> str:
    """``dicom/{study}/{series}/{sop}/{sha256}.dcm``: content-addressed, so re-puts are idempotent."""
    study = _require_key_uid(study_uid, "StudyInstanceUID")
    series = _require_key_uid(series_uid, "SeriesInstanceUID")
    sop = _require_key_uid(sop_uid, "SOPInstanceUID")
    sha = _require_sha256(sha256_hex)
    return f"dicom/{study}/{series}/{sop}/{sha}.dcm"


RECONCILIATION_PREFIX = "reconciliation/"


def reconciliation_key(sha256_hex: str) -> str:
    """``reconciliation/{sha256}.dcm``: an object held, not filed (pacs.reconciliation); outside ``dicom/``,
    so ``pacs reindex`` never files it and ``pacs check`` never takes it for an orphan instance."""
    return f"{RECONCILIATION_PREFIX}{_require_sha256(sha256_hex)}.dcm"


def parse_reconciliation_key(key: str) -> str | None:
    """Inverse of :func:`reconciliation_key`: the held object's SHA-256, or None if ``key`` is not one."""
    if not isinstance(key, str) or not key.startswith(RECONCILIATION_PREFIX) or not key.endswith(".dcm"):
        return None
    sha = key[len(RECONCILIATION_PREFIX):-len(".dcm")]
    return sha if SHA256_RE.match(sha) else None


def correction_marker_key(sop_uid: str, sha256_hex: str) -> str:
    """``corrections/{sop}/{sha256}``: written by the archive before it ingests a corrected version of one of its
    objects (pacs.studies.corrections), so that ``pacs reindex`` applies that version's values as ingest did —
    a sender cannot write here, so a forged Original Attributes Sequence in an object it sends is never taken for
    a correction. Outside ``dicom/``: never an instance."""
    return f"corrections/{_require_key_uid(sop_uid, 'SOPInstanceUID')}/{_require_sha256(sha256_hex)}"


def correction_marker_prefix(sop_uid: str) -> str:
    """``corrections/{sop}/``: every correction marker of one SOP instance (deleted with it)."""
    return f"corrections/{_require_key_uid(sop_uid, 'SOPInstanceUID')}/"


def thumbnail_key(study_uid: str, series_uid: str, sop_uid: str) -> str:
    """``derived/thumbnails/{study}/{series}/{sop}.jpg``."""
    study = _require_key_uid(study_uid, "StudyInstanceUID")
    series = _require_key_uid(series_uid, "SeriesInstanceUID")
    sop = _require_key_uid(sop_uid, "SOPInstanceUID")
    return f"derived/thumbnails/{study}/{series}/{sop}.jpg"


def series_thumbnail_key(study_uid: str, series_uid: str) -> str:
    """``derived/thumbnails/{study}/{series}.jpg``: the series' representative thumbnail."""
    study = _require_key_uid(study_uid, "StudyInstanceUID")
    series = _require_key_uid(series_uid, "SeriesInstanceUID")
    return f"derived/thumbnails/{study}/{series}.jpg"


def study_thumbnail_key(study_uid: str) -> str:
    """``derived/thumbnails/{study}.jpg``: the study's representative thumbnail."""
    study = _require_key_uid(study_uid, "StudyInstanceUID")
    return f"derived/thumbnails/{study}.jpg"


def instance_metadata_key(study_uid: str, series_uid: str, sop_uid: str) -> str:
    """``derived/metadata/{study}/{series}/{sop}.json``: one instance's DICOM JSON object."""
    study = _require_key_uid(study_uid, "StudyInstanceUID")
    series = _require_key_uid(series_uid, "SeriesInstanceUID")
    sop = _require_key_uid(sop_uid, "SOPInstanceUID")
    return f"derived/metadata/{study}/{series}/{sop}.json"


def series_metadata_key(study_uid: str, series_uid: str) -> str:
    """``derived/metadata/{study}/{series}.json``: the series' DICOM JSON document (array of instances)."""
    study = _require_key_uid(study_uid, "StudyInstanceUID")
    series = _require_key_uid(series_uid, "SeriesInstanceUID")
    return f"derived/metadata/{study}/{series}.json"


def parse_instance_key(key: str) -> tuple[str, str, str, str] | None:
    """Inverse of :func:`instance_key`: ``(study, series, sop, sha256)``, or None if ``key`` is not one."""
    m = _INSTANCE_KEY_RE.match(key) if isinstance(key, str) else None
    if m is None:
        return None
    study, series, sop, sha = m.group("study", "series", "sop", "sha")
    if not all(_key_uid(p) for p in (study, series, sop)):
        return None
    return study, series, sop, sha


def is_valid_segment(name: str) -> bool:
    """Whether ``name`` may be one '/'-separated segment of a key."""
    return _SEGMENT_RE.match(name) is not None and not name.startswith(".")


def validate_key(key: object) -> str:
    """Return ``key`` if it is a safe object key, else raise ``InvalidKey``.

    A key is 1-1024 characters of '/'-separated segments made of
    ``[A-Za-z0-9._-]``: no leading '/', no empty segment (``a//b``, trailing
    '/'), and no segment starting with '.', which rules out ``.`` and ``..``
    and keeps names like ``.tmp-*`` free for the filesystem store's temp files.
    """
    if not isinstance(key, str) or not key:
        raise InvalidKey(f"invalid key: {_show(key)}")
    if len(key) > KEY_MAX_LEN:
        raise InvalidKey(f"invalid key (longer than {KEY_MAX_LEN} characters): {_show(key)}")
    for segment in key.split("/"):
        if not is_valid_segment(segment):
            raise InvalidKey(f"invalid key: {_show(key)}")
    return key


def validate_prefix(prefix: object) -> str:
    """Return ``prefix`` if it is a valid listing prefix, else raise ``InvalidKey``.

    A prefix is empty, or a valid key followed by '/', or a valid key prefix
    ending in a partial segment (``dicom/1.2`` matches ``dicom/1.2.3/...``).
    """
    if not isinstance(prefix, str):
        raise InvalidKey(f"invalid prefix: {_show(prefix)}")
    if len(prefix) > KEY_MAX_LEN:
        raise InvalidKey(f"invalid prefix (longer than {KEY_MAX_LEN} characters): {_show(prefix)}")
    head, _, partial = prefix.rpartition("/")
    if head:
        try:
            validate_key(head)
        except InvalidKey:
            raise InvalidKey(f"invalid prefix: {_show(prefix)}") from None
    elif prefix.startswith("/"):
        raise InvalidKey(f"invalid prefix: {_show(prefix)}")
    if not _PARTIAL_SEGMENT_RE.match(partial):
        raise InvalidKey(f"invalid prefix: {_show(prefix)}")
    return prefix
