"""The one rule for text sent as UTF-8 under a Latin-1 label (``PACS_ASSUME_UTF8_FOR_LATIN1``).

Many modalities and workstations write UTF-8 bytes ("Nguyễn^Văn An") while their Specific Character
Set (0008,0005) says nothing (the default repertoire) or ISO_IR 100 (Latin-1). Decoded as labelled,
such a name becomes "NguyÃ¡»…n". The rule, applied wherever received text is read (ingest and the
index, DICOM JSON metadata, C-FIND and worklist identifiers, the DIMSE audit):

- it applies only when ``assume_utf8_for_latin1`` is set and every label of the dataset is the default
  or Latin-1 (:data:`LATIN1_LABELS`); a dataset labelled ISO_IR 192, or anything else, is decoded as
  labelled by pydicom;
- it applies only to text VRs (:data:`TEXT_VRS`) whose raw bytes are not plain ASCII;
- the bytes are read as UTF-8 only when they are valid UTF-8: a genuine Latin-1 name ("Müller", where
  ü is the single byte 0xFC) is never valid UTF-8 and stays Latin-1.

Only elements still raw (not yet decoded by pydicom) can be read this way: callers apply the rule
before anything reads the values, or read through :func:`text_of`.
"""

from __future__ import annotations

from typing import Any

from pydicom.datadict import dictionary_has_tag, dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

UTF8_LABEL = "ISO_IR 192"
LATIN1_LABELS = frozenset({"", "ISO_IR 100", "ISO_IR 6", "ISO 2022 IR 6", "ISO 2022 IR 100"})
TEXT_VRS = frozenset({"PN", "LO", "SH", "ST", "LT", "UT", "UC"})
_SINGLE_VALUED_VRS = frozenset({"ST", "LT", "UT"})  # a backslash in them is text, not a value separator


def charset_labels(ds: Dataset) -> list[str]:
    """The dataset's Specific Character Set values, stripped ([] when it has none)."""
    value = ds.get("SpecificCharacterSet", "") or ""
    labels = [value] if isinstance(value, str) else [str(v) for v in value]
    return [label.strip() for label in labels if label.strip()]


def assumes_utf8(ds: Dataset, assume_utf8_for_latin1: bool) -> bool:
    """Does the rule apply to ``ds``: the setting is on and it is labelled the default or Latin-1 only?"""
    return assume_utf8_for_latin1 and all(label in LATIN1_LABELS for label in charset_labels(ds))


def utf8_text(raw: Any, vr: str | None = None) -> str | None:
    """``raw`` (a :class:`RawDataElement`) read as UTF-8: its value with trailing spaces and NULs removed,
    or None when it is not raw text holding non-ASCII bytes that are valid UTF-8 (then decode as labelled).

    ``vr``: the element's VR when the caller knows it better (an implicit VR element has none).
    """
    if not isinstance(raw, RawDataElement) or not isinstance(raw.value, bytes) or raw.value.isascii():
        return None
    vr = vr or raw.VR or (dictionary_VR(raw.tag) if dictionary_has_tag(raw.tag) else "")
    if vr not in TEXT_VRS:
        return None
    try:
        return raw.value.decode("utf-8").rstrip(" \x00")
    except UnicodeDecodeError:
        return None


def utf8_element(raw: Any) -> DataElement | None:
    """``raw`` decoded by :func:`utf8_text` as a DataElement (multi-valued where its VR allows), or None."""
    text = utf8_text(raw)
    if text is None:
        return None
    vr = raw.VR or dictionary_VR(raw.tag)
    value: str | list[str] = text if vr in _SINGLE_VALUED_VRS or "\\" not in text else text.split("\\")
    return DataElement(raw.tag, vr, value)


def text_of(ds: Dataset, keyword: str, assume_utf8: bool) -> str:
    """One text attribute of ``ds`` as a string ('' when absent or undecodable), multiple values joined
    with a backslash; ``assume_utf8`` is :func:`assumes_utf8` of the dataset the attribute is in."""
    try:
        if keyword not in ds:
            return ""
        if assume_utf8:
            text = utf8_text(ds.get_item(keyword))
            if text is not None:
                return text.strip(" \x00")
        value = ds.get(keyword, "")
    except Exception:
        return ""
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value).strip(" \x00")
    return str(value).strip(" \x00")


def decode_dataset_text(ds: Dataset, assume_utf8_for_latin1: bool) -> Dataset:
    """Apply the rule to every raw text element of ``ds`` in place (sequence items included), so that
    whatever reads it afterwards reads UTF-8 sent under a Latin-1 label as UTF-8. Returns ``ds``.

    An item with a Specific Character Set of its own is judged by it; other items inherit the dataset's.
    Elements that cannot be read are left for the caller to meet (and report) as it would have.
    """
    _decode(ds, assumes_utf8(ds, assume_utf8_for_latin1), assume_utf8_for_latin1)
    return ds


def _decode(ds: Dataset, utf8: bool, assume_utf8_for_latin1: bool) -> None:
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        if utf8:
            element = utf8_element(raw)
            if element is not None:
                ds[tag] = element
                continue
        vr = getattr(raw, "VR", None) or (dictionary_VR(tag) if dictionary_has_tag(tag) else "")
        if vr != "SQ":
            continue
        try:
            items = ds[tag].value or []
        except Exception:
            continue
        for item in items:
            own = "SpecificCharacterSet" in item
            _decode(item, assumes_utf8(item, assume_utf8_for_latin1) if own else utf8, assume_utf8_for_latin1)
