"""Plain element values read straight from pydicom's raw elements, as pydicom would convert them.

Ingest reads a few dozen values of every received object (its UIDs, the index's attributes, the DICOM JSON
fragment). Converting each through pydicom's :class:`~pydicom.dataelem.DataElement` costs more than the rest of
the parse (issue 13). The functions here turn the *plain* cases (explicit or dictionary VR, a value that validates,
text that is ASCII under a character set where ASCII is ASCII) into the same result from the raw bytes, and return
None for everything else: the caller then asks pydicom, so the unusual cases (sequences, private or UN elements,
ISO 2022 escapes, non-ASCII text, values pydicom would warn about or refuse) keep pydicom's exact behaviour.

``tests/test_raw_values.py`` compares both paths over pydicom's whole test corpus and over generated values.
"""

from __future__ import annotations

import base64
import re
import struct
from typing import Any, Final

from pydicom import config
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.hooks import hooks
from pydicom.tag import _LUT_DESCRIPTOR_TAGS
from pydicom.values import converters

from storage.keys import is_valid_uid

__all__ = ["BULK", "ascii_safe_charset", "fast_path_available", "int_of_raw", "json_of_raw", "plain_vr",
           "text_of_raw"]

#: Python encodings (as pydicom names them) that decode ASCII bytes without an escape as ASCII.
_ASCII_SAFE_ENCODINGS: Final = frozenset({"iso8859", "latin_1", "UTF8", "utf_8"})
#: VRs whose value pydicom decodes with the default encoding, whatever the character set.
_DEFAULT_CHARSET_STRINGS: Final = frozenset({"AS", "CS", "DA", "DT", "TM"})
_NUMBER_FORMATS: Final = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "FL": "f", "FD": "d", "SV": "q", "UV": "Q"}
_NUMBER_SIZES: Final = {vr: struct.calcsize("=" + fmt) for vr, fmt in _NUMBER_FORMATS.items()}
_BINARY_VRS: Final = frozenset({"OB", "OD", "OF", "OL", "OV", "OW"})
_KNOWN_VRS: Final = frozenset(converters)  # pydicom refuses to convert any other VR, even an empty value
_MULTI_TEXT_VRS: Final = {"SH": 16, "LO": 64, "UC": 0}  # pydicom's length limits (0: none)
_SINGLE_TEXT_VRS: Final = {"ST": 1024, "LT": 10240, "UT": 0}
_PN_COMPONENT_MAX: Final = 64
# pydicom's own validation patterns (pydicom.valuerep.VR_REGEXES): a value outside them takes pydicom's path,
# which warns about it
_IS: Final = re.compile(r" *[+\-]?\d+ *")
_DS: Final = re.compile(r" *[+\-]?(\d+|\d+\.\d*|\.\d+)([eE][+\-]?\d+)? *")
#: what :func:`json_of_raw` returns for bulk data
BULK: Final[dict[str, Any]] = {}
_DEFAULT_VR_HOOK: Final = hooks.raw_element_vr
_DEFAULT_VALUE_HOOK: Final = hooks.raw_element_value


def fast_path_available() -> bool:
    """False when pydicom is configured to convert values differently from its defaults (then use pydicom)."""
    return (hooks.raw_element_vr is _DEFAULT_VR_HOOK and hooks.raw_element_value is _DEFAULT_VALUE_HOOK
            and not hooks.raw_element_kwargs and config.data_element_callback is None
            and not config.datetime_conversion and not config.use_DS_numpy and not config.use_DS_decimal
            and not config.use_IS_numpy and not config.use_none_as_empty_text_VR_value)


def ascii_safe_charset(ds: Dataset) -> bool:
    """Does pydicom decode ASCII text of ``ds`` (no escape byte) as ASCII?  The charset ``Dataset[...]`` uses."""
    encodings = ds.original_character_set or ds._character_set
    if isinstance(encodings, str):
        return encodings in _ASCII_SAFE_ENCODINGS
    return all(e in _ASCII_SAFE_ENCODINGS for e in encodings)


def plain_vr(raw: RawDataElement) -> str | None:
    """The VR pydicom gives ``raw`` when it is plain: explicit, or the dictionary's for an implicit public tag.
    None for UN (pydicom may replace it), ambiguous, private or unknown tags."""
    vr = raw.VR
    if vr is None:
        try:
            vr = dictionary_VR(raw.tag)
        except KeyError:
            return None
        if " or " in vr:
            return None
    elif vr == "UN":
        return None
    return vr


def _strings(values: list[str], vr: str) -> dict[str, Any]:
    """DICOM JSON of a pydicom string value: one value (empty means none) or a list of them."""
    if len(values) == 1:
        return {"vr": vr, "Value": values} if values[0] else {"vr": vr}
    return {"vr": vr, "Value": values}


def _ascii_text(value: bytes) -> str | None:
    return value.decode("ascii") if value.isascii() and b"\x1b" not in value else None


def json_of_raw(raw: RawDataElement, vr: str, text_ok: bool, threshold: int) -> dict[str, Any] | None:
    """The DICOM JSON element pydicom's conversion and ``to_json_dict`` would give ``raw`` (a value already read,
    VR from :func:`plain_vr`, not Pixel Data); None when it is not a plain case; :data:`BULK` when the value is
    bulk data (a binary or UT value longer than ``threshold``), whose entry only the caller can make.

    ``text_ok``: :func:`ascii_safe_charset` of its dataset.
    """
    value = raw.value
    if value is None or vr not in _KNOWN_VRS:
        return None
    if not value:  # pydicom's empty value for the VR: no "Value"
        return None if vr == "SQ" else {"vr": vr}
    if vr in _NUMBER_FORMATS:
        size = _NUMBER_SIZES[vr]
        if len(value) % size or (vr == "SS" and raw.tag in _LUT_DESCRIPTOR_TAGS):
            return None
        numbers = struct.unpack(f"{'<' if raw.is_little_endian else '>'}{len(value) // size}{_NUMBER_FORMATS[vr]}",
                                value)
        return {"vr": vr, "Value": list(numbers)}
    if vr in _DEFAULT_CHARSET_STRINGS:
        return _strings(value.decode("latin-1").rstrip(" \x00").split("\\"), vr)
    if vr == "UI":
        uids = value.decode("latin-1").rstrip(" \x00").split("\\")
        if not all(is_valid_uid(u) for u in uids):  # pydicom's UI expression
            return None
        return {"vr": vr, "Value": uids}
    if vr == "IS":
        items = value.decode("latin-1").rstrip(" \x00").split("\\")
        if not all(len(i) <= 12 and _IS.fullmatch(i) for i in items):
            return None
        return {"vr": vr, "Value": [int(i) for i in items]}
    if vr == "DS":
        items = value.decode("latin-1").strip().rstrip(" \x00").split("\\")
        if not all(len(i) <= 16 and _DS.fullmatch(i) for i in items):
            return None
        return {"vr": vr, "Value": [float(i) for i in items]}
    if vr == "AE":
        return _strings([s.strip() for s in value.decode("latin-1").split("\\")], vr)
    if vr in _BINARY_VRS:
        if raw.length > threshold:
            return BULK
        return {"vr": vr, "InlineBinary": base64.b64encode(value).decode("utf-8")}
    if not text_ok:
        return None
    if vr in _MULTI_TEXT_VRS:
        text = _ascii_text(value)
        limit = _MULTI_TEXT_VRS[vr]
        if text is None:
            return None
        items = text.split("\\")
        if limit and any(len(i) > limit for i in items):
            return None
        return _strings([i.rstrip("\x00 ") for i in items], vr)
    if vr in _SINGLE_TEXT_VRS:
        text = _ascii_text(value)
        limit = _SINGLE_TEXT_VRS[vr]
        if text is None or (limit and len(text) > limit):
            return None
        text = text.rstrip("\x00 ")
        if not text:
            return {"vr": vr}
        if vr == "UT" and raw.length > threshold:
            return BULK
        return {"vr": vr, "Value": [text]}
    if vr == "PN":
        text = _ascii_text(value.rstrip(b"\x00 "))
        if text is None or "=" in text:
            return None
        names = text.split("\\")
        if any(len(n) > _PN_COMPONENT_MAX for n in names) or (len(names) > 1 and not all(names)):
            return None
        if len(names) == 1 and not names[0]:
            return {"vr": vr}
        return {"vr": vr, "Value": [{"Alphabetic": n} for n in names]}
    return None


def text_of_raw(raw: Any, expected_vr: str, text_ok: bool) -> str | None:
    """A plain string, text or UID value of ``raw`` as ingest reads it (values joined with a backslash,
    spaces and NULs stripped at both ends); None when it is not a plain case or not raw."""
    if not isinstance(raw, RawDataElement) or raw.value is None or raw.VR not in (None, expected_vr):
        return None
    value = raw.value
    if expected_vr in _DEFAULT_CHARSET_STRINGS:
        return value.decode("latin-1").strip(" \x00")
    if expected_vr == "UI":
        text = value.decode("latin-1").rstrip(" \x00")
        if not text and value:
            return None
        if text and not all(is_valid_uid(u) for u in text.split("\\")):
            return None
        return text
    if not text_ok:
        return None
    if expected_vr in _MULTI_TEXT_VRS:
        ascii_text = _ascii_text(value)
        limit = _MULTI_TEXT_VRS[expected_vr]
        if ascii_text is None or "\\" in ascii_text or (limit and len(ascii_text) > limit):
            return None
        return ascii_text.strip(" \x00")
    if expected_vr == "PN":
        name = _ascii_text(value.rstrip(b"\x00 "))
        if name is None or "=" in name or "\\" in name or len(name) > _PN_COMPONENT_MAX:
            return None
        return name.strip(" \x00")
    return None


def int_of_raw(raw: Any, expected_vr: str) -> tuple[bool, int | None]:
    """The first value of a plain IS or US ``raw`` as an int, (True, value); (False, None) when not plain."""
    if not isinstance(raw, RawDataElement) or raw.value is None or raw.VR not in (None, expected_vr):
        return False, None
    value = raw.value
    if not value:
        return True, None
    if expected_vr == "US":  # pydicom reads several values as a list, which ingest's int() refuses: not plain
        if len(value) != 2:
            return False, None
        return True, struct.unpack("<H" if raw.is_little_endian else ">H", value[:2])[0]
    if expected_vr == "IS":
        items = value.decode("latin-1").rstrip(" \x00").split("\\")
        if not all(len(i) <= 12 and _IS.fullmatch(i) for i in items):
            return False, None
        return True, int(items[0])
    return False, None
