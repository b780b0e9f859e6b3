"""Frames of a native (uncompressed) little-endian object located without parsing the dataset with pydicom.

A viewer reads a CT or MR series one frame per request. For an object stored uncompressed, answering one means
finding the pixel data's offset and the image geometry, then reading one frame's bytes; pydicom's parse of every
element before the pixel data costs more CPU than the rest of the request's own work. :func:`native_frames` walks
the element headers instead (file meta, then the dataset in Explicit or Implicit VR Little Endian), keeping the five
values it needs, and stops at the pixel data. Every step is bounded by the file's size; anything it does not expect
(another transfer syntax, encapsulated or bit-packed pixel data, an odd length, a value of the wrong size, no pixel
data) returns None and the caller parses the object with pydicom as before (:class:`pacs.dicomweb.objects.FrameReader`),
which then also produces the errors.

The walk also keeps every top-level element of the Image Pixel group (0028,xxxx) and the tags it passed, so that
``/rendered`` of a plain single-frame grayscale image can build the few attributes rendering reads
(:func:`pacs.dicomweb.rendering.plain_image`) without parsing the rest of the object either.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO

from pacs.errors import NotFound

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
HEADER_BYTES = 256 * 1024  # the elements before the pixel data are read in one piece of at most this size
MAX_DEPTH = 16  # sequences nested deeper than this are left to pydicom
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
# the values read: Samples per Pixel, Number of Frames, Rows, Columns, Bits Allocated
_SAMPLES, _FRAMES, _ROWS, _COLUMNS, _BITS = 0x00280002, 0x00280008, 0x00280010, 0x00280011, 0x00280100
_IMAGE_GROUP = 0x0028
_US = struct.Struct("<H")
_TAG = struct.Struct("<HH")
_EXPLICIT_SHORT = struct.Struct("<HH2sH")
_IMPLICIT = struct.Struct("<HHI")
_U32 = struct.Struct("<I")


class _Unexpected(Exception):
    """Not the simple layout this reader handles: pydicom reads the object."""


@dataclass(frozen=True)
class NativeFrames:
    """The frames of one native little-endian object (``fp`` must stay open while it is used)."""

    fp: BinaryIO
    syntax: str
    value_tell: int  # where the pixel data's value starts in the file
    length: int  # of the pixel data's value
    rows: int
    columns: int
    samples: int
    bits: int
    count: int
    tags: frozenset[int] = frozenset()  # the top-level tags before the pixel data
    image: tuple[tuple[int, bytes, bytes], ...] = ()  # top-level (0028,xxxx) elements: (tag, VR or b"", value)
    pixel_vr: bytes = b""  # the pixel data's VR (b"" in Implicit VR)

    def check(self, number: int) -> int:
        """The zero-based index of 1-based frame ``number``; NotFound when the instance has no such frame."""
        if not 1 <= number <= self.count:
            raise NotFound(f"frame {number} does not exist: the instance has {self.count} frame(s)")
        return number - 1

    def stored(self, index: int) -> bytes | None:
        """The frame's bytes as stored, or None when the object is shorter than its header says (the caller then
        reads it with pydicom, which names the problem)."""
        size = self.rows * self.columns * self.samples * self.bits // 8
        first = index * size
        if first + size > self.length:
            return None
        self.fp.seek(self.value_tell + first)
        data = self.fp.read(size)
        return data if len(data) == size else None


def native_frames(fp: BinaryIO) -> NativeFrames | None:
    """The frame layout of the Part-10 object in ``fp`` when it is native little endian, else None."""
    try:
        return _read(fp)
    except (_Unexpected, struct.error, ValueError, UnicodeDecodeError):
        return None


def _read(fp: BinaryIO) -> NativeFrames:
    fp.seek(0)
    head = fp.read(HEADER_BYTES)
    if len(head) < 132 or head[128:132] != b"DICM":
        raise _Unexpected
    pos, syntax = _file_meta(head, 132)
    explicit = syntax == EXPLICIT_LE
    if not explicit and syntax != IMPLICIT_LE:
        raise _Unexpected
    values: dict[int, bytes] = {}
    tags: list[int] = []
    image: list[tuple[int, bytes, bytes]] = []
    while True:
        tag, vr, length, pos = _element(head, pos, explicit)
        if tag == _PIXEL_DATA:
            if length == _UNDEFINED or (explicit and vr not in (b"OB", b"OW")):
                raise _Unexpected  # encapsulated
            break
        tags.append(tag)
        if tag > _PIXEL_DATA:
            raise _Unexpected  # no (integer) pixel data
        if tag in (0x7FE00008, 0x7FE00009):
            raise _Unexpected  # float pixel data
        if length == _UNDEFINED:
            if vr == b"UN":
                raise _Unexpected  # its items are Implicit VR: left to pydicom
            pos = _skip_sequence(head, pos, explicit)
            continue
        if tag >> 16 == _IMAGE_GROUP:
            if pos + length > len(head):
                raise _Unexpected  # the value runs past what was read
            image.append((tag, vr, head[pos:pos + length]))
            if tag in (_SAMPLES, _FRAMES, _ROWS, _COLUMNS, _BITS):
                values[tag] = head[pos:pos + length]
        pos += length
    rows, columns, bits = _us(values, _ROWS), _us(values, _COLUMNS), _us(values, _BITS)
    samples = _us(values, _SAMPLES) if _SAMPLES in values else 1
    if rows < 1 or columns < 1 or samples < 1 or bits not in (8, 16, 32, 64):
        raise _Unexpected  # bit-packed (1) or odd sizes: pydicom's reader handles them
    frame_bytes = rows * columns * samples * bits // 8
    claimed = _frames(values.get(_FRAMES))
    count = max(min(claimed, length // frame_bytes), 1)
    return NativeFrames(fp, syntax, pos, length, rows, columns, samples, bits, count, frozenset(tags), tuple(image),
                        vr if explicit else b"")


def _file_meta(head: bytes, pos: int) -> tuple[int, str]:
    """Past the file meta group (always Explicit VR Little Endian): (position, Transfer Syntax UID)."""
    syntax = ""
    while pos + 8 <= len(head):
        group, _ = _TAG.unpack_from(head, pos)
        if group != 0x0002:
            return pos, syntax
        tag, _vr, length, pos = _element(head, pos, True)
        if length == _UNDEFINED:
            raise _Unexpected
        if tag == 0x00020010:
            syntax = head[pos:pos + length].decode("ascii").rstrip("\x00 ")
        pos += length
    raise _Unexpected


def _element(head: bytes, pos: int, explicit: bool) -> tuple[int, bytes, int, int]:
    """The element header at ``pos``: (tag, VR or b"", value length, where the value starts)."""
    if pos + 8 > len(head):
        raise _Unexpected  # the header is longer than HEADER_BYTES, or the file ends early
    if explicit:
        group, element, vr, length = _EXPLICIT_SHORT.unpack_from(head, pos)
        tag = group << 16 | element
        if group == 0xFFFE:  # item and delimiters have no VR
            return tag, b"", _U32.unpack_from(head, pos + 4)[0], pos + 8
        if vr in _LONG_VRS:
            if pos + 12 > len(head):
                raise _Unexpected
            return tag, vr, _U32.unpack_from(head, pos + 8)[0], pos + 12
        if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
            raise _Unexpected  # not a VR: not explicit VR after all
        return tag, vr, length, pos + 8
    group, element, length = _IMPLICIT.unpack_from(head, pos)
    return group << 16 | element, b"", length, pos + 8


def _skip_sequence(head: bytes, pos: int, explicit: bool, depth: int = 0) -> int:
    """Past a sequence of undefined length whose items start at ``pos`` (each step moves forward: bounded)."""
    if depth > MAX_DEPTH:
        raise _Unexpected
    while True:
        tag, _vr, length, pos = _element(head, pos, explicit)
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise _Unexpected
        if length != _UNDEFINED:
            pos += length
            continue
        while True:  # an item of undefined length: its elements up to the item delimiter
            tag, vr, length, pos = _element(head, pos, explicit)
            if tag == _ITEM_END:
                break
            if length == _UNDEFINED and vr == b"UN":
                raise _Unexpected
            pos = _skip_sequence(head, pos, explicit, depth + 1) if length == _UNDEFINED else pos + length


def _us(values: dict[int, bytes], tag: int) -> int:
    raw = values.get(tag)
    if raw is None or len(raw) != 2:
        raise _Unexpected
    return int(_US.unpack(raw)[0])


def _frames(raw: bytes | None) -> int:
    """Number of Frames (IS): 1 when absent or empty, as pydicom's reader counts."""
    text = (raw or b"").decode("ascii").strip("\x00 ")
    if not text:
        return 1
    return max(int(text), 1)
