"""AE-title spoofing (issue 12 finding 3), reproduced against a live in-process SCP (plain and TLS listeners).

The attack: ``MODA`` is registered at 127.0.0.1 for facility HOSP-A; a peer at 127.0.0.2 (Linux loopback
answers the whole 127/8, so a pynetdicom SCU bound there is "another host") calls as ``MODA``.

What each bad input gets:

- the spoofed title from another address is an unknown AE: a C-FIND or C-GET association is rejected
  (1, 1, 3) "calling AE title not recognized"; a storage association is accepted (unknown AEs may store,
  ``PACS_ACCEPT_UNKNOWN_STORE_AES``) but a new version of A's instance, or a new instance in A's study, is
  not filed there (refused, or held for reconciliation: pacs.security.filing_rules): C-GET from the real
  MODA still returns exactly the original bytes (SHA-256);
- ``--no-check-host`` (``check_host=False``) restores the old, documented-risky behaviour: believed from anywhere;
- the first time a registered title calls from an address, one ``ae.new-address`` audit event and one
  WARNING; never again for the same pair; never for an unregistered title; at most 64 addresses per title;
- an AE bound to a TLS client certificate (``tls_subject``: a CN or a SHA-256 fingerprint) is that AE only
  over TLS with that certificate: another valid certificate of the same CA, TLS without a client
  certificate, or plain TCP are unknown AEs (query rejected (1, 1, 3); what they store is not its facility's).
"""

from __future__ import annotations

import hashlib
import logging
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import (
    SecondaryCaptureImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)
from sqlalchemy import func, select

from dicom_scp.server import Listeners, start_scp
from pacs.ae_access import PeerCertificate, certificate_matches, normal_tls_subject
from pacs.ae_sightings import ACTION, MAX_ADDRESSES_PER_AE, AESightings
from pacs.aes import add_ae
from pacs.context import AppContext
from pacs.db import migrate
from pacs.db.models import AESighting, AuditEvent, Instance, Study
from pacs.dimse_responses import rejection_of
from pacs.ingest import Ingestor
from pacs.settings import Settings
from tests.support.datasets import make_dataset
from tests.support.net import free_port
from tests.support.pki import make_pki

pytestmark = pytest.mark.integration

HOME, AWAY = "127.0.0.1", "127.0.0.2"
NOT_RECOGNIZED = (1, 1, 3)  # A-ASSOCIATE-RJ rejected-permanent / service-user / calling AE title not recognized


@dataclass
class Scp:
    ctx: AppContext
    listeners: Listeners
    port: int
    tls_port: int
    pki: Path


@pytest.fixture(scope="module")
def scp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scp]:
    root = tmp_path_factory.mktemp("spoof")
    pki = root / "pki"
    make_pki(pki, "hospital-ca", ("server", "modality", "intruder"))
    settings = Settings(data_dir=root / "data", dicom_host=HOME, dicom_port=free_port(), dicom_tls_port=free_port(),
                        tls_cert_file=pki / "server.crt", tls_key_file=pki / "server.key",
                        tls_ca_file=pki / "hospital-ca.crt")  # client certificates optional, verified when shown
    ctx = AppContext.create(settings)
    migrate.upgrade(ctx.engine)
    fingerprint = hashlib.sha256(ssl.PEM_cert_to_DER_cert((pki / "modality.crt").read_text())).hexdigest()
    with ctx.sessions() as session, session.begin():
        add_ae(session, "MODA", HOME, 104, facility="HOSP-A")  # the host check is the default
        add_ae(session, "OPENMOD", HOME, 104, facility="HOSP-A", check_host=False)
        add_ae(session, "WATCHED", HOME, 104, facility="HOSP-A")
        add_ae(session, "TLSMOD", HOME, 104, facility="HOSP-T", tls_subject="modality")
        add_ae(session, "TLSFP", HOME, 104, facility="HOSP-T", tls_subject=f"sha256:{fingerprint}")
        add_ae(session, "STOREONLY", HOME, 104, allow_query=False, allow_retrieve=False)  # no facility
    listeners = start_scp(ctx, Ingestor(ctx.sessions, ctx.store))
    assert listeners.tls is not None
    try:
        yield Scp(ctx, listeners, listeners.server_address[1], listeners.tls.server_address[1], pki)
    finally:
        listeners.shutdown()
        ctx.close()


def _client_tls(scp: Scp, name: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(scp.pki / "hospital-ca.crt"))
    if name is not None:
        context.load_cert_chain(str(scp.pki / f"{name}.crt"), str(scp.pki / f"{name}.key"))
    return context


def _associate(scp: Scp, title: str, *contexts: str, source: str = HOME, cert: str | None = None,
               over_tls: bool = False, received: list[bytes] | None = None) -> Association:
    """An association from ``source`` calling as ``title`` (over TLS with client certificate ``cert``)."""
    ae = AE(ae_title=title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for abstract_syntax in contexts:
        ae.add_requested_context(abstract_syntax, ExplicitVRLittleEndian)
    roles, handlers = [], []
    if received is not None:  # C-GET: we take the C-STORE sub-operations
        roles = [build_role(SecondaryCaptureImageStorage, scp_role=True)]
        handlers = [(evt.EVT_C_STORE, lambda event: received.append(event.request.DataSet.getvalue()) or 0x0000)]
    tls = (_client_tls(scp, cert), "localhost") if over_tls or cert else None
    return ae.associate(HOME, scp.tls_port if tls else scp.port, ae_title="PACS", bind_address=(source, 0),
                        tls_args=tls, ext_neg=roles, evt_handlers=handlers)


def _store(scp: Scp, title: str, ds: Dataset, **where: object) -> int:
    assoc = _associate(scp, title, SecondaryCaptureImageStorage, **where)  # type: ignore[arg-type]
    assert assoc.is_established, "storage is open to unknown AEs"
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def _find_studies(scp: Scp, title: str, **where: object) -> list[str] | tuple[int, int, int] | None:
    """Study UIDs a C-FIND finds, or the A-ASSOCIATE-RJ reason when the association is rejected."""
    assoc = _associate(scp, title, StudyRootQueryRetrieveInformationModelFind, **where)  # type: ignore[arg-type]
    if not assoc.is_established:
        return rejection_of(assoc)
    try:
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ""
        return [str(identifier.StudyInstanceUID) for status, identifier in
                assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
                if status and status.Status in (0xFF00, 0xFF01) and identifier is not None]
    finally:
        assoc.release()


def _get_study(scp: Scp, title: str, study_uid: str, source: str = HOME) -> list[bytes] | tuple | None:
    """The datasets a C-GET of the study returns (as received), or the A-ASSOCIATE-RJ reason."""
    received: list[bytes] = []
    assoc = _associate(scp, title, StudyRootQueryRetrieveInformationModelGet, SecondaryCaptureImageStorage,
                       source=source, received=received)
    if not assoc.is_established:
        return rejection_of(assoc)
    try:
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study_uid
        statuses = [int(status.Status) for status, _ in
                    assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet) if status]
        assert statuses[-1] == 0x0000, [hex(s) for s in statuses]
        return received
    finally:
        assoc.release()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_spoofed_title_from_another_address_cannot_replace_query_or_retrieve(scp: Scp) -> None:
    original = make_dataset(SeriesDescription="original")
    assert _store(scp, "MODA", original) == 0x0000  # the real MODA, from its host
    study = str(original.StudyInstanceUID)

    altered = make_dataset(SOPInstanceUID=original.SOPInstanceUID, StudyInstanceUID=study,
                           SeriesInstanceUID=original.SeriesInstanceUID, SeriesDescription="altered")
    altered.PixelData = bytes(256)
    added = make_dataset(StudyInstanceUID=study, SeriesInstanceUID=original.SeriesInstanceUID, InstanceNumber=2)
    for ds in (altered, added):
        # an unknown AE's objects for a facility's study are refused, or stored aside for reconciliation
        # (pacs.security.filing_rules): either way never filed under A's study, as checked below
        _store(scp, "MODA", ds, source=AWAY)

    # query and retrieve: the spoofer is an unknown AE, rejected before any request
    assert _find_studies(scp, "MODA", source=AWAY) == NOT_RECOGNIZED
    assert _get_study(scp, "MODA", study, source=AWAY) == NOT_RECOGNIZED
    # the real MODA still finds its study and gets back exactly the bytes it sent
    assert _find_studies(scp, "MODA") == [study]
    returned = _get_study(scp, "MODA", study)
    assert isinstance(returned, list) and len(returned) == 1, f"{len(returned or [])} instances in A's study"
    assert _sha256(returned[0]) == _sha256(encode(original, False, True))
    assert _sha256(returned[0]) != _sha256(encode(altered, False, True))


def test_spoofer_is_not_the_earlier_sender_of_a_store_only_aes_instance(scp: Scp) -> None:
    """An unregistered peer may re-send its own earlier instance of a study of no facility (a modality
    correcting its images); a peer that merely borrows a registered title is not that sender."""
    original = make_dataset(SeriesDescription="original")
    assert _store(scp, "STOREONLY", original) == 0x0000
    current = select(Instance.sha256).where(Instance.sop_instance_uid == str(original.SOPInstanceUID))
    with scp.ctx.sessions() as session:
        before = session.scalar(current)
    altered = make_dataset(SOPInstanceUID=original.SOPInstanceUID, StudyInstanceUID=original.StudyInstanceUID,
                           SeriesInstanceUID=original.SeriesInstanceUID, SeriesDescription="altered")
    assert _store(scp, "STOREONLY", altered, source=AWAY) != 0x0000  # refused: not a new version
    with scp.ctx.sessions() as session:
        assert session.scalar(current) == before


def test_no_check_host_believes_the_title_from_any_address(scp: Scp) -> None:
    """The documented risk of ``pacs ae add --no-check-host``: whoever calls as OPENMOD is OPENMOD."""
    mine = make_dataset()
    assert _store(scp, "OPENMOD", mine) == 0x0000
    found = _find_studies(scp, "OPENMOD", source=AWAY)
    assert isinstance(found, list) and str(mine.StudyInstanceUID) in found


def _sightings(scp: Scp, title: str) -> list[AuditEvent]:
    with scp.ctx.read_sessions() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.action == ACTION, AuditEvent.actor == title)
                                    .order_by(AuditEvent.id)))


def test_a_registered_title_from_a_new_address_is_audited_once(scp: Scp, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pacs.ae_sightings")
    for _ in range(2):
        assert isinstance(_find_studies(scp, "WATCHED"), list)
        assert _find_studies(scp, "WATCHED", source=AWAY) == NOT_RECOGNIZED
        assert _find_studies(scp, "NOBODY", source=AWAY) == NOT_RECOGNIZED  # unregistered: not tracked
    events = _sightings(scp, "WATCHED")
    assert [(e.source_address, e.outcome) for e in events] == [(HOME, "success"), (AWAY, "failure")]
    assert "connects from 127.0.0.2" in events[1].detail
    assert _sightings(scp, "NOBODY") == []
    warnings = [r.getMessage() for r in caplog.records if r.name == "pacs.ae_sightings" and "WATCHED" in r.getMessage()]
    assert len(warnings) == 2 and "new address 127.0.0.2" in warnings[1] and "unknown AE" in warnings[1]


def test_sightings_are_bounded_per_title(scp: Scp) -> None:
    sightings = AESightings(scp.ctx.sessions)
    new = [sightings.note("BOUNDED", f"10.9.0.{i}", recognized=False, reason="test") for i in range(70)]
    assert all(new)
    assert not sightings.note("BOUNDED", "10.9.0.69", recognized=False)  # a known pair: no second event
    with scp.ctx.read_sessions() as session:
        kept = session.scalar(select(func.count()).select_from(AESighting).where(AESighting.ae_title == "BOUNDED"))
    assert kept == MAX_ADDRESSES_PER_AE


@pytest.mark.parametrize("title", ["TLSMOD", "TLSFP"])  # bound by certificate CN, and by SHA-256 fingerprint
def test_tls_bound_ae_needs_its_certificate(scp: Scp, title: str) -> None:
    assert _find_studies(scp, title, cert="intruder") == NOT_RECOGNIZED  # valid, same CA, another identity
    assert _find_studies(scp, title, over_tls=True) == NOT_RECOGNIZED  # TLS without a client certificate
    assert _find_studies(scp, title) == NOT_RECOGNIZED  # plain TCP from its own host

    # what an impostor stores is an unknown AE's, never filed under the AE's facility
    theirs = make_dataset()
    _store(scp, title, theirs, cert="intruder")
    # the right certificate: the AE itself, for every service (the C-STORE handler sees the certificate too)
    ours = make_dataset()
    assert _store(scp, title, ours, cert="modality") == 0x0000
    found = _find_studies(scp, title, cert="modality")
    assert isinstance(found, list) and str(ours.StudyInstanceUID) in found
    assert str(theirs.StudyInstanceUID) not in found
    with scp.ctx.read_sessions() as session:
        facilities = dict(session.execute(select(Study.study_instance_uid, Study.facility).where(
            Study.study_instance_uid.in_([str(ours.StudyInstanceUID), str(theirs.StudyInstanceUID)]))).all())
    assert facilities[str(ours.StudyInstanceUID)] == "HOSP-T"
    assert facilities.get(str(theirs.StudyInstanceUID)) != "HOSP-T"


def test_tls_subject_forms() -> None:
    cert = PeerCertificate("ab" * 32, common_names=("ct01.ward.example",), dns_names=("ct01", "ct01.local"))
    assert normal_tls_subject("AB:" * 31 + "AB") == "sha256:" + "ab" * 32  # openssl's colon form
    assert certificate_matches("sha256:" + "AB" * 32, cert) and certificate_matches("CT01.ward.example", cert)
    assert certificate_matches("ct01.local", cert)
    assert not certificate_matches("ct02", cert) and not certificate_matches("sha256:" + "cd" * 32, cert)
    assert not certificate_matches("", cert)
    for bad in ("*.ward.example", "sha256:abc"):  # wildcards and short fingerprints are refused at registration
        with pytest.raises(ValueError):
            normal_tls_subject(bad)
