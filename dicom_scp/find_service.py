"""Query/Retrieve C-FIND SCP (Patient Root and Study Root, all four levels): a thin adapter onto
pacs.query.engine.

The identifier's values are decoded with its Specific Character Set (and, like ingest, UTF-8
bytes labelled ISO_IR 100 or the default are read as UTF-8 when ``assume_utf8_for_latin1``),
handed to the engine as strings, and each match goes back as a Pending response in UTF-8
(ISO_IR 192) with the keys that were asked for, the Query/Retrieve Level and our AE title as
Retrieve AE Title. Keys the engine does not know come back empty (PS3.4 C.4.1.1.3.2).

Statuses:

=========  =====================================================================================
0xFF00     Pending, one per match
0x0000     Success, after the last match
0xFE00     Cancel: the SCU sent C-CANCEL
0xA900     Identifier does not match SOP Class: no or an unknown Query/Retrieve Level, a level
           the model lacks (PATIENT in Study Root), missing unique keys of the levels above
           (relational queries are not supported)
0xC000     Unable to process: a value that cannot be matched (malformed date range, more than
           1000 UIDs, a number that is not one), or an identifier that cannot be decoded
0xA700     Out of resources: the index database cannot be read
0xC001     Unable to process: an unexpected error (logged)
=========  =====================================================================================

Failures carry an Error Comment saying why.

Matches are limited to the calling AE's scope (:mod:`pacs.ae_scope`: its facility's studies and those
shared with it, or every study for an archive-wide AE), at every level of both models: a study, series
or instance outside it is not a match, and neither is a patient who has no study inside it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from functools import partial, wraps
from typing import Any

from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from dicom_scp.audit import audited_stream
from pacs import metrics
from pacs.ae_scope import calling_scope
from pacs.aes import AERegistry
from pacs.charset import assumes_utf8, utf8_text
from pacs.context import AppContext
from pacs.dimse_status import (
    CANCEL,
    IDENTIFIER_DOES_NOT_MATCH,
    OUT_OF_RESOURCES,
    PENDING,
    SOP_CLASS_NOT_SUPPORTED,
    UNABLE_TO_PROCESS,
    UNABLE_TO_PROCESS_INTERNAL,
    failure,
)
from pacs.errors import IndexUnavailable
from pacs.ingest import Ingestor
from pacs.query.attributes import ATTRIBUTES, Root
from pacs.query.engine import IdentifierError, MatchValueError, Query, QueryEngine
from pacs.security.principal import AccessScope

log = logging.getLogger("dicom_scp")

ROOTS = {
    str(PatientRootQueryRetrieveInformationModelFind): Root.PATIENT_ROOT,
    str(StudyRootQueryRetrieveInformationModelFind): Root.STUDY_ROOT,
}
TRANSFER_SYNTAXES = [str(ImplicitVRLittleEndian), str(ExplicitVRLittleEndian), "1.2.840.10008.1.2.2"]

RESPONSE_CHARSET = "ISO_IR 192"
_NOT_KEYS = {"QueryRetrieveLevel", "SpecificCharacterSet", "TimezoneOffsetFromUTC"}

FindResponse = Iterator[tuple[int | Dataset, Dataset | None]]
ScopeOf = Callable[[str, str], AccessScope]  # (calling AE title, peer address) -> what it may see


def contexts(ctx: AppContext) -> list[tuple[str, list[str]]]:
    return [(uid, TRANSFER_SYNTAXES) for uid in ROOTS]


def handlers(ctx: AppContext, ingestor: Ingestor) -> list[tuple]:
    scope_of = partial(calling_scope, AERegistry(ctx.read_sessions))
    return [(evt.EVT_C_FIND, handle_find, [QueryEngine(ctx.read_sessions), ctx, scope_of])]


class Identifier:
    """A C-FIND request identifier read into strings: the level, the keys and what else to echo."""

    def __init__(self, level: str, filters: dict[str, str], returns: list[str],
                 echo_empty: list[tuple[int, str]]) -> None:
        self.level = level
        self.filters = filters  # keyword -> value as received ('' for a return key)
        self.returns = returns  # keywords whose value is a sequence: returned, not matched
        self.echo_empty = echo_empty  # (tag, VR) of elements that have no keyword: returned empty


def _timed(handler: Callable[..., FindResponse]) -> Callable[..., FindResponse]:
    """``pacs_dimse_find_seconds``: from the request to the final response (or the SCU's stop), by the level
    the handler read (an invalid one counts as ``other``)."""

    @wraps(handler)
    def timed(event: evt.Event, *args: Any) -> FindResponse:
        started = time.perf_counter()
        try:
            yield from handler(event, *args)
        finally:
            metrics.find_observed(str(event.__dict__.get("_pacs_level", "")), time.perf_counter() - started)

    return timed


@audited_stream("dimse.c-find")
@_timed
def handle_find(event: evt.Event, engine: QueryEngine, ctx: AppContext, scope_of: ScopeOf) -> FindResponse:
    calling_ae = str(event.assoc.requestor.ae_title).strip()
    address = str(getattr(event.assoc.requestor, "address", "") or "")
    root = ROOTS.get(str(event.request.AffectedSOPClassUID))
    if root is None:
        yield failure(SOP_CLASS_NOT_SUPPORTED, "not a Query/Retrieve FIND SOP class"), None
        return
    try:
        identifier = read_identifier(_decoded(event), ctx.settings.assume_utf8_for_latin1)
        event.__dict__["_pacs_level"] = identifier.level  # for _timed
        if not identifier.level:
            raise IdentifierError("no QueryRetrieveLevel in the identifier")
        query = Query(identifier.level, root, identifier.filters, identifier.returns,
                      scope=scope_of(calling_ae, address))
        rows = iter(engine.search(query))
        first = next(rows, None)  # runs the query: a database failure is reported before any match
    except IdentifierError as exc:
        log.info("C-FIND from %s refused (0xA900): %s", calling_ae, exc)
        yield failure(IDENTIFIER_DOES_NOT_MATCH, str(exc)), None
        return
    except (MatchValueError, _Undecodable) as exc:
        log.info("C-FIND from %s refused (0xC000): %s", calling_ae, exc)
        yield failure(UNABLE_TO_PROCESS, str(exc)), None
        return
    except IndexUnavailable:
        metrics.index_error("c-find")
        log.warning("C-FIND from %s: index database unavailable", calling_ae)
        yield failure(OUT_OF_RESOURCES, "index database unavailable"), None
        return
    except Exception as exc:
        log.exception("C-FIND from %s failed", calling_ae)
        yield failure(UNABLE_TO_PROCESS_INTERNAL, f"internal error: {type(exc).__name__}"), None
        return

    count = 0
    try:
        row = first
        while row is not None:
            if event.is_cancelled:
                log.info("C-FIND from %s cancelled after %d match(es)", calling_ae, count)
                yield CANCEL, None
                return
            yield PENDING, response(row, identifier, ctx.settings.ae_title)
            count += 1
            row = next(rows, None)
    except IndexUnavailable:
        metrics.index_error("c-find")
        log.warning("C-FIND from %s: index database lost after %d match(es)", calling_ae, count)
        yield failure(OUT_OF_RESOURCES, "index database unavailable"), None
        return
    finally:
        close = getattr(rows, "close", None)
        if close is not None:
            close()  # release the database cursor at once if the SCU stopped early
    log.info("C-FIND from %s: %s level, %d match(es)", calling_ae, identifier.level, count)


class _Undecodable(ValueError):
    """The identifier (or one of its values) cannot be decoded."""


def _decoded(event: evt.Event) -> Dataset:
    try:
        return event.identifier
    except Exception as exc:
        raise _Undecodable(f"cannot decode the identifier: {_short(exc)}") from None


def read_identifier(ds: Dataset, assume_utf8_for_latin1: bool = True) -> Identifier:
    """Decode every element of ``ds`` to a string with its character set; never trusts a value's form."""
    try:
        utf8_fallback = assumes_utf8(ds, assume_utf8_for_latin1)
        tags = list(ds.keys())
    except Exception as exc:
        raise _Undecodable(f"cannot read the identifier: {_short(exc)}") from None
    level, filters, returns, echo = "", {}, [], []
    for tag in tags:
        tag = Tag(tag)
        if tag.element == 0 or tag.is_private:
            continue  # group lengths; private keys are neither matched nor returned
        keyword = keyword_for_tag(tag)
        vr = _vr(ds, tag)
        if vr == "SQ":
            if keyword:
                returns.append(keyword)
            else:
                echo.append((int(tag), vr))
            continue
        if not keyword:
            echo.append((int(tag), vr))
            continue
        value = _value_text(ds, tag, vr, utf8_fallback)
        if keyword == "QueryRetrieveLevel":
            level = value.strip().upper()
        elif keyword not in _NOT_KEYS:
            filters[keyword] = value
    return Identifier(level, filters, returns, echo)


def response(row: dict[str, Any], identifier: Identifier, ae_title: str) -> Dataset:
    """One Pending response's identifier: the row's keys, the empty echoes, level and AE title."""
    ds = Dataset()
    _put(ds, 0x00080005, "CS", RESPONSE_CHARSET)
    _put(ds, 0x00080052, "CS", identifier.level)
    for keyword, value in row.items():
        if keyword in _NOT_KEYS:
            continue
        attr = ATTRIBUTES.get(keyword)
        tag = Tag(keyword)
        vr = attr.vr if attr is not None else _dictionary_vr(tag)
        _put(ds, int(tag), vr, value)
    for echo_tag, vr in identifier.echo_empty:
        _put(ds, echo_tag, vr, None)
    _put(ds, 0x00080054, "AE", ae_title)  # Retrieve AE Title: where a C-MOVE for this match goes
    if "InstanceAvailability" in row:
        _put(ds, 0x00080056, "CS", "ONLINE")
    return ds


def _put(ds: Dataset, tag: int, vr: str, value: Any) -> None:
    """Add an element without pydicom's value validation (stored values come from modalities as sent)."""
    if vr == "SQ":
        value = Sequence([])
    elif value == "":
        value = None
    ds.add(DataElement(tag, vr, value, validation_mode=pydicom_config.IGNORE))


def _vr(ds: Dataset, tag: Any) -> str:
    raw = ds.get_item(tag)
    vr = getattr(raw, "VR", None)
    if vr:
        return str(vr)
    return _dictionary_vr(tag)


def _dictionary_vr(tag: Any) -> str:
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return "UN"
    return vr.split(" or ")[0]  # 'US or SS' and the like: the first is as good as any for an empty value


def _value_text(ds: Dataset, tag: Any, vr: str, utf8_fallback: bool) -> str:
    raw = ds.get_item(tag)
    raw_bytes = raw.value if isinstance(raw, RawDataElement) and isinstance(raw.value, bytes) else None
    as_utf8 = utf8_text(raw, vr) if utf8_fallback else None  # the rule of pacs.charset
    if as_utf8 is not None:
        return as_utf8.strip(" \x00")
    try:
        value = ds[tag].value
    except Exception:
        if raw_bytes is None:
            raise _Undecodable(f"cannot decode {keyword_for_tag(tag) or tag}") from None
        return raw_bytes.decode("ascii", errors="replace").strip(" \x00")  # e.g. 'abc' for an IS key
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value).strip(" \x00")
    if isinstance(value, bytes):
        return value.decode("ascii", errors="replace").strip(" \x00")
    return str(value).strip(" \x00")


def _short(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__).splitlines()[0][:120]
