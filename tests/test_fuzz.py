"""Fuzzing the two doors hostile bytes come through (SPEC §7), deterministically (``derandomize``):

- the ingest parser, ``parse_received``: random bytes, and truncated and mutated files of pydicom's
  corpus (deflated ones included). It only ever returns a ReceivedObject or raises ObjectRejected,
  within a time bound;
- the DICOM listener of a live `pacs serve`: fuzzed PDUs on raw sockets, on fresh connections and on
  established associations. Every connection gets only well-formed PDUs back (mostly A-ABORT) and is
  closed when the peer hangs up; afterwards the server answers DCMTK's echoscu, has no connection
  thread left over and its memory stayed bounded.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
import time
from collections import Counter
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pacs.ingest.parsing import ObjectRejected, ReceivedObject, parse_received
from storage.keys import is_valid_uid
from tests.support.corpus import corpus_dicom_files
from tests.support.datasets import make_dataset, to_bytes
from tests.support.dcmtk import echoscu
from tests.support.net import wait_until
from tests.support.pdus import associate_rq
from tests.support.stack import EmbeddedPacs
from tests.support.tiers import starts_servers

MiB = 1024 * 1024
SECONDS_PER_CASE = 5.0  # generous: a shared 2-core machine; a hang or a quadratic blow-up is far above
MAX_INFLATED = 4 * MiB
FUZZ = settings(derandomize=True, deadline=None, database=None, print_blob=True,
                suppress_health_check=list(HealthCheck))


def _corpus() -> list[bytes]:
    files = [p.read_bytes() for p in corpus_dicom_files() if p.stat().st_size <= 256 * 1024]
    fixed = {"SOPInstanceUID": "1.2.826.0.1.3680043.9.7433.3.1", "StudyInstanceUID": "1.2.826.0.1.3680043.9.7433.3.2",
             "SeriesInstanceUID": "1.2.826.0.1.3680043.9.7433.3.3"}  # the same bytes every run
    deflated = make_dataset(**fixed)
    deflated.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"
    return [*files, to_bytes(make_dataset(**fixed)), to_bytes(deflated)]


CORPUS = _corpus()
DEFLATED = [data for data in CORPUS if b"1.2.840.10008.1.2.1.99" in data[:1024]]
LYING_LENGTHS = [0xFFFFFFFF, 0xFFFFFFFE, 0x7FFFFFFF, 0x80000000, 0x0000FFFF, 0xFFFF0000, 1, 3, 0]


def _parse(data: bytes) -> str:
    """Parse; the outcome's name. Any exception but ObjectRejected, or a slow parse, fails the test."""
    start = time.perf_counter()
    try:
        obj = parse_received(data, max_bytes=64 * MiB, max_inflated_bytes=MAX_INFLATED)
    except ObjectRejected as exc:
        assert exc.message and exc.reason
        outcome = f"refused:{exc.reason.value}"
    else:
        assert isinstance(obj, ReceivedObject)
        assert all(is_valid_uid(u) for u in (obj.sop_class_uid, obj.sop_instance_uid, obj.study_instance_uid,
                                             obj.series_instance_uid))
        if data[128:132] == b"DICM":
            assert obj.data == data  # stored byte for byte as received
        outcome = "accepted"
    elapsed = time.perf_counter() - start
    assert elapsed < SECONDS_PER_CASE, f"parse took {elapsed:.1f} s"
    return outcome


def _report(name: str, outcomes: Counter[str], expected: int) -> None:
    print(f"\n{name}: {sum(outcomes.values())} cases: {dict(sorted(outcomes.items()))}")
    assert sum(outcomes.values()) >= expected


def test_random_bytes_are_refused() -> None:
    outcomes: Counter[str] = Counter()
    prefixes = [b"", b"\x00" * 128 + b"DICM", CORPUS[0][:400]]  # none, a bare DICM prefix, a real file's start

    @settings(FUZZ, max_examples=100)
    @given(prefix=st.sampled_from(prefixes), body=st.binary(max_size=4096))
    def run(prefix: bytes, body: bytes) -> None:
        outcome = _parse(prefix + body)
        assert outcome != "accepted"  # random bytes never carry four valid UIDs
        outcomes[outcome] += 1

    run()
    _report("random bytes", outcomes, 100)


def test_truncated_corpus_files_never_crash_the_parser() -> None:
    outcomes: Counter[str] = Counter()

    @settings(FUZZ, max_examples=100)
    @given(data=st.sampled_from(CORPUS), fraction=st.floats(0, 1, exclude_max=True))
    def run(data: bytes, fraction: float) -> None:
        outcomes[_parse(data[:int(len(data) * fraction)])] += 1

    run()
    _report("truncated corpus files", outcomes, 100)
    assert outcomes["refused:truncated"] > 0  # truncation is recognised as such, not just as "not DICOM"


@st.composite
def mutated(draw: st.DrawFn, sources: list[bytes]) -> bytes:
    """A corpus file with a few bytes flipped and some 2- or 4-byte fields overwritten with lying lengths."""
    data = bytearray(draw(st.sampled_from(sources)))
    start = 132 if data[128:132] == b"DICM" else 0
    for _ in range(draw(st.integers(1, 8))):
        pos = draw(st.integers(start, len(data) - 1))
        kind = draw(st.sampled_from(["byte", "length16", "length32"]))
        if kind == "byte":
            data[pos] = draw(st.integers(0, 255))
        else:
            size = 2 if kind == "length16" else 4
            value = draw(st.sampled_from(LYING_LENGTHS)) & (0xFFFF if size == 2 else 0xFFFFFFFF)
            data[pos:pos + size] = value.to_bytes(size, "little")
    return bytes(data)


def test_mutated_corpus_files_never_crash_the_parser() -> None:
    outcomes: Counter[str] = Counter()

    @settings(FUZZ, max_examples=150)
    @given(data=mutated(CORPUS))
    def run(data: bytes) -> None:
        outcomes[_parse(data)] += 1

    run()
    _report("mutated corpus files", outcomes, 150)
    assert len(outcomes) >= 3  # the mutations reach different checks, not one early refusal


def test_mutated_deflated_files_never_crash_the_parser() -> None:
    assert len(DEFLATED) >= 2 and all(_parse(data) == "accepted" for data in DEFLATED)  # image_dfl.dcm and ours
    outcomes: Counter[str] = Counter()

    @settings(FUZZ, max_examples=50)
    @given(data=mutated(DEFLATED))
    def run(data: bytes) -> None:
        outcomes[_parse(data)] += 1

    run()
    _report("mutated deflated files", outcomes, 50)


# -- the live DICOM listener ----------------------------------------------------------------------

ACSE_TIMEOUT_S = 1


@pytest.fixture(scope="module")
@starts_servers
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPacs]:
    pacs = EmbeddedPacs(tmp_path_factory.mktemp("fuzz") / "srv", {
        "PACS_DICOM_ACSE_TIMEOUT_S": str(ACSE_TIMEOUT_S), "PACS_NETWORK_TIMEOUT_S": "2",
        "PACS_MAX_ASSOCIATIONS": "64", "PACS_MAX_PDU_SIZE": "16384"})
    try:
        yield pacs
    finally:
        pacs.close()


VALID_RQ = associate_rq()
SCP_PDUS = {0x02, 0x03, 0x04, 0x06, 0x07}  # what an SCP may send: AC, RJ, P-DATA, RELEASE-RP, ABORT
PDU_TYPES = [0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x7F, 0xFF]


@st.composite
def pdu_stream(draw: st.DrawFn) -> tuple[bool, bytes]:
    """(associate first?, one to three PDUs): each a valid A-ASSOCIATE-RQ mutated or cut, or a header
    (any type, a true or lying length) with a random body. Half the streams are sent on an
    established association, the others on a fresh connection."""
    out = b""
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.booleans()):
            pdu = bytearray(VALID_RQ)
            for _ in range(draw(st.integers(0, 6))):
                pdu[draw(st.integers(0, len(pdu) - 1))] = draw(st.integers(0, 255))
            out += bytes(pdu[:draw(st.integers(1, len(pdu)))])
        else:
            body = draw(st.binary(max_size=512))
            length = draw(st.one_of(st.just(len(body)), st.sampled_from(LYING_LENGTHS), st.integers(0, 1 << 20)))
            out += struct.pack(">BBL", draw(st.sampled_from(PDU_TYPES)), 0, length) + body
    return draw(st.booleans()), out


def _pdu_types(data: bytes) -> list[int]:
    types, pos = [], 0
    while pos + 6 <= len(data):
        pdu_type, _, length = struct.unpack(">BBL", data[pos:pos + 6])
        types.append(pdu_type)
        pos += 6 + length
    return types


def test_fuzzed_pdus_never_break_the_listener(server: EmbeddedPacs) -> None:
    process = server.proc  # `pacs serve` and its DICOM receiving processes (the default on a multi-core host)
    baseline_threads, rss_before = process.num_threads(), process.rss_bytes()
    outcomes: Counter[str] = Counter()
    peers = iter(range(1 << 30))

    @settings(FUZZ, max_examples=60)
    @given(stream=pdu_stream())
    def run(stream: tuple[bool, bytes]) -> None:
        associate, pdus = stream
        source = f"127.0.{next(peers) % 200 + 10}.1"  # many peers: the per-peer limits are not what is fuzzed
        with socket.create_connection(("127.0.0.1", server.port), timeout=5, source_address=(source, 0)) as sock:
            if associate:
                sock.sendall(VALID_RQ)
                header = sock.recv(6, socket.MSG_WAITALL)
                assert header[:1] == b"\x02", header  # A-ASSOCIATE-AC
                sock.recv(struct.unpack(">L", header[2:])[0], socket.MSG_WAITALL)
            try:
                sock.sendall(pdus)
                sock.shutdown(socket.SHUT_WR)  # the peer hangs up: the server must close too, at once
            except (ConnectionResetError, BrokenPipeError):
                pass  # the server already aborted and closed: what it sent first is still read below
            except OSError as exc:  # ENOTCONN: the server's reset arrived between sendall and shutdown
                if exc.errno != errno.ENOTCONN:
                    raise
            received = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := sock.recv(65536):  # a TimeoutError here: the server kept the connection
                    received += chunk
        types = _pdu_types(received)
        assert set(types) <= SCP_PDUS, received[:64]
        outcomes[("associated:" if associate else "") + ("+".join(f"{t:02X}" for t in types) or "closed")] += 1

    start = time.monotonic()
    run()
    elapsed = time.monotonic() - start
    wait_until(lambda: process.num_threads() <= baseline_threads + 1, timeout=30, interval=0.2,
               what="the listener's threads to end after the fuzz run")
    result = echoscu(server.port)
    assert result.returncode == 0, result.stdout + result.stderr
    grown = process.rss_bytes() - rss_before
    _report(f"fuzzed PDU streams ({elapsed:.1f} s; server RSS {rss_before / MiB:.0f} -> "
            f"{process.rss_bytes() / MiB:.0f} MiB)", outcomes, 60)
    assert grown < 100 * MiB
