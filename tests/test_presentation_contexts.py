"""The supported presentation contexts shared read-only by every association (dicom_scp.presentation_contexts),
and pynetdicom's UID validation remembered for conformant UIDs (dicom_scp.uid_memo)."""

from __future__ import annotations

import copy
import logging

import pytest
from pydicom.uid import UID
from pynetdicom import AE, AllStoragePresentationContexts, utils
from pynetdicom.presentation import QueryRetrievePresentationContexts, negotiate_as_acceptor

from dicom_scp import uid_memo
from dicom_scp.presentation_contexts import SharedContext, own_copy, shared

_SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5"]
_CT = "1.2.840.10008.5.1.4.1.1.2"


def _server_contexts() -> list:
    ae = AE()
    for context in AllStoragePresentationContexts[:60] + QueryRetrievePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, _SYNTAXES)
    ae.add_supported_context(_CT, _SYNTAXES, scu_role=True, scp_role=True)
    return ae.supported_contexts


def _described(contexts: list) -> list[tuple]:
    return [(c.context_id, c.abstract_syntax, list(c.transfer_syntax), c.scu_role, c.scp_role, c.as_scu, c.as_scp,
             c.result) for c in contexts]


def test_an_association_gets_the_servers_contexts_themselves_holding_what_deepcopy_holds() -> None:
    original = _server_contexts()
    server = shared(original)
    mine = copy.deepcopy(server)  # what pynetdicom does for each association
    assert mine is server and mine[0] is server[0]
    assert _described(mine) == _described(copy.deepcopy(original))
    assert all(isinstance(c, SharedContext) for c in mine)
    assert str(mine[0]) == str(original[0])  # pynetdicom's own rendering (UID names) works on them


def test_the_shared_contexts_cannot_be_changed() -> None:
    server = shared(_server_contexts())
    before = _described(server)
    with pytest.raises(AttributeError):
        server[0].scu_role = True
    with pytest.raises(AttributeError):
        server[0].transfer_syntax = ["1.2.840.10008.1.2"]
    with pytest.raises(AttributeError):
        server[0].transfer_syntax.remove("1.2.840.10008.1.2")  # a tuple
    with pytest.raises(AttributeError):
        server[0].add_transfer_syntax("1.2.840.10008.1.2.4.50")
    for change in (lambda: server.append(server[0]), lambda: server.pop(), lambda: server.__setitem__(0, server[1]),
                   lambda: server.sort(key=str), lambda: server.__delitem__(0), server.clear):
        with pytest.raises(TypeError):
            change()
    assert _described(server) == before


def test_an_own_copy_changes_alone() -> None:
    server = shared(_server_contexts())
    before = _described(server)
    mine = own_copy(server[0])
    mine.scu_role = True
    mine.transfer_syntax = ["1.2.840.10008.1.2"]
    mine.add_transfer_syntax("1.2.840.10008.1.2.1")
    assert mine.transfer_syntax == ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"] and mine.scu_role is True
    assert _described(server) == before


def test_negotiation_against_the_shared_contexts_leaves_them_as_they_were() -> None:
    """The acceptor side of negotiation reads roles and syntaxes (what a C-GET SCU asks for) and builds new ones."""
    server = shared(_server_contexts())
    before = _described(server)
    ae = AE()
    ae.add_requested_context(_CT, ["1.2.840.10008.1.2.4.90"])
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4", ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    requested = copy.deepcopy(ae.requested_contexts)
    for index, context in enumerate(requested):
        context.context_id = 2 * index + 1
    accepted, _ = negotiate_as_acceptor(requested, copy.deepcopy(server), {_CT: (False, True)})
    assert accepted[0].result == 0x00 and accepted[0].transfer_syntax[0] == "1.2.840.10008.1.2.4.90"
    assert accepted[0].as_scu is True
    assert accepted[1].result == 0x00 and accepted[1].transfer_syntax[0] == "1.2.840.10008.1.2.1"
    assert not any(a is s for a in accepted for s in server)
    assert _described(server) == before


def _outcome(set_uid: object, value: object) -> tuple[str, object]:
    try:
        return "ok", set_uid(value, "abstract_syntax")  # type: ignore[operator]
    except ValueError as exc:
        return "ValueError", str(exc)


def test_the_uid_memo_returns_what_pynetdicom_returns(caplog: pytest.LogCaptureFixture) -> None:
    uid_memo.install()
    original = uid_memo._original_set_uid
    for value in ("1.2.840.10008.1.2.1", b"1.2.840.10008.5.1.4.1.1.2", UID("1.2.840.10008.1.2"), "1.2.3 ",
                  b"1.2.4\x00"):
        for _ in range(2):  # learned, then remembered
            got = uid_memo.set_uid(value, "abstract_syntax", True, False, True)
            assert got == original(value, "abstract_syntax", True, False, True) and type(got) is UID
    assert uid_memo.set_uid(None, "x") is None
    for refused in ("", b""):
        with pytest.raises(ValueError):
            uid_memo.set_uid(refused, "abstract_syntax", False, False, True)
    for invalid in ("1.2.3" + "4" * 70, "1.2\\3", b"1.2.\x013", "1.2.a"):  # long, backslash, control, a letter
        for _ in range(2):
            assert _outcome(uid_memo.set_uid, invalid) == _outcome(original, invalid)
            assert invalid not in uid_memo._known
    with pytest.raises(ValueError):
        uid_memo.set_uid("1.2.3" + "4" * 70, "abstract_syntax")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pynetdicom"):
        for _ in range(2):  # non-conformant but valid: the same UID and pynetdicom's warning, each time
            assert uid_memo.set_uid("1.02.3", "abstract_syntax") == "1.02.3"
    assert sum("Non-conformant" in r.getMessage() for r in caplog.records) == 2
    padded = "1.2.840.10008.1.2" + " " * 60_000  # pydicom strips it: valid, but never kept at that length
    assert uid_memo.set_uid(padded, "transfer_syntax") == "1.2.840.10008.1.2"
    assert uid_memo.set_uid(padded.encode(), "transfer_syntax") == "1.2.840.10008.1.2"
    assert padded not in uid_memo._known and padded.encode() not in uid_memo._known
    assert "1.2.3 " not in uid_memo._known and b"1.2.4\x00" not in uid_memo._known
    private = UID("1.2.3.4.5.6")
    private.set_private_encoding(False, True)
    assert uid_memo.set_uid(private, "transfer_syntax").is_little_endian is True  # not taken from the memo


def test_the_uid_memo_is_bounded_and_in_pynetdicoms_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    uid_memo.install()
    uid_memo.install()  # idempotent
    from pynetdicom import pdu_items, presentation

    assert pdu_items.set_uid is uid_memo.set_uid and presentation.set_uid is uid_memo.set_uid
    from pynetdicom import dimse_primitives

    assert dimse_primitives.set_uid is uid_memo._original_set_uid  # SOP Instance UIDs never come back: not kept
    assert utils.set_uid is uid_memo._original_set_uid  # pynetdicom's own stays where it is
    monkeypatch.setattr(uid_memo, "_known", {})
    monkeypatch.setattr(uid_memo, "MAX_ENTRIES", 3)
    for n in range(10):
        assert uid_memo.set_uid(f"1.2.826.0.1.{n}", "sop_class_uid") == f"1.2.826.0.1.{n}"
    assert len(uid_memo._known) == 3


def _added(values: list, add: object) -> tuple[list, list[str]]:
    """The transfer syntaxes a new context holds after ``add(context, value)`` of each value, and the log lines."""
    from pynetdicom.presentation import PresentationContext

    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Collect(logging.DEBUG)
    logger = logging.getLogger("pynetdicom")
    logger.addHandler(handler)
    context = PresentationContext()
    try:
        for value in values:
            try:
                add(context, value)  # type: ignore[operator]
            except ValueError as exc:
                records.append(f"ValueError: {exc}")
    finally:
        logger.removeHandler(handler)
    return [(str(s), type(s), s.__dict__) for s in context.transfer_syntax], records


def test_the_transfer_syntax_memo_adds_what_pynetdicom_adds_and_logs_what_it_logs() -> None:
    """An A-ASSOCIATE-RQ's transfer syntaxes as pynetdicom decodes them: the same list, the same warnings and
    errors, whether the value is remembered or not (twice: learned, then remembered)."""
    uid_memo.install()
    from pynetdicom.presentation import PresentationContext

    assert PresentationContext.add_transfer_syntax is uid_memo.add_transfer_syntax
    private_ts = UID("1.2.3.4.5.6")
    private_ts.set_private_encoding(False, True)
    values = ["1.2.840.10008.1.2.1", b"1.2.840.10008.1.2", "1.2.840.10008.1.2.1",  # again: not added twice
              UID("1.2.840.10008.1.2.4.70"), UID("1.2.840.10008.1.2.4.70"),  # as a decoded A-ASSOCIATE-RQ holds them
              "1.2.840.10008.5.1.4.1.1.2",  # a conformant UID that is not a transfer syntax: pynetdicom warns
              "1.2.826.0.1.3680043.2.1", b"1.02.3", "1.2.840.10008.1.2.4.50 ", "", b"", None, 7,
              "1.2.3" + "4" * 70, "1.2.a", b"1.2.\xff", "1.2.3.4.5.6", private_ts]  # the same text, own encoding
    for _ in range(2):
        ours = _added(values, uid_memo.add_transfer_syntax)
        theirs = _added(values, uid_memo._original_add_transfer_syntax)
        assert ours == theirs
    assert ours[0][:2] == [("1.2.840.10008.1.2.1", UID, {}), ("1.2.840.10008.1.2", UID, {})]
    added = _added([private_ts], uid_memo.add_transfer_syntax)[0]  # its encoding kept, as pynetdicom keeps it
    assert added == _added([private_ts], uid_memo._original_add_transfer_syntax)[0] and added[0][2]
    assert any("not a transfer syntax" in line for line in ours[1])  # still said the second time
    kept = uid_memo._known_syntaxes
    assert "1.2.840.10008.1.2.1" in kept and b"1.2.840.10008.1.2" in kept and "1.2.826.0.1.3680043.2.1" in kept
    assert type(next(k for k in kept if k == "1.2.840.10008.1.2.4.70")) is str  # kept by its text
    for never in ("1.2.840.10008.5.1.4.1.1.2", b"1.02.3", "1.2.840.10008.1.2.4.50 ", "", b"", "1.2.a"):
        assert never not in kept


def test_the_transfer_syntax_memo_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from pynetdicom.presentation import PresentationContext

    monkeypatch.setattr(uid_memo, "_known_syntaxes", {})
    monkeypatch.setattr(uid_memo, "MAX_ENTRIES", 3)
    context = PresentationContext()
    for n in range(10):
        uid_memo.add_transfer_syntax(context, f"1.2.826.0.1.{n}")
    assert len(uid_memo._known_syntaxes) == 3
    assert [str(s) for s in context.transfer_syntax] == [f"1.2.826.0.1.{n}" for n in range(10)]
