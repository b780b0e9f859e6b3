"""QIDO-RS results: query rows (``{keyword: value}`` from :mod:`pacs.query.engine`) as DICOM JSON objects
(PS3.18 F.2).

Attributes are written in tag order, each as ``{"vr": ..., "Value": [...]}``; an attribute without a
value is ``{"vr": ...}`` (PS3.18 F.2.5: present, zero length). Person names become
``{"Alphabetic", "Ideographic", "Phonetic"}`` objects, integer strings (IS, US...) JSON numbers, and
backslash-joined multi-values (Modalities in Study) arrays. Two attributes are not in the index:
Instance Availability (0008,0056) is ``ONLINE`` (everything indexed is in the store) and Retrieve URL
(0008,1190) is the WADO-RS address of the row's study, series or instance.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword

from pacs.dicomweb.metadata import encode_json
from pacs.query.attributes import ATTRIBUTES, INTEGER_VRS, Level

RETRIEVE_URL = "RetrieveURL"
INSTANCE_AVAILABILITY = "InstanceAvailability"
SYNTHETIC = (RETRIEVE_URL, INSTANCE_AVAILABILITY)  # returned, not read from the index

_SINGLE_VALUED_TEXT = {"LT", "ST", "UT", "UR"}  # backslash is not a value separator in these VRs


def vr_of(keyword: str) -> str:
    attr = ATTRIBUTES.get(keyword)
    if attr is not None:
        return attr.vr
    vr = dictionary_VR(keyword)
    return vr.split(" or ")[0]


def tag_of(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return f"{tag:08X}"


def retrieve_url(base_url: str, level: Level, row: dict[str, Any]) -> str:
    """``{base}studies/{study}[/series/{series}[/instances/{sop}]]`` for a row at ``level``."""
    url = f"{base_url}studies/{row.get('StudyInstanceUID')}"
    if level.depth >= Level.SERIES.depth:
        url += f"/series/{row.get('SeriesInstanceUID')}"
    if level.depth >= Level.IMAGE.depth:
        url += f"/instances/{row.get('SOPInstanceUID')}"
    return url


def element(keyword: str, value: Any) -> dict[str, Any]:
    vr = vr_of(keyword)
    if value is None or value == "":
        return {"vr": vr}
    if isinstance(value, int) and not isinstance(value, bool):
        return {"vr": vr, "Value": [value]}
    text = str(value)
    values = [text] if vr in _SINGLE_VALUED_TEXT else text.split("\\")
    if vr == "PN":
        return {"vr": vr, "Value": [_person_name(v) for v in values]}
    if vr in INTEGER_VRS:
        return {"vr": vr, "Value": [_number(v) for v in values]}
    return {"vr": vr, "Value": values}


def _person_name(value: str) -> dict[str, str] | None:
    groups = value.split("=")
    named = {name: group for name, group in zip(("Alphabetic", "Ideographic", "Phonetic"), groups, strict=False)
             if group}
    return named or None


def _number(value: str) -> int | str | None:
    value = value.strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        return value  # a malformed IS stays a string rather than being lost


def row_json(row: dict[str, Any], keys: Sequence[str], level: Level, base_url: str) -> dict[str, Any]:
    """The DICOM JSON object of one row; ``keys`` names the attributes to include (synthetic ones too)."""
    out: dict[str, dict[str, Any]] = {}
    for keyword in keys:
        if keyword == RETRIEVE_URL:
            value: Any = retrieve_url(base_url, level, row)
        elif keyword == INSTANCE_AVAILABILITY:
            value = "ONLINE"
        else:
            value = row.get(keyword)
        out[tag_of(keyword)] = element(keyword, value)
    return dict(sorted(out.items()))


def json_array(rows: Iterable[dict[str, Any]], keys: Sequence[str], level: Level, base_url: str,
               batch: int = 100) -> Iterator[bytes]:
    """A JSON array of the rows' DICOM JSON objects, streamed a batch of rows at a time."""
    yield b"["
    pending: list[bytes] = []
    first = True
    for row in rows:
        pending.append(encode_json(row_json(row, keys, level, base_url)))
        if len(pending) >= batch:
            yield (b"" if first else b",") + b",".join(pending)
            first, pending = False, []
    if pending:
        yield (b"" if first else b",") + b",".join(pending)
    yield b"]"
