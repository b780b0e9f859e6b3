"""The C-STORE handler's Part-10 bytes (dicom_scp.received) are pynetdicom's ``encoded_dataset()``, byte for byte.

The stored object and its content address (SHA-256) are these bytes: the File Meta Information encoded without
pydicom's writer must not change one of them.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import UID, AllTransferSyntaxes
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.dsutils import create_file_meta, encode_file_meta, split_dataset

from dicom_scp.received import file_meta_bytes, received_part10
from tests.support.corpus import corpus_dicom_files
from tests.support.datasets import make_dataset, random_uid
from tests.support.net import free_port
from tests.support.senders import send_dataset, send_file_raw
from tests.support.tiers import starts_servers


def _pynetdicom(sop_class: str, sop_instance: str, syntax: str) -> bytes:
    return encode_file_meta(create_file_meta(sop_class_uid=UID(sop_class), sop_instance_uid=UID(sop_instance),
                                             transfer_syntax=UID(syntax)))


@pytest.mark.parametrize("syntax", [str(ts) for ts in AllTransferSyntaxes])
def test_file_meta_is_encoded_as_pynetdicom_encodes_it(syntax: str) -> None:
    rng = random.Random(syntax)
    for length in range(1, 65):  # odd and even lengths: padding
        sop_class, sop_instance = random_uid(rng, rng.randint(1, 64)), random_uid(rng, length)
        assert file_meta_bytes(sop_class, sop_instance, syntax) == _pynetdicom(sop_class, sop_instance, syntax)


@pytest.mark.parametrize("uid", ["", "1.2.03", "1..2", "1.2.", ".1", "1" * 65, "1.2 ", "1.2\x00", "1.2\\3", "ü"])
def test_uids_that_are_not_valid_are_left_to_pynetdicom(uid: str) -> None:
    assert file_meta_bytes("1.2.840.10008.5.1.4.1.1.2", uid, "1.2.840.10008.1.2.1") is None
    assert file_meta_bytes(uid, "1.2.3", "1.2.840.10008.1.2.1") is None


class _RecordingSCP:
    """A pynetdicom Storage SCP that keeps, for every C-STORE, both encodings of what it received."""

    def __init__(self) -> None:
        self.port = free_port()
        self.pairs: list[tuple[bytes, bytes]] = []
        self._lock = threading.Lock()
        ae = AE(ae_title="PACS")
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(str(cx.abstract_syntax), [str(ts) for ts in AllTransferSyntaxes])
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event: evt.Event) -> int:
        pair = (received_part10(event), event.encoded_dataset(include_meta=True))
        with self._lock:
            self.pairs.append(pair)
        return 0x0000

    def stop(self) -> None:
        assert self._server is not None
        self._server.shutdown()


@pytest.fixture()
@starts_servers
def scp() -> Iterator[_RecordingSCP]:
    server = _RecordingSCP()
    yield server
    server.stop()


def _one_file_per_kind() -> list[Path]:
    """A corpus file for each SOP class and transfer syntax (one association each: all of them take minutes)."""
    kinds: dict[tuple[str, str], Path] = {}
    for path in corpus_dicom_files():
        try:
            meta, _ = split_dataset(path)
            kinds.setdefault((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)), path)
        except Exception:
            continue
    return list(kinds.values())


def test_corpus_files_received_get_pynetdicoms_bytes(scp: _RecordingSCP) -> None:
    sent = sum(send_file_raw(scp.port, path).status == 0 for path in _one_file_per_kind())
    assert sent >= 30
    assert len(scp.pairs) == sent
    for mine, theirs in scp.pairs:
        assert mine == theirs


def test_a_request_uid_that_is_not_valid_gets_pynetdicoms_bytes(scp: _RecordingSCP) -> None:
    ds = make_dataset(SOPInstanceUID="1.2.0003.4")  # leading zeros: pynetdicom's own path
    assert send_dataset(scp.port, ds, "1.2.840.10008.1.2.1").status == 0
    [(mine, theirs)] = scp.pairs
    assert mine == theirs
    assert b"1.2.0003.4" in mine
