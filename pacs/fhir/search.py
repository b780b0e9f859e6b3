"""FHIR R4 search parameters (https://hl7.org/fhir/R4/search.html) as query-engine filters.

ImagingStudy (R4 search parameters, plus ``date`` as an alias of ``started``):

==================================================  =============================================================
``patient.identifier``, ``subject.identifier``,      token ``[system|]value``: PatientID; a system ``urn:oid:X``
``subject:Patient.identifier``                       (or any other text X) must equal IssuerOfPatientID X
``patient``, ``subject``                             reference ``Patient/{id}`` (or just the id)
``identifier``                                       ``urn:dicom:uid|urn:oid:{uid}`` (or a value ``urn:oid:{uid}``):
                                                     StudyInstanceUID; any other value: AccessionNumber
``identifier:of-type``                               ``http://terminology.hl7.org/CodeSystem/v2-0203|ACSN|{value}``
``started``, ``date``                                date with prefix ``eq`` (default), ``ge``, ``le``, ``gt``,
                                                     ``lt``; ``YYYY``, ``YYYY-MM``, ``YYYY-MM-DD`` or a dateTime
                                                     (matched on its day: StudyDate has no time zone); repeat the
                                                     parameter for a range (``date=ge2024-01-01&date=le2024-01-31``)
``modality``                                         token: one of ModalitiesInStudy
``_id``                                              StudyInstanceUID
``_count``, ``_offset``                              page size (default 50, at most 200) and start
==================================================  =============================================================

Patient: ``identifier``, ``_id``.

DiagnosticReport: the patient parameters above, ``study`` / ``imaging-study`` (a Study Instance UID, the
ImagingStudy id, ``ImagingStudy/{id}`` or ``urn:oid:{uid}``; R5's ``study``, not in R4), ``identifier``
(accession number), ``status`` (``preliminary``, ``final``, ``amended``; the status of the newest version the
caller may see), ``date`` (the study date, as for ImagingStudy), ``category`` (LOINC ``LP29684-5`` or v2-0074
``RAD``: every report here), ``code`` (LOINC ``18748-4``: every report here), ``_id``.

ServiceRequest: the patient parameters above, ``identifier`` (an accession or placer order number; a system
is not compared), ``identifier:of-type`` (``…v2-0203|ACSN|{value}`` or ``…|PLAC|{value}``), ``status``
(``active``, ``completed``, ``revoked``; see :mod:`pacs.fhir.service_request`), ``_id``.

Every resource: ``_count`` (page size, default 50, at most 200), ``_offset`` (start), ``_summary=count``
(the total only) or ``_summary=false``, ``_format`` (JSON only) and ``_pretty`` (accepted, no effect).

Comma-separated values are alternatives (OR); a parameter other than the dates may be given once.
Token values are matched exactly, so ``*``, ``?`` and ``\\`` (DICOM's wildcard and list characters)
are refused in them.

**Strictness.** A misspelled parameter must not widen a search (``patient_id=X`` silently ignored would
list every patient's studies), so an unknown or unsupported parameter is an error (HTTP 400 naming it)
unless the request says ``Prefer: handling=lenient`` (FHIR R4 §3.1.1.5.2 / the search ``handling``
preference); then it is ignored and left out of the Bundle's links. An unsupported modifier or chain on a
supported parameter (``identifier:exact``, ``patient.name``) is an error either way: ignoring it would
widen the search too. The functions here take ``strict=False`` (lenient) by default; the HTTP layer
passes ``strict=True`` unless the client asked for lenient handling.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import NoReturn

from pacs.errors import InvalidInput
from pacs.fhir.ids import PatientRef, decode_patient_id, study_uid_from_id
from storage.keys import is_valid_uid

DEFAULT_COUNT = 50
MAX_COUNT = 200
DICOM_UID_SYSTEM = "urn:dicom:uid"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
DCM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
LOINC = "http://loinc.org"
RADIOLOGY_CATEGORY = "LP29684-5"  # LOINC part "Radiology"
IMAGING_REPORT_CODE = "18748-4"  # LOINC "Diagnostic imaging study"
JSON_FORMATS = frozenset({"json", "application/json", "application/fhir+json"})
CONTROL_PARAMS = ("_count", "_offset", "_summary", "_format", "_pretty")
_PATIENT_TOKEN_PARAMS = {"patient.identifier", "subject.identifier", "subject:Patient.identifier",
                         "patient:Patient.identifier"}
_TIME = r"T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:\d{2})?"
_DATE_RE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2})(?:" + _TIME + r")?)?)?$")
_PREFIXES = ("eq", "ge", "le", "gt", "lt")

#: DiagnosticReport statuses that reports here can have (a draft is never published).
REPORT_STATUSES = frozenset({"preliminary", "final", "amended"})
#: Every R4 DiagnosticReport status: a valid one that no report here has matches nothing (not an error).
_ALL_REPORT_STATUSES = REPORT_STATUSES | {"registered", "partial", "corrected", "appended", "cancelled",
                                          "entered-in-error", "unknown"}
#: ServiceRequest status -> order states (pacs.ris.models) it stands for.
ORDER_STATES_BY_STATUS: dict[str, tuple[str, ...]] = {
    "active": ("scheduled", "in-progress"), "completed": ("completed",), "revoked": ("discontinued",)}
_ALL_REQUEST_STATUSES = frozenset(ORDER_STATES_BY_STATUS) | {"draft", "on-hold", "entered-in-error", "unknown"}


class SearchError(InvalidInput):
    """A search parameter cannot be used; the message says which and why (HTTP 400).

    ``code`` is the OperationOutcome issue type: ``invalid`` for a bad value, ``not-supported`` for a
    parameter (or modifier, or format) this server does not handle."""

    def __init__(self, message: str, code: str = "invalid") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Token:
    system: str | None  # None: no ``|`` given; "": ``|value`` (no system)
    code: str


@dataclass
class Search:
    """A parsed search: query-engine filters plus what the service must resolve or apply itself.

    ``filters`` holds query-engine keywords for every resource type (``PatientID``, ``IssuerOfPatientID``,
    ``StudyInstanceUID``, ``AccessionNumber``, ``StudyDate``), and ``OrderIdentifier`` (an accession or
    placer order number) for ServiceRequest; multiple values are separated by ``\\`` as in DICOM.
    """

    filters: dict[str, str] = field(default_factory=dict)
    patient_ref: PatientRef | None = None  # ``patient=Patient/{id}`` / Patient ``_id``
    matches_nothing: bool = False  # e.g. an empty date range
    applied: list[tuple[str, str]] = field(default_factory=list)  # the parameters used (for links)
    count: int = DEFAULT_COUNT
    offset: int = 0
    statuses: frozenset[str] | None = None  # DiagnosticReport / ServiceRequest ``status`` (None: any)
    ids: tuple[str, ...] | None = None  # DiagnosticReport / ServiceRequest ``_id`` values, as given
    summary_count: bool = False  # ``_summary=count``: the total only
    ignored: list[str] = field(default_factory=list)  # unknown parameters ignored (lenient handling)


def imaging_study_search(params: Sequence[tuple[str, str]], *, strict: bool = False) -> Search:
    search = Search()
    dates: list[str] = []
    seen: set[str] = set()
    known = ("started", "date", "identifier", "identifier:of-type", "patient", "subject", "modality", "_id",
             *sorted(_PATIENT_TOKEN_PARAMS))
    for name, value in params:
        if name in ("started", "date"):
            dates.append(value)
            search.applied.append((name, value))
            continue
        if _control(search, name, value):
            continue
        _once(seen, name)
        if name in _PATIENT_TOKEN_PARAMS:
            _patient_tokens(search, name, value)
        elif name in ("patient", "subject"):
            _patient_reference(search, name, value)
        elif name == "identifier":
            _study_identifier(search, value)
        elif name == "identifier:of-type":
            _accession_of_type(search, value)
        elif name == "modality":
            codes = [_plain(t, name, systems=(DCM_SYSTEM,)) for t in _tokens(value, name)]
            _set(search, "ModalitiesInStudy", "\\".join(codes), name)
        elif name == "_id":
            uids = [study_uid_from_id(v) for v in split_list(value)]
            if not all(uids):
                search.matches_nothing = True  # ids we never made name nothing
            _set(search, "StudyInstanceUID", "\\".join(u for u in uids if u), name)
        else:
            _unknown(search, name, strict, known)
            continue
        search.applied.append((name, value))
    if dates:
        _dates(search, dates)
    return _finish(search)


def patient_search(params: Sequence[tuple[str, str]], *, strict: bool = False) -> Search:
    search = Search()
    seen: set[str] = set()
    for name, value in params:
        if _control(search, name, value):
            continue
        _once(seen, name)
        if name == "identifier":
            _patient_tokens(search, name, value)
        elif name == "_id":
            ids = split_list(value)
            if len(ids) != 1:
                raise SearchError("_id takes one Patient id")
            ref = decode_patient_id(ids[0])
            if ref is None:
                search.matches_nothing = True
            search.patient_ref = ref
        else:
            _unknown(search, name, strict, ("identifier", "_id"))
            continue
        search.applied.append((name, value))
    return _finish(search)


def diagnostic_report_search(params: Sequence[tuple[str, str]], *, strict: bool = False) -> Search:
    search = Search()
    dates: list[str] = []
    seen: set[str] = set()
    known = ("patient", "subject", *sorted(_PATIENT_TOKEN_PARAMS), "study", "imaging-study", "identifier",
             "status", "date", "category", "code", "_id")
    for name, value in params:
        if name == "date":
            dates.append(value)
            search.applied.append((name, value))
            continue
        if _control(search, name, value):
            continue
        _once(seen, name)
        if name in _PATIENT_TOKEN_PARAMS:
            _patient_tokens(search, name, value)
        elif name in ("patient", "subject"):
            _patient_reference(search, name, value)
        elif name in ("study", "imaging-study"):
            _study_references(search, name, value)
        elif name == "identifier":
            _set(search, "AccessionNumber", "\\".join(t.code for t in _tokens(value, name)), name)
        elif name == "status":
            _statuses(search, name, value, REPORT_STATUSES, _ALL_REPORT_STATUSES)
        elif name == "category":
            _fixed_code(search, name, value, {(LOINC, RADIOLOGY_CATEGORY), (V2_0074, "RAD")})
        elif name == "code":
            _fixed_code(search, name, value, {(LOINC, IMAGING_REPORT_CODE)})
        elif name == "_id":
            search.ids = tuple(split_list(value)) or _no_value(name)
        else:
            _unknown(search, name, strict, known)
            continue
        search.applied.append((name, value))
    if dates:
        _dates(search, dates)
    return _finish(search)


def service_request_search(params: Sequence[tuple[str, str]], *, strict: bool = False) -> Search:
    search = Search()
    seen: set[str] = set()
    known = ("patient", "subject", *sorted(_PATIENT_TOKEN_PARAMS), "identifier", "identifier:of-type", "status",
             "_id")
    for name, value in params:
        if _control(search, name, value):
            continue
        _once(seen, name)
        if name in _PATIENT_TOKEN_PARAMS:
            _patient_tokens(search, name, value)
        elif name in ("patient", "subject"):
            _patient_reference(search, name, value)
        elif name == "identifier":
            _set(search, "OrderIdentifier", "\\".join(t.code for t in _tokens(value, name)), name)
        elif name == "identifier:of-type":
            _order_identifier_of_type(search, value)
        elif name == "status":
            _statuses(search, name, value, frozenset(ORDER_STATES_BY_STATUS), _ALL_REQUEST_STATUSES)
        elif name == "_id":
            search.ids = tuple(split_list(value)) or _no_value(name)
        else:
            _unknown(search, name, strict, known)
            continue
        search.applied.append((name, value))
    return _finish(search)


# -- values ---------------------------------------------------------------------------------------


def split_list(value: str) -> list[str]:
    """Comma-separated alternatives; ``\\,`` is a literal comma (FHIR escaping)."""
    parts, current, i = [], [], 0
    while i < len(value):
        ch = value[i]
        if ch == "\\" and i + 1 < len(value) and value[i + 1] in ",|$\\":
            current.append(ch + value[i + 1])
            i += 2
            continue
        if ch == ",":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    return [p for p in parts if p]


def parse_token(value: str) -> Token:
    """``system|code``, ``|code`` or ``code`` (``\\|`` is a literal bar)."""
    for i, ch in enumerate(value):
        if ch == "|" and (i == 0 or value[i - 1] != "\\"):
            return Token(_unescape(value[:i]), _unescape(value[i + 1:]))
    return Token(None, _unescape(value))


def _unescape(text: str) -> str:
    return re.sub(r"\\([,|$\\])", r"\1", text)


def _tokens(value: str, name: str) -> list[Token]:
    tokens = [parse_token(v) for v in split_list(value)]
    if not tokens:
        raise SearchError(f"{name} has no value")
    for token in tokens:
        if not token.code:
            raise SearchError(f"{name}: a value is needed after the system")
        if any(c in token.code for c in "*?\\") or (token.system and any(c in token.system for c in "*?\\")):
            raise SearchError(f"{name}: values are matched exactly; *, ? and \\ are not allowed")
        if len(token.code) > 72:  # urn:oid: and a 64-character UID
            raise SearchError(f"{name}: value longer than 72 characters")
    return tokens


def _plain(token: Token, name: str, systems: tuple[str, ...] = ()) -> str:
    if token.system and token.system not in systems:
        raise SearchError(f"{name}: system {token.system[:60]!r} is not supported")
    return token.code


def _set(search: Search, keyword: str, value: str, name: str) -> None:
    if keyword in search.filters:
        raise SearchError(f"{name} repeats a criterion given by another parameter")
    search.filters[keyword] = value


def _control(search: Search, name: str, value: str) -> bool:
    """Handle a parameter every search takes (paging, ``_summary``, ``_format``); False for any other."""
    if name in ("_count", "_offset"):
        _paging(search, name, value)
    elif name == "_summary":
        if value.strip() not in ("count", "false"):
            raise SearchError(f"_summary={value[:20]!r} is not supported (count or false)", "not-supported")
        search.summary_count = value.strip() == "count"
    elif name == "_format":
        if value.split(";", 1)[0].strip().lower() not in JSON_FORMATS:
            raise SearchError(f"_format={value[:40]!r} is not supported: this server answers JSON only",
                              "not-supported")
    elif name != "_pretty":
        return False
    return True


def _paging(search: Search, name: str, value: str) -> None:
    try:
        number = int(value)
    except ValueError:
        raise SearchError(f"{name} must be a whole number, not {value[:20]!r}") from None
    if number < 0 or number > 10_000_000:
        raise SearchError(f"{name} must be from 0 to 10000000")
    if name == "_count":
        search.count = min(number, MAX_COUNT)
    else:
        search.offset = number


def _finish(search: Search) -> Search:
    if search.summary_count:
        search.count = 0
    return search


def _once(seen: set[str], name: str) -> None:
    if name in seen:
        raise SearchError(f"give {name} once (comma-separated values are alternatives)")
    seen.add(name)


def _no_value(name: str) -> NoReturn:
    raise SearchError(f"{name} has no value")


def _unknown(search: Search, name: str, strict: bool, known: tuple[str, ...]) -> None:
    """A parameter this search does not know: an error when strict, else ignored (and remembered).

    A modifier or chain on a known parameter is an error either way (see the module docstring)."""
    base = name.split(":", 1)[0].split(".", 1)[0]
    if base in {k.split(":", 1)[0].split(".", 1)[0] for k in known}:
        raise SearchError(f"search parameter {name[:60]!r} (modifier or chain) is not supported", "not-supported")
    if strict:
        raise SearchError(f"unknown search parameter {name[:60]!r}; supported: {', '.join((*known, *CONTROL_PARAMS))}"
                          " (send 'Prefer: handling=lenient' to have unknown parameters ignored)", "not-supported")
    search.ignored.append(name[:60])


def _statuses(search: Search, name: str, value: str, served: frozenset[str], valid: frozenset[str]) -> None:
    """``status``: codes of the resource's status value set; valid ones that nothing here has match nothing."""
    codes = set()
    for token in _tokens(value, name):
        if token.code not in valid:
            raise SearchError(f"{name}: {token.code[:30]!r} is not a status of this resource "
                              f"({', '.join(sorted(valid))})")
        codes.add(token.code)
    search.statuses = frozenset(codes & served)
    if not search.statuses:
        search.matches_nothing = True


def _fixed_code(search: Search, name: str, value: str, ours: set[tuple[str, str]]) -> None:
    """A token every resource of this type carries (``category``, ``code``): matches all, or nothing."""
    codes = {code for _, code in ours}
    tokens = _tokens(value, name)
    if not any((t.system, t.code) in ours or (t.system is None and t.code in codes) for t in tokens):
        search.matches_nothing = True


def _study_references(search: Search, name: str, value: str) -> None:
    """``study`` / ``imaging-study``: ``ImagingStudy/{id}`` (or an absolute URL to it), an id, ``urn:oid:{uid}``."""
    uids = []
    for ref in split_list(value):
        text = ref.strip()
        if "/" in text:
            kind, _, text = text.rstrip("/").rpartition("/")
            if not kind.endswith("ImagingStudy"):
                raise SearchError(f"{name} must reference an ImagingStudy")
        text = text.removeprefix("urn:oid:")
        uid = study_uid_from_id(text)
        if uid is None:
            raise SearchError(f"{name}: {ref[:70]!r} is not a Study Instance UID or ImagingStudy id")
        uids.append(uid)
    if not uids:
        _no_value(name)
    _set(search, "StudyInstanceUID", "\\".join(uids), name)


def _order_identifier_of_type(search: Search, value: str) -> None:
    """``identifier:of-type`` for orders: ``v2-0203|ACSN|{accession}`` or ``v2-0203|PLAC|{placer number}``."""
    by_type: dict[str, list[str]] = {}
    for item in split_list(value):
        system, sep1, rest = item.partition("|")
        code, sep2, number = rest.partition("|")
        if not (sep1 and sep2) or system != V2_0203 or code not in ("ACSN", "PLAC") or not number:
            raise SearchError(f"identifier:of-type takes {V2_0203}|ACSN|{{accession}} or …|PLAC|{{placer number}}")
        by_type.setdefault(code, []).append(number)
    if len(by_type) != 1:
        raise SearchError("identifier:of-type: one identifier type per search")
    ((code, numbers),) = by_type.items()
    tokens = _tokens(",".join(numbers), "identifier:of-type")
    keyword = "AccessionNumber" if code == "ACSN" else "PlacerOrderNumber"
    _set(search, keyword, "\\".join(t.code for t in tokens), "identifier:of-type")


def _patient_tokens(search: Search, name: str, value: str) -> None:
    tokens = _tokens(value, name)
    systems = {t.system or "" for t in tokens}
    if len(systems) > 1:
        raise SearchError(f"{name}: give one identifier system per search")
    issuer = _issuer(systems.pop())
    if search.patient_ref is not None:
        raise SearchError(f"{name} repeats a criterion given by another parameter")
    _set(search, "PatientID", "\\".join(t.code for t in tokens), name)
    if issuer:
        search.filters["IssuerOfPatientID"] = issuer


def _issuer(system: str) -> str:
    """The Issuer of Patient ID a token system names: ``urn:oid:X`` -> X; another system is the issuer as is."""
    return system[len("urn:oid:"):] if system.startswith("urn:oid:") else system


def _patient_reference(search: Search, name: str, value: str) -> None:
    refs = split_list(value)
    if len(refs) != 1:
        raise SearchError(f"{name} takes one Patient reference")
    ref = refs[0]
    if "/" in ref:
        kind, _, ref = ref.rstrip("/").rpartition("/")
        if not kind.endswith("Patient"):
            raise SearchError(f"{name} must reference a Patient")
    patient = decode_patient_id(ref)
    if patient is None:
        search.matches_nothing = True
    if search.patient_ref is not None or "PatientID" in search.filters:
        raise SearchError(f"{name} repeats a criterion given by another parameter")
    search.patient_ref = patient


def _study_identifier(search: Search, value: str) -> None:
    uids, accessions = [], []
    for token in _tokens(value, "identifier"):
        code = token.code
        if token.system == DICOM_UID_SYSTEM or (not token.system and code.startswith("urn:oid:")):
            uid = code[len("urn:oid:"):] if code.startswith("urn:oid:") else code
            if not is_valid_uid(uid):
                raise SearchError(f"identifier: {code[:70]!r} is not a DICOM UID")
            uids.append(uid)
        else:
            accessions.append(code)  # no system, or the EMR's accession system: the value is the accession
    if uids and accessions:
        raise SearchError("identifier: search by Study Instance UID or by accession number, not both at once")
    if uids:
        _set(search, "StudyInstanceUID", "\\".join(uids), "identifier")
    else:
        _set(search, "AccessionNumber", "\\".join(accessions), "identifier")


def _accession_of_type(search: Search, value: str) -> None:
    values = []
    for item in split_list(value):
        system, sep1, rest = item.partition("|")
        code, sep2, accession = rest.partition("|")
        if not (sep1 and sep2) or system != V2_0203 or code != "ACSN" or not accession:
            raise SearchError(f"identifier:of-type takes {V2_0203}|ACSN|{{accession}}")
        values.append(accession)
    tokens = _tokens(",".join(values), "identifier:of-type")
    _set(search, "AccessionNumber", "\\".join(t.code for t in tokens), "identifier:of-type")


# -- dates ----------------------------------------------------------------------------------------


def _dates(search: Search, values: list[str]) -> None:
    low: date | None = None
    high: date | None = None
    for raw in values:
        if "," in raw:
            raise SearchError("date: one value per parameter (repeat the parameter for a range)")
        lo, hi = date_interval(raw)
        low = lo if low is None or (lo is not None and lo > low) else low
        high = hi if high is None or (hi is not None and hi < high) else high
    if low is not None and high is not None and low > high:
        search.matches_nothing = True
        return
    text = (low.strftime("%Y%m%d") if low else "") + ("-" if low != high else "") + (
        high.strftime("%Y%m%d") if high and high != low else "")
    if text and text != "-":
        search.filters["StudyDate"] = text


def date_interval(value: str) -> tuple[date | None, date | None]:
    """The days a FHIR date parameter value matches, as (first, last); None is unbounded."""
    prefix = value[:2] if value[:2].isalpha() else "eq"
    text = value[2:] if value[:2].isalpha() else value
    if prefix not in _PREFIXES:
        raise SearchError(f"date prefix {prefix!r} is not supported (use eq, ge, le, gt or lt)")
    match = _DATE_RE.match(text)
    if not match:
        raise SearchError(f"date {text[:40]!r} is not YYYY, YYYY-MM, YYYY-MM-DD or a dateTime")
    year, month, day = int(match.group(1)), match.group(2), match.group(3)
    try:
        if day:
            first = last = date(year, int(month), int(day))
        elif month:
            first = date(year, int(month), 1)
            last = (date(year + int(month) // 12, int(month) % 12 + 1, 1)) - timedelta(days=1)
        else:
            first, last = date(year, 1, 1), date(year, 12, 31)
    except ValueError:
        raise SearchError(f"date {text[:40]!r} is not a calendar date") from None
    has_time = "T" in text
    if prefix == "eq":
        return first, last
    if prefix == "ge":
        return first, None
    if prefix == "le":
        return None, last
    if prefix == "gt":  # a dateTime is matched on its day: later that day is still "greater"
        return (first if has_time else last + timedelta(days=1)), None
    return None, (last if has_time else first - timedelta(days=1))  # lt
