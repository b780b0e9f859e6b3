"""A pynetdicom "modality" for Storage Commitment: it asks for commitment (N-ACTION) and listens for the
archive's N-EVENT-REPORT, taking the SCP role the archive proposes (tests/test_storage_commitment.py,
tests/test_dimse_scope.py)."""

from __future__ import annotations

import threading
import warnings

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification
from pynetdicom.transport import ThreadedAssociationServer

from dicom_scp.commitment_service import WELL_KNOWN_INSTANCE
from pacs.commitment.service import SopRef
from tests.support.net import free_port, wait_until

TS = [str(ImplicitVRLittleEndian), str(ExplicitVRLittleEndian)]


def action_info(transaction: str | None = None, refs: list[tuple[str, str]] | None = None) -> Dataset:
    """Action Information; invalid UIDs are set on purpose (pydicom's warnings about them are silenced)."""
    ds = Dataset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if transaction is not None:
            ds.TransactionUID = transaction
        if refs is not None:
            ds.ReferencedSOPSequence = [ref_item(c, i) for c, i in refs]
    return ds


def ref_item(sop_class: str, sop_instance: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    return item


class _ReusableServer(ThreadedAssociationServer):
    allow_reuse_address = True  # the listener comes back on the same port in the restart case


class Modality:
    """A pynetdicom modality: N-ACTION SCU, and an N-EVENT-REPORT listener that takes the SCP role from the peer."""

    def __init__(self, ae_title: str = "MODALITY", scp_role: bool = True) -> None:
        self.ae_title = ae_title
        self.port = free_port()
        self.scp_role = scp_role
        self.reports: list[tuple[int, Dataset]] = []
        self._lock = threading.Lock()
        self._server: ThreadedAssociationServer | None = None

    def listen(self) -> Modality:
        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(StorageCommitmentPushModel, TS, scu_role=not self.scp_role, scp_role=self.scp_role)
        ae.add_supported_context(Verification, TS)
        server = ae.make_server(("127.0.0.1", self.port), server_class=_ReusableServer,
                                evt_handlers=[(evt.EVT_N_EVENT_REPORT, self._on_report)])
        ae._servers.append(server)  # what start_server() does; shutdown() takes it out again
        threading.Thread(target=server.serve_forever, name=f"modality-{self.port}", daemon=True).start()
        self._server = server
        return self

    def stop_listening(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_report(self, event: evt.Event) -> tuple[int, None]:
        info = event.event_information
        with self._lock:
            self.reports.append((int(event.event_type), info))
        return 0x0000, None

    def reports_for(self, transaction: str) -> list[tuple[int, Dataset]]:
        with self._lock:
            return [(t, ds) for t, ds in self.reports if ds.TransactionUID == transaction]

    def request(self, pacs_port: int, info: Dataset | None, action_type: int = 1,
                instance: str = WELL_KNOWN_INSTANCE) -> tuple[int | None, str]:
        """Send an N-ACTION; returns its status and Error Comment (None: association refused)."""
        ae = AE(ae_title=self.ae_title)
        ae.add_requested_context(StorageCommitmentPushModel, TS)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
        assoc = ae.associate("127.0.0.1", pacs_port, ae_title="PACS")
        if not assoc.is_established:
            return None, "association not established"
        try:
            status, _ = assoc.send_n_action(info, action_type, StorageCommitmentPushModel, instance)
        finally:
            assoc.release()
        assert status and "Status" in status
        return int(status.Status), str(status.get("ErrorComment", ""))

    def commit(self, pacs_port: int, refs: list[SopRef]) -> str:
        transaction = generate_uid()
        status, comment = self.request(pacs_port, action_info(transaction, [(r.sop_class_uid, r.sop_instance_uid)
                                                                      for r in refs]))
        assert status == 0, comment
        return transaction

    def wait_report(self, transaction: str, timeout: float = 20) -> tuple[int, Dataset]:
        wait_until(lambda: bool(self.reports_for(transaction)), timeout=timeout,
                   what=f"N-EVENT-REPORT for {transaction}")
        return self.reports_for(transaction)[0]
