"""A-ASSOCIATE-RQ variable items decoded and A-ASSOCIATE-AC PDUs built and encoded by dicom_scp.association_pdus are
pynetdicom's: the same item objects, the same bytes, the same exceptions and log lines for malformed input; a live
`pacs` negotiates with DCMTK's and pynetdicom's requestors through them."""

from __future__ import annotations

import logging
import random
import socket
import struct
import subprocess
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import UID
from pynetdicom import AE, _config, build_role, pdu_items, pdu_primitives, presentation
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
    SOPClassCommonExtendedNegotiation,
    SOPClassExtendedNegotiation,
    UserIdentityNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import select

from dicom_scp import association_pdus, presentation_contexts, uid_memo
from pacs.db.models import Instance
from tests.support.datasets import make_dataset
from tests.support.dcmtk import dcmtk, echoscu, storescu
from tests.support.stack import EmbeddedPacs
from tests.support.tiers import starts_servers

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
SYNTAXES = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.4.50",
            "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.5",
            "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.201", "1.2.826.0.1.3680043.9.7433.99.1"]
ABSTRACTS = [CTImageStorage, Verification, "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.1.1",
             "1.2.840.10008.5.1.4.1.2.2.1", "1.2.840.10008.5.1.4.1.2.2.2", "1.2.840.10008.5.1.4.1.2.2.3",
             "1.2.840.10008.5.1.4.31", "1.2.840.10008.3.1.2.3.3", "1.2.826.0.1.3680043.9.7433.99.2"]


@pytest.fixture(autouse=True)
def quiet_associations(monkeypatch: pytest.MonkeyPatch) -> None:
    """Associations without pynetdicom's standard logging handlers, as `pacs` builds them below INFO (build_ae)."""
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "none")


@pytest.fixture(params=["memo", "no memo"])
def uid_validation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """pynetdicom's UID validation with dicom_scp.uid_memo (as `pacs` runs) and without it (pynetdicom's own)."""
    memo = request.param == "memo"
    for module in (pdu_items, pdu_primitives, presentation):
        monkeypatch.setattr(module, "set_uid", uid_memo.set_uid if memo else uid_memo._original_set_uid)
    monkeypatch.setattr(PresentationContext, "add_transfer_syntax",
                        uid_memo.add_transfer_syntax if memo else uid_memo._original_add_transfer_syntax)
    return str(request.param)


# --- describing what pynetdicom and this module make -----------------------------------------------------------


def _state(value: Any) -> Any:
    """Everything an object holds, recursively, with its classes: two objects with the same state are the same to
    any reader (UIDs with their class and attributes, items with every attribute in order)."""
    if isinstance(value, str | bytes | int | float | bool) or value is None:
        extra = _state(dict(vars(value))) if hasattr(value, "__dict__") else None
        return (type(value).__name__, value, extra)
    if isinstance(value, list | tuple):
        return (type(value).__name__, [_state(item) for item in value])
    if isinstance(value, dict):
        return ("dict", [(_state(key), _state(item)) for key, item in value.items()])
    return (type(value).__name__, [(name, _state(item)) for name, item in vars(value).items()])


def _outcome(call: Callable[[], Any], caplog: pytest.LogCaptureFixture) -> tuple[Any, list[tuple[str, int, str]]]:
    """What ``call`` returned (its state) or raised (class and message), and the log lines and warnings it
    wrote."""
    caplog.clear()
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        try:
            result: Any = ("returned", _state(call()))
        except Exception as exc:  # compared: pynetdicom's exception must be ours
            result = ("raised", type(exc).__name__, str(exc))
    logged = [(record.name, record.levelno, record.getMessage()) for record in caplog.records]
    return result, logged + [(warning.category.__name__, 0, str(warning.message)) for warning in warned]


def _decode(data: bytes, decoder: Callable[..., list[Any]], monkeypatch: pytest.MonkeyPatch) -> A_ASSOCIATE_RQ:
    """``A_ASSOCIATE_RQ.decode`` (as the DUL's ``_decode_pdu`` calls it) with ``decoder`` for its variable items."""
    with monkeypatch.context() as patch:
        patch.setattr(A_ASSOCIATE_RQ, "_wrap_generate_items", decoder)
        pdu = A_ASSOCIATE_RQ()
        pdu.decode(data)
        return pdu


def _assert_decoded_as_pynetdicom(data: bytes, caplog: pytest.LogCaptureFixture,
                                  monkeypatch: pytest.MonkeyPatch) -> Any:
    """The PDU decoded by pynetdicom and here: the same items (and primitive), or the same exception; the same
    log lines. Returns pynetdicom's outcome."""
    caplog.set_level(logging.DEBUG)
    theirs = _outcome(lambda: _decode(data, association_pdus._original_generate_items, monkeypatch), caplog)
    ours = _outcome(lambda: _decode(data, association_pdus.decode_variable_items, monkeypatch), caplog)
    assert ours == theirs
    if theirs[0][0] == "returned":  # and what the ACSE is given
        pdu = _decode(data, association_pdus.decode_variable_items, monkeypatch)
        theirs_primitive = _outcome(_decode(data, association_pdus._original_generate_items, monkeypatch).to_primitive,
                                    caplog)
        assert _outcome(pdu.to_primitive, caplog) == theirs_primitive
    return theirs


# --- A-ASSOCIATE-RQ PDUs as requestors send them ---------------------------------------------------------------


def _uid(rng: random.Random) -> str:
    return f"1.2.826.0.1.3680043.9.7433.{rng.randint(1, 10**6)}.{rng.randint(0, 999)}"


def _user_information(rng: random.Random, abstracts: list[str]) -> list[Any]:
    """A requestor's user information: maximum length, implementation, and a random choice of the rest."""
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = rng.choice([0, 4096, 16382, 16384, 65536, 0xFFFFFFFF])
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = _uid(rng)
    items: list[Any] = [maximum, implementation]
    if rng.random() < 0.5:
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = rng.choice(["OFFIS_DCMTK_368", "PYNETDICOM_304", "X"])
        items.append(version)
    if rng.random() < 0.4:
        window = AsynchronousOperationsWindowNegotiation()
        window.maximum_number_operations_invoked = rng.randint(0, 5)
        window.maximum_number_operations_performed = rng.randint(0, 5)
        items.append(window)
    for abstract in rng.sample(abstracts, k=min(len(abstracts), rng.randint(0, 3))):
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid = abstract
        role.scu_role, role.scp_role = rng.choice([(True, True), (False, True), (True, False)])
        items.append(role)
    if rng.random() < 0.3:
        extended = SOPClassExtendedNegotiation()
        extended.sop_class_uid = rng.choice(abstracts)
        extended.service_class_application_information = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        items.append(extended)
    if rng.random() < 0.3:
        common = SOPClassCommonExtendedNegotiation()
        common.sop_class_uid = rng.choice(abstracts)
        common.service_class_uid = "1.2.840.10008.4.2"
        common.related_general_sop_class_identification = [CTImageStorage]
        items.append(common)
    if rng.random() < 0.3:
        identity = UserIdentityNegotiation()
        identity.user_identity_type = rng.choice([1, 2])
        identity.primary_field = b"user"
        if identity.user_identity_type == 2:
            identity.secondary_field = b"secret"
        identity.positive_response_requested = rng.random() < 0.5
        items.append(identity)
    return items


def _request(rng: random.Random, contexts: int) -> bytes:
    """An A-ASSOCIATE-RQ as pynetdicom's requestor encodes one: ``contexts`` presentation contexts."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT
    primitive.calling_ae_title = rng.choice(["PYSCU", "A", "SIXTEEN_CHARS_AE"])
    primitive.called_ae_title = "PACS"
    proposed = []
    for number in range(contexts):
        context = PresentationContext()
        context.context_id = 2 * number + 1
        context.abstract_syntax = rng.choice(ABSTRACTS)
        context.transfer_syntax = rng.sample(SYNTAXES, k=rng.randint(1, 4))
        proposed.append(context)
    primitive.presentation_context_definition_list = proposed
    primitive.user_information = _user_information(rng, [str(cx.abstract_syntax) for cx in proposed])
    return A_ASSOCIATE_RQ(primitive).encode()


def _storescu_like() -> bytes:
    """An A-ASSOCIATE-RQ shaped as DCMTK's ``storescu -xe`` sends one: 128 contexts, 1-2 transfer syntaxes each, odd
    and even UID lengths (pynetdicom pads nothing; DCMTK's capture is in the integration tests)."""
    return _request(random.Random(128), 128)


@pytest.mark.parametrize("seed", range(40))
def test_requests_decode_as_pynetdicom_decodes_them(seed: int, uid_validation: str, caplog: pytest.LogCaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(seed)
    data = _request(rng, rng.choice([1, 2, 5, 20, 128]))
    outcome = _assert_decoded_as_pynetdicom(data, caplog, monkeypatch)
    assert outcome[0][0] == "returned"


def test_the_items_are_pynetdicoms_classes(monkeypatch: pytest.MonkeyPatch) -> None:
    pdu = _decode(_storescu_like(), association_pdus.decode_variable_items, monkeypatch)
    kinds = [type(item) for item in pdu.variable_items]
    assert kinds == [pdu_items.ApplicationContextItem] + [pdu_items.PresentationContextItemRQ] * 128 + [
        pdu_items.UserInformationItem]
    context = pdu.presentation_context[0]
    assert isinstance(context.abstract_transfer_syntax_sub_items[0], pdu_items.AbstractSyntaxSubItem)
    assert context.context_id == 1 and context.abstract_syntax in ABSTRACTS
    assert all(isinstance(uid, UID) for uid in context.transfer_syntax)


def _with_uid_padding(data: bytes, rng: random.Random) -> bytes:
    """The same PDU with some abstract and transfer syntax names NUL-padded to an even length, as DCMTK pads them."""
    out, offset = bytearray(data[:74]), 74
    while offset < len(data):
        kind, length = struct.unpack(">BxH", data[offset:offset + 4])
        body = data[offset + 4:offset + 4 + length]
        if kind == 0x20:
            subs, pos = bytearray(body[:4]), 4
            while pos < len(body):
                sub_kind, sub_length = struct.unpack(">BxH", body[pos:pos + 4])
                value = body[pos + 4:pos + 4 + sub_length]
                if len(value) % 2 and rng.random() < 0.7:
                    value += b"\x00"
                subs += struct.pack(">BxH", sub_kind, len(value)) + value
                pos += 4 + sub_length
            body = bytes(subs)
        out += struct.pack(">BxH", kind, len(body)) + body
        offset += 4 + length
    struct.pack_into(">I", out, 2, len(out) - 6)
    return bytes(out)


@pytest.mark.parametrize("seed", range(10))
def test_nul_padded_names_decode_as_pynetdicom_decodes_them(seed: int, uid_validation: str,
                                                            caplog: pytest.LogCaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(seed)
    data = _with_uid_padding(_request(rng, 30), rng)
    assert _assert_decoded_as_pynetdicom(data, caplog, monkeypatch)[0][0] == "returned"


# --- malformed and hostile A-ASSOCIATE-RQ PDUs -----------------------------------------------------------------


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BxH", kind, len(body)) + body


def _context(context_id: int, *subs: bytes) -> bytes:
    return _item(0x20, bytes([context_id, 0, 0, 0]) + b"".join(subs))


def _pdu(*items: bytes) -> bytes:
    body = struct.pack(">HH16s16s32x", 1, 0, b"PACS".ljust(16), b"SCU".ljust(16)) + b"".join(items)
    return struct.pack(">BxI", 1, len(body)) + body


APP = _item(0x10, APPLICATION_CONTEXT.encode())
USER = _item(0x50, _item(0x51, struct.pack(">I", 16384)) + _item(0x52, b"1.2.826.0.1.3680043.9.7433.1"))
CT_AS = _item(0x30, CTImageStorage.encode())
ELE = _item(0x40, b"1.2.840.10008.1.2.1")

HOSTILE = {
    "no items": _pdu(),
    "only a context": _pdu(_context(1, CT_AS, ELE)),
    "no sub-items": _pdu(APP, _context(1), USER),
    "context of 0-3 bytes": [_pdu(APP, _item(0x20, bytes(n)), USER) for n in range(4)],
    "even context id": _pdu(APP, _context(2, CT_AS, ELE), USER),
    "context id 0 and 255": [_pdu(APP, _context(n, CT_AS, ELE), USER) for n in (0, 255)],
    "two abstract syntaxes": _pdu(APP, _context(1, CT_AS, _item(0x30, Verification.encode()), ELE), USER),
    "transfer syntax first": _pdu(APP, _context(1, ELE, CT_AS), USER),
    "no transfer syntax": _pdu(APP, _context(1, CT_AS), USER),
    "no abstract syntax": _pdu(APP, _context(1, ELE), USER),
    "empty names": _pdu(APP, _context(1, _item(0x30, b""), _item(0x40, b"")), USER),
    "NUL-only names": _pdu(APP, _context(1, _item(0x30, b"\x00"), _item(0x40, b"\x00\x00")), USER),
    "two NULs": _pdu(APP, _context(1, _item(0x30, CTImageStorage.encode() + b"\x00\x00"), ELE), USER),
    "non-conformant names": _pdu(APP, _context(1, _item(0x30, b"1.2.03.4"), _item(0x40, b"1.2.840.10008.01.2")), USER),
    "invalid names": _pdu(APP, _context(1, _item(0x30, b"1.2.abc"), ELE), USER),
    "invalid transfer syntax": _pdu(APP, _context(1, CT_AS, _item(0x40, b"1.2.x")), USER),
    "long name": _pdu(APP, _context(1, _item(0x30, b"1." + b"2" * 70), ELE), USER),
    "name with space": _pdu(APP, _context(1, _item(0x30, b"1.2.3 "), _item(0x40, b" 1.2.840.10008.1.2")), USER),
    "non-ASCII name": _pdu(APP, _context(1, _item(0x30, b"1.2.\xff"), ELE), USER),
    "an abstract syntax that is a transfer syntax": _pdu(APP, _context(1, _item(0x30, ELE[4:]), CT_AS), USER),
    "a SOP class as transfer syntax": _pdu(APP, _context(1, CT_AS, _item(0x40, CTImageStorage.encode())), USER),
    "unknown sub-item": _pdu(APP, _context(1, CT_AS, _item(0x41, b"1.2"), ELE), USER),
    "user information sub-item in a context": _pdu(APP, _context(1, CT_AS, _item(0x51, bytes(4))), USER),
    "unknown item": _pdu(APP, _context(1, CT_AS, ELE), _item(0x99, b"x"), USER),
    "AC context in an RQ": _pdu(APP, _item(0x21, bytes([1, 0, 0, 0]) + ELE), USER),
    "sub-item at the top": _pdu(APP, CT_AS, ELE, USER),
    "two application contexts": _pdu(APP, APP, _context(1, CT_AS, ELE), USER),
    "invalid application context": _pdu(_item(0x10, b"1.2.abc"), _context(1, CT_AS, ELE), USER),
    "empty user information": _pdu(APP, _context(1, CT_AS, ELE), _item(0x50, b"")),
    "garbage user information": _pdu(APP, _context(1, CT_AS, ELE), _item(0x50, b"\x51\x00\x00\x09abc")),
    "sub-item overruns its context": _pdu(APP, _item(0x20, bytes([1, 0, 0, 0]) + CT_AS[:2] + b"\x00\x40" + CT_AS[4:]),
                                          USER),
    "sub-item header cut": _pdu(APP, _item(0x20, bytes([1, 0, 0, 0]) + CT_AS + b"\x40\x00"), USER),
    "item header cut": _pdu(APP, _context(1, CT_AS, ELE), USER, b"\x50\x00"),
    "one stray byte": _pdu(APP, _context(1, CT_AS, ELE), USER, b"\x10"),
    "item overruns the PDU": _pdu(APP, _context(1, CT_AS, ELE), USER[:-3]),
    "a valid context after a bad name": _pdu(APP, _context(1, _item(0x30, b"1.2.03")), _context(3, CT_AS, ELE),
                                             _context(5, _item(0x30, b"1.2.abc"), ELE), USER),
    "bad names then a cut": _pdu(APP, _context(1, _item(0x30, b"1.2.03"), ELE), USER, b"\x20\x00\x00\x09"),
    "bad AE title": _pdu(APP, _context(1, CT_AS, ELE), USER).replace(b"PACS".ljust(16), b" " * 16, 1),
}


def _hostile_cases() -> Iterator[tuple[str, bytes]]:
    for name, value in HOSTILE.items():
        for number, data in enumerate(value if isinstance(value, list) else [value]):
            yield f"{name} {number}", data


@pytest.mark.parametrize(("name", "data"), list(_hostile_cases()))
def test_malformed_requests_fail_or_warn_as_in_pynetdicom(name: str, data: bytes, uid_validation: str,
                                                          caplog: pytest.LogCaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _assert_decoded_as_pynetdicom(data, caplog, monkeypatch)


def test_every_truncation_fails_or_decodes_as_in_pynetdicom(caplog: pytest.LogCaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    data = _pdu(APP, _context(1, CT_AS, ELE, _item(0x40, b"1.2.840.10008.1.2")), _context(3, CT_AS, ELE), USER)
    raised = 0
    for end in range(74, len(data) + 1):
        raised += _assert_decoded_as_pynetdicom(data[:end], caplog, monkeypatch)[0][0] == "raised"
    assert raised  # the cuts inside an item are pynetdicom's exceptions, raised here too


@pytest.mark.parametrize("seed", range(6))
def test_random_corruptions_fail_or_decode_as_in_pynetdicom(seed: int, uid_validation: str,
                                                            caplog: pytest.LogCaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(seed)
    base = _request(rng, 6)
    for _ in range(60):
        data = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            position = rng.randrange(74, len(data))
            data[position] = rng.choice([0x00, 0x01, 0x10, 0x20, 0x21, 0x30, 0x40, 0x50, 0xFF, rng.randrange(256)])
        _assert_decoded_as_pynetdicom(bytes(data), caplog, monkeypatch)


def test_lying_item_lengths_fail_or_decode_as_in_pynetdicom(caplog: pytest.LogCaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    base = _pdu(APP, _context(1, CT_AS, ELE), _context(3, _item(0x30, Verification.encode()), ELE), USER)
    headers = [n for n in range(74, len(base) - 4) if base[n] in (0x10, 0x20, 0x30, 0x40, 0x50) and base[n + 1] == 0]
    assert len(headers) >= 8
    for position in headers:
        length = struct.unpack(">H", base[position + 2:position + 4])[0]
        for lie in {0, 1, 3, length - 1, length + 1, length + 4, 0xFFFF}:
            data = bytearray(base)
            struct.pack_into(">H", data, position + 2, max(0, min(lie, 0xFFFF)))
            _assert_decoded_as_pynetdicom(bytes(data), caplog, monkeypatch)


def test_not_bytes_takes_pynetdicoms_path(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    pynetdicoms = association_pdus._original_generate_items

    def original(self: Any, data: Any) -> list[Any]:
        calls.append(len(data))
        return pynetdicoms(self, data)

    monkeypatch.setattr(association_pdus, "_original_generate_items", original)
    data = _storescu_like()
    with pytest.raises(TypeError, match="bytearray"):  # pynetdicom's UID setters take no bytearray
        association_pdus.decode_variable_items(A_ASSOCIATE_RQ(), bytearray(data[74:]))  # type: ignore[arg-type]
    association_pdus.decode_variable_items(A_ASSOCIATE_RQ(), data[74:])
    assert calls == [len(data) - 74]  # the bytearray only


# --- A-ASSOCIATE-AC PDUs -----------------------------------------------------------------------------------------


def _supported() -> list[PresentationContext]:
    """An archive's supported contexts, shared read-only as `pacs` shares them (dicom_scp.presentation_contexts)."""
    contexts = []
    for abstract in ABSTRACTS[:-1]:
        context = PresentationContext()
        context.abstract_syntax = abstract
        context.transfer_syntax = list[str | bytes | UID](SYNTAXES[:8])
        context.scp_role = context.scu_role = abstract == CTImageStorage or None
        contexts.append(context)
    return presentation_contexts.shared(contexts)


def _accept(data: bytes, rng: random.Random) -> A_ASSOCIATE:
    """The A-ASSOCIATE (accept) primitive an acceptor answers the request ``data`` with: pynetdicom's negotiation,
    and user information with the responses an acceptor may give."""
    request = A_ASSOCIATE_RQ()
    request.decode(data)
    proposed = request.to_primitive()
    roles: dict[Any, tuple[bool | None, bool | None]] = {
        item.sop_class_uid: (item.scu_role, item.scp_role) for item in proposed.user_information
        if isinstance(item, SCP_SCU_RoleSelectionNegotiation)}
    results, role_responses = negotiate_as_acceptor(proposed.presentation_context_definition_list, _supported(), roles)
    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT
    primitive.calling_ae_title, primitive.called_ae_title = proposed.calling_ae_title, proposed.called_ae_title
    primitive.result = 0
    primitive.presentation_context_definition_results_list = results
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = rng.choice([0, 16382, 1048576])
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.3.0.4"
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = "PYNETDICOM_304"
    info: list[Any] = [maximum, implementation, version, *role_responses]
    if rng.random() < 0.3:
        window = AsynchronousOperationsWindowNegotiation()
        window.maximum_number_operations_invoked = window.maximum_number_operations_performed = 1
        info.append(window)
    if rng.random() < 0.3:
        identity = UserIdentityNegotiation()
        identity.server_response = b"token"
        info.append(identity)
    if rng.random() < 0.3:
        extended = SOPClassExtendedNegotiation()
        extended.sop_class_uid = CTImageStorage
        extended.service_class_application_information = b"\x01"
        info.append(extended)
    primitive.user_information = info
    return primitive


def _assert_answered_as_pynetdicom(primitive: A_ASSOCIATE, caplog: pytest.LogCaptureFixture) -> Any:
    """The A-ASSOCIATE-AC built from ``primitive`` by pynetdicom and here (the same items or exception, the same log
    lines) and encoded by both (the same bytes or exception). Returns pynetdicom's encoding's outcome."""
    caplog.set_level(logging.DEBUG)
    theirs, ours = A_ASSOCIATE_AC(), A_ASSOCIATE_AC()
    def build(from_primitive: Callable[[A_ASSOCIATE_AC, Any], None], pdu: A_ASSOCIATE_AC) -> A_ASSOCIATE_AC:
        from_primitive(pdu, primitive)
        return pdu

    built = _outcome(lambda: build(association_pdus._original_ac_from_primitive, theirs), caplog)
    assert _outcome(lambda: build(association_pdus.from_primitive_ac, ours), caplog) == built
    if built[0][0] == "raised":
        return built
    encoded = _outcome(lambda: association_pdus._original_ac_encode(theirs), caplog)
    assert _outcome(lambda: association_pdus.encode_associate_ac(theirs), caplog) == encoded
    assert _outcome(lambda: association_pdus.encode_associate_ac(ours), caplog) == encoded
    return encoded


@pytest.mark.parametrize("seed", range(30))
def test_answers_are_pynetdicoms_bytes(seed: int, uid_validation: str, caplog: pytest.LogCaptureFixture) -> None:
    rng = random.Random(seed)
    primitive = _accept(_request(rng, rng.choice([1, 3, 20, 128])), rng)
    outcome = _assert_answered_as_pynetdicom(primitive, caplog)
    assert outcome[0][0] == "returned"
    results = primitive.presentation_context_definition_results_list
    assert len(results) < 4 or {cx.result for cx in results} & {0}, "some contexts accepted"


def _unusual(change: Callable[[A_ASSOCIATE], None]) -> A_ASSOCIATE:
    primitive = _accept(_request(random.Random(5), 4), random.Random(5))
    change(primitive)
    return primitive


def _set(attribute: str, value: Any, index: int = 0) -> Callable[[A_ASSOCIATE], None]:
    def change(primitive: A_ASSOCIATE) -> None:
        primitive.presentation_context_definition_results_list[index].__dict__[attribute] = value
    return change


def _replace_context(factory: Callable[[PresentationContext], Any]) -> Callable[[A_ASSOCIATE], None]:
    def change(primitive: A_ASSOCIATE) -> None:
        results = primitive.presentation_context_definition_results_list
        results[1] = factory(results[1])
    return change


def _private_syntax(context: PresentationContext) -> PresentationContext:
    uid = UID("1.2.840.10008.1.2.1")
    uid.set_private_encoding(False, True)
    context.__dict__["_transfer_syntax"] = [uid]
    return context


UNUSUAL_ANSWERS: dict[str, Callable[[A_ASSOCIATE], None]] = {
    "no transfer syntax": _set("_transfer_syntax", []),
    "a transfer syntax of None": _set("_transfer_syntax", [None]),
    "an empty transfer syntax": _set("_transfer_syntax", [""]),
    "an invalid transfer syntax": _set("_transfer_syntax", ["1.2.abc"]),
    "a non-conformant transfer syntax": _set("_transfer_syntax", ["1.2.840.10008.01.2"]),
    "a bytes transfer syntax": _set("_transfer_syntax", [b"1.2.840.10008.1.2"]),
    "a private encoding": _replace_context(_private_syntax),
    "a tuple of transfer syntaxes": _set("_transfer_syntax", ("1.2.840.10008.1.2",)),
    "context id None": _set("_context_id", None),
    "context id 256": _set("_context_id", 256),
    "context id -1": _set("_context_id", -1),
    "context id a str": _set("_context_id", "1"),
    "result None": _set("result", None),
    "result 256": _set("result", 256),
    "result a float": _set("result", 0.0),
    "a bool result": _set("result", False),
    "a shared context": _replace_context(lambda cx: presentation_contexts.shared([cx])[0]),
    "a context subclass": _replace_context(lambda cx: type("Sub", (PresentationContext,), {})()),
    "a long called AE title": lambda p: p.__dict__.update(_called_ae_title="SEVENTEEN_CHARS_X"),
    "a non-ASCII called AE title": lambda p: p.__dict__.update(_called_ae_title="PAC\u00c9"),
    "a bytes calling AE title": lambda p: p.__dict__.update(_calling_ae_title=b"SCU"),
    "no results": lambda p: p.__dict__.update(_presentation_context_definition_results_list=[]),
    "an invalid application context": lambda p: p.__dict__.update(_application_context_name="1.2.abc"),
    "no user information": lambda p: p.__dict__.update(_user_information=[]),
}


@pytest.mark.parametrize("name", list(UNUSUAL_ANSWERS))
def test_unusual_answers_are_built_and_encoded_as_in_pynetdicom(name: str, uid_validation: str,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    _assert_answered_as_pynetdicom(_unusual(UNUSUAL_ANSWERS[name]), caplog)


def _items(ac: A_ASSOCIATE_AC) -> list[Any]:
    return ac.variable_items  # a test puts anything there


def _first(ac: A_ASSOCIATE_AC) -> Any:
    """The PDU's first presentation context result item."""
    return ac.variable_items[1]


def _second_syntax(ac: A_ASSOCIATE_AC) -> None:
    extra = pdu_items.TransferSyntaxSubItem()
    extra.transfer_syntax_name = "1.2.840.10008.1.2"
    _first(ac).transfer_syntax_sub_item.append(extra)


def _swap_item(ac: A_ASSOCIATE_AC) -> None:
    _items(ac)[1] = pdu_items.PresentationContextItemRQ()


UNUSUAL_PDUS: dict[str, Callable[[A_ASSOCIATE_AC], None]] = {
    "two transfer syntaxes in a result": _second_syntax,
    "no transfer syntax sub-item": lambda ac: _first(ac).__dict__.update(transfer_syntax_sub_item=[]),
    "a tuple of sub-items": lambda ac: _first(ac).__dict__.update(
        transfer_syntax_sub_item=tuple(_first(ac).transfer_syntax_sub_item)),
    "a sub-item without a name": lambda ac: _first(ac).transfer_syntax_sub_item[0].__dict__.update(
        _transfer_syntax_name=None),
    "a non-ASCII name": lambda ac: _first(ac).transfer_syntax_sub_item[0].__dict__.update(
        _transfer_syntax_name="1.2.\u00e9"),
    "a 65,530-character name": lambda ac: _first(ac).transfer_syntax_sub_item[0].__dict__.update(
        _transfer_syntax_name="1" * 65530),
    "an abstract syntax sub-item": lambda ac: _first(ac).__dict__.update(
        transfer_syntax_sub_item=[pdu_items.AbstractSyntaxSubItem()]),
    "an RQ item": _swap_item,
    "protocol version 2": lambda ac: ac.__dict__.update(protocol_version=2),
    "protocol version 65536": lambda ac: ac.__dict__.update(protocol_version=65536),
    "a long reserved AE title": lambda ac: ac.__dict__.update(_reserved_aet="SEVENTEEN_CHARS_X"),
    "a tuple of items": lambda ac: ac.__dict__.update(variable_items=tuple(ac.variable_items)),
    "no items": lambda ac: ac.__dict__.update(variable_items=[]),
    "a None item": lambda ac: _items(ac).append(None),
}


@pytest.mark.parametrize("name", list(UNUSUAL_PDUS))
def test_unusual_pdus_are_encoded_as_in_pynetdicom(name: str, caplog: pytest.LogCaptureFixture) -> None:
    primitive = _accept(_request(random.Random(9), 4), random.Random(9))
    pdu = A_ASSOCIATE_AC(primitive)
    UNUSUAL_PDUS[name](pdu)
    caplog.set_level(logging.DEBUG)
    theirs = _outcome(lambda: association_pdus._original_ac_encode(pdu), caplog)
    assert _outcome(lambda: association_pdus.encode_associate_ac(pdu), caplog) == theirs


def test_install_is_idempotent_and_leaves_another_patch_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(A_ASSOCIATE_RQ, "_wrap_generate_items", association_pdus._original_generate_items)
    monkeypatch.setattr(A_ASSOCIATE_AC, "encode", association_pdus._original_ac_encode)
    monkeypatch.setattr(A_ASSOCIATE_AC, "from_primitive", association_pdus._original_ac_from_primitive)
    association_pdus.install()
    association_pdus.install()
    assert A_ASSOCIATE_RQ._wrap_generate_items is association_pdus.decode_variable_items
    assert A_ASSOCIATE_AC.encode is association_pdus.encode_associate_ac
    assert A_ASSOCIATE_AC.from_primitive is association_pdus.from_primitive_ac
    assert "_wrap_generate_items" not in A_ASSOCIATE_AC.__dict__  # the AC's decoding stays pynetdicom's

    def other(self: Any) -> bytes:
        raise AssertionError

    monkeypatch.setattr(A_ASSOCIATE_AC, "encode", other)
    association_pdus.install()
    assert A_ASSOCIATE_AC.encode is other


# --- DCMTK's requests, captured from the wire ------------------------------------------------------------------


def _capture(args: list[str], tmp: Path) -> bytes:
    """The A-ASSOCIATE-RQ a DCMTK tool sends (``args`` after its options; host and port added), read by a listener
    that then closes the connection."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        tool, *rest = args
        files = [arg for arg in rest if arg.startswith("/")]
        options = [arg for arg in rest if not arg.startswith("/")]
        proc = subprocess.Popen([dcmtk(tool), *options, "127.0.0.1", str(port), *files], cwd=tmp,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            server.settimeout(30)
            conn, _ = server.accept()
            with conn:
                conn.settimeout(30)
                data = b""
                while len(data) < 6 or len(data) < 6 + struct.unpack(">I", data[2:6])[0]:
                    chunk = conn.recv(65536)
                    assert chunk, data
                    data += chunk
        finally:
            proc.wait(30)
    return data


@pytest.fixture(scope="module")
@starts_servers
def dcmtk_requests(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    tmp = tmp_path_factory.mktemp("dcmtk-requests")
    path = tmp / "ct.dcm"
    make_dataset().save_as(path, enforce_file_format=True)
    tools = {
        "storescu -xe": ["storescu", "-xe", "-aec", "PACS", str(path)],
        "storescu": ["storescu", "-aec", "PACS", str(path)],
        "storescu -xs -R": ["storescu", "-xs", "-R", "-aec", "PACS", str(path)],
        "storescu -pdu 4096": ["storescu", "-pdu", "4096", "-aec", "PACS", str(path)],
        "echoscu": ["echoscu", "-aec", "PACS"],
        "findscu": ["findscu", "-S", "-aec", "PACS", "-k", "QueryRetrieveLevel=STUDY"],
        "movescu": ["movescu", "-S", "-aec", "PACS", "-aem", "DEST", "-k", "QueryRetrieveLevel=STUDY"],
        "getscu": ["getscu", "-S", "-aec", "PACS", "-k", "QueryRetrieveLevel=STUDY"],
    }
    return {name: _capture(args, tmp) for name, args in tools.items()}


@pytest.mark.parametrize("name", ["storescu -xe", "storescu", "storescu -xs -R", "storescu -pdu 4096", "echoscu",
                                  "findscu", "movescu", "getscu"])
def test_dcmtk_requests_decode_and_are_answered_as_in_pynetdicom(dcmtk_requests: dict[str, bytes], name: str,
                                                                 uid_validation: str,
                                                                 caplog: pytest.LogCaptureFixture,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    data = dcmtk_requests[name]
    assert _assert_decoded_as_pynetdicom(data, caplog, monkeypatch)[0][0] == "returned"
    assert _assert_answered_as_pynetdicom(_accept(data, random.Random(1)), caplog)[0][0] == "returned"
    # and cut anywhere, it fails (or decodes) as in pynetdicom
    for end in random.Random(name).sample(range(74, len(data)), k=min(40, len(data) - 74)):
        _assert_decoded_as_pynetdicom(data[:end], caplog, monkeypatch)


def test_storescu_proposes_what_the_module_decodes_itself(dcmtk_requests: dict[str, bytes]) -> None:
    """storescu -xe's request is the one measured (issue 13): 128 contexts, all decoded here, none left to
    pynetdicom's item decoding."""
    data = dcmtk_requests["storescu -xe"]
    assert association_pdus._ordinary_layout(data[74:])
    pdu = A_ASSOCIATE_RQ()
    pdu.decode(data)
    assert len(pdu.presentation_context) == 128


# --- a live `pacs` -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
@starts_servers
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPacs]:
    pacs = EmbeddedPacs(tmp_path_factory.mktemp("association-pdus"))
    try:
        yield pacs
    finally:
        pacs.close()


P = "1.2.826.0.1.3680043.9.7433.61"
MR = "1.2.840.10008.5.1.4.1.1.4"  # this file's UIDs, apart from every other test's


@pytest.mark.integration
def test_storescu_and_echoscu_associate_with_a_live_pacs(live: EmbeddedPacs, tmp_path: Path) -> None:
    paths = []
    for n in range(3):
        path = tmp_path / f"{n}.dcm"
        make_dataset(SOPInstanceUID=f"{P}.1.{n}", SeriesInstanceUID=f"{P}.1", StudyInstanceUID=P).save_as(
            path, enforce_file_format=True)
        paths.append(path)
    for path in paths:  # one image per association, as CR/DX rooms send
        result = storescu(live.port, [path], "-xe")
        assert result.returncode == 0 and result.status == 0x0000, result.output[-2000:]
    result = storescu(live.port, paths, "-xs", extra=("-pdu", "4096"))
    assert result.returncode == 0 and result.status == 0x0000, result.output[-2000:]
    assert echoscu(live.port).returncode == 0
    with live.ctx.sessions() as s:
        stored = set(s.scalars(select(Instance.sop_instance_uid).where(Instance.sop_instance_uid.like(f"{P}.1.%"))))
    assert stored == {f"{P}.1.{n}" for n in range(3)}


@pytest.mark.integration
def test_pynetdicom_negotiation_items_with_a_live_pacs(live: EmbeddedPacs) -> None:
    ae = AE(ae_title="PYSCU")
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 30
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.1"])
    ae.add_requested_context(MR, ["1.2.826.0.1.3680043.9.7433.99.1"])  # no supported transfer syntax: rejected
    ds = make_dataset(SOPInstanceUID=f"{P}.2.1")
    ae.add_requested_context(ds.SOPClassUID, "1.2.840.10008.1.2.1")
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = window.maximum_number_operations_performed = 2
    extended = SOPClassExtendedNegotiation()
    extended.sop_class_uid = CTImageStorage
    extended.service_class_application_information = b"\x02\x00"
    assoc = ae.associate("127.0.0.1", live.port, ae_title="PACS", max_pdu=4096,
                         ext_neg=[build_role(CTImageStorage, scu_role=True), window, extended])
    try:
        assert assoc.is_established
        accepted = {str(cx.abstract_syntax): str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
        assert accepted == {Verification: "1.2.840.10008.1.2", CTImageStorage: "1.2.840.10008.1.2.1",
                            ds.SOPClassUID: "1.2.840.10008.1.2.1"}
        assert [str(cx.abstract_syntax) for cx in assoc.rejected_contexts] == [MR]
        assert assoc.send_c_echo().Status == 0x0000
        assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()


def _read_answer(sock: socket.socket) -> bytes:
    """What the server answers before it closes the connection (an A-ABORT must not be lost to a reset)."""
    answer: list[bytes] = []

    def read() -> None:
        data = b""
        sock.settimeout(30)
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except (ConnectionResetError, TimeoutError):
            pass
        answer.append(data)

    reader = threading.Thread(target=read)
    reader.start()
    reader.join(40)
    return answer[0] if answer else b""


@pytest.mark.integration
@pytest.mark.parametrize("name", ["sub-item overruns its context", "unknown sub-item", "sub-item header cut",
                                  "bad names then a cut"])
def test_malformed_requests_are_aborted_by_a_live_pacs(live: EmbeddedPacs, name: str) -> None:
    """Requests pynetdicom cannot decode (test_malformed_requests_fail_or_warn_as_in_pynetdicom: the same
    exceptions here) are answered with an A-ABORT, and the next association is served."""
    data = dict(_hostile_cases())[f"{name} 0"]
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
        sock.sendall(data)
        answer = _read_answer(sock)
    assert answer[:1] == b"\x07", answer[:64]  # A-ABORT: the PDU could not be decoded, never an A-ASSOCIATE-AC
    assert echoscu(live.port).returncode == 0
