"""Content negotiation (PS3.18 8.7): what each resource sends for a request's ``Accept``.

An ``Accept`` value is a list of media ranges with parameters and ``q`` weights. For the multipart
resources the media type that matters is the ``type`` parameter of ``multipart/related`` (a bare
``application/dicom`` or ``application/octet-stream`` is read the same way, leniently), and the
``transfer-syntax`` parameter picks the encoding:

- instances (``application/dicom``): a named syntax, ``*`` (as stored), or none, which means
  Explicit VR Little Endian, PS3.18's default; an object stored otherwise is decompressed for it;
- frames and pixel bulk data (``application/octet-stream``, or ``image/jp2``, ``image/jpeg``...):
  uncompressed by default; ``transfer-syntax=*`` or the image media type of the stored syntax
  returns the stored (compressed) frame untouched;
- rendered images and thumbnails: ``image/jpeg`` (default) or ``image/png``;
- metadata and searches: ``application/dicom+json`` (or ``application/json``).

Anything else gets :class:`NotAcceptable` (HTTP 406) saying what the resource offers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from pydicom.uid import UID, ExplicitVRLittleEndian

from pacs.errors import PacsError
from pacs.transcode import Unconvertible, check_convertible

EXPLICIT_LE = str(ExplicitVRLittleEndian)
ANY_SYNTAX = "*"
OCTET_STREAM = "application/octet-stream"
DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"

#: PS3.18 Table 8.7.3-5: the media type of a compressed frame, by the transfer syntax it is stored in.
FRAME_MEDIA_TYPES: dict[str, tuple[str, ...]] = {
    "1.2.840.10008.1.2.5": ("image/dicom-rle", "image/x-dicom-rle"),
    "1.2.840.10008.1.2.4.50": ("image/jpeg",),
    "1.2.840.10008.1.2.4.51": ("image/jpeg",),
    "1.2.840.10008.1.2.4.57": ("image/jpeg",),
    "1.2.840.10008.1.2.4.70": ("image/jpeg",),
    "1.2.840.10008.1.2.4.80": ("image/jls", "image/x-jls"),
    "1.2.840.10008.1.2.4.81": ("image/jls", "image/x-jls"),
    "1.2.840.10008.1.2.4.90": ("image/jp2",),
    "1.2.840.10008.1.2.4.91": ("image/jp2",),
    "1.2.840.10008.1.2.4.92": ("image/jpx",),
    "1.2.840.10008.1.2.4.93": ("image/jpx",),
    "1.2.840.10008.1.2.4.201": ("image/jphc",),
    "1.2.840.10008.1.2.4.202": ("image/jphc",),
    "1.2.840.10008.1.2.4.203": ("image/jphc",),
}
RENDERED_TYPES = ("image/jpeg", "image/png")
_ANY = ("*/*", "application/*")


class NotAcceptable(PacsError):
    """Nothing the resource can produce matches the request's Accept (HTTP 406)."""


@dataclass(frozen=True)
class MediaRange:
    media_type: str  # lower case "type/subtype"
    params: dict[str, str] = field(default_factory=dict)  # lower-case names, unquoted values
    q: float = 1.0

    def inner(self) -> tuple[str, str | None]:
        """(the media type asked for, its transfer-syntax parameter): ``multipart/related; type=X`` and a
        bare ``X`` both mean X; ``multipart/related`` without a type means anything."""
        syntax = self.params.get("transfer-syntax") or None
        if self.media_type in ("multipart/related", "multipart/*"):
            return (self.params.get("type") or "*/*").lower(), syntax
        return self.media_type, syntax


def parse_accept(header: str | None) -> list[MediaRange]:
    """The media ranges of an Accept value, best first (stable for equal ``q``); none given means ``*/*``.

    Malformed ranges are skipped (a client's typo should not turn into an error about another range);
    ``q=0`` ranges are dropped.
    """
    ranges: list[MediaRange] = []
    for piece in _split(header or "", ","):
        parts = _split(piece, ";")
        if not parts:
            continue
        media_type = parts[0].strip().lower()
        if media_type.count("/") != 1 or " " in media_type:
            continue
        params: dict[str, str] = {}
        for param in parts[1:]:
            name, sep, value = param.partition("=")
            if sep:
                params[name.strip().lower()] = value.strip().strip('"').strip()
        try:
            q = float(params.pop("q", "1"))
        except ValueError:
            continue
        if q > 0:
            ranges.append(MediaRange(media_type, params, min(q, 1.0)))
    ranges.sort(key=lambda r: -r.q)
    return ranges or [MediaRange("*/*")]


def _split(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside double quotes."""
    out: list[str] = []
    current: list[str] = []
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            out.append("".join(current))
            current = []
        else:
            current.append(ch)
    out.append("".join(current))
    return [p for p in (s.strip() for s in out) if p]


# -- instances (application/dicom) ------------------------------------------------------------------


def dicom_syntaxes(ranges: Iterable[MediaRange]) -> tuple[str, ...]:
    """The transfer syntaxes acceptable for ``application/dicom`` parts, best first (``*``: any)."""
    out: list[str] = []
    for r in ranges:
        media, syntax = r.inner()
        if media in (*_ANY, DICOM):
            out.append(syntax or EXPLICIT_LE)
    if not out:
        raise NotAcceptable('this resource is multipart/related; type="application/dicom" '
                            "(transfer-syntax=* for objects as stored)")
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class SyntaxChoice:
    transfer_syntax: str  # what the part carries
    convert: bool  # False: the stored bytes as they are


def choose_syntax(stored: str, acceptable: tuple[str, ...]) -> SyntaxChoice:
    """How to send an object stored in ``stored`` to a client accepting ``acceptable``."""
    for syntax in acceptable:
        if syntax in (ANY_SYNTAX, stored):
            return SyntaxChoice(stored, False)
        try:
            check_convertible(stored, syntax)
        except Unconvertible:
            continue
        return SyntaxChoice(syntax, True)
    raise NotAcceptable(f"an object stored as {_name(stored)} cannot be sent in {', '.join(acceptable)} "
                        "(objects are decompressed to 1.2.840.10008.1.2.1 or sent as stored: transfer-syntax=*)")


# -- frames and pixel bulk data ---------------------------------------------------------------------


@dataclass(frozen=True)
class FrameFormat:
    media_type: str  # the part's media type
    transfer_syntax: str  # the encoding of the bytes in each part
    decode: bool  # True: decompress the stored frame; False: the stored frame's bytes (native or compressed)


def choose_frame_format(stored: str, ranges: Iterable[MediaRange]) -> FrameFormat:
    """How to send frames of an object stored in ``stored``, for the request's media ranges."""
    compressed = UID(stored).is_compressed
    own_types = FRAME_MEDIA_TYPES.get(stored, ())
    wanted: list[str] = []
    for r in ranges:
        media, syntax = r.inner()
        wanted.append(f"{media}{'; transfer-syntax=' + syntax if syntax else ''}")
        if media in (*_ANY, OCTET_STREAM):
            if syntax in (None, EXPLICIT_LE) or (syntax == ANY_SYNTAX and not compressed):
                if compressed and not _decodable(stored):
                    continue
                return FrameFormat(OCTET_STREAM, EXPLICIT_LE, compressed)
            if compressed and syntax in (ANY_SYNTAX, stored):
                return FrameFormat(OCTET_STREAM, stored, False)
        elif own_types and (media in own_types or media == "image/*") and syntax in (None, ANY_SYNTAX, stored):
            return FrameFormat(own_types[0] if media == "image/*" else media, stored, False)
    offered = [f'multipart/related; type="{OCTET_STREAM}" (uncompressed)']
    if compressed:
        offered.append(f'type="{OCTET_STREAM}"; transfer-syntax=* or {stored} (as stored)')
        offered += [f'type="{t}"' for t in own_types]
    raise NotAcceptable(f"frames stored as {_name(stored)} are offered as {', '.join(offered)}; "
                        f"asked for {', '.join(wanted)[:200]}")


def _decodable(stored: str) -> bool:
    try:
        check_convertible(stored, EXPLICIT_LE)
    except Unconvertible:
        return False
    return True


def require_octet_stream(ranges: Iterable[MediaRange]) -> None:
    """Bulk data other than pixel data: ``application/octet-stream`` only."""
    if not any(r.inner()[0] in (*_ANY, OCTET_STREAM) for r in ranges):
        raise NotAcceptable(f'bulk data is multipart/related; type="{OCTET_STREAM}"')


# -- rendered images, JSON --------------------------------------------------------------------------


def rendered_type(ranges: Iterable[MediaRange]) -> str:
    """``image/jpeg`` or ``image/png`` for a rendered image or thumbnail."""
    for r in ranges:
        media, _ = r.inner()
        if media in ("*/*", "image/*"):
            return "image/jpeg"
        if media in RENDERED_TYPES:
            return media
    raise NotAcceptable("rendered images are image/jpeg or image/png")


def require_json(ranges: Iterable[MediaRange]) -> None:
    """Searches and metadata: DICOM JSON (``application/dicom+json``; ``application/json`` too)."""
    if not any(r.media_type in (*_ANY, DICOM_JSON, "application/json") for r in ranges):
        raise NotAcceptable(f"this resource is {DICOM_JSON} (XML is not offered)")


def _name(syntax: str) -> str:
    name = UID(syntax).name
    return syntax if name == syntax else f"{name} ({syntax})"
