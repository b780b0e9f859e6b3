"""Raw DICOM upper-layer PDUs, built with pynetdicom's encoders, for tests that speak to the SCP below
pynetdicom's association machinery (hostile input, fuzzing)."""

from __future__ import annotations

from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, ImplementationClassUIDNotification, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification


def associate_rq(called: str = "PACS", calling: str = "RAWPDU", max_length: int = 16384) -> bytes:
    cx = build_context(Verification, ["1.2.840.10008.1.2"])
    cx.context_id = 1
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title, primitive.called_ae_title = calling, called
    primitive.presentation_context_definition_list = [cx]
    max_len = MaximumLengthNotification()
    max_len.maximum_length_received = max_length
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = "1.2.826.0.1.3680043.9.7433.1"
    primitive.user_information = [max_len, impl]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()

