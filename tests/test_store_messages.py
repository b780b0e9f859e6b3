"""C-STORE command sets encoded and decoded by dicom_scp.store_messages are pynetdicom's, byte for byte and
attribute for attribute; anything unusual takes pynetdicom's own path; a live `pacs` answers every sender with them."""

from __future__ import annotations

import random
import re
import struct
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any, cast

import pytest
from pydicom.uid import UID
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext
from sqlalchemy import select

from dicom_scp import store_messages
from pacs.db.models import Instance
from pacs.security.filing_rules import REFUSAL
from tests.support.datasets import make_dataset, random_uid
from tests.support.dcmtk import storescu
from tests.support.senders import send_dataset, send_file_raw
from tests.support.stack import EmbeddedPacs
from tests.support.tiers import starts_servers

CT = "1.2.840.10008.5.1.4.1.1.2"
_original_send = store_messages._original_send_msg  # pynetdicom's own, whatever a test patches
_original_receive = store_messages._original_receive_primitive
STATUSES = (0x0000, 0x0001, 0x0107, 0x0116, 0x0117, 0x0122, 0x0124, 0x0210, 0x0211, 0xA700, 0xA701, 0xA702,
            0xA7FF, 0xA900, 0xA9FF, 0xB000, 0xB006, 0xB007, 0xC000, 0xC001, 0xC002, 0xC211, 0xCFFF, 0xFE00, 0xFF00,
            0xFF01, 0xFFFF)


def _association(max_pdu: int = 16382) -> Association:
    """An acceptor association that is never started: its DIMSE provider's P-DATA stay in its DUL's queue."""
    assoc = Association(AE(), "acceptor")
    assoc.requestor.maximum_length = max_pdu
    return assoc


def _sent(assoc: Association) -> list[list[tuple[int, bytes]]]:
    """The PDV lists of the P-DATA the association's DIMSE provider sent, taken off its DUL's queue."""
    queue = assoc.dul.to_provider_queue
    sent = []
    while not queue.empty():
        pdata = queue.get_nowait()
        assert isinstance(pdata, P_DATA)
        sent.append([(cid, bytes(value)) for cid, value in pdata.presentation_data_value_list])
    return sent


@pytest.fixture(autouse=True)
def quiet_associations(monkeypatch: pytest.MonkeyPatch) -> None:
    """Associations without pynetdicom's standard logging handlers, as `pacs` builds them below INFO (build_ae)."""
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "none")


@pytest.fixture()
def pynetdicom_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every call dicom_scp.store_messages leaves to pynetdicom's own send_msg and receive_primitive."""
    calls: list[str] = []
    original_send, original_receive = store_messages._original_send_msg, store_messages._original_receive_primitive

    def send(self: DIMSEServiceProvider, primitive: Any, context_id: int) -> None:
        calls.append("send_msg")
        original_send(self, primitive, context_id)

    def receive(self: DIMSEServiceProvider, primitive: Any) -> None:
        calls.append("receive_primitive")
        original_receive(self, primitive)

    monkeypatch.setattr(store_messages, "_original_send_msg", send)
    monkeypatch.setattr(store_messages, "_original_receive_primitive", receive)
    return calls


def _response(message_id: int, status: int, sop_class: str | None = CT, instance: str | None = "1.2.3",
              comment: Any = None) -> C_STORE:
    """A C-STORE response as pynetdicom's StorageServiceClass builds it (validate_status setting the comment)."""
    rsp = C_STORE()
    rsp.MessageID = message_id
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPInstanceUID = instance
    rsp.AffectedSOPClassUID = sop_class
    rsp.Status = status
    if comment is not None:
        rsp.ErrorComment = comment
    return rsp


def _pynetdicom_send(rsp: C_STORE, max_pdu: int = 16382, context_id: int = 1) -> list[Any]:
    assoc = _association(max_pdu)
    _original_send(assoc.dimse, rsp, context_id)
    return _sent(assoc)


def _ours_and_pynetdicoms(rsp: C_STORE, max_pdu: int = 16382, context_id: int = 1) -> tuple[list[Any], list[Any]]:
    assoc = _association(max_pdu)
    store_messages.send_msg(assoc.dimse, rsp, context_id)
    return _sent(assoc), _pynetdicom_send(rsp, max_pdu, context_id)


def test_responses_are_pynetdicoms_bytes(pynetdicom_calls: list[str]) -> None:
    rng = random.Random(7)
    comments = ["", "x", "ab", "Refused: no Patient ID", "o" * 63, "e" * 64, " leading and trailing ",
                "~!@#$%^&*()_+{}|:\"<>?`-=[];',./"]
    checked = 0
    for message_id in [*range(0, 70), *range(65500, 65536), *rng.sample(range(65536), 300)]:
        status = STATUSES[message_id % len(STATUSES)]
        comment = comments[message_id % len(comments)] if message_id % 3 else None
        sop_class, sop_instance = random_uid(rng, rng.randint(1, 64)), random_uid(rng, 1 + message_id % 64)
        rsp = _response(message_id, status, sop_class, sop_instance, comment)
        ours, theirs = _ours_and_pynetdicoms(rsp, context_id=1 + 2 * (message_id % 128))
        assert ours == theirs, (message_id, status, comment)
        checked += 1
    for length in range(1, 65):  # every UID length, odd and even (the NUL pad), both UIDs
        for status in (0x0000, 0xB000, 0xC001):
            rsp = _response(length, status, random_uid(rng, length), random_uid(rng, 65 - length), "c" * (length % 65))
            ours, theirs = _ours_and_pynetdicoms(rsp)
            assert ours == theirs
            checked += 1
    assert pynetdicom_calls == []  # every one of them took the shortcut
    assert checked > 500
    [[(context_id, value)]] = _ours_and_pynetdicoms(_response(5, 0xC001, comment="why"))[0]
    assert (context_id, value[0]) == (1, 0x03)  # one PDV: the last (only) command fragment
    assert b"why " in value and struct.pack("<HHIH", 0, 0x0100, 2, 0x8001) in value


def test_responses_without_uids_are_pynetdicoms_bytes(pynetdicom_calls: list[str]) -> None:
    for sop_class, instance in ((None, None), (CT, None), (None, "1.2.3.4")):
        ours, theirs = _ours_and_pynetdicoms(_response(9, 0x0117, sop_class, instance, "Invalid SOP Instance"))
        assert ours == theirs
    assert pynetdicom_calls == []


@pytest.mark.parametrize("comment", ["e" * 65, "caf\u00e9", "a\\b", "tab\there", "nul\x00", b"bytes"])
def test_unusual_comments_take_pynetdicoms_path(pynetdicom_calls: list[str], comment: Any) -> None:
    rsp = _response(3, 0xC001, comment=comment)
    assert store_messages.encode_store_response(rsp) is None
    ours, theirs = _ours_and_pynetdicoms(rsp)
    assert ours == theirs and pynetdicom_calls == ["send_msg"]


def test_a_comment_pynetdicom_cannot_encode_fails_as_in_pynetdicom(pynetdicom_calls: list[str]) -> None:
    rsp = _response(3, 0xC001, comment=12)
    with pytest.raises(TypeError):
        _pynetdicom_send(rsp)
    with pytest.raises(TypeError):
        store_messages.send_msg(_association().dimse, rsp, 1)
    assert pynetdicom_calls == ["send_msg"]


@pytest.mark.parametrize("instance", ["1.2.03", "1.2.", "01.2", "1..2"])
def test_non_conformant_uids_take_pynetdicoms_path(pynetdicom_calls: list[str], instance: str) -> None:
    rsp = _response(3, 0x0000, instance=instance)
    ours, theirs = _ours_and_pynetdicoms(rsp)
    assert ours == theirs and pynetdicom_calls == ["send_msg"]


def test_unusual_responses_take_pynetdicoms_path(pynetdicom_calls: list[str]) -> None:
    offending = _response(1, 0xA900)
    setattr(offending, "OffendingElement", [0x00100010, 0x00100020])  # noqa: B010  # typed None by pynetdicom
    too_big = _response(2, 0x10000)
    boolean = _response(3, 0x0000)
    boolean.Status = True
    with_data = _response(4, 0x0000)
    with_data.DataSet = BytesIO(b"\x08\x00\x16\x00\x02\x00\x00\x001\x00")
    for rsp in (offending, too_big, boolean, with_data):
        assert store_messages.encode_store_response(rsp) is None
    for rsp in (offending, boolean):  # pynetdicom encodes these (the others make it fail: same failure)
        ours, theirs = _ours_and_pynetdicoms(rsp)
        assert ours == theirs
    assert pynetdicom_calls == ["send_msg", "send_msg"]


def test_requests_and_other_primitives_take_pynetdicoms_path(pynetdicom_calls: list[str]) -> None:
    request = C_STORE()
    request.MessageID = 7
    request.AffectedSOPClassUID = CT
    request.AffectedSOPInstanceUID = "1.2.3"
    request.DataSet = BytesIO(b"\x08\x00\x16\x00\x02\x00\x00\x001\x00")
    echo = C_ECHO()
    echo.MessageIDBeingRespondedTo = 7
    echo.Status = 0
    for primitive in (request, echo):
        ours, theirs = _ours_and_pynetdicoms(primitive)  # type: ignore[arg-type]
        assert ours == theirs
    assert pynetdicom_calls == ["send_msg", "send_msg"]


@pytest.mark.parametrize("max_pdu", [7, 20, 64, 90, 97])
def test_a_small_maximum_pdu_takes_pynetdicoms_fragments(pynetdicom_calls: list[str], max_pdu: int) -> None:
    rsp = _response(3, 0xC001, "1.2.840.10008.5.1.4.1.1.2", "1.2.826.0.1.3680043.8.498.1234567890", "x" * 40)
    ours, theirs = _ours_and_pynetdicoms(rsp, max_pdu)
    assert ours == theirs and len(theirs) > 1
    assert pynetdicom_calls == ["send_msg"]


def test_the_exact_fit_and_no_limit_are_one_pdv(pynetdicom_calls: list[str]) -> None:
    rsp = _response(3, 0x0000)
    size = len(store_messages.encode_store_response(rsp) or b"")
    for max_pdu in (0, size + 6):
        ours, theirs = _ours_and_pynetdicoms(rsp, max_pdu)
        assert ours == theirs and len(ours) == 1
    assert pynetdicom_calls == []
    ours, theirs = _ours_and_pynetdicoms(rsp, size + 5)
    assert ours == theirs and len(ours) == 2 and pynetdicom_calls == ["send_msg"]


def test_a_dimse_sent_handler_gets_pynetdicoms_message(pynetdicom_calls: list[str]) -> None:
    seen: list[Any] = []
    assoc = _association()
    assoc.bind(evt.EVT_DIMSE_SENT, lambda event: seen.append(event.message))
    rsp = _response(3, 0xB000, comment="held")
    store_messages.send_msg(assoc.dimse, rsp, 1)
    assert _sent(assoc) == _pynetdicom_send(rsp)
    assert pynetdicom_calls == ["send_msg"]
    [message] = seen
    assert message.command_set.Status == 0xB000 and message.command_set.ErrorComment == "held"


def test_pynetdicoms_logging_handlers_get_pynetdicoms_message(pynetdicom_calls: list[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "standard")  # INFO/DEBUG: they log every DIMSE message
    rsp = _response(3, 0x0000)
    ours, theirs = _ours_and_pynetdicoms(rsp)
    assert ours == theirs and pynetdicom_calls == ["send_msg"]
    pdatas = _wire(_request(5, "1.2.3.4"))
    assert _received(pdatas, store_messages.receive_primitive)[0] == _received(pdatas, _original_receive)[0]
    assert pynetdicom_calls == ["send_msg"] + ["receive_primitive"] * len(pdatas)


# --- C-STORE-RQ command sets ---


def _request(message_id: int, instance: str, priority: int = 2, originator: str | None = None,
             originator_id: int | None = None) -> C_STORE:
    rq = C_STORE()
    rq.MessageID = message_id
    rq.AffectedSOPClassUID = CT
    rq.AffectedSOPInstanceUID = instance
    rq.Priority = priority
    if originator is not None:
        rq.MoveOriginatorApplicationEntityTitle = originator
    if originator_id is not None:
        rq.MoveOriginatorMessageID = originator_id
    rq.DataSet = BytesIO(b"\x08\x00\x16\x00\x02\x00\x00\x001\x00" * 50)
    return rq


def _wire(rq: C_STORE, max_pdu: int = 16382, context_id: int = 1) -> list[P_DATA]:
    """The P-DATA a pynetdicom requestor sends for ``rq``."""
    sender = Association(AE(), "requestor")
    sender.acceptor.maximum_length = max_pdu
    _original_send(sender.dimse, rq, context_id)
    queue = sender.dul.to_provider_queue
    return [cast(P_DATA, queue.get_nowait()) for _ in range(queue.qsize())]


def _received(pdatas: list[P_DATA], receive: Callable[[DIMSEServiceProvider, Any], None],
              bind: bool = False) -> tuple[dict[str, Any], list[Any]]:
    """Feed ``pdatas`` to ``receive`` on a fresh acceptor; the queued primitive's attributes (the dataset as bytes,
    each value with its type) and the messages an EVT_DIMSE_RECV handler saw (when ``bind``)."""
    assoc = _association()
    seen: list[Any] = []
    if bind:
        assoc.bind(evt.EVT_DIMSE_RECV, lambda event: seen.append(event.message.command_set))
    for pdata in pdatas:
        receive(assoc.dimse, pdata)
    context_id, primitive = assoc.dimse.get_msg()
    events = assoc.dul.event_queue
    attributes: dict[str, Any] = {"context": context_id, "events": [events.get_nowait() for _ in range(events.qsize())]}
    if primitive is None:  # pynetdicom could not make a primitive of it (Evt19: the association is aborted)
        return attributes, seen
    assert assoc.dimse.message is None
    for name, value in sorted(vars(primitive).items()):
        attributes[name] = (type(value), value.getvalue() if isinstance(value, BytesIO) else value)
    return attributes, seen


def test_requests_are_decoded_as_pynetdicom_decodes_them(pynetdicom_calls: list[str]) -> None:
    rng = random.Random(11)
    requests = [_request(message_id, random_uid(rng, 1 + message_id % 64), message_id % 3)
                for message_id in [*range(0, 70), *range(65500, 65536), *rng.sample(range(65536), 100)]]
    requests += [_request(1, "1.2.3", 0, "MOVESCU", 0), _request(2, "1.2.3", 1, " A ", 65535),
                 _request(3, "1.2.3", 2, "X" * 16, 12345), _request(4, "1.2.3", originator_id=9)]
    for rq in requests:
        pdatas = _wire(rq, context_id=1 + 2 * ((rq.MessageID or 0) % 127))
        ours, _ = _received(pdatas, store_messages.receive_primitive)
        theirs, _ = _received(pdatas, _original_receive)
        assert ours == theirs
        assert isinstance(ours["_affected_sop_instance_uid"][1], UID)
    # the command set and the dataset's fragments: pynetdicom's path for the dataset only
    assert pynetdicom_calls == ["receive_primitive"] * sum(len(_wire(rq)) - 1 for rq in requests)


def test_a_recv_handler_bound_during_the_dataset_reads_the_command_set(pynetdicom_calls: list[str]) -> None:
    pdatas = _wire(_request(5, "1.2.3.4", 1, "MOVER", 7), max_pdu=200)
    assoc = _association()
    store_messages.receive_primitive(assoc.dimse, pdatas[0])
    assert isinstance(assoc.dimse.message, store_messages.DecodedStoreRequest)
    seen: list[Any] = []
    assoc.bind(evt.EVT_DIMSE_RECV, lambda event: seen.append(event.message.command_set))
    for pdata in pdatas[1:]:
        store_messages.receive_primitive(assoc.dimse, pdata)
    [command_set] = seen
    assert command_set.MessageID == 5 and command_set.MoveOriginatorApplicationEntityTitle == "MOVER"
    assert assoc.dimse.get_msg()[1].MoveOriginatorMessageID == 7  # type: ignore[union-attr]


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0, element, len(value)) + value


def _command_set(*elements: tuple[int, bytes]) -> bytes:
    body = b"".join(_element(e, v) for e, v in elements)
    return _element(0x0000, struct.pack("<I", len(body))) + body


def _store_rq(**changes: bytes | None) -> list[tuple[int, bytes]]:
    elements = {0x0002: CT.encode() + b"\x00", 0x0100: b"\x01\x00", 0x0110: b"\x05\x00", 0x0700: b"\x00\x00",
                0x0800: b"\x01\x00", 0x1000: b"1.2.3\x00"}
    for name, value in changes.items():
        element = int(name[1:], 16)
        if value is None:
            elements.pop(element)
        else:
            elements[element] = value
    return sorted(elements.items())


def _pdata(*pdvs: tuple[int, bytes]) -> P_DATA:
    pdata = P_DATA()
    pdata.presentation_data_value_list.extend(pdvs)
    return pdata


DATASET = _pdata((1, b"\x02" + b"\x08\x00\x16\x00\x02\x00\x00\x001\x00"))


@pytest.mark.parametrize("changes", [
    {"e1000": b"1.2.03\x00"}, {"e1000": b"1.2.3 "}, {"e1000": b"1.2.3\x00\x00"}, {"e1000": b""}, {"e0002": b"1.2.x"},
    {"e1000": None}, {"e0002": None}, {"e0700": b"\x03\x00"}, {"e0700": b"\x01\x00\x01\x00"},
    {"e0110": b"\x05\x00\x00\x00"}, {"e1030": b"MOVE\x00SCU "}, {"e1030": b"                "},
    {"e1030": b"A\\B "}, {"e1030": b"X" * 18}, {"e1031": b""}, {"e0900": b"\x00\x00"}, {"e0902": b"no "},
    {"e0100": b"\x20\x00"},
])
def test_unusual_requests_take_pynetdicoms_path(pynetdicom_calls: list[str], changes: dict[str, bytes | None]) -> None:
    pdatas = [_pdata((1, b"\x03" + _command_set(*_store_rq(**changes)))), DATASET]
    ours, _ = _received(pdatas, store_messages.receive_primitive)
    theirs, _ = _received(pdatas, _original_receive)
    assert ours == theirs
    assert pynetdicom_calls == ["receive_primitive", "receive_primitive"]


def test_unusual_framing_takes_pynetdicoms_path(pynetdicom_calls: list[str]) -> None:
    command = _command_set(*_store_rq())
    for pdatas in ([_pdata((1, b"\x01" + command[:20])), _pdata((1, b"\x03" + command[20:])), DATASET],
                   [_pdata((1, b"\x03" + command), (1, DATASET.presentation_data_value_list[0][1]))],
                   [_pdata((1, b"\x07" + command)), DATASET]):
        pynetdicom_calls.clear()
        ours, _ = _received(pdatas, store_messages.receive_primitive)
        theirs, _ = _received(pdatas, _original_receive)
        assert ours == theirs
        assert pynetdicom_calls == ["receive_primitive"] * len(pdatas)
    # a second command set before the dataset: pynetdicom decodes both together, as it would have
    second = _command_set(*_store_rq(e0110=b"\x06\x00"))
    pdatas = [_pdata((1, b"\x03" + command)), _pdata((1, b"\x03" + second)), DATASET]
    ours, _ = _received(pdatas, store_messages.receive_primitive)
    assert ours == _received(pdatas, _original_receive)[0] and ours["_message_id"] == (int, 6)
    # swapped elements, a truncated element, a command set without a dataset
    swapped = _command_set(*reversed(_store_rq()))
    truncated = command[:-3]
    no_dataset = _command_set(*_store_rq(e0800=b"\x01\x01"))
    for encoded in (swapped, truncated, no_dataset):
        assert store_messages.decode_store_request(encoded) is None
    assert store_messages.decode_store_request(command) is not None


def test_a_recv_handler_or_chunked_storage_takes_pynetdicoms_path(pynetdicom_calls: list[str],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    pdatas = _wire(_request(5, "1.2.3.4"))
    ours, seen = _received(pdatas, store_messages.receive_primitive, bind=True)
    assert ours == _received(pdatas, _original_receive)[0]
    assert pynetdicom_calls == ["receive_primitive"] * len(pdatas) and seen[0].MessageID == 5
    pynetdicom_calls.clear()
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", True)
    assoc = _association()
    context = PresentationContext()
    context.context_id, context.abstract_syntax, context.transfer_syntax = 1, CT, ["1.2.840.10008.1.2"]
    assoc._accepted_cx = {1: context}
    for pdata in pdatas:
        store_messages.receive_primitive(assoc.dimse, pdata)
    assert pynetdicom_calls == ["receive_primitive"] * len(pdatas)
    primitive = assoc.dimse.get_msg()[1]
    assert primitive is not None and primitive._dataset_file is not None  # the dataset went to a file
    primitive._dataset_file.close()
    Path(primitive._dataset_file.name).unlink()


def test_install_is_idempotent_and_leaves_another_patch_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(DIMSEServiceProvider, "send_msg", _original_send)
    monkeypatch.setattr(DIMSEServiceProvider, "receive_primitive", _original_receive)
    store_messages.install()
    store_messages.install()
    assert DIMSEServiceProvider.send_msg is store_messages.send_msg
    assert DIMSEServiceProvider.receive_primitive is store_messages.receive_primitive

    def other(self: DIMSEServiceProvider, primitive: Any, context_id: int) -> None:
        raise AssertionError

    monkeypatch.setattr(DIMSEServiceProvider, "send_msg", other)
    store_messages.install()
    assert DIMSEServiceProvider.send_msg is other


# --- a live `pacs` ---


@pytest.fixture(scope="module")
@starts_servers
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPacs]:
    pacs = EmbeddedPacs(tmp_path_factory.mktemp("store-messages"))
    try:
        yield pacs
    finally:
        pacs.close()


def _archived(pacs: EmbeddedPacs, uids: list[str]) -> set[str]:
    with pacs.ctx.sessions() as s:
        return set(s.scalars(select(Instance.sop_instance_uid).where(Instance.sop_instance_uid.in_(uids))))


def _files(folder: Path, count: int, prefix: str) -> tuple[list[Path], list[str]]:
    folder.mkdir()
    paths, uids = [], []
    for n in range(count):
        uid = f"{prefix}.{n + 1}"
        ds = make_dataset(SOPInstanceUID=uid, SeriesInstanceUID=f"{prefix}.0", StudyInstanceUID=prefix)
        path = folder / f"{n}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        uids.append(uid)
    return paths, uids


P = "1.2.826.0.1.3680043.9.7433"  # this file's UIDs, apart from every other test's


@pytest.mark.integration
@pytest.mark.parametrize("extra", [(), ("-pdu", "4096")])
def test_storescu_gets_success_for_every_object(live: EmbeddedPacs, tmp_path: Path, extra: tuple[str, ...]) -> None:
    paths, uids = _files(tmp_path / "in", 12, f"{P}.1{len(extra)}")
    result = storescu(live.port, paths, "-xe", extra=extra)
    assert result.returncode == 0, result.output[-2000:]
    statuses = re.findall(r"DIMSE Status\s*:\s*0x([0-9A-Fa-f]{4})", result.output)
    assert statuses == ["0000"] * 12, result.output[-2000:]
    assert _archived(live, uids) == set(uids)


@pytest.mark.integration
def test_pynetdicom_gets_success_and_refusals_with_their_comment(live: EmbeddedPacs, tmp_path: Path) -> None:
    ds = make_dataset(SOPInstanceUID=f"{P}.20.1")
    assert send_dataset(live.port, ds, "1.2.840.10008.1.2.1").status == 0x0000
    assert _archived(live, [ds.SOPInstanceUID]) == {ds.SOPInstanceUID}
    # the same instance in another study, from another peer: refused, the comment 64 characters long
    moved = make_dataset(SOPInstanceUID=f"{P}.20.1", StudyInstanceUID=f"{P}.20.2", PatientName="OTHER^NAME")
    result = send_dataset(live.port, moved, "1.2.840.10008.1.2.1", aet="OTHERSCU")
    assert result.status == 0xA900 and result.error_comment == REFUSAL[:64], result
    refused = make_dataset(SOPInstanceUID=f"{P}.20.3", StudyInstanceUID="1.2.abc.4")
    result = send_dataset(live.port, refused, "1.2.840.10008.1.2.1")
    assert result.status == 0xC001 and "StudyInstanceUID" in result.error_comment, result
    path = tmp_path / "t.dcm"
    make_dataset(SOPInstanceUID=f"{P}.20.4").save_as(path, enforce_file_format=True)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(path.read_bytes()[:-100])
    truncated = send_file_raw(live.port, cut)
    assert truncated.status == 0xC002 and "truncated" in truncated.error_comment, truncated
    assert _archived(live, [f"{P}.20.3", f"{P}.20.4"]) == set()


@pytest.mark.integration
def test_storescu_gets_a_refusal_with_its_comment(live: EmbeddedPacs, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    path = folder / "bad.dcm"
    make_dataset(SOPInstanceUID=f"{P}.30.1", StudyInstanceUID="1.2.abc.4").save_as(path, enforce_file_format=True)
    result = storescu(live.port, [path], "-xe")
    assert result.status == 0xC001 and "StudyInstanceUID" in result.error_comment, result.output[-2000:]
