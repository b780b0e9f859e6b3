"""The DICOM JSON model (PS3.18 F.2) of stored instances: what WADO-RS ``/metadata`` returns.

Bulk data
---------
Pixel Data (7FE0,0010), Float Pixel Data (7FE0,0008) and Double Float Pixel Data (7FE0,0009), at
any depth and of any size, and every OB, OD, OF, OL, OV, OW, UN or UT value longer than
:data:`BULK_DATA_THRESHOLD` bytes (also inside sequences) are not inlined: the element carries a
``BulkDataURI`` instead, *relative to the DICOMweb root* (the WADO-RS layer prefixes its own base
URL when it serves the document, so stored documents survive a change of host name)::

    studies/{study}/series/{series}/instances/{sop}/bulkdata/{tag path}

The tag path leads from the instance's top-level dataset to the element: tags as 8 upper-case
hexadecimal digits, sequence items as zero-based decimal indexes, joined by ``/``::

    7FE00010                  Pixel Data
    00880200/0/7FE00010       Pixel Data of the first item of the Icon Image Sequence
    00420011                  Encapsulated Document

Pixel data uses ``bulkdata`` like everything else (not ``.../frames``): the URI names the element's
value exactly as stored (for encapsulated transfer syntaxes, the fragments). Smaller binary values
are inlined as ``InlineBinary`` (base64), as PS3.18 allows.

Reading
-------
The object is read with ``defer_size``: values longer than the threshold are skipped while
parsing and only their position is remembered, so building the metadata of a 500 MB multi-frame
object never loads (let alone decodes) its pixel data. A deferred value that is not bulk data (a
long multi-valued DS, say) is read when it is converted, so the stream must stay open and
seekable until :func:`instance_json` returns.

Converting
----------
Plain values still raw (explicit or dictionary VR, a value pydicom would accept without a warning, ASCII text
under a character set that reads ASCII as ASCII) go from their bytes to JSON by :mod:`pacs.raw_values`;
everything else (sequences, private and UN elements, other text, odd values) through pydicom's ``DataElement``
and ``to_json_dict``. Both give the same document (``tests/test_raw_values.py``); the first costs a fraction
of the second, which ingest pays for every instance it stores (issue 13).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from typing import Any, BinaryIO, Final

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset

from pacs.charset import assumes_utf8, utf8_element
from pacs.raw_values import BULK, ascii_safe_charset, fast_path_available, json_of_raw, plain_vr

log = logging.getLogger(__name__)

__all__ = [
    "BULK_DATA_THRESHOLD",
    "BULK_VRS",
    "PIXEL_DATA_TAGS",
    "JsonArrayWriter",
    "bulk_data_uri",
    "encode_json",
    "instance_json",
    "instance_metadata",
    "iter_bulk_uris",
    "read_dataset",
]

#: Binary values longer than this many bytes become bulk data.
BULK_DATA_THRESHOLD: Final = 1024
#: VRs whose long values are bulk data.
BULK_VRS: Final = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "UT"})
#: Float Pixel Data, Double Float Pixel Data, Pixel Data: always bulk data, whatever their size.
PIXEL_DATA_TAGS: Final = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})

_TRAILING_PADDING: Final = 0xFFFCFFFC

TagPath = tuple[int, ...]  # tag, item index, tag, item index, ..., tag


def bulk_data_uri(study_uid: str, series_uid: str, sop_uid: str, path: TagPath) -> str:
    """The relative WADO-RS URI of the element at ``path`` (see the module docstring)."""
    parts = [f"{p:08X}" if i % 2 == 0 else str(p) for i, p in enumerate(path)]
    return f"studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/bulkdata/{'/'.join(parts)}"


def read_dataset(fp: BinaryIO, threshold: int = BULK_DATA_THRESHOLD) -> Dataset:
    """Parse a stored object without loading values longer than ``threshold`` (``fp`` must be seekable)."""
    return pydicom.dcmread(fp, defer_size=threshold, force=True)


def instance_json(
    ds: Dataset,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    *,
    threshold: int = BULK_DATA_THRESHOLD,
    assume_utf8_for_latin1: bool = False,
    plain_values: bool = True,
) -> dict[str, Any]:
    """The DICOM JSON object of ``ds``, bulk data replaced by URIs under the given UIDs.

    ``assume_utf8_for_latin1`` reads text labelled with the default or a Latin-1 character set as
    UTF-8 when its bytes are valid UTF-8 (as the index does, see ``PACS_ASSUME_UTF8_FOR_LATIN1``).
    ``plain_values``: plain values still raw go straight from their bytes to JSON (:mod:`pacs.raw_values`,
    the same document); False converts every element through pydicom (the reference the tests compare with).
    """
    walker = _Walker(study_uid, series_uid, sop_uid, threshold, assumes_utf8(ds, assume_utf8_for_latin1),
                     plain_values and fast_path_available())
    return walker.dataset(ds, ())


def encode_json(value: Any) -> bytes:
    """Compact UTF-8 JSON; non-finite numbers (a DS of "NaN") become null, which JSON can carry."""
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError:
        text = json.dumps(_finite(value), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.encode("utf-8")


def whole_fragment(data: bytes) -> bool:
    """Whether stored fragment bytes can be an object :func:`encode_json` wrote: ``{`` … ``}`` and no NUL byte.

    Fragments are put without forcing their bytes to disk (they can be made again from the object; their names are
    synced, :meth:`storage.filesystem.FilesystemStore.put`), so after a power cut one may read empty or with a hole
    of zeros; compact JSON never holds a raw NUL (``json`` escapes it), so this cheap check tells such a file from a
    whole one.
    """
    return len(data) >= 2 and data[:1] == b"{" and data[-1:] == b"}" and b"\x00" not in data


def instance_metadata(
    fp: BinaryIO,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    *,
    threshold: int = BULK_DATA_THRESHOLD,
    assume_utf8_for_latin1: bool = False,
) -> bytes:
    """Read a stored object from ``fp`` and return its encoded DICOM JSON object.

    UIDs not given are taken from the dataset; the archive passes the index's, which name the
    WADO-RS resources the bulk data URIs point at.
    """
    ds = read_dataset(fp, threshold)
    return encode_json(instance_json(
        ds,
        study_uid or str(ds.StudyInstanceUID),
        series_uid or str(ds.SeriesInstanceUID),
        sop_uid or str(ds.SOPInstanceUID),
        threshold=threshold,
        assume_utf8_for_latin1=assume_utf8_for_latin1,
    ))


class JsonArrayWriter:
    """Writes a JSON array whose members are already-encoded JSON values, one after the other.

    The series document is built this way so that it is never held (or parsed) as a whole.
    """

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._count = 0
        self._size = 1
        out.write(b"[")

    def add(self, member: bytes | BinaryIO) -> None:
        if self._count:
            self._out.write(b",")
            self._size += 1
        if isinstance(member, bytes | bytearray):
            self._out.write(member)
            self._size += len(member)
        else:
            while chunk := member.read(1024 * 1024):
                self._out.write(chunk)
                self._size += len(chunk)
        self._count += 1

    def finish(self) -> int:
        """Close the array; returns the number of bytes written."""
        self._out.write(b"]")
        self._size += 1
        return self._size

    @property
    def count(self) -> int:
        return self._count


class _Walker:
    """Converts one instance's datasets, tracking the tag path of every element for its URI."""

    def __init__(self, study: str, series: str, sop: str, threshold: int, utf8: bool, plain: bool = False) -> None:
        self._uids = (study, series, sop)
        self._threshold = threshold
        self._utf8 = utf8
        self._plain = plain

    def dataset(self, ds: Dataset, path: TagPath) -> dict[str, Any]:
        out: dict[str, Any] = {}
        text_ok: bool | None = None  # ascii_safe_charset(ds), once needed
        for tag, raw in list(ds._dict.items()):  # the order of ds.keys()
            number = int(tag)  # BaseTag compares and formats in Python: an int does not
            if number & 0xFFFF == 0 or number == _TRAILING_PADDING:
                continue  # group lengths and trailing padding mean nothing once re-encoded
            key = f"{number:08X}"
            if self._plain and type(raw) is RawDataElement and raw.value is not None and number not in PIXEL_DATA_TAGS:
                vr = plain_vr(raw)
                if vr is not None:
                    if text_ok is None:
                        text_ok = ascii_safe_charset(ds)
                    plain = json_of_raw(raw, vr, text_ok, self._threshold)
                    if plain is BULK:
                        out[key] = self._bulk(vr, (*path, number))
                        continue
                    if plain is not None:
                        out[key] = plain
                        continue
            try:
                value = self._element(ds, tag, (*path, number))
            except Exception as exc:  # one malformed value must not cost the whole instance its metadata
                log.warning("metadata of %s: skipped %s: %s", self._uids[2], tag, exc)
                continue
            out[key] = value
        return out

    def _element(self, ds: Dataset, tag: int, path: TagPath) -> dict[str, Any]:
        raw = ds.get_item(tag, keep_deferred=True)
        if isinstance(raw, RawDataElement) and raw.value is None and raw.length:
            vr = _deferred_vr(raw)
            if vr is not None and (vr in BULK_VRS or tag in PIXEL_DATA_TAGS):
                return self._bulk(vr, path)  # never read: that is the point of deferring it
        elif isinstance(raw, RawDataElement) and self._utf8:
            decoded = utf8_element(raw)
            if decoded is not None:
                ds[tag] = decoded
        elem: DataElement = ds[tag]
        if elem.VR == "SQ":
            items = [self.dataset(item, (*path, i)) for i, item in enumerate(elem.value)]
            return {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
        if not elem.is_empty and (tag in PIXEL_DATA_TAGS or (elem.VR in BULK_VRS and self._large(raw, elem))):
            return self._bulk(str(elem.VR), path)
        return elem.to_json_dict(None, self._threshold)

    def _large(self, raw: RawDataElement | DataElement | None, elem: DataElement) -> bool:
        if isinstance(raw, RawDataElement):
            return raw.length > self._threshold  # undefined length (0xFFFFFFFF) is large too
        value = elem.value
        size = len(value.encode("utf-8")) if isinstance(value, str) else len(value) if value is not None else 0
        return size > self._threshold

    def _bulk(self, vr: str, path: TagPath) -> dict[str, Any]:
        return {"vr": vr, "BulkDataURI": bulk_data_uri(*self._uids, path)}


def _deferred_vr(raw: RawDataElement) -> str | None:
    """The VR of a value not read yet; None when it can only be known by reading it."""
    vr = raw.VR
    if vr is None:  # implicit VR: the dictionary's; private or unknown tags are UN
        try:
            vr = dictionary_VR(raw.tag)
        except KeyError:
            return "UN"
    if " or " in vr:
        # Ambiguous (implicit VR only): PS3.5 A.1 makes implicit VR pixel data OW, and a value long
        # enough to be deferred is a LUT or pixel data, so OW; a "US or SS" value must be read.
        return "OW" if "OW" in vr else None
    return vr


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def iter_bulk_uris(document: dict[str, Any]) -> Iterator[str]:
    """Every BulkDataURI in a DICOM JSON object (nested items included), in document order."""
    for element in document.values():
        if "BulkDataURI" in element:
            yield element["BulkDataURI"]
        for item in element.get("Value", []) if element.get("vr") == "SQ" else []:
            yield from iter_bulk_uris(item)
