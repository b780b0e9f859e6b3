"""Audit rows as FHIR R4 ``AuditEvent`` resources, and a ``searchset`` Bundle of them (SPEC §7). Pure functions.

The mapping:

- ``type`` / ``subtype``: the DICOM audit event ID and type codes (system
  ``http://dicom.nema.org/resources/ontology/DCM``, PS3.15 A.5) chosen by :func:`classify` from the
  row's action; ``subtype`` also carries the row's own action (system :data:`ACTION_SYSTEM`), so
  nothing is lost;
- ``action``: C, R, U, D or E (the DICOM EventActionCode);
- ``recorded``: the row's time; ``outcome``: 0 success, 4 minor failure (``warning``: some
  sub-operations failed, or cancelled; ``partial``: some STOW-RS instances refused), 8 serious
  failure; ``outcomeDesc``: the detail when not a success;
- ``agent``: who asked (``requestor`` true: user, token, AE title, with role and network address),
  this archive (``requestor`` false, its AE title), and a C-MOVE's destination;
- ``source``: the observer is this archive (its AE title), an application server;
- ``entity``: the patient (identifier), the study (Study Instance UID), and for queries the
  query itself; the row's detail text goes with the first entity.

An ``extension`` carries the row's chain hash (:mod:`pacs.audit.trail`), so an export can be checked
against the live trail.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

DCM = "http://dicom.nema.org/resources/ontology/DCM"
ACTION_SYSTEM = "urn:pacs:audit-action"
HASH_EXTENSION = "urn:pacs:audit-entry-hash"
SECURITY_SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
ROLE_TYPE = "http://terminology.hl7.org/CodeSystem/extra-security-role-type"

# DICOM audit codes (PS3.16 CID 400-402) by code value.
DCM_CODES = {
    "110100": "Application Activity", "110101": "Audit Log Used", "110103": "DICOM Instances Accessed",
    "110104": "DICOM Instances Transferred", "110106": "Export", "110107": "Import", "110109": "Order Record",
    "110110": "Patient Record", "110111": "Procedure Record", "110112": "Query", "110113": "Security Alert",
    "110114": "User Authentication", "110122": "Login", "110123": "Logout", "110126": "Node Authentication",
    "110128": "Network Configuration", "110131": "Software Configuration", "110132": "Use of Restricted Function",
    "110135": "Object Security Attributes Changed", "110137": "User Security Attributes Changed",
    "110150": "Application", "110152": "Destination Role ID", "110153": "Source Role ID",
    "110180": "Study Instance UID",
}

HUMAN_ROLES = frozenset({"admin", "radiologist", "technologist", "clinician", "patient", "operator"})
OUTCOMES = {"success": "0", "warning": "4", "partial": "4", "failure": "8"}

_QUERY_WORDS = ("search", "query", "qido", "find", "count")
_TRANSFER_WORDS = ("retrieve", "wado", "download", "c-move", "c-get")
_ACCESS_WORDS = ("read", "view", "metadata", "render", "frame", "thumbnail", "bulkdata")


@dataclass(frozen=True)
class Observer:
    """This archive, as the source of the events."""

    ae_title: str
    name: str = "Filmless PACS"


@dataclass(frozen=True)
class Kind:
    """What kind of event an action is: DICOM event ID, optional event type, FHIR action code."""

    type_code: str
    subtype_code: str | None
    action: str  # C R U D E


# First matching prefix wins; then the word rules in classify().
_BY_PREFIX: list[tuple[str, Kind]] = [
    ("auth.login", Kind("110114", "110122", "E")),
    ("auth.logout", Kind("110114", "110123", "E")),
    ("auth.", Kind("110114", None, "E")),  # auth.denied: no or a bad credential
    ("access.denied", Kind("110113", "110132", "E")),
    ("dimse.association-rejected", Kind("110113", "110126", "E")),
    ("dimse.c-find", Kind("110112", None, "E")),
    ("dimse.worklist-find", Kind("110112", None, "E")),
    ("dimse.c-move", Kind("110104", None, "R")),
    ("dimse.c-get", Kind("110104", None, "R")),
    ("dimse.mpps-create", Kind("110111", None, "C")),
    ("dimse.mpps-set", Kind("110111", None, "U")),
    ("instance.duplicate-discarded", Kind("110104", None, "E")),
    ("audit.", Kind("110101", None, "R")),
    ("study.share", Kind("110113", "110135", "U")),
    ("config.ae-", Kind("110113", "110128", "U")),
    ("config.user-", Kind("110113", "110137", "U")),
    ("config.token-", Kind("110113", "110137", "U")),
    ("config.initial-admin", Kind("110113", "110137", "C")),
    ("config.", Kind("110100", "110131", "U")),
    ("order.", Kind("110109", None, "U")),
    ("report.", Kind("110110", None, "U")),
]


def classify(action: str, detail: str = "") -> Kind:
    """The DICOM event ID / type and the FHIR action code of an audit action."""
    kind = next((k for prefix, k in _BY_PREFIX if action.startswith(prefix)), None)
    verb = _verb(action)
    if kind is not None:
        if action.startswith(("config.", "order.", "report.")) and verb is not None:
            return Kind(kind.type_code, kind.subtype_code, verb)
        return kind
    if action.startswith("instance.") or any(w in action for w in ("store", "stow")):
        imported = "transport=import" in detail
        return Kind("110107" if imported else "110104", None, "C")
    if any(w in action for w in _QUERY_WORDS):
        return Kind("110112", None, "E")
    if any(w in action for w in _TRANSFER_WORDS):
        return Kind("110104", None, "R")
    if any(w in action for w in _ACCESS_WORDS):
        return Kind("110103", None, "R")
    if any(w in action for w in ("fhir", "patient", "report")):
        return Kind("110110", None, verb or "R")
    if "export" in action:
        return Kind("110106", None, "R")
    return Kind("110100", None, verb or "E")


def audit_event(row: Mapping[str, Any], observer: Observer) -> dict[str, Any]:
    """One audit row (as :func:`pacs.audit.search.as_dict` gives it) as a FHIR R4 AuditEvent."""
    action = str(row.get("action", ""))
    detail = str(row.get("detail", ""))
    outcome = str(row.get("outcome", "") or "success")
    kind = classify(action, detail)
    subtype = [_dcm(kind.subtype_code)] if kind.subtype_code else []
    subtype.append({"system": ACTION_SYSTEM, "code": action, "display": action})
    resource: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": str(row["id"]),
        "type": _dcm(kind.type_code),
        "subtype": subtype,
        "action": kind.action,
        "recorded": str(row["at"]),
        "outcome": OUTCOMES.get(outcome, "8"),
        "agent": _agents(row, observer, detail),
        "source": {
            "site": observer.name,
            "observer": {"display": observer.ae_title},
            "type": [{"system": SECURITY_SOURCE_TYPE, "code": "4", "display": "Application Server"}],
        },
    }
    if row.get("entry_hash"):
        resource["extension"] = [{"url": HASH_EXTENSION, "valueString": str(row["entry_hash"])}]
    if outcome != "success" and detail:
        resource["outcomeDesc"] = detail
    entities = _entities(row, kind, detail)
    if entities:
        resource["entity"] = entities
    return resource


def bundle(rows: Iterable[Mapping[str, Any]], observer: Observer, *, total: int | None = None,
           self_url: str | None = None) -> dict[str, Any]:
    """A ``searchset`` Bundle of the rows' AuditEvents."""
    return {**_bundle_head(total, self_url), "entry": [_entry(row, observer) for row in rows]}


def iter_bundle_json(rows: Iterable[Mapping[str, Any]], observer: Observer, *, total: int | None = None,
                     self_url: str | None = None) -> Iterator[str]:
    """The same Bundle as JSON text in pieces, one entry at a time (an export of any size in constant memory)."""
    yield json.dumps(_bundle_head(total, self_url), ensure_ascii=False)[:-1] + ', "entry": ['
    for i, row in enumerate(rows):
        yield ("," if i else "") + "\n" + json.dumps(_entry(row, observer), ensure_ascii=False)
    yield "\n]}\n"


def _bundle_head(total: int | None, self_url: str | None) -> dict[str, Any]:
    head: dict[str, Any] = {"resourceType": "Bundle", "id": str(uuid.uuid4()), "type": "searchset"}
    if total is not None:
        head["total"] = total
    if self_url:
        head["link"] = [{"relation": "self", "url": self_url}]
    return head


def _entry(row: Mapping[str, Any], observer: Observer) -> dict[str, Any]:
    return {"fullUrl": _full_url(row), "resource": audit_event(row, observer), "search": {"mode": "match"}}


def _agents(row: Mapping[str, Any], observer: Observer, detail: str) -> list[dict[str, Any]]:
    actor = str(row.get("actor", "") or "")
    role = str(row.get("role", "") or "")
    requestor: dict[str, Any] = {
        "type": _agent_type(role),
        "who": {"display": actor or "unknown"},
        "name": actor or "unknown",
        "requestor": True,
    }
    if actor and not actor.startswith("unverified:"):  # a failed login's claimed name is no identity
        requestor["altId"] = actor
    if role:
        requestor["role"] = [{"text": role}]
    network = _network(str(row.get("source_address", "") or ""))
    if network:
        requestor["network"] = network
    agents = [requestor, {"type": _dcm("110150"), "who": {"display": observer.ae_title}, "name": observer.name,
                          "requestor": False}]
    destination = _detail_field(detail, "destination")
    if destination:
        title, _, address = destination.partition("@")
        agent: dict[str, Any] = {"type": _dcm("110152"), "who": {"display": title}, "altId": title,
                                 "requestor": False}
        if _network(address):
            agent["network"] = _network(address)
        agents.append(agent)
    return agents


def _entities(row: Mapping[str, Any], kind: Kind, detail: str) -> list[dict[str, Any]]:
    entities: list[dict[str, Any]] = []
    patient_id = str(row.get("patient_id", "") or "")
    study_uid = str(row.get("study_instance_uid", "") or "")
    if patient_id:
        entities.append({
            "what": {"identifier": {"value": patient_id}},
            "type": {"system": ENTITY_TYPE, "code": "1", "display": "Person"},
            "role": {"system": OBJECT_ROLE, "code": "1", "display": "Patient"},
        })
    if study_uid:
        entities.append({
            "what": {"identifier": {"type": {"coding": [_dcm("110180")]}, "value": study_uid}},
            "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
            "role": {"system": OBJECT_ROLE, "code": "3", "display": "Report"},
        })
    if kind.type_code == "110112":
        keys = _bracketed(detail, "keys")
        entities.append({
            "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
            "role": {"system": OBJECT_ROLE, "code": "24", "display": "Query"},
            "description": keys or detail or "query",
            "query": base64.b64encode((keys or detail).encode("utf-8")).decode("ascii"),
        })
    if detail:
        if not entities:
            entities.append({"type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
                             "description": row.get("action", "")})
        entities[0]["detail"] = [{"type": "detail", "valueString": detail}]
    return entities


def _agent_type(role: str) -> dict[str, Any]:
    if role in HUMAN_ROLES:
        return {"coding": [{"system": ROLE_TYPE, "code": "humanuser", "display": "human user"}]}
    return {"coding": [_dcm("110150")]}


def _network(address: str) -> dict[str, str] | None:
    """FHIR network access point from ``host:port`` (the port dropped): type 2 IP address, 1 machine name."""
    if not address or address == "cli":
        return None
    host = address
    if address.startswith("["):
        host = address[1:].split("]", 1)[0]
    elif address.count(":") >= 1:
        head, _, tail = address.rpartition(":")
        if tail.isdigit() or not tail:
            host = head
    if not host:
        return None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return {"address": host, "type": "1"}
    return {"address": host, "type": "2"}


def _dcm(code: str) -> dict[str, str]:
    return {"system": DCM, "code": code, "display": DCM_CODES[code]}


def _verb(action: str) -> str | None:
    last = action.rsplit(".", 1)[-1]
    for words, code in ((("add", "create", "store", "new", "initial"), "C"),
                        (("remove", "delete", "revoke"), "D"),
                        (("read", "retrieve", "view", "get", "list", "search"), "R"),
                        (("set", "update", "change", "passwd", "password", "enable", "disable", "sign", "amend",
                          "cancel", "share", "edit"), "U")):
        if any(w in last for w in words):
            return code
    return None


def _detail_field(detail: str, name: str) -> str:
    for token in detail.split():
        if token.startswith(f"{name}="):
            return token[len(name) + 1:]
    return ""


def _bracketed(detail: str, name: str) -> str:
    start = detail.find(f"{name}=[")
    if start < 0:
        return ""
    start += len(name) + 2
    end = detail.find("]", start)
    return detail[start:end if end >= 0 else len(detail)]


def _full_url(row: Mapping[str, Any]) -> str:
    """A stable ``urn:uuid:`` per row, from its chain hash (else its id)."""
    digest = str(row.get("entry_hash", "") or "")
    if len(digest) >= 32:
        return f"urn:uuid:{uuid.UUID(digest[:32])}"
    return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, 'audit-event/' + str(row.get('id')))}"
