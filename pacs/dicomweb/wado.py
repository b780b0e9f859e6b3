"""WADO-RS and WADO-URI responses (PS3.18 10.4, 9), transport-free: each method takes a resolved
:class:`~pacs.dicomweb.resources.Target` and the request's media ranges and returns a :class:`Body`
(content type and a stream of chunks) for the HTTP layer to send.

Everything that can fail because of the request (no acceptable representation, a missing frame, a
malformed parameter) fails *before* the first byte is produced, so the client gets a proper status.
So does the first conversion of a response: the first object to transcode (WADO-RS retrieve, WADO-URI)
and the first frame to decode are converted before the body starts, so a decode failure or an object over
the decode bound (:mod:`pacs.imaging.limits`) is 406 ``not_acceptable`` (naming ``transfer-syntax=*``,
which always works) and corrupt frames 422, never a 200 with a cut body.
What fails later (a later object of a study, a later frame) ends the stream without its closing
boundary (the HTTP server then closes the connection without the chunked body's last chunk), which
clients report as a truncated response rather than complete data.

A single frame and a rendered image are built whole (a body with a Content-Length) and carry an ``ETag``
derived from the stored object's SHA-256 and the representation, with ``Cache-Control: private, no-cache``: a
browser may keep them but asks again each time (so every view is still access-checked and audited), and gets
``304 Not Modified`` while the instance is the same version. Rendered images are also kept in a process-wide
:class:`~pacs.imaging.cache.RenderedCache` keyed the same way.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy.orm import Session, sessionmaker

from pacs.dicomweb import media
from pacs.dicomweb.documents import MetadataDocuments
from pacs.dicomweb.media import FrameFormat, MediaRange
from pacs.dicomweb.multipart import MultipartWriter
from pacs.dicomweb.native_frames import native_frames
from pacs.dicomweb.objects import (
    FrameError,
    FrameReader,
    bulk_value,
    is_pixel_path,
    open_seekable,
    read_deferred,
    stream_converted,
    stream_stored,
)
from pacs.dicomweb.rendering import RenderParams, plain_image, render, render_thumbnail
from pacs.dicomweb.resources import (
    StoredInstance,
    Target,
    instance,
    iter_instances,
    representative,
    stored_syntaxes,
)
from pacs.errors import InvalidInput, NotFound
from pacs.imaging import limits
from pacs.imaging.cache import RenderedCache
from pacs.imaging.render import RenderError, placeholder
from pacs.transcode import Unconvertible
from storage import ObjectNotFound, ObjectStore
from storage.keys import series_thumbnail_key, study_thumbnail_key

log = logging.getLogger(__name__)

MAX_FRAMES_PER_REQUEST = 10_000
# A version of an instance never changes; a newer version has another SHA-256 (and so another ETag). The
# responses stay ``Cache-Control: no-store`` (viewer_api.hardening): patient images are not kept on the disk of a
# shared ward PC. A client that keeps its own copy anyway may revalidate with ``If-None-Match``.
_SMALL_INT = re.compile(r"^[0-9]{1,9}$")
_TAG_PATH = re.compile(r"^[0-9A-Fa-f]{8}(/[0-9]{1,6}/[0-9A-Fa-f]{8})*$")


class FrameLayout(Protocol):
    """What picks the frames of a request: a :class:`FrameReader` or a native layout (pacs.dicomweb.native_frames)."""

    @property
    def count(self) -> int: ...

    def check(self, number: int) -> int: ...


class Unrenderable(Exception):
    """The instance's pixel data cannot be rendered (no pixel data, no decoder, corrupt): HTTP 422."""


@dataclass
class Body:
    content_type: str
    chunks: Iterable[bytes]
    headers: dict[str, str] = field(default_factory=dict)


def parse_frame_list(text: str) -> list[int]:
    """``1,3,5`` -> [1, 3, 5]; InvalidInput for anything else (frame numbers start at 1)."""
    numbers: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not _SMALL_INT.match(part) or int(part) < 1:
            raise InvalidInput(f"frame numbers are positive integers separated by commas, got {text[:40]!r}")
        numbers.append(int(part))
    if len(numbers) > MAX_FRAMES_PER_REQUEST:
        raise InvalidInput(f"at most {MAX_FRAMES_PER_REQUEST} frames per request")
    return numbers


def parse_tag_path(text: str) -> tuple[int, ...]:
    """``00880200/0/7FE00010`` -> (0x00880200, 0, 0x7FE00010) (pacs.dicomweb.metadata's bulk data URI layout)."""
    if not _TAG_PATH.match(text):
        raise InvalidInput("a bulk data path is tags (8 hexadecimal digits) and item indexes joined by '/'")
    return tuple(int(p, 16) if i % 2 == 0 else int(p) for i, p in enumerate(text.split("/")))


class Wado:
    """One per process; thread-safe (each call opens what it needs)."""

    def __init__(self, sessions: sessionmaker[Session], store: ObjectStore, *, thumbnail_size: int = 128,
                 assume_utf8_for_latin1: bool = False, rendered_cache: RenderedCache | None = None) -> None:
        self.sessions = sessions
        self.store = store
        self.thumbnail_size = thumbnail_size
        self.rendered_cache = rendered_cache
        self.documents = MetadataDocuments(sessions, store, assume_utf8_for_latin1)

    # -- instances --------------------------------------------------------------------------------

    def retrieve(self, target: Target, ranges: list[MediaRange]) -> Body:
        """Study, series or instance as ``multipart/related; type="application/dicom"``, one object at a time."""
        acceptable = media.dicom_syntaxes(ranges)
        syntaxes = stored_syntaxes(self.sessions, target)
        if not syntaxes:
            raise NotFound("no instances")
        for syntax in syntaxes:
            media.choose_syntax(syntax, acceptable)  # 406 now, before any part is sent
        writer = MultipartWriter(media.DICOM)
        return Body(writer.content_type, _primed(self._instances(target, acceptable, writer)))

    def _instances(self, target: Target, acceptable: tuple[str, ...], writer: MultipartWriter) -> Iterator[bytes]:
        """The parts; each object is read (converted) before its part header, so priming the first
        chunk converts the first object."""
        for item in iter_instances(self.sessions, target):
            choice = media.choose_syntax(item.transfer_syntax_uid, acceptable)
            if choice.convert:
                chunks = stream_converted(self.store, item.object_key, choice.transfer_syntax)
            else:
                chunks = stream_stored(self.store, item.object_key)
            first = next(chunks, b"")
            yield from writer.part(f"{media.DICOM}; transfer-syntax={choice.transfer_syntax}",
                                   itertools.chain([first], chunks))
        yield writer.end()

    def retrieve_single(self, target: Target, transfer_syntax: str | None) -> Body:
        """WADO-URI ``contentType=application/dicom``: one object, not multipart (PS3.18 9.1.2.1.4)."""
        item = instance(self.sessions, target)
        acceptable = (transfer_syntax or media.EXPLICIT_LE,)
        choice = media.choose_syntax(item.transfer_syntax_uid, acceptable)
        chunks = (stream_converted(self.store, item.object_key, choice.transfer_syntax) if choice.convert
                  else stream_stored(self.store, item.object_key))
        return Body(media.DICOM, _primed(chunks))

    # -- metadata ---------------------------------------------------------------------------------

    def metadata(self, target: Target, ranges: list[MediaRange], base_url: str) -> Body:
        media.require_json(ranges)
        return Body(media.DICOM_JSON, self.documents.stream(target, base_url))

    # -- frames and bulk data ---------------------------------------------------------------------

    def frames(self, target: Target, numbers: list[int], ranges: list[MediaRange]) -> Body:
        item = instance(self.sessions, target)
        fmt = media.choose_frame_format(item.transfer_syntax_uid, ranges)
        return self._frame_body(item, fmt, lambda reader: [reader.check(n) for n in numbers])

    def bulkdata(self, target: Target, path_text: str, ranges: list[MediaRange]) -> Body:
        path = parse_tag_path(path_text)
        item = instance(self.sessions, target)
        if is_pixel_path(path):  # pixel data: every frame, one part each, negotiated like /frames
            fmt = media.choose_frame_format(item.transfer_syntax_uid, ranges)
            return self._frame_body(item, fmt, lambda reader: range(reader.count))
        media.require_octet_stream(ranges)
        with open_seekable(self.store, item.object_key) as fp:
            value, _vr = bulk_value(read_deferred(fp), path)
        writer = MultipartWriter(media.OCTET_STREAM)
        return Body(writer.content_type, [*writer.part(media.OCTET_STREAM, value), writer.end()])

    def _frame_body(self, item: StoredInstance, fmt: FrameFormat,
                    indexes_of: Callable[[FrameLayout], Sequence[int]]) -> Body:
        if not fmt.decode:  # one frame of a native object, as stored: located without pydicom
            single = self._native_frame_body(item, fmt, indexes_of)
            if single is not None:
                return single
        stack = contextlib.ExitStack()
        try:
            fp: BinaryIO = stack.enter_context(open_seekable(self.store, item.object_key))
            reader = FrameReader(fp)
            indexes = indexes_of(reader)
        except BaseException:
            stack.close()
            raise
        writer = MultipartWriter(fmt.media_type)
        part_type = f"{fmt.media_type}; transfer-syntax={fmt.transfer_syntax}"

        def frame(index: int) -> bytes:
            return reader.decoded(index) if fmt.decode else reader.stored(index)

        if not indexes:
            stack.close()
            return Body(writer.content_type, [writer.end()])

        try:  # the first frame now: a refusal or a decode error gets a status, not a cut body
            first = frame(indexes[0]) if indexes else b""
        except limits.DecodeTooLarge as exc:
            stack.close()
            raise media.NotAcceptable(f"{exc}; ask for the frames as stored: multipart/related; "
                                      f'type="{media.OCTET_STREAM}"; transfer-syntax=*') from None
        except FrameError as exc:
            stack.close()
            raise Unrenderable(str(exc)) from None
        except BaseException:
            stack.close()
            raise

        if len(indexes) == 1:  # one frame: the whole body now, with an ETag of this version's frame
            stack.close()
            return Body(writer.content_type, [*writer.part(part_type, first), writer.end()],
                        {"ETag": etag(item.sha256, "frames", indexes[0], fmt.media_type,
                                                    fmt.transfer_syntax)})

        def chunks() -> Iterator[bytes]:
            with stack:
                for n, index in enumerate(indexes):
                    yield from writer.part(part_type, first if n == 0 else frame(index))
                yield writer.end()

        return Body(writer.content_type, chunks())

    def _native_frame_body(self, item: StoredInstance, fmt: FrameFormat,
                           indexes_of: Callable[[FrameLayout], Sequence[int]]) -> Body | None:
        """One frame of a native little-endian object as stored (:mod:`pacs.dicomweb.native_frames`); None for
        anything else (several frames, another layout, a short object), which :class:`FrameReader` then reads."""
        with open_seekable(self.store, item.object_key) as fp:
            layout = native_frames(fp)
            if layout is None:
                return None
            indexes = indexes_of(layout)  # NotFound for a frame the object does not have, as FrameReader says
            if len(indexes) != 1 or (data := layout.stored(indexes[0])) is None:
                return None
        writer = MultipartWriter(fmt.media_type)
        part_type = f"{fmt.media_type}; transfer-syntax={fmt.transfer_syntax}"
        return Body(writer.content_type, [*writer.part(part_type, data), writer.end()],
                    {"ETag": etag(item.sha256, "frames", indexes[0], fmt.media_type, fmt.transfer_syntax)})

    # -- rendered and thumbnails ------------------------------------------------------------------

    def rendered(self, target: Target, frames: list[int] | None, params: RenderParams, ranges: list[MediaRange]
                 ) -> Body:
        """One image (an instance's first frame, a study's or series' representative instance, one frame),
        or ``multipart/related`` of images for several frames."""
        media_type = media.rendered_type(ranges)
        item = representative(self.sessions, target)
        numbers = frames or [1]
        keys = [(item.sha256, n, media_type, params) for n in numbers]
        cache = self.rendered_cache if item.sha256 else None
        cached = [cache.get(key) for key in keys] if cache is not None else [None]
        if all(image is not None for image in cached):  # rendered before: these frames exist and render
            images = [image for image in cached if image is not None]
        else:
            images = self._render(item, numbers, params, media_type)
            if cache is not None:
                for key, image in zip(keys, images, strict=True):
                    cache.put(key, image)
        if len(images) == 1:
            return Body(media_type, images, {"ETag": etag(*keys[0])})
        writer = MultipartWriter(media_type)
        return Body(writer.content_type, [c for image in images for c in writer.part(media_type, image)]
                    + [writer.end()])

    def _render(self, item: StoredInstance, numbers: list[int], params: RenderParams, media_type: str) -> list[bytes]:
        with open_seekable(self.store, item.object_key) as fp:
            # a plain single-frame grayscale image: only what rendering reads of it, without pydicom's full parse
            layout = native_frames(fp) if numbers == [1] else None
            ds = plain_image(layout) if layout is not None else None
            if ds is None:
                fp.seek(0)
                ds = _read_image(fp)
            count = _frame_count(ds)
            for n in numbers:
                if not 1 <= n <= count:
                    raise NotFound(f"frame {n} does not exist: the instance has {count} frame(s)")
            try:
                return [render(ds, n - 1, params, media_type) for n in numbers]
            except RenderError as exc:
                raise Unrenderable(str(exc)) from exc

    def thumbnail(self, target: Target, params: RenderParams, ranges: list[MediaRange]) -> Body:
        """The stored thumbnail when it answers the request, else one rendered now (a placeholder when the
        pixel data cannot be rendered, as the workers do)."""
        media_type = media.rendered_type(ranges)
        plain = media_type == "image/jpeg" and params.plain
        if plain and target.sop_uid is None:  # a study's or series' stored thumbnail, without listing its instances
            stored = self._stored_thumbnail(target, None)
            if stored is not None:
                return Body(media_type, [stored])
        item = representative(self.sessions, target)
        if plain and target.sop_uid is not None:
            stored = self._stored_thumbnail(target, item)
            if stored is not None:
                return Body(media_type, [stored])
        with open_seekable(self.store, item.object_key) as fp:
            try:
                image = render_thumbnail(_read_image(fp), params, media_type, self.thumbnail_size)
            except (RenderError, Unrenderable) as exc:
                log.info("thumbnail of %s: placeholder (%s)", item.sop_uid, exc)
                size = min(params.viewport) if params.viewport else self.thumbnail_size
                image = placeholder(size)
                media_type = "image/jpeg"  # the placeholder is a JPEG; Accept allowed an image
        return Body(media_type, [image])

    def _stored_thumbnail(self, target: Target, item: StoredInstance | None) -> bytes | None:
        if item is not None:
            key = item.thumbnail_key if item.fragment_current else None  # built for this version
        elif target.series_uid is not None:
            key = series_thumbnail_key(target.study_uid, target.series_uid)
        else:
            key = study_thumbnail_key(target.study_uid)
        if not key:
            return None
        try:
            return self.store.get_bytes(key)
        except ObjectNotFound:
            return None


def etag(*parts: object) -> str:
    """A weak entity tag for a representation of a stored version (its SHA-256 among ``parts``): weak because a
    multipart body's boundary differs between two answers of the same content."""
    return 'W/"' + hashlib.sha256(repr(parts).encode()).hexdigest()[:40] + '"'


def _primed(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """``chunks`` with its first chunk already produced: a conversion that fails there raises now, mapped to
    406 (``transfer-syntax=*`` sends the object as stored), instead of after a 200 has started."""
    try:
        first = next(chunks, None)
    except Unconvertible as exc:
        raise media.NotAcceptable(f"the object cannot be sent decompressed: {exc}; "
                                  "ask for it as stored (transfer-syntax=*)") from None
    return iter(()) if first is None else itertools.chain([first], chunks)


def _read_image(fp: BinaryIO) -> Dataset:
    try:
        return pydicom.dcmread(fp, force=True)
    except Exception as exc:
        raise Unrenderable(f"the stored object cannot be parsed: {' '.join(str(exc).split())[:200]}") from exc


def _frame_count(ds: Dataset) -> int:
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise NotFound("the instance has no pixel data (nothing to render)")
    try:
        return max(int(ds.get("NumberOfFrames") or 1), 1)
    except (TypeError, ValueError):
        return 1
