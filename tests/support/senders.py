"""A pynetdicom C-STORE SCU that sends a file's dataset bytes exactly as they are on disk."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, _config
from pynetdicom.dsutils import split_dataset


@dataclass(frozen=True)
class SendResult:
    status: int | None  # None: nothing was sent (file unreadable, association rejected)
    error_comment: str
    note: str = ""


def send_file_raw(port: int, path: Path, aec: str = "PACS", aet: str = "PYSCU") -> SendResult:
    """Propose the file's own SOP class and transfer syntax; send without decoding or re-encoding."""
    try:
        meta, _ = split_dataset(path)
        sop_class, tsyntax = meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID
    except Exception as exc:
        return SendResult(None, "", f"unreadable file meta: {exc}")
    ae = AE(ae_title=aet)
    ae.add_requested_context(sop_class, [tsyntax])
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 30
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title=aec)
        if not assoc.is_established:
            return SendResult(None, "", "association not established")
        try:
            status = assoc.send_c_store(path)
        except Exception as exc:
            return SendResult(None, "", f"could not send: {exc}")
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
    return _result(status)


def send_dataset(port: int, ds: Dataset, tsyntax: str, aec: str = "PACS", aet: str = "PYSCU") -> SendResult:
    """Send an in-memory dataset (used for deliberately malformed objects DCMTK would not send)."""
    ae = AE(ae_title=aet)
    ae.add_requested_context(ds.SOPClassUID, [tsyntax])
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title=aec)
    if not assoc.is_established:
        return SendResult(None, "", "association not established")
    try:
        return _result(assoc.send_c_store(ds))
    finally:
        assoc.release()


def _result(status: Dataset) -> SendResult:
    if not status or "Status" not in status:
        return SendResult(None, "", "no response")
    return SendResult(int(status.Status), str(status.get("ErrorComment", "")))
