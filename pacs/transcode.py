"""Converting a stored object to an uncompressed transfer syntax: shared by C-GET/C-MOVE (for peers that
refuse the stored syntax) and WADO-RS / WADO-URI (for clients that ask for an uncompressed object).

Stored objects are never changed; a conversion works on a parsed copy. The pixel data is decoded with
pydicom's plugins (pylibjpeg, openjpeg, RLE, JPEG-LS); the instance keeps its SOP Instance UID (the same
instance in another transfer syntax, PS3.5 §10).

Decoding is bounded (:mod:`pacs.imaging.limits`): the whole object's decode cost (every frame) and each
frame's compressed header are checked before the decoder runs, and an object over
``PACS_MAX_DECODED_MIB`` is refused with :class:`TooLargeToConvert` (it is still sent as stored to whoever
accepts its syntax). The memory of the converted copy is held against the process's decode budget until
the converted dataset is freed.
"""

from __future__ import annotations

import contextlib
import weakref

from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels import get_decoder
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pacs.imaging import limits

#: The syntaxes :func:`to_uncompressed` can produce, in preference order.
UNCOMPRESSED_TARGETS = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


class Unconvertible(Exception):
    """The object cannot be converted to the requested syntax; the message says why."""


class TooLargeToConvert(Unconvertible):
    """Decoding the object would need more memory than the bound (or its compressed headers lie)."""


def check_convertible(stored: str, target: str) -> None:
    """Raise :class:`Unconvertible` unless an object stored in ``stored`` can be written as ``target``
    (without reading it: from the syntaxes alone, and whether a decoder is installed)."""
    source, goal = UID(stored), UID(target)
    if goal not in UNCOMPRESSED_TARGETS:
        raise Unconvertible(f"conversion to {goal.name} is not offered (only to uncompressed syntaxes)")
    if source == goal:
        return
    if not source.is_little_endian:
        raise Unconvertible("an Explicit VR Big Endian object is only sent as stored")
    if source.is_compressed:
        try:
            decoder = get_decoder(source)
        except NotImplementedError:
            raise Unconvertible(f"no decoder for {source.name}") from None
        if not decoder.is_available:
            raise Unconvertible(f"no decoder installed for {source.name}")


def to_uncompressed(ds: Dataset, target: UID) -> Dataset:
    """Decompress ``ds`` in place (if it is compressed) and label it with ``target``; returns ``ds``.

    Raises :class:`Unconvertible` for an Explicit VR Big Endian object (pydicom would write its OW/OF
    values without swapping their bytes: refuse, never corrupt), and whatever pydicom raises when no
    plugin decodes the pixel data.
    """
    if not ds.file_meta.TransferSyntaxUID.is_little_endian:
        raise Unconvertible("an Explicit VR Big Endian object is only sent as stored")
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        cost = check_decodable(ds)
        hold = contextlib.ExitStack()
        try:
            hold.enter_context(limits.reserve(cost))
        except limits.DecodeBusy as exc:
            raise Unconvertible(str(exc)) from None
        try:
            # Same instance in another transfer syntax: it keeps its UID (pydicom would make a new one).
            ds.decompress(generate_instance_uid=False)
        except BaseException:
            hold.close()
            raise
        weakref.finalize(ds, hold.close)  # the decoded copy lives as long as the dataset
    ds.file_meta.TransferSyntaxUID = target
    return ds


def check_decodable(ds: Dataset) -> int:
    """The memory decoding all of ``ds``'s frames needs; :class:`TooLargeToConvert` over the bound or when a
    frame's compressed header claims more than the dataset."""
    tsyntax = UID(ds.file_meta.TransferSyntaxUID)
    try:
        geometry = limits.geometry_of(ds)
        cost = limits.check_frames(geometry, tsyntax, geometry.frames)
        if limits.has_frame_header(tsyntax) and "PixelData" in ds:
            frames = generate_frames(ds.PixelData, number_of_frames=geometry.frames)
            number = 0
            while True:
                try:
                    frame = next(frames, None)
                except Exception as exc:
                    raise TooLargeToConvert(f"the compressed frames cannot be located: {exc}") from None
                if frame is None:
                    break
                number += 1
                limits.check_codestream(frame, geometry, tsyntax, number)
    except limits.DecodeTooLarge as exc:
        raise TooLargeToConvert(str(exc)) from None
    return cost
