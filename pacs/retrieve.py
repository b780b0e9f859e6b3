"""Which stored instances a C-MOVE / C-GET identifier names (PS3.4 C.4.2 and C.4.3).

Retrieves are resolved with unique keys only, straight from the index: Patient ID at the
PATIENT level, Study Instance UID at STUDY, Series Instance UID at SERIES and SOP Instance UID
at IMAGE; the key of the retrieve level may be a list of UIDs. Unique keys of the levels above
are checked when present (one value each) and narrow the match; when absent the match is
relational, as most archives accept.

Only studies inside the caller's :class:`~pacs.security.principal.AccessScope` are matched (for a
DICOM peer, :func:`pacs.ae_scope.ae_scope`): an instance of a study outside it is not counted and not
sent, exactly as if it were not archived, so a retrieve tells nothing about other facilities' studies.

A retrieve may name a whole patient, so nothing here holds the match in memory: :func:`plan`
gives the count (the number of sub-operations) and an upper bound on the instance row ids,
then :func:`iter_items` pages through the rows in short read transactions (keyset on the row
id), so a long transfer never keeps a transaction, or a study, open.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from sqlalchemy import Select, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from pacs.db.models import Instance, Patient, Series, Study
from pacs.errors import IndexUnavailable, InvalidInput
from pacs.query.matching import MAX_UID_LIST
from pacs.security.access import study_condition
from pacs.security.principal import AccessScope
from storage.keys import is_valid_uid

PAGE_SIZE = 200


class Model(StrEnum):
    """The Query/Retrieve information model of the request's presentation context."""

    PATIENT_ROOT = "PATIENT_ROOT"
    STUDY_ROOT = "STUDY_ROOT"


class Level(StrEnum):
    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"


_LEVELS = {
    Model.PATIENT_ROOT: (Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE),
    Model.STUDY_ROOT: (Level.STUDY, Level.SERIES, Level.IMAGE),
}


class InvalidIdentifier(InvalidInput):
    """The identifier cannot be resolved; the message says why (it becomes the Error Comment)."""


class IdentifierMismatch(InvalidIdentifier):
    """Structurally wrong for the model: no or an unknown level, or no unique key for the level.

    DIMSE: 0xA900 "Identifier does not match SOP Class".
    """


class InvalidKeyValue(InvalidIdentifier):
    """A unique key holds a value that cannot name anything: a malformed UID, a wildcard, too long a list.

    DIMSE: 0xC000 "Unable to process".
    """


@dataclass(frozen=True)
class RetrieveRequest:
    """A validated identifier: the level, and the unique keys that constrain the match."""

    model: Model
    level: Level
    patient_id: str | None = None
    issuer_of_patient_id: str | None = None
    study_uids: tuple[str, ...] = ()
    series_uids: tuple[str, ...] = ()
    sop_uids: tuple[str, ...] = ()


@dataclass(frozen=True)
class RetrieveItem:
    """One C-STORE sub-operation: the stored object and what it must be proposed as."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    object_key: str


@dataclass(frozen=True)
class RetrievePlan:
    """What :func:`plan` found: sub-operation count and the row id bound that keeps iteration consistent."""

    request: RetrieveRequest
    count: int
    max_id: int
    syntaxes: tuple[tuple[str, str], ...] = field(default=())  # distinct (SOP class, transfer syntax)
    # what plan() was given, kept by iter_items: an instance is sent only if every scope sees its study
    # (the caller's and, for C-MOVE, the destination's); a plan built without one sends nothing
    scopes: tuple[AccessScope, ...] = field(default_factory=lambda: (AccessScope(facilities=frozenset()),))


def parse_identifier(identifier: Dataset, model: Model) -> RetrieveRequest:
    """Validate a retrieve identifier for ``model``; raises :class:`InvalidIdentifier` subclasses."""
    level_text = _text(identifier, "QueryRetrieveLevel").upper()
    if not level_text:
        raise IdentifierMismatch("Query/Retrieve Level is missing")
    try:
        level = Level(level_text)
    except ValueError:
        raise IdentifierMismatch(f"unknown Query/Retrieve Level {level_text[:16]!r}") from None
    levels = _LEVELS[model]
    if level not in levels:
        raise IdentifierMismatch(f"level {level} is not part of the {model.name.replace('_', ' ').lower()} model")
    depth = levels.index(level)

    def required(keyword: str, uid_list: bool) -> tuple[str, ...]:
        values = _values(identifier, keyword)
        if not values:
            raise IdentifierMismatch(f"{keyword} (the unique key of level {level}) is missing")
        if not uid_list and len(values) > 1:
            raise InvalidKeyValue(f"{keyword} must be a single value")
        return values

    def optional(keyword: str) -> tuple[str, ...]:
        values = _values(identifier, keyword)
        if len(values) > 1:
            raise InvalidKeyValue(f"{keyword} above the retrieve level must be a single value")
        return values

    patient_id: str | None = None
    issuer: str | None = None
    if model is Model.PATIENT_ROOT:
        ids = required("PatientID", uid_list=False) if level is Level.PATIENT else optional("PatientID")
        if ids:
            patient_id = ids[0]
            if any(w in patient_id for w in "*?"):
                raise InvalidKeyValue("PatientID must not hold wildcards in a retrieve")
            issuer = _text(identifier, "IssuerOfPatientID") or None

    keys: dict[str, tuple[str, ...]] = {"StudyInstanceUID": (), "SeriesInstanceUID": (), "SOPInstanceUID": ()}
    ladder = [(Level.STUDY, "StudyInstanceUID"), (Level.SERIES, "SeriesInstanceUID"), (Level.IMAGE, "SOPInstanceUID")]
    for key_level, keyword in ladder:
        key_depth = levels.index(key_level)
        if key_depth > depth:
            break
        values = required(keyword, uid_list=True) if key_depth == depth else optional(keyword)
        _check_uids(keyword, values)
        keys[keyword] = values
    return RetrieveRequest(model, level, patient_id, issuer, keys["StudyInstanceUID"], keys["SeriesInstanceUID"],
                           keys["SOPInstanceUID"])


def _text(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword)
    except Exception as exc:  # a value pydicom cannot convert
        raise InvalidKeyValue(f"{keyword} cannot be read: {exc}") from exc
    if value is None:
        return ""
    if isinstance(value, MultiValue):
        value = "\\".join(str(v) for v in value)
    return str(value).strip(" \x00")


def _values(ds: Dataset, keyword: str) -> tuple[str, ...]:
    """The distinct non-empty values of a (possibly multi-valued) element, in order."""
    text = _text(ds, keyword)
    return tuple(dict.fromkeys(v.strip(" \x00") for v in text.split("\\") if v.strip(" \x00")))


def _check_uids(keyword: str, values: tuple[str, ...]) -> None:
    if len(values) > MAX_UID_LIST:
        raise InvalidKeyValue(f"{keyword}: list of {len(values)} UIDs exceeds {MAX_UID_LIST}")
    for uid in values:
        if not is_valid_uid(uid):
            shown = uid if len(uid) <= 24 else uid[:21] + "..."
            raise InvalidKeyValue(f"{keyword}: invalid UID {shown!r}")


def _filtered(stmt: Select, request: RetrieveRequest, scopes: tuple[AccessScope, ...]) -> Select:
    """Add the joins and unique-key conditions of ``request``, and every one of ``scopes``, to a statement
    over Instance."""
    restricted = [scope for scope in scopes if not scope.unrestricted]
    stmt = stmt.join(Series, Instance.series_fk == Series.id)
    if request.study_uids or request.patient_id is not None or restricted:
        stmt = stmt.join(Study, Series.study_fk == Study.id)
    for scope in restricted:
        stmt = stmt.where(study_condition(scope))
    if request.patient_id is not None:
        stmt = stmt.join(Patient, Study.patient_fk == Patient.id).where(Patient.patient_id == request.patient_id)
        if request.issuer_of_patient_id:
            stmt = stmt.where(Patient.issuer_of_patient_id == request.issuer_of_patient_id)
    for column, values in ((Study.study_instance_uid, request.study_uids),
                           (Series.series_instance_uid, request.series_uids),
                           (Instance.sop_instance_uid, request.sop_uids)):
        if len(values) == 1:
            stmt = stmt.where(column == values[0])
        elif values:
            stmt = stmt.where(column.in_(values))
    return stmt


def plan(sessions: sessionmaker[Session], request: RetrieveRequest, *, scope: AccessScope,
         destination_scope: AccessScope | None = None) -> RetrievePlan:
    """Count the matching instances inside ``scope`` and list their distinct (SOP class, transfer syntax)
    pairs. ``scope`` is required: every caller says whose studies it may send (``AccessScope()`` for all).

    ``destination_scope``: for C-MOVE, the studies the receiving AE may hold; only studies inside both
    scopes are sent, so that a peer of facility A cannot move A's studies to another facility's node.
    """
    scopes = (scope,) if destination_scope is None else (scope, destination_scope)
    try:
        with sessions() as session:
            count, max_id = session.execute(_filtered(select(func.count(Instance.id), func.max(Instance.id)),
                                                      request, scopes)).one()
            syntaxes: tuple[tuple[str, str], ...] = ()
            if count:
                rows = session.execute(_filtered(
                    select(Instance.sop_class_uid, Instance.transfer_syntax_uid), request, scopes)
                    .where(Instance.id <= max_id).distinct()).all()
                syntaxes = tuple(sorted((r[0], r[1]) for r in rows))
    except SQLAlchemyError as exc:
        raise IndexUnavailable(f"index database unavailable: {str(exc).splitlines()[0][:200]}") from exc
    return RetrievePlan(request, int(count or 0), int(max_id or 0), syntaxes, scopes)


def iter_items(sessions: sessionmaker[Session], retrieve: RetrievePlan,
               page_size: int = PAGE_SIZE) -> Iterator[RetrieveItem]:
    """The planned instances in row order, ``page_size`` rows per short read transaction.

    Rows added after :func:`plan` are not included (they were not counted); rows removed since are
    skipped. Raises :class:`IndexUnavailable` if the index goes away part-way.
    """
    if not retrieve.count:
        return
    last_id = 0
    columns = select(Instance.id, Instance.sop_class_uid, Instance.sop_instance_uid, Instance.transfer_syntax_uid,
                     Instance.object_key)
    while True:
        try:
            with sessions() as session:
                rows = session.execute(_filtered(columns, retrieve.request, retrieve.scopes)
                                       .where(Instance.id > last_id, Instance.id <= retrieve.max_id)
                                       .order_by(Instance.id).limit(page_size)).all()
        except SQLAlchemyError as exc:
            raise IndexUnavailable(f"index database unavailable: {str(exc).splitlines()[0][:200]}") from exc
        for row in rows:
            yield RetrieveItem(row.sop_class_uid, row.sop_instance_uid, row.transfer_syntax_uid, row.object_key)
        if len(rows) < page_size:
            return
        last_id = rows[-1].id
