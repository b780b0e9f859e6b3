"""PS3.4 C.2.2.2 attribute matching, one function per matching type, each turned into SQL.

Every function takes an index column and the value received in a query identifier and
returns a SQLAlchemy condition, or ``None`` for universal matching (no condition). Values
come from the network: they are bound as parameters, never spliced into SQL text.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, and_, literal, or_
from sqlalchemy.orm import QueryableAttribute

from pacs.text import fold

#: An index column or an ORM attribute (``Study.study_date``): what a query key is matched on and returns.
Column = ColumnElement[Any] | QueryableAttribute[Any]

WILDCARDS = ("*", "?")
RANGE_VRS = {"DA", "TM", "DT"}
MAX_UID_LIST = 1000  # a list of UIDs longer than this is refused (PS3.4 leaves the bound to the SCP)
MAX_VALUE_LIST = 100  # other multi-value keys (names, dates…): each value is its own condition, so fewer


class InvalidMatchValue(ValueError):
    """A query value that cannot be matched (e.g. a malformed range or an oversized UID list)."""


def is_universal(value: str | None) -> bool:
    """Empty or only '*' matches everything (C.2.2.2.3)."""
    return value is None or value.strip(" ") in ("", "*")


def single_value(column: Column, value: str) -> ColumnElement[bool]:
    """C.2.2.2.1: exact, case-sensitive (callers fold PN values and columns first)."""
    return column == value


def wildcard(column: Column, pattern: str) -> ColumnElement[bool]:
    """C.2.2.2.4: '*' any run of characters, '?' one character; SQL's own wildcards escaped."""
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return column.like(escaped.replace("*", "%").replace("?", "_"), escape="\\")


def uid_list(column: Column, value: str) -> ColumnElement[bool]:
    """C.2.2.2.2: a backslash-separated list of UIDs matches any of them."""
    uids = [u.strip(" \x00") for u in value.split("\\") if u.strip(" \x00")]
    if len(uids) > MAX_UID_LIST:
        raise InvalidMatchValue(f"list of {len(uids)} UIDs exceeds {MAX_UID_LIST}")
    return column.in_(uids)


def date_time_range(column: Column, value: str, vr: str) -> ColumnElement[bool]:
    """C.2.2.2.5: 'a-b', 'a-' or '-b' for DA, TM and DT (values compare as strings of digits)."""
    if vr not in RANGE_VRS:
        raise InvalidMatchValue(f"range matching is not defined for VR {vr}")
    low, sep, high = value.partition("-")
    if not sep or value.count("-") != 1:
        raise InvalidMatchValue(f"malformed range {value!r}")
    low, high = _normalise(low.strip(), vr), _normalise(high.strip(), vr, upper=True)
    if not low and not high:
        raise InvalidMatchValue(f"empty range {value!r}")
    conditions = []
    if low:
        conditions.append(column >= low)
    if high:
        conditions.append(column <= high)
    return and_(*conditions)


def _normalise(value: str, vr: str, upper: bool = False) -> str:
    """Strip the separators old-style values may carry; an upper TM bound covers its whole second."""
    cleaned = value.replace(".", "").replace(":", "") if vr == "DA" else value.replace(":", "")
    if cleaned and not cleaned.replace(".", "").isdigit():
        raise InvalidMatchValue(f"not a {vr} value: {value!r}")
    if upper and vr == "TM" and cleaned and "." not in cleaned:
        cleaned += ".999999"
    return cleaned


def multi_valued(column: Column, value: str) -> ColumnElement[bool]:
    """Match one value of a backslash-joined column (e.g. ModalitiesInStudy 'CT\\\\MR' matches 'CT').

    Several values in the query ('CT\\\\MR') match a row holding any of them.
    """
    wanted = [v for v in value.split("\\") if v]
    padded = literal("\\") + column + literal("\\")
    return or_(*(padded.like(f"%\\{_like_escape(v)}\\%", escape="!") for v in wanted))


def _like_escape(value: str) -> str:
    return value.replace("!", "!!").replace("%", "!%").replace("_", "!_")


def person_name(folded_column: Column, value: str) -> ColumnElement[bool] | None:
    """PN matching on the index's folded column: case- and diacritic-insensitive ("nguyen" finds "Nguyễn").

    A name without wildcards also matches names that start with it component-wise, the way
    radiographers type a family name only: 'NGUYEN' finds 'NGUYEN^VAN AN'.
    """
    if is_universal(value):
        return None
    folded = fold(value.strip())
    if any(w in folded for w in WILDCARDS):
        return wildcard(folded_column, folded)
    return or_(folded_column == folded, wildcard(folded_column, folded + "^*"))


def condition(column: Column, value: str | None, vr: str) -> ColumnElement[bool] | None:
    """Pick the matching type for ``value`` (C.2.2.2) and build its condition; None for universal."""
    if is_universal(value):
        return None
    assert value is not None
    value = value.strip(" \x00")
    if vr == "UI":
        return uid_list(column, value) if "\\" in value else single_value(column, value)
    if vr in RANGE_VRS and "-" in value:
        return date_time_range(column, value, vr)
    if any(w in value for w in WILDCARDS):
        return wildcard(column, value)
    if vr in RANGE_VRS:
        return single_value(column, _normalise(value, vr))
    return single_value(column, value)
