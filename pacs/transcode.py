"""Converting a stored object to an uncompressed transfer syntax: shared by C-GET/C-MOVE (for peers that
refuse the stored syntax) and WADO-RS / WADO-URI (for clients that ask for an uncompressed object).

Stored objects are never changed; a conversion works on a parsed copy. The pixel data is decoded with
pydicom's plugins (pylibjpeg, openjpeg, RLE, JPEG-LS); the instance keeps its SOP Instance UID (the same
instance in another transfer syntax, PS3.5 §10).
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

#: The syntaxes :func:`to_uncompressed` can produce, in preference order.
UNCOMPRESSED_TARGETS = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


class Unconvertible(Exception):
    """The object cannot be converted to the requested syntax; the message says why."""


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
        # Same instance in another transfer syntax: it keeps its UID (pydicom would make a new one).
        ds.decompress(generate_instance_uid=False)
    ds.file_meta.TransferSyntaxUID = target
    return ds
