"""QIDO-RS (PS3.18 10.6): search parameters turned into a query of the one engine behind C-FIND.

Resources and levels::

    /studies                                   STUDY
    /studies/{study}/series, /series           SERIES
    /studies/{study}/series/{series}/instances,
    /studies/{study}/instances, /instances     IMAGE

Parameters (PS3.18 8.3.4):

- ``{attributeID}={value}``: a keyword (``PatientName``) or a tag (``00100010``) and a C-FIND match value
  (PS3.4 C.2.2.2: single value, ``*``/``?`` wildcards, ``a-b`` ranges, UID lists). A UID list may be
  separated by commas or backslashes; in the VRs that cannot hold a comma (UI, CS, DA, TM, DT, integers)
  a comma separates values too (``ModalitiesInStudy=CT,MR``). A repeated attribute is a list of values.
  An empty value asks for the attribute to be returned without matching on it. Attributes that the
  index does not hold at the level (or sequence paths) are not matched, and the response says so in a
  ``Warning`` header (PS3.18 8.3.4.1: the origin server may ignore them).
- ``includefield``: repeatable and comma-separated attribute IDs, or ``all`` (every attribute the index
  holds at the level); added to the level's default attributes (PS3.18 Tables 10.6.3-3 to -5).
- ``limit`` / ``offset``: non-negative integers; at most :data:`MAX_LIMIT` results per response.
- ``fuzzymatching=true``: person names (Patient's Name) are already matched without case or diacritics
  and a name without wildcards also finds the names it begins, component-wise ("NGUYEN" finds
  "NGUYEN^VAN AN"). Fuzzy matching adds prefix matching of each name component and word: "ngu" finds
  "Nguyễn^Văn An", "van" finds it too (any component or word starting with it), and "ngu^va" matches the
  family name by "ngu*" and the given name by "va*". A typed space matches a space or a component
  separator ("nguyen van" and OHIF's "*nguyen van*" find "Nguyễn^Văn An").

Searches run with ``relational=True`` (series and instances across studies) and the asker's access
scope, so the SQL itself leaves out what the asker may not see.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from pydicom.datadict import keyword_for_tag, tag_for_keyword

from pacs.dicomweb.qido_json import INSTANCE_AVAILABILITY, RETRIEVE_URL, SYNTHETIC, vr_of
from pacs.errors import InvalidInput
from pacs.query.attributes import Level, Matching, Root, attribute_at, supported_keywords
from pacs.query.engine import Query
from pacs.query.matching import MAX_UID_LIST, WILDCARDS
from pacs.security.principal import AccessScope
from storage.keys import is_valid_uid

MAX_LIMIT = 10_000  # results per response; more are paged with limit/offset (a Warning says how many remain)


class Resource(StrEnum):
    STUDIES = "studies"
    SERIES = "series"
    INSTANCES = "instances"

    @property
    def level(self) -> Level:
        return {Resource.STUDIES: Level.STUDY, Resource.SERIES: Level.SERIES, Resource.INSTANCES: Level.IMAGE}[self]


# IssuerOfPatientID and InstitutionName label each study with the hospital it belongs to (pacs.persons: a
# person's studies of other facilities appear among the results): read from the same row, no extra statement
STUDY_DEFAULTS = ("StudyDate", "StudyTime", "AccessionNumber", INSTANCE_AVAILABILITY, "ModalitiesInStudy",
                  "ReferringPhysicianName", RETRIEVE_URL, "PatientName", "PatientID", "PatientBirthDate",
                  "PatientSex", "StudyInstanceUID", "StudyID", "NumberOfStudyRelatedSeries",
                  "NumberOfStudyRelatedInstances", "IssuerOfPatientID", "InstitutionName")
SERIES_DEFAULTS = ("Modality", "SeriesDescription", "SeriesNumber", "SeriesInstanceUID",
                   "NumberOfSeriesRelatedInstances", RETRIEVE_URL)
INSTANCE_DEFAULTS = ("SOPClassUID", "SOPInstanceUID", INSTANCE_AVAILABILITY, RETRIEVE_URL, "InstanceNumber",
                     "Rows", "Columns", "NumberOfFrames")

_RESERVED = {"includefield", "limit", "offset", "fuzzymatching"}
_IGNORED = {"accept", "charset"}  # content negotiation parameters (PS3.18 8.3.3), handled elsewhere or moot
_NO_COMMA_VRS = {"UI", "CS", "DA", "TM", "DT", "IS", "US", "UL", "SS", "SL", "AS"}
_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")
_KEYWORD = re.compile(r"^[A-Za-z][A-Za-z0-9]{0,63}$")


@dataclass(frozen=True)
class Search:
    """A checked QIDO-RS request: the engine query, what each result carries, what was not honoured."""

    resource: Resource
    query: Query
    keys: tuple[str, ...]  # attributes of each result, synthetic ones (Retrieve URL...) included
    warnings: tuple[str, ...]
    limit: int
    offset: int

    @property
    def level(self) -> Level:
        return self.resource.level


def parse_search(resource: str, params: Iterable[tuple[str, str]], *, scope: AccessScope | None,
                 study_uid: str | None = None, series_uid: str | None = None) -> Search:
    """Check a search's path and parameters; raises :class:`InvalidInput` (HTTP 400) saying what is wrong."""
    try:
        res = Resource(resource)
    except ValueError:
        raise InvalidInput(f"unknown search resource {resource[:20]!r}: studies, series or instances") from None
    level = res.level
    for uid, what in ((study_uid, "StudyInstanceUID"), (series_uid, "SeriesInstanceUID")):
        if uid is not None and not is_valid_uid(uid):
            raise InvalidInput(f"invalid {what} in the path: {uid[:24]!r}")

    values: dict[str, list[str]] = {}
    include: list[str] = []
    unsupported: list[str] = []
    limit_text = offset_text = fuzzy_text = None
    for name, value in params:
        lowered = name.lower()
        if lowered in _RESERVED:
            if lowered == "includefield":
                include += [v.strip() for v in value.split(",") if v.strip()]
            elif lowered == "limit":
                limit_text = value
            elif lowered == "offset":
                offset_text = value
            else:
                fuzzy_text = value
            continue
        if lowered in _IGNORED:
            continue
        keyword = _attribute(name)
        if keyword is None or attribute_at(keyword, level) is None:
            unsupported.append(name)
            continue
        values.setdefault(keyword, []).append(value)

    fuzzy = _boolean("fuzzymatching", fuzzy_text)
    limit = _count("limit", limit_text, MAX_LIMIT)
    offset = _count("offset", offset_text, 0)
    warnings: list[str] = []
    if limit > MAX_LIMIT:
        warnings.append(f"limit reduced to {MAX_LIMIT}")
        limit = MAX_LIMIT

    filters = {k: _match_value(k, v, fuzzy) for k, v in values.items()}
    if study_uid is not None:
        filters["StudyInstanceUID"] = study_uid
    if series_uid is not None:
        filters["SeriesInstanceUID"] = series_uid

    keys = list(_defaults(res, study_uid is not None, series_uid is not None))
    not_included: list[str] = []
    for item in include:
        if item.lower() == "all":
            keys += supported_keywords(level)
            continue
        keyword = _attribute(item)
        if keyword is None or (attribute_at(keyword, level) is None and keyword not in SYNTHETIC):
            not_included.append(item)
        else:
            keys.append(keyword)
    keys += [k for k in filters if k not in keys]
    keys = list(dict.fromkeys(k for k in keys if attribute_at(k, level) is not None or k in SYNTHETIC))

    if unsupported:
        warnings.append(f"not matched (not searchable at the {res.value} level): {', '.join(unsupported)[:300]}")
    if not_included:
        warnings.append(f"not returned (not held at the {res.value} level): {', '.join(not_included)[:300]}")
    returns = [k for k in keys if k not in SYNTHETIC and k not in filters]
    query = Query(level, Root.STUDY_ROOT, filters, returns, limit=limit, offset=offset, relational=True, scope=scope)
    return Search(res, query, tuple(keys), tuple(warnings), limit, offset)


def _defaults(res: Resource, in_study: bool, in_series: bool) -> Sequence[str]:
    """PS3.18 Tables 10.6.3-3/4/5: a level's attributes, plus those of the levels above that the path
    does not pin (``/series`` also returns study attributes, ``/instances`` series and study ones)."""
    if res is Resource.STUDIES:
        return STUDY_DEFAULTS
    above_study = () if in_study else tuple(k for k in STUDY_DEFAULTS if k not in SYNTHETIC)
    if res is Resource.SERIES:
        return (*SERIES_DEFAULTS, *above_study)
    above_series = () if in_series else tuple(k for k in SERIES_DEFAULTS if k not in SYNTHETIC)
    return (*INSTANCE_DEFAULTS, *above_series, *above_study)


def _attribute(name: str) -> str | None:
    """The keyword of an attribute ID (keyword or 8 hex digits); None for one we do not match on (a
    sequence path, a private tag); InvalidInput for something that is no attribute at all."""
    name = name.strip()
    if _TAG.match(name):
        return keyword_for_tag(int(name, 16)) or None
    if _KEYWORD.match(name):
        if tag_for_keyword(name) is None:
            raise InvalidInput(f"unknown attribute {name[:40]!r} (a DICOM keyword or 8 hexadecimal digits)")
        return name
    if "." in name and all(_TAG.match(p) or _KEYWORD.match(p) for p in name.split(".")):
        return None  # a sequence path: valid, not supported for matching
    raise InvalidInput(f"malformed attribute ID {name[:40]!r} (a DICOM keyword or 8 hexadecimal digits)")


def _match_value(keyword: str, raw: list[str], fuzzy: bool) -> str:
    vr = vr_of(keyword)
    values: list[str] = []
    for value in raw:
        values += value.replace(",", "\\").split("\\") if vr in _NO_COMMA_VRS else [value]
    if len(values) > MAX_UID_LIST:
        raise InvalidInput(f"{keyword}: list of {len(values)} values exceeds {MAX_UID_LIST}")
    if vr == "UI":
        for uid in values:
            if uid.strip() and uid.strip() != "*" and not is_valid_uid(uid.strip()):
                raise InvalidInput(f"{keyword}: invalid UID {uid[:24]!r}")
    attr = attribute_at(keyword, Level.IMAGE)
    if fuzzy and attr is not None and attr.matching is Matching.PERSON_NAME:
        values = [p for v in values for p in _fuzzy_patterns(v)]
    return "\\".join(values)


def _fuzzy_patterns(value: str) -> list[str]:
    """Prefix matching of each name component (see the module docstring); values with wildcards are kept.

    A space the user typed also matches a component separator: people type "nguyen van" for
    ``Nguyễn^Văn An`` (OHIF sends ``*nguyen van*``), so each space becomes the one-character wildcard.
    """
    value = value.strip()
    if not value or value == "*" or any(w in value for w in WILDCARDS):
        return [value.replace(" ", "?")]
    value = value.replace(" ", "?")
    components = value.split("^")
    if len(components) == 1:
        return [f"{value}*", f"*^{value}*", f"* {value}*"]
    return ["^".join(f"{c}*" if c else "*" for c in components)]


def _count(name: str, text: str | None, default: int) -> int:
    if text is None:
        return default
    if not re.match(r"^[0-9]+$", text.strip()):
        raise InvalidInput(f"{name} must be a non-negative integer, got {text[:20]!r}")
    if len(text.strip()) > 9:
        raise InvalidInput(f"{name} must be below 1000000000, got {text[:20]!r}")
    return int(text.strip())


def _boolean(name: str, text: str | None) -> bool:
    if text is None:
        return False
    lowered = text.strip().lower()
    if lowered not in ("true", "false"):
        raise InvalidInput(f"{name} must be true or false, got {text[:20]!r}")
    return lowered == "true"
