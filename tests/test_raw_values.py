"""Plain values read from raw bytes (pacs.raw_values) give exactly what pydicom's conversion gives.

Ingest reads its attributes and makes the DICOM JSON fragment from the raw elements when they are plain, and
through pydicom otherwise (issue 13). The reference is the pydicom path (``plain_values=False``): the parse, the
fragment and the ``/metadata`` document must be identical, byte for byte, for every file of pydicom's test corpus
(charsets, sequences, big endian, compressed, malformed) and for generated values built to hit the edges
(padding, backslashes, person name groups, escapes, non-ASCII, numbers pydicom warns about, lying VRs).
"""

from __future__ import annotations

import io
import logging
import random
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.datadict import DicomDictionary, dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID

from pacs.dicomweb import metadata
from pacs.ingest.parsing import ObjectRejected, parse_received
from tests.support.corpus import corpus_files

MAX = 1 << 30


@contextmanager
def _quiet() -> Iterator[None]:
    """pydicom warns about odd corpus files on every read; the outcome, not the noise, is compared."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.CRITICAL)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


def _ingest(data: bytes, plain: bool, utf8: bool) -> tuple[Any, bytes | str]:
    """What ingest makes of ``data``: the parsed object (or the refusal) and the fragment (or why there is none)."""
    try:
        obj = parse_received(data, max_bytes=MAX, assume_utf8_for_latin1=utf8, plain_values=plain)
    except ObjectRejected as exc:
        return (exc.reason, exc.message), ""
    assert obj.dataset is not None
    try:
        fragment: bytes | str = metadata.encode_json(metadata.instance_json(
            obj.dataset, obj.study_instance_uid, obj.series_instance_uid, obj.sop_instance_uid,
            assume_utf8_for_latin1=utf8, plain_values=plain))
    except Exception as exc:
        fragment = repr(exc)
    return obj, fragment


def _document(data: bytes, plain: bool, utf8: bool) -> bytes | str:
    """The ``/metadata`` document of stored bytes (values over 1 KiB deferred), or the error it meets."""
    try:
        ds = metadata.read_dataset(io.BytesIO(data))
        return metadata.encode_json(metadata.instance_json(ds, "1.2", "1.3", "1.4", assume_utf8_for_latin1=utf8,
                                                           plain_values=plain))
    except Exception as exc:
        return repr(exc)


def _assert_same(data: bytes, label: str) -> None:
    with _quiet():
        for utf8 in (False, True):
            reference, fast = _ingest(data, False, utf8), _ingest(data, True, utf8)
            assert fast == reference, f"{label}: parse or fragment differs (utf8={utf8})"
            assert _document(data, True, utf8) == _document(data, False, utf8), f"{label}: /metadata differs"


CORPUS = corpus_files()


def test_the_corpus_is_all_of_pydicoms_test_files() -> None:
    listed = {Path(p) for p in pydicom.data.get_testdata_files() if Path(p).is_file()}
    assert listed and listed <= set(CORPUS)


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.name)
def test_corpus_file_parses_and_converts_as_pydicom_does(path: Path) -> None:
    _assert_same(path.read_bytes(), path.name)


def test_plain_values_are_not_converted_by_pydicom() -> None:
    """The comparison means something: on an ordinary CT the fragment leaves most elements raw."""
    data = Path(pydicom.data.get_testdata_file("CT_small.dcm")).read_bytes()  # type: ignore[arg-type]
    obj = parse_received(data, max_bytes=MAX)
    assert obj.dataset is not None
    metadata.instance_json(obj.dataset, "1.2", "1.3", "1.4")
    raw = [e for e in obj.dataset._dict.values() if isinstance(e, RawDataElement)]
    assert len(raw) >= 0.8 * len(obj.dataset._dict)


# ---- generated values -------------------------------------------------------------------------------------------

_PIECES = ["", " ", "\x00", "ABC", "Doe^John", "A\\B", " x ", "=", "Yamada^Tarou=山田^太郎=やまだ^たろう", "Müller",
           "Nguyễn^Văn An", "\x1b$B", "\x1b(B", "1", "1.5", "-2", "+3", "1e5", ".5", "5.", "NaN", "inf", "1,5", "01",
           "1.2.840.10008", "1..2", "0.1", "20240101", "1230", "x" * 70, "ORIGINAL\\PRIMARY", "\t", "\r\n", "^^^^",
           "1" * 13, "2" * 17, "1.0", "  7  ", "a=b=c=d", "\\", "\\\\", "é", "1 2"]
_CHARSETS = [None, "", "ISO_IR 100", "ISO_IR 192", "ISO_IR 6", "ISO 2022 IR 6\\ISO 2022 IR 87", "GB18030",
             "ISO_IR 13", "ISO_IR 144", "\\ISO 2022 IR 149", "ISO_IR 999"]
_LONG_LENGTH_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT", "SV", "UV"}
_VRS = ["AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT", "US",
        "SS", "UL", "SL", "FL", "FD", "SV", "UV", "OB", "OW", "OF", "OD", "OL", "OV", "AT"]
# the attributes ingest reads, with their VRs, and one public tag for every other VR
_INGEST_TAGS = [0x00080016, 0x00080018, 0x0020000D, 0x0020000E, 0x00100010, 0x00100020, 0x00100021, 0x00100030,
                0x00100040, 0x00080020, 0x00080030, 0x00080050, 0x00200010, 0x00081030, 0x00080090, 0x00080080,
                0x00080060, 0x00200011, 0x0008103E, 0x00180015, 0x00080021, 0x00080031, 0x00081010, 0x00200013,
                0x00280010, 0x00280011, 0x00280008]
_UID_TAGS = {0x00080016, 0x00080018, 0x0020000D, 0x0020000E}


def _tag_for_each_vr() -> dict[str, int]:
    tags: dict[str, int] = {}
    for tag, entry in sorted(DicomDictionary.items()):
        vr = entry[0]
        if vr in _VRS and vr not in tags and 0x0008 <= tag >> 16 != 0x7FE0 and entry[3] == "" \
                and tag not in _INGEST_TAGS and tag != 0x00080005:
            tags[vr] = tag
    return tags


_OTHER_TAGS = _tag_for_each_vr()


def _text(rng: random.Random) -> bytes:
    text = rng.choice(["", "\\", " ", "^"]).join(rng.choice(_PIECES) for _ in range(rng.randint(1, 3)))
    encoding = rng.choice(["ascii", "latin-1", "utf-8", "iso2022_jp", "gb18030"])
    data = text.encode(encoding, errors="ignore")
    return data + rng.choice([b"", b" ", b"\x00", b"  "])


def _value(rng: random.Random, vr: str, tag: int) -> bytes:
    if tag in _UID_TAGS and rng.random() < 0.95:
        uid = f"1.2.826.0.1.{rng.randint(1, 10**9)}.{rng.randint(0, 99)}"
        return (uid + "\x00" * (len(uid) % 2)).encode()
    if vr in ("US", "SS", "UL", "SL", "FL", "FD", "SV", "UV", "OB", "OW", "OF", "OD", "OL", "OV", "AT"):
        size = rng.choice([0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 2000])
        return bytes(rng.getrandbits(8) for _ in range(size))
    return _text(rng)


def _element(tag: int, vr: str, value: bytes, explicit: bool, little: bool) -> bytes:
    e = "<" if little else ">"
    head = struct.pack(f"{e}HH", tag >> 16, tag & 0xFFFF)
    if not explicit:
        return head + struct.pack(f"{e}I", len(value)) + value
    if vr in _LONG_LENGTH_VRS:
        return head + vr.encode() + b"\x00\x00" + struct.pack(f"{e}I", len(value)) + value
    return head + vr.encode() + struct.pack(f"{e}H", len(value)) + value[:0xFFFF]


def _generated(seed: int) -> bytes:
    rng = random.Random(seed)
    syntax = rng.choice(["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"])
    explicit, little = syntax != "1.2.840.10008.1.2", syntax != "1.2.840.10008.1.2.2"
    elements: dict[int, tuple[str, bytes]] = {}
    charset = rng.choice(_CHARSETS)
    if charset is not None:
        elements[0x00080005] = ("CS", charset.encode() + b" " * (len(charset) % 2))
    for tag in [*_INGEST_TAGS, *_OTHER_TAGS.values()]:
        if rng.random() < 0.1:
            continue
        vr = dictionary_VR(tag)
        if explicit and rng.random() < 0.08:  # a lying or unknown VR
            vr = rng.choice([*_VRS, "UN", "XX"])
        elements[tag] = (vr, _value(rng, vr, tag))
    body = b"".join(_element(tag, vr, value, explicit, little) for tag, (vr, value) in sorted(elements.items()))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.7")
    meta.MediaStorageSOPInstanceUID = UID("1.2.3.4")
    meta.TransferSyntaxUID = UID(syntax)
    out = DicomBytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    return out.getvalue() + body


@pytest.mark.parametrize("chunk", range(8))
def test_generated_values_parse_and_convert_as_pydicom_does(chunk: int) -> None:
    for seed in range(chunk * 60, (chunk + 1) * 60):
        _assert_same(_generated(seed), f"seed {seed}")
