"""Hostile input against a live `pacs serve` (SPEC §7): malformed PDUs, connection floods, association
limits, lying lengths, decompression bombs and path-like UIDs. Each bad input gets a definite answer,
the server keeps answering DCMTK's echoscu, its memory stays bounded and nothing is written outside
its data folder."""

from __future__ import annotations

import contextlib
import io
import itertools
import random
import socket
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from pydicom.dataset import Dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import select

from pacs.association_limits import MAX_CONTROL_PDU_BYTES, LiveAssociations, connection_limits, pdu_length_error
from pacs.db.models import Instance
from pacs.dimse_responses import rejection_of
from tests.support.datasets import dataset_bytes, make_dataset, to_bytes
from tests.support.dcmtk import dcmtk, dcmtk_env, echoscu
from tests.support.inprocess import register_ae
from tests.support.net import free_port, wait_until
from tests.support.pdus import associate_rq
from tests.support.pki import make_pki
from tests.support.senders import send_dataset, send_file_raw
from tests.support.stack import EmbeddedPacs

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
ACSE_TIMEOUT_S = 2
NETWORK_TIMEOUT_S = 3
PREASSOC_TIMEOUT_S = 5.0  # the default of PACS_DICOM_PREASSOC_TIMEOUT_S
MAX_ASSOCIATIONS = 8
RESERVED = 1  # association slots only registered, host-checked AEs may take
PER_PEER = 3
MAX_PDU = 65536
MAX_INFLATED = 8 * MiB
MAX_OBJECT = 4 * MiB
RSS_GROWTH_LIMIT = 100 * MiB
A_ABORT = 0x07


@dataclass
class Server:
    pacs: EmbeddedPacs
    outside: Path  # the folder holding the server's root: nothing may appear here but the root's own files
    pki: Path  # CA, server and modality certificates of the TLS listener

    @property
    def port(self) -> int:
        return self.pacs.port

    def rss(self) -> int:
        """`pacs serve` and its DICOM receiving processes (the default on a multi-core host)."""
        return self.pacs.proc.rss_bytes()

    def threads(self) -> int:
        return self.pacs.proc.num_threads()

    @property
    def dicom_ports(self) -> set[int]:
        return {self.port, int(self.pacs.env["PACS_DICOM_TLS_PORT"])}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    outside = tmp_path_factory.mktemp("hostile")
    (outside / "sentinel.txt").write_text("the server's neighbour\n")
    pki = tmp_path_factory.mktemp("hostile-pki")
    make_pki(pki, "hospital-ca", ("server", "modality"))
    pacs = EmbeddedPacs(outside / "srv", {
        "PACS_DICOM_ACSE_TIMEOUT_S": str(ACSE_TIMEOUT_S), "PACS_NETWORK_TIMEOUT_S": str(NETWORK_TIMEOUT_S),
        "PACS_MAX_ASSOCIATIONS": str(MAX_ASSOCIATIONS), "PACS_MAX_ASSOCIATIONS_PER_PEER": str(PER_PEER),
        "PACS_DICOM_RESERVED_ASSOCIATIONS": str(RESERVED),
        "PACS_MAX_PDU_SIZE": str(MAX_PDU), "PACS_MAX_INFLATED_BYTES": str(MAX_INFLATED),
        "PACS_MAX_OBJECT_BYTES": str(MAX_OBJECT), "PACS_DICOM_TLS_PORT": str(free_port()),
        "PACS_TLS_CERT_FILE": str(pki / "server.crt"), "PACS_TLS_KEY_FILE": str(pki / "server.key"),
        "PACS_TLS_CA_FILE": str(pki / "hospital-ca.crt"), "PACS_TLS_REQUIRE_CLIENT_CERT": "true"})
    register_ae(pacs.ctx, "MODA", "127.0.0.6", 104, query=False, retrieve=False)
    try:
        yield Server(pacs, outside, pki)
    finally:
        pacs.close()


def _outside_listing(server: Server) -> set[str]:
    """Everything next to the server's data folder (its log is its own)."""
    data = server.pacs.root / "data"
    out = set()
    for path in server.outside.rglob("*"):
        if path == data or data in path.parents or path == server.pacs.root / "serve.log":
            continue
        out.add(str(path.relative_to(server.outside)))
    return out


def _assert_nothing_outside(server: Server) -> None:
    assert _outside_listing(server) == {"sentinel.txt", "srv"}
    data = (server.pacs.root / "data").resolve()
    for path in data.rglob("*"):
        assert data in path.resolve().parents, path  # no symlink or '..' escapes the data folder
        assert ".." not in path.name and "outside" not in path.name, path


def _stored_keys(server: Server) -> set[str]:
    return {o.key for o in server.pacs.ctx.store.list("dicom/")}


def _indexed(server: Server, sop_uid: str) -> bool:
    with server.pacs.ctx.sessions() as session:
        return session.scalars(select(Instance).where(Instance.sop_instance_uid == sop_uid)).first() is not None


def _settle(server: Server, baseline_threads: int) -> None:
    """Wait until the connections a test left have been closed by the server: no connection on its DICOM
    ports but the listeners, and the thread count back to normal and steady (the serve process's other
    thread pools come and go, so one low reading alone proves nothing)."""
    def open_connections() -> int:
        return sum(1 for c in server.pacs.proc.tcp_connections()
                   if c.status != psutil.CONN_LISTEN and c.laddr and c.laddr.port in server.dicom_ports)

    def settled() -> bool:
        if open_connections() or server.threads() > baseline_threads + 1:
            return False
        time.sleep(0.5)
        return open_connections() == 0 and server.threads() <= baseline_threads + 1

    wait_until(settled, timeout=ACSE_TIMEOUT_S + NETWORK_TIMEOUT_S + 15, interval=0.2,
               what="the server's connections and their threads to end")


# -- raw PDUs -------------------------------------------------------------------------------------


def _connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float, bool]:
    """What the server sends until it closes the connection: (bytes, seconds, closed)."""
    start = time.monotonic()
    received = b""
    sock.settimeout(timeout)
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        return received, time.monotonic() - start, False
    return received, time.monotonic() - start, True


def _exchange(sock: socket.socket, payload: bytes | Iterable[bytes], timeout: float = 30) -> tuple[bytes, float]:
    """Send while a reader collects the answer (an A-ABORT must not be lost to the reset that closing
    a socket with unread data causes); the seconds until the server closed."""
    answer: list[tuple[bytes, float, bool]] = []
    reader = threading.Thread(target=lambda: answer.append(_read_until_closed(sock, timeout)))
    reader.start()
    chunks = [payload] if isinstance(payload, bytes) else payload
    with contextlib.suppress(ConnectionResetError, BrokenPipeError):
        for chunk in chunks:
            sock.sendall(chunk)
    reader.join(timeout + 5)
    assert answer and answer[0][2], "the server did not close the connection"
    return answer[0][0], answer[0][1]


def _pdu_types(data: bytes) -> list[int]:
    types, pos = [], 0
    while pos + 6 <= len(data):
        pdu_type, _, length = struct.unpack(">BBL", data[pos:pos + 6])
        types.append(pdu_type)
        pos += 6 + length
    return types


def test_pdu_length_bounds() -> None:
    assert pdu_length_error(0x04, MAX_PDU, MAX_PDU) == ""
    assert "exceeds the negotiated maximum" in pdu_length_error(0x04, MAX_PDU + 1, MAX_PDU)
    assert pdu_length_error(0x04, 0xFFFFFFFF, 0) == ""  # 0: we announced no maximum
    assert pdu_length_error(0x01, MAX_CONTROL_PDU_BYTES, MAX_PDU) == ""
    assert "exceeds" in pdu_length_error(0x01, 0xFFFFFFFF, MAX_PDU)
    assert pdu_length_error(0xFF, 4, MAX_PDU) == "unknown PDU type 0xFF"


def test_live_association_register_counts_per_peer_and_in_all() -> None:
    alive = {"a", "b", "c", "d", "e"}
    live = LiveAssociations(is_alive=lambda token: token in alive)
    assert live.try_acquire("a", "10.0.0.1", per_peer=2, total=3).accept
    assert live.try_acquire("b", "::ffff:10.0.0.1", per_peer=2, total=3).accept  # the same peer
    third = live.try_acquire("c", "10.0.0.1", per_peer=2, total=3)
    assert not third.accept and third.reject == (2, 3, 2) and "per-peer" in third.reason
    assert live.try_acquire("d", "10.0.0.2", per_peer=2, total=3).accept
    assert live.try_acquire("e", "10.0.0.3", per_peer=2, total=3).reject == (2, 3, 2)  # the total
    live.release("a")
    live.release("a")  # released on several events: idempotent
    assert live.try_acquire("c", "10.0.0.1", per_peer=2, total=3).accept
    alive.discard("b")  # an association whose end was never signalled is dropped once its thread is gone
    assert live.try_acquire("e", "10.0.0.1", per_peer=2, total=3).accept
    assert live.count("10.0.0.1") == 2 and live.count() == 3


def test_live_association_register_is_race_free() -> None:
    live = LiveAssociations()
    barrier = threading.Barrier(40)
    accepted: list[int] = []

    def request(n: int) -> None:
        barrier.wait()
        if live.try_acquire(n, "10.0.0.9", per_peer=3, total=100).accept:
            accepted.append(n)

    threads = [threading.Thread(target=request, args=(n,)) for n in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(accepted) == 3 and live.count("10.0.0.9") == 3


def test_connection_that_sends_nothing_is_closed_after_the_acse_timeout(server: Server) -> None:
    baseline = server.threads()
    silent = _connect(server.port)
    half = _connect(server.port)
    half.sendall(associate_rq()[:100])  # a truncated A-ASSOCIATE-RQ: the header promises more
    with silent, half:
        data, elapsed, closed = _read_until_closed(silent, timeout=30)
        assert closed and data == b"" and ACSE_TIMEOUT_S - 0.5 <= elapsed <= ACSE_TIMEOUT_S + 6, (data, elapsed)
        data, elapsed, closed = _read_until_closed(half, timeout=30)
        assert closed and 0x02 not in _pdu_types(data)  # never accepted
        assert elapsed <= ACSE_TIMEOUT_S + NETWORK_TIMEOUT_S + 6, elapsed
    _settle(server, baseline)
    assert echoscu(server.port).returncode == 0


@pytest.mark.parametrize(("name", "payload"), [
    ("pdu type 0x00", b"\x00\x00\x00\x00\x00\x04" + b"\x00" * 4),
    ("pdu type 0x08", b"\x08\x00\x00\x00\x00\x04" + b"\x01" * 4),
    ("pdu type 0xFF", b"\xff\x00\x00\x00\x00\x04" + b"\xff" * 4),
    ("A-ASSOCIATE-RQ claiming 4 GB", b"\x01\x00\xff\xff\xff\xff" + associate_rq()[6:] + b"\x00" * 65536),
    ("P-DATA-TF claiming 4 GB before association", b"\x04\x00\xff\xff\xff\xf0" + b"\x00" * 65536),
    ("A-RELEASE-RQ claiming 2 MB", b"\x05\x00\x00\x20\x00\x00" + b"\x00" * 1024),
    ("A-ASSOCIATE-RQ with a garbage body", b"\x01\x00\x00\x00\x01\x00" + random.Random(7).randbytes(256)),
    ("random bytes", random.Random(11).randbytes(4096)),
    ("random bytes after a valid header", associate_rq()[:6] + random.Random(13).randbytes(2048)),
])
def test_malformed_pdu_gets_abort_or_close_never_an_association(server: Server, name: str, payload: bytes) -> None:
    baseline, rss_before = server.threads(), server.rss()
    with _connect(server.port) as sock:
        data, elapsed = _exchange(sock, payload)
    types = _pdu_types(data)
    assert set(types) <= {A_ABORT, 0x03}, (name, data[:64])  # A-ABORT or A-ASSOCIATE-RJ, never an AC
    if name.startswith(("pdu type", "A-ASSOCIATE-RQ claiming", "P-DATA-TF claiming", "A-RELEASE-RQ claiming")):
        # refused on the 6-byte header: A-ABORT at once, not a wait for the 4 GB or for a timeout
        assert types[:1] == [A_ABORT], (name, data[:64])
        assert elapsed < ACSE_TIMEOUT_S, (name, elapsed)
    else:
        assert elapsed <= ACSE_TIMEOUT_S + NETWORK_TIMEOUT_S + 6, (name, elapsed)
    _settle(server, baseline)
    assert server.rss() - rss_before < RSS_GROWTH_LIMIT
    assert echoscu(server.port).returncode == 0


def _raw_association(port: int) -> socket.socket:
    sock = _connect(port)
    sock.sendall(associate_rq())
    sock.settimeout(10)
    header = sock.recv(6, socket.MSG_WAITALL)
    assert header[:1] == b"\x02", header  # A-ASSOCIATE-AC
    sock.recv(struct.unpack(">L", header[2:6])[0], socket.MSG_WAITALL)
    return sock


@pytest.mark.parametrize(("claimed", "streamed_mib"), [(MAX_PDU + 1, 0), (0xFFFFFFF0, 32)])
def test_oversized_p_data_on_an_association_is_aborted(server: Server, claimed: int, streamed_mib: int) -> None:
    baseline, rss_before = server.threads(), server.rss()
    # a well-formed P-DATA-TF start (one PDV item, presentation context 1), then only part of the
    # body: the A-ABORT must come from the header, not from a timeout or from decoding the body
    start = struct.pack(">BBLLBB", 0x04, 0, claimed, claimed - 4, 1, 0x00) + bytes(1000)
    with _raw_association(server.port) as sock:
        data, elapsed = _exchange(sock, itertools.chain([start], itertools.repeat(bytes(MiB), streamed_mib)))
    assert _pdu_types(data)[:1] == [A_ABORT], data[:64]
    assert elapsed < NETWORK_TIMEOUT_S, elapsed
    _settle(server, baseline)
    grown = server.rss() - rss_before
    print(f"oversized P-DATA ({claimed} bytes claimed, {streamed_mib} MiB streamed): A-ABORT after {elapsed:.2f} s, "
          f"server RSS grew {grown / MiB:.1f} MiB")
    assert grown < RSS_GROWTH_LIMIT
    assert echoscu(server.port).returncode == 0


def _echo_from(port: int, source: str) -> int | None:
    ae = AE(ae_title="PROBE")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS", bind_address=(source, 0))
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if status else None
    finally:
        assoc.release()


def test_connection_flood_from_one_peer_is_bounded(server: Server) -> None:
    _, per_peer_connections = connection_limits(MAX_ASSOCIATIONS, PER_PEER)
    baseline, rss_before = server.threads(), server.rss()
    socks = []
    for i in range(200):  # half-open: connect and send nothing, or half an A-ASSOCIATE-RQ
        sock = _connect(server.port)
        if i % 2:
            with contextlib.suppress(OSError):
                sock.sendall(associate_rq()[:40])
        socks.append(sock)
    try:
        assert _echo_from(server.port, "127.0.0.2") == 0  # another peer is served during the flood
        rss_flood = server.rss()
        held = 0
        for sock in socks:  # the server closed all but a peer's share at once
            held += not _read_until_closed(sock, timeout=0.2)[2]
        assert held <= per_peer_connections, held
    finally:
        for sock in socks:
            sock.close()
    _settle(server, baseline)
    result = echoscu(server.port)
    assert result.returncode == 0, result.stdout + result.stderr
    grown = max(rss_flood, server.rss()) - rss_before
    print(f"200 half-open connections: {200 - held} closed at once, {held} held until the ACSE timeout; "
          f"server RSS {rss_before / MiB:.0f} MiB before, {rss_flood / MiB:.0f} MiB during, "
          f"{server.rss() / MiB:.0f} MiB after")
    assert grown < RSS_GROWTH_LIMIT


def _associate(port: int, source: str, title: str = "LIMITS") -> Association:
    ae = AE(ae_title=title)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)  # a storage request: the AE registry is asked who calls
    ae.acse_timeout = ae.network_timeout = 10
    return ae.associate("127.0.0.1", port, ae_title="PACS", bind_address=(source, 0))


def _keep_alive(live: list[Association]) -> None:
    """A C-ECHO on each held association: the server closes one idle for PACS_NETWORK_TIMEOUT_S (3 s here), and on a
    loaded machine the steps of a test can take that long; a slot freed that way would let an association through
    that the limit under test must refuse."""
    for assoc in live:
        status = assoc.send_c_echo()
        assert assoc.is_established and status and status.Status == 0x0000


def test_per_peer_and_total_association_limits(server: Server) -> None:
    baseline = server.threads()
    live: list[Association] = []
    try:
        live += [_associate(server.port, "127.0.0.1") for _ in range(PER_PEER)]
        assert all(a.is_established for a in live)
        over = _associate(server.port, "127.0.0.1")
        assert rejection_of(over) == (2, 3, 2)  # rejected-transient, service provider, local limit exceeded
        _keep_alive(live)
        dcmtk = echoscu(server.port)  # what a modality is told
        assert dcmtk.returncode != 0 and "Local Limit Exceeded" in dcmtk.stdout + dcmtk.stderr

        _keep_alive(live)
        other = _associate(server.port, "127.0.0.2")  # the limit is per peer address
        assert other.is_established
        live.append(other)
        live += [_associate(server.port, f"127.0.0.{n}") for n in (3, 3, 4)]
        assert all(a.is_established for a in live) and len(live) == MAX_ASSOCIATIONS - RESERVED
        # the last slot is kept for registered AEs that proved who they are: unknown peers cannot fill it
        _keep_alive(live)
        assert rejection_of(_associate(server.port, "127.0.0.4")) == (2, 3, 2)
        _keep_alive(live)
        spoofed = _associate(server.port, "127.0.0.5", title="MODA")  # the title, from the wrong host
        assert rejection_of(spoofed) == (2, 3, 2)
        _keep_alive(live)
        modality = _associate(server.port, "127.0.0.6", title="MODA")
        assert modality.is_established
        live.append(modality)
        _keep_alive(live)
        assert rejection_of(_associate(server.port, "127.0.0.5")) == (2, 3, 2)  # the total limit

        live.pop(0).release()  # a slot of 127.0.0.1 is free again at once (two: one is the kept headroom)
        live.pop(0).release()
        tries: list[Association] = []

        def associated_again() -> bool:  # the server sees a release when its thread has handled it
            tries.append(_associate(server.port, "127.0.0.1"))
            return tries[-1].is_established

        wait_until(associated_again, timeout=10, interval=0.2, what="a slot of 127.0.0.1 free again")
        again = tries[-1]
        live.append(again)
        assert again.send_c_echo().Status == 0
    finally:
        for assoc in live:
            assoc.release()
    _settle(server, baseline)
    assert echoscu(server.port).returncode == 0


def _tls_echo(server: Server) -> subprocess.CompletedProcess[str]:
    tls_port = int(server.pacs.env["PACS_DICOM_TLS_PORT"])
    return subprocess.run([dcmtk("echoscu"), "-aec", "PACS", "+tls", str(server.pki / "modality.key"),
                           str(server.pki / "modality.crt"), "+cf", str(server.pki / "hospital-ca.crt"),
                           "127.0.0.1", str(tls_port)], capture_output=True, text=True, env=dcmtk_env(), timeout=30)


def test_silent_tls_connections_do_not_block_the_tls_listener(server: Server) -> None:
    # A connection of an earlier test's flood can keep its pre-association budget slot after the socket is gone,
    # until its deadline (PACS_DICOM_PREASSOC_TIMEOUT_S, 5 s): with two silent connections here and a per-peer
    # budget of three, wait that out first (seen once in a full run: echoscu refused at accept).
    time.sleep(PREASSOC_TIMEOUT_S + 0.5)
    baseline = server.threads()
    tls_port = int(server.pacs.env["PACS_DICOM_TLS_PORT"])
    silent = _connect(tls_port)  # TCP only: no ClientHello
    half = _connect(tls_port)
    half.sendall(b"\x16\x03\x01\x02\x00")  # the start of a TLS record, then nothing
    with silent, half:
        start = time.monotonic()
        result = _tls_echo(server)  # the handshake is not in the accept loop: others are served meanwhile
        assert result.returncode == 0, result.stdout + result.stderr
        assert time.monotonic() - start < ACSE_TIMEOUT_S
        for sock in (silent, half):
            _, elapsed, closed = _read_until_closed(sock, timeout=30)
            assert closed and elapsed <= ACSE_TIMEOUT_S + 6, elapsed  # the handshake has the ACSE timeout
    _settle(server, baseline)
    assert _tls_echo(server).returncode == 0


def test_object_over_the_size_limit(server: Server) -> None:
    """A bit over PACS_MAX_OBJECT_BYTES: 0xA702 from ingest. Far over: the association is aborted while
    the object is still arriving, so the sender cannot make the server hold it."""
    keys_before = _stored_keys(server)
    near = make_dataset(Rows=2048, Columns=2304, PixelData=bytes(2048 * 2304))  # 4.5 MiB
    result = send_dataset(server.port, near, "1.2.840.10008.1.2.1")
    assert result.status == 0xA702 and result.error_comment.startswith("object of "), result

    rss_before = server.rss()
    far = make_dataset(Rows=8192, Columns=8192, PixelData=bytes(64 * MiB))
    result = send_dataset(server.port, far, "1.2.840.10008.1.2.1")
    grown = server.rss() - rss_before
    print(f"64 MiB object against a 4 MiB limit: {result}; server RSS grew {grown / MiB:.1f} MiB")
    assert result.status is None  # aborted: no C-STORE response
    assert grown < 48 * MiB  # receiving it whole would have cost 64 MiB at least, twice over
    assert not _indexed(server, str(far.SOPInstanceUID)) and not _indexed(server, str(near.SOPInstanceUID))
    assert _stored_keys(server) == keys_before
    assert echoscu(server.port).returncode == 0


# -- datasets: decompression bombs, lying lengths, path-like UIDs ----------------------------------


def deflated_part10(ds: Dataset, extra: Iterable[bytes] = ()) -> bytes:
    """``ds`` as a Deflated Explicit VR Little Endian Part-10 file; the ``extra`` chunks are appended to
    the dataset inside the deflate stream (a bomb is built without holding its inflated size)."""
    plain = dataset_bytes(to_bytes(ds))  # make_dataset's transfer syntax: Explicit VR Little Endian
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = bytearray(compressor.compress(plain))
    for chunk in extra:
        body += compressor.compress(chunk)
    body += compressor.flush()
    if len(body) % 2:
        body += b"\x00"
    buf = io.BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, ds.file_meta, enforce_standard=True)
    return buf.getvalue() + bytes(body)


def deflate_bomb(inflated_mib: int) -> tuple[bytes, str]:
    """A valid dataset whose Pixel Data is ``inflated_mib`` MiB of zeros, deflated (about 1 KiB per MiB)."""
    ds = make_dataset()
    del ds.PixelData
    header = struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, inflated_mib * MiB)
    return deflated_part10(ds, itertools.chain([header], itertools.repeat(bytes(MiB), inflated_mib))), \
        str(ds.SOPInstanceUID)


def test_deflate_bomb_is_refused_without_inflating_it(server: Server, tmp_path: Path) -> None:
    keys_before = _stored_keys(server)
    bomb, sop_uid = deflate_bomb(256)  # 256 MiB of zeros in ~256 KiB; the server's bound is 8 MiB
    assert len(bomb) < 2 * MiB
    path = tmp_path / "bomb.dcm"
    path.write_bytes(bomb)
    rss_before = server.rss()
    result = send_file_raw(server.port, path)
    grown = server.rss() - rss_before
    print(f"deflate bomb: {len(bomb)} bytes inflating to 256 MiB -> 0x{result.status or 0:04X} "
          f"{result.error_comment!r}; server RSS grew {grown / MiB:.1f} MiB")
    assert result.status == 0xC000, result
    assert result.error_comment == f"deflate bomb: dataset inflates past {MAX_INFLATED} bytes"
    assert grown < RSS_GROWTH_LIMIT  # inflating it in full would have cost 256 MiB at least
    assert not _indexed(server, sop_uid)
    assert _stored_keys(server) == keys_before

    # a deflated object under the bound is archived (the limit is not a ban on deflate)
    small = make_dataset(Rows=1024, Columns=1024, PixelData=bytes(MiB))
    small_path = tmp_path / "small.dcm"
    small_path.write_bytes(deflated_part10(small))
    assert send_file_raw(server.port, small_path).status == 0
    assert _indexed(server, str(small.SOPInstanceUID))
    _assert_nothing_outside(server)


def _splice(data: bytes, find: bytes, start: int, end: int, new: bytes) -> bytes:
    """Replace bytes [start, end) relative to the first ``find`` in the dataset (after the preamble)."""
    at = data.index(find, 132)
    return data[:at + start] + new + data[at + end:]


PN = b"\x10\x00\x10\x00PN"  # (0010,0010) Patient Name, explicit VR
PIXELS = b"\xe0\x7f\x10\x00OB\x00\x00"  # (7FE0,0010) Pixel Data
LIES = {
    "PatientName length 0xFFFF": (lambda d: _splice(d, PN, 6, 8, b"\xff\xff"), 0xC002, "truncated"),
    "PixelData length 2 GB": (lambda d: _splice(d, PIXELS, 8, 12, struct.pack("<L", 0x7FFFFFF0)), 0xC002,
                              "truncated"),
    "PixelData odd length, a byte left over": (lambda d: _splice(d, PIXELS, 8, 12, struct.pack("<L", 255)), 0xC002,
                                               "truncated"),
    "undefined length on a text element": (lambda d: _splice(d, PN, 4, 8, b"UN\x00\x00\xff\xff\xff\xff"), 0xC000,
                                           "malformed"),
    "element cut after its VR": (lambda d: d[:d.index(PIXELS, 132) + 6], 0xC002, "truncated"),
}


@pytest.mark.parametrize("name", sorted(LIES))
def test_lying_lengths_are_refused(server: Server, tmp_path: Path, name: str) -> None:
    keys_before = _stored_keys(server)
    ds = make_dataset()
    lie, status, comment = LIES[name]
    path = tmp_path / "lie.dcm"
    path.write_bytes(lie(to_bytes(ds)))
    result = send_file_raw(server.port, path)
    assert result.status == status and comment in result.error_comment, (name, result)
    assert not _indexed(server, str(ds.SOPInstanceUID))
    assert _stored_keys(server) == keys_before


@pytest.mark.parametrize(("where", "uid"), [("StudyInstanceUID", "../../../outside"),
                                            ("SeriesInstanceUID", "/tmp/pacs-hostile-outside"),
                                            ("SOPInstanceUID", "1.2.3\\..\\..\\outside")])
def test_path_like_uid_inside_a_deflated_dataset_is_refused(server: Server, tmp_path: Path, where: str,
                                                            uid: str) -> None:
    keys_before = _stored_keys(server)
    absolute_before = Path("/tmp/pacs-hostile-outside").exists()
    ds = make_dataset(**{where: uid})
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.9.7433.2"  # the request's UID is valid
    path = tmp_path / "uid.dcm"
    path.write_bytes(deflated_part10(ds))
    result = send_file_raw(server.port, path)
    assert result.status == 0xC001 and where in result.error_comment, result
    assert _stored_keys(server) == keys_before
    assert Path("/tmp/pacs-hostile-outside").exists() == absolute_before
    _assert_nothing_outside(server)
