"""Client addresses through load balancers (issue 17): the PROXY protocol on DICOM, X-Forwarded-For on HTTP,
both believed only from ``PACS_TRUSTED_PROXIES``.

Fast tier: the PROXY protocol parser (``pacs.proxy_protocol``) and the trust list (``pacs.trusted_proxies``).

Integration: one `pacs serve` (plain and TLS DICOM listeners) with ``PACS_TRUSTED_PROXIES=["127.0.0.2"]``
behind Debian's HAProxy in TCP mode, connecting to it from 127.0.0.2 with ``send-proxy-v2`` (plain and TLS
frontends) and ``send-proxy`` (v1). The modalities are pynetdicom requestors bound to 127.0.0.5 and
127.0.0.6 (Linux loopback answers all of 127/8, so each is "another host"):

- a registered AE with the host check for 127.0.0.5 is itself through the proxy from 127.0.0.5 (query
  accepted) and an unknown AE from 127.0.0.6 (rejected (1, 1, 3)), over v2, v1 and TLS;
- the audit rows and ae_sightings name the modality, never the proxy;
- the per-peer association limit counts per modality: two modalities each at the limit both get in through
  the one proxy, the next association of one of them is refused (2, 3, 2);
- a PROXY header from a peer not in the list is an invalid PDU: aborted, nothing believed; from the
  trusted address, a garbage header (or none, or silence past the deadline) closes the connection, and the
  refusal is logged; HAProxy's health checks (v2 LOCAL, then closed) never pile up against its limits;
- HTTP: X-Forwarded-For from an untrusted peer is ignored (the audit row has the socket address), from the
  trusted one honoured (the rightmost untrusted hop); the per-client connection cap counts the real client.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import json
import shutil
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification
from sqlalchemy import func, select

from dicom_scp.server import ConnectionGuard
from pacs.aes import add_ae
from pacs.context import AppContext
from pacs.db.models import AESighting, AuditEvent, Instance
from pacs.dimse_responses import rejection_of
from pacs.proxy_protocol import (
    MAX_V1_BYTES,
    MAX_V2_BODY_BYTES,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    parse,
    read_header,
)
from pacs.settings import Settings
from pacs.trusted_proxies import TrustedProxies, parse_networks
from tests.support.net import free_port, port_open, wait_until
from tests.support.pdus import associate_rq
from tests.support.pki import make_pki
from tests.support.stack import EmbeddedPacs
from tests.support.tiers import starts_servers

PROXY = "127.0.0.2"  # HAProxy's source address towards the SCP: the one trusted proxy
MOD_A, MOD_B = "127.0.0.5", "127.0.0.6"  # two modalities
PER_PEER = 2
HTTP_PER_CLIENT = 2
HEADER_TIMEOUT_S = 3.0
NOT_RECOGNIZED = (1, 1, 3)
LOCAL_LIMIT = (2, 3, 2)


# -- the parser (fast tier) ------------------------------------------------------------------------------


def _reader(data: bytes) -> tuple[Callable[[int], bytes], Callable[[], bytes]]:
    """A ``recv_exactly`` over ``data``, and what is left of it afterwards."""
    position = 0

    def recv_exactly(n: int) -> bytes:
        nonlocal position
        chunk = data[position:position + n]
        position += len(chunk)
        return chunk

    return recv_exactly, lambda: data[position:]


def _v2(command: int, family: int, body: bytes) -> bytes:
    return V2_SIGNATURE + struct.pack(">BBH", 0x20 | command, family, len(body)) + body


def _v2_inet(source: str, dest: str, sport: int, dport: int, tlvs: bytes = b"") -> bytes:
    a, b = ipaddress.ip_address(source), ipaddress.ip_address(dest)
    family = 0x11 if a.version == 4 else 0x21
    return _v2(0x1, family, a.packed + b.packed + struct.pack(">HH", sport, dport) + tlvs)


NEXT = b"\x01\x00\x00\x00\x00\x10"  # the first bytes after the header (an A-ASSOCIATE-RQ): never consumed


@pytest.mark.parametrize(("header", "expected"), [
    (b"PROXY TCP4 192.0.2.7 10.0.0.1 40001 11112\r\n", ProxyHeader(1, ("192.0.2.7", 40001), ("10.0.0.1", 11112))),
    (b"PROXY TCP6 2001:db8::7 2001:db8::1 40001 104\r\n",
     ProxyHeader(1, ("2001:db8::7", 40001), ("2001:db8::1", 104))),
    (b"PROXY UNKNOWN\r\n", ProxyHeader(1)),
    (b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n", ProxyHeader(1)),
    (_v2_inet("192.0.2.7", "10.0.0.1", 40001, 11112), ProxyHeader(2, ("192.0.2.7", 40001), ("10.0.0.1", 11112))),
    (_v2_inet("2001:db8::7", "2001:db8::1", 1, 2), ProxyHeader(2, ("2001:db8::7", 1), ("2001:db8::1", 2))),
    (_v2_inet("192.0.2.7", "10.0.0.1", 5, 6, tlvs=b"\x04\x00\x03abc" * 20),  # TLVs are skipped
     ProxyHeader(2, ("192.0.2.7", 5), ("10.0.0.1", 6))),
    (_v2(0x0, 0x00, b""), ProxyHeader(2)),  # LOCAL: a health check, the connection's own address stands
    (_v2(0x0, 0x11, bytes(12)), ProxyHeader(2)),  # LOCAL with an address block: ignored
    (_v2(0x1, 0x00, b""), ProxyHeader(2)),  # PROXY with UNSPEC family: unknown client
    (_v2(0x1, 0x31, bytes(216)), ProxyHeader(2)),  # a UNIX socket client: no address of ours
], ids=["v1-tcp4", "v1-tcp6", "v1-unknown", "v1-unknown-long", "v2-ipv4", "v2-ipv6", "v2-tlvs", "v2-local",
        "v2-local-block", "v2-unspec", "v2-unix"])
def test_valid_headers_are_read_exactly(header: bytes, expected: ProxyHeader) -> None:
    recv, rest = _reader(header + NEXT)
    assert read_header(recv) == expected
    assert rest() == NEXT  # not a byte of what follows (DICOM, or a TLS handshake) is consumed
    assert parse(header) == expected


@pytest.mark.parametrize(("data", "error"), [
    (b"", "ended inside"),
    (b"PROXY TC", "ended inside"),
    (b"PROXY TCP4 192.0.2.7 10.0.0.1 40001 11112", "ended inside"),  # no CRLF before the end
    (_v2_inet("192.0.2.7", "10.0.0.1", 1, 2)[:20], "ended inside"),
    (V2_SIGNATURE[:10], "ended inside"),
    (b"PROXY UNKNOWN " + b"x" * 120 + b"\r\n", "longer than 107"),
    (V2_SIGNATURE + struct.pack(">BBH", 0x21, 0x11, MAX_V2_BODY_BYTES + 1) + bytes(MAX_V2_BODY_BYTES + 1),
     "the limit is"),
    (b"\r\n\r\n\x00\r\nQUIX\n" + bytes(4), "signature"),
    (NEXT + bytes(10), "no PROXY protocol header"),  # a bare A-ASSOCIATE-RQ: no header at all
    (b"GET / HTTP/1.1\r\n\r\n", "no PROXY protocol header"),
    (b"PROXY TCP4 banana 10.0.0.1 1 2\r\n", "not an IP address"),
    (b"PROXY TCP4 2001:db8::7 10.0.0.1 1 2\r\n", "not an IPv4"),
    (b"PROXY TCP6 192.0.2.7 2001:db8::1 1 2\r\n", "not an IPv6"),
    (b"PROXY TCP4 192.0.2.7 10.0.0.1 65536 2\r\n", "not a port"),
    (b"PROXY TCP4 192.0.2.7 10.0.0.1 01 2\r\n", "not a port"),
    (b"PROXY TCP4 192.0.2.7 10.0.0.1 1\r\n", "malformed"),
    (b"PROXY UDP4 192.0.2.7 10.0.0.1 1 2\r\n", "malformed"),
    (b"PROXY TCP4 192.0.2.7  10.0.0.1 1 2\r\n", "malformed"),
    (b"PROXY TCP4 192.0.2.\xff 10.0.0.1 1 2\r\n", "not ASCII"),
    (V2_SIGNATURE + struct.pack(">BBH", 0x11, 0x11, 12) + bytes(12), "version 1"),
    (V2_SIGNATURE + struct.pack(">BBH", 0x22, 0x11, 12) + bytes(12), "command 2"),
    (_v2(0x1, 0x12, bytes(12)), "not a stream"),  # UDP over IPv4
    (_v2(0x1, 0x41, bytes(12)), "not a stream"),  # an unknown family
    (_v2(0x1, 0x21, bytes(12)), "too short"),  # IPv6 with an IPv4-sized block
], ids=["empty", "v1-cut", "v1-no-crlf", "v2-cut-body", "v2-cut-signature", "v1-oversized", "v2-oversized",
        "v2-bad-signature", "dicom", "http", "v1-bad-address", "v1-v6-in-tcp4", "v1-v4-in-tcp6", "v1-port-range",
        "v1-port-leading-zero", "v1-missing-field", "v1-udp", "v1-double-space", "v1-not-ascii", "v2-version",
        "v2-command", "v2-udp", "v2-family", "v2-short-block"])
def test_invalid_headers_are_refused(data: bytes, error: str) -> None:
    recv, rest = _reader(data)
    with pytest.raises(ProxyProtocolError, match=error):
        read_header(recv)
    assert len(data) - len(rest()) <= max(MAX_V1_BYTES, 16 + MAX_V2_BODY_BYTES)  # a bounded read, even of garbage


def test_an_oversized_v2_length_is_refused_before_its_body_is_read() -> None:
    recv, rest = _reader(V2_SIGNATURE + struct.pack(">BBH", 0x21, 0x11, 0xFFFF) + bytes(0xFFFF))
    with pytest.raises(ProxyProtocolError, match="the limit is"):
        read_header(recv)
    assert len(rest()) == 0xFFFF  # only the 16-byte header was read


def test_a_v1_line_is_read_no_further_than_107_bytes() -> None:
    recv, rest = _reader(b"PROXY TCP4 " + b"1" * 500)
    with pytest.raises(ProxyProtocolError, match="longer than 107"):
        read_header(recv)
    assert len(b"PROXY TCP4 " + b"1" * 500) - len(rest()) == MAX_V1_BYTES


# -- the trust list (fast tier) ------------------------------------------------------------------------------


def test_a_bad_header_frees_its_connection_slot_exactly_once() -> None:
    """The guard's counts after connections from the trusted proxy whose header is garbage or missing: back to
    zero (the slot was freed twice, so every health check or broken connection raised the total limit by one
    and left a phantom connection of a peer "none": issue 17 review)."""
    settings = Settings(trusted_proxies=[PROXY], max_associations=4, dicom_preassoc_timeout_s=1.0)
    guard = ConnectionGuard(cast(AppContext, SimpleNamespace(settings=settings)))
    acceptor = AE()
    for payload in (b"PROXY TCP4 banana 127.0.0.1 1 2\r\n", b""):
        ours, theirs = socket.socketpair()
        with ours, theirs:
            theirs.sendall(payload)
            theirs.shutdown(socket.SHUT_WR)
            assert guard.admit(acceptor, (PROXY, 40000), ours)
            assert guard.client_of(acceptor, ours, (PROXY, 40000)) is None
        assert guard._awaiting_header == 0 and not guard._starting, (guard._awaiting_header, guard._starting)
    # and a good header turns the proxy's slot into the modality's
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(f"PROXY TCP4 {MOD_A} 127.0.0.1 40000 104\r\n".encode())
        assert guard.admit(acceptor, (PROXY, 40001), ours)
        assert guard.client_of(acceptor, ours, (PROXY, 40001)) == (MOD_A, 40000)
        assert guard._awaiting_header == 0 and guard._starting == {MOD_A: 1}


def test_trust_list_addresses_and_cidrs() -> None:
    proxies = TrustedProxies(["10.0.5.0/24", "192.0.2.1", "fd00::/8"])
    assert proxies.is_trusted("10.0.5.77") and proxies.is_trusted("192.0.2.1")
    assert proxies.is_trusted("::ffff:10.0.5.9")  # a dual-stack listener's view of an IPv4 peer
    assert proxies.is_trusted("fd12::3")
    assert not proxies.is_trusted("10.0.6.1") and not proxies.is_trusted("192.0.2.2")
    assert not proxies.is_trusted("") and not proxies.is_trusted("testclient")
    assert not TrustedProxies() and not TrustedProxies().is_trusted("127.0.0.1")  # the default trusts nobody
    with pytest.raises(ValueError, match=r"'10\.0\.0\.300' is not an IP address or CIDR"):
        parse_networks(["10.0.0.300"])


def test_the_client_is_the_rightmost_untrusted_hop() -> None:
    proxies = TrustedProxies(["10.0.5.0/24"])

    def client(peer: str, *headers: tuple[str, str]) -> str:
        return proxies.client_address(peer, [(name.encode(), value.encode()) for name, value in headers])

    xff = ("x-forwarded-for", "198.51.100.66, 203.0.113.8")
    assert client("203.0.113.200", xff) == "203.0.113.200"  # from an untrusted peer: ignored
    assert client("10.0.5.1", xff) == "203.0.113.8"  # the client's own claim (198.51.100.66) proves nothing
    assert client("10.0.5.1", ("x-forwarded-for", "203.0.113.8, 10.0.5.2")) == "203.0.113.8"  # two proxies
    assert client("10.0.5.1", ("x-forwarded-for", "10.0.5.3, 10.0.5.2")) == "10.0.5.3"  # all trusted: leftmost
    assert client("10.0.5.1", ("X-Forwarded-For", "1.1.1.1"), ("x-forwarded-for", "203.0.113.9:5555")) \
        == "203.0.113.9"  # several headers are one list; a port is dropped
    assert client("10.0.5.1", ("x-forwarded-for", "[2001:db8::9]:80")) == "2001:db8::9"
    assert client("10.0.5.1", ("x-forwarded-for", "unknown")) == "10.0.5.1"  # nothing usable: the proxy
    assert client("10.0.5.1") == "10.0.5.1"
    forwarded = ("forwarded", 'for=198.51.100.66;proto=https, for="[2001:db8::17]:4711";by=10.0.5.1')
    assert client("10.0.5.1", forwarded) == "2001:db8::17"  # Forwarded when there is no X-Forwarded-For
    assert client("10.0.5.1", forwarded, ("x-forwarded-for", "203.0.113.8")) == "203.0.113.8"
    assert proxies.forwarded_proto("10.0.5.1", [(b"x-forwarded-proto", b"https")]) == "https"
    assert proxies.forwarded_proto("203.0.113.1", [(b"x-forwarded-proto", b"https")]) is None
    assert proxies.forwarded_proto("10.0.5.1", [(b"x-forwarded-proto", b"gopher")]) is None


# -- behind HAProxy (integration) -------------------------------------------------------------------------


@dataclass
class Stack:
    pacs: EmbeddedPacs
    pki: Path
    frontends: dict[str, int]  # "v2", "v1", "tls" -> HAProxy's port
    tls_port: int

    def log(self) -> str:
        return (self.pacs.root / "serve.log").read_text(errors="replace")


HAPROXY_CFG = """\
global
    maxconn 200
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend v2
    bind 127.0.0.1:{v2}
    default_backend scp_v2
backend scp_v2
    server scp 127.0.0.1:{dicom} send-proxy-v2 source {proxy} check inter 1s
frontend v1
    bind 127.0.0.1:{v1}
    default_backend scp_v1
backend scp_v1
    server scp 127.0.0.1:{dicom} send-proxy source {proxy}
frontend tls
    bind 127.0.0.1:{tls}
    default_backend scp_tls
backend scp_tls
    server scp 127.0.0.1:{dicom_tls} send-proxy-v2 source {proxy}
"""


@pytest.fixture(scope="module")
@starts_servers
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    root = tmp_path_factory.mktemp("proxy")
    pki = root / "pki"
    make_pki(pki, "hospital-ca", ("server",))
    tls_port = free_port()
    pacs = EmbeddedPacs(root, {
        "PACS_TRUSTED_PROXIES": json.dumps([PROXY]),
        "PACS_MAX_ASSOCIATIONS": "16", "PACS_MAX_ASSOCIATIONS_PER_PEER": str(PER_PEER),
        "PACS_HTTP_MAX_CONNECTIONS_PER_CLIENT": str(HTTP_PER_CLIENT),
        "PACS_DICOM_PREASSOC_TIMEOUT_S": str(HEADER_TIMEOUT_S),  # below the ACSE timeout: the header's deadline
        "PACS_DICOM_TLS_PORT": str(tls_port), "PACS_TLS_CERT_FILE": str(pki / "server.crt"),
        "PACS_TLS_KEY_FILE": str(pki / "server.key"), "PACS_TLS_CA_FILE": str(pki / "hospital-ca.crt")})
    proc: subprocess.Popen[bytes] | None = None
    try:
        with pacs.ctx.sessions() as session, session.begin():
            add_ae(session, "MODP", MOD_A, 104, archive_wide=True)  # the host check is the default
        frontends = {"v2": free_port(), "v1": free_port(), "tls": free_port()}
        config = root / "haproxy.cfg"
        config.write_text(HAPROXY_CFG.format(dicom=pacs.port, dicom_tls=tls_port, proxy=PROXY, **frontends))
        with (root / "haproxy.log").open("wb") as out:
            proc = subprocess.Popen([haproxy, "-db", "-f", str(config)], stdout=out, stderr=subprocess.STDOUT)
        wait_until(lambda: all(port_open(port) for port in frontends.values()), timeout=20, what="HAProxy")
        yield Stack(pacs, pki, frontends, tls_port)
    finally:
        if proc is not None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        pacs.close()


def _associate(stack: Stack, frontend: str, title: str, source: str, *contexts: str) -> Association:
    ae = AE(ae_title=title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for abstract_syntax in contexts or (Verification,):
        ae.add_requested_context(abstract_syntax, ExplicitVRLittleEndian)
    tls = None
    if frontend == "tls":
        tls = (ssl.create_default_context(cafile=str(stack.pki / "hospital-ca.crt")), "localhost")
    return ae.associate("127.0.0.1", stack.frontends[frontend], ae_title="PACS", bind_address=(source, 0),
                        tls_args=tls)


def _find(assoc: Association) -> list[int]:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    return [int(status.Status) for status, _ in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
            if status is not None and "Status" in status]


@pytest.mark.parametrize("frontend", ["v2", "v1", "tls"])
def test_the_host_check_sees_the_modality_through_the_proxy(stack: Stack, frontend: str) -> None:
    assoc = _associate(stack, frontend, "MODP", MOD_A, StudyRootQueryRetrieveInformationModelFind)
    assert assoc.is_established, f"the registered AE at {MOD_A} through the {frontend} proxy: {rejection_of(assoc)}"
    try:
        assert _find(assoc)[-1] == 0x0000
    finally:
        assoc.release()
    spoof = _associate(stack, frontend, "MODP", MOD_B, StudyRootQueryRetrieveInformationModelFind)
    try:
        assert rejection_of(spoof) == NOT_RECOGNIZED, "the same title from another host is an unknown AE"
    finally:
        if spoof.is_established:
            spoof.release()


def test_audit_rows_and_sightings_name_the_modality_not_the_proxy(stack: Stack) -> None:
    assoc = _associate(stack, "v2", "MODP", MOD_A, StudyRootQueryRetrieveInformationModelFind)
    assert assoc.is_established
    try:
        _find(assoc)
    finally:
        assoc.release()
    _associate(stack, "v2", "MODP", MOD_B, StudyRootQueryRetrieveInformationModelFind)  # rejected, audited
    ctx = stack.pacs.ctx

    def hosts() -> set[str]:
        with ctx.sessions() as session:
            rows = session.scalars(select(AuditEvent.source_address).where(AuditEvent.actor == "MODP")).all()
        return {address.split(":")[0] for address in rows}  # "host:port", or "host" (ae.new-address)

    wait_until(lambda: {MOD_A, MOD_B} <= hosts(), timeout=15, what="the association's audit rows")
    assert hosts() == {MOD_A, MOD_B}, "never the proxy's address"
    with ctx.sessions() as session:
        seen = set(session.scalars(select(AESighting.address).where(AESighting.ae_title == "MODP")).all())
    assert seen == {MOD_A, MOD_B}
    log = stack.log()
    assert f"MODP@{MOD_A}" in log and f"MODP@{PROXY}" not in log


def test_the_per_peer_limit_counts_each_modality_behind_the_proxy(stack: Stack) -> None:
    opened: list[Association] = []
    try:
        for source in (MOD_A, MOD_B):
            for _ in range(PER_PEER):
                assoc = _associate(stack, "v2", "ANYMOD", source)
                opened.append(assoc)
                assert assoc.is_established, f"association {len(opened)} ({source}): {rejection_of(assoc)}"
        third = _associate(stack, "v2", "ANYMOD", MOD_A)
        opened.append(third)
        assert rejection_of(third) == LOCAL_LIMIT, f"{MOD_A} is over its own limit of {PER_PEER}"
    finally:
        for assoc in opened:
            if assoc.is_established:
                assoc.release()


def _raw(stack: Stack, source: str, payload: bytes, port: int | None = None) -> bytes:
    """Send ``payload`` from ``source`` straight to the SCP (no HAProxy); what it answers until it closes."""
    with socket.socket() as sock:
        sock.bind((source, 0))
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port or stack.pacs.port))
        sock.sendall(payload)
        answer = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                answer += chunk
                if answer[:1] == b"\x02":  # A-ASSOCIATE-AC: enough (the SCP waits for our release)
                    break
        return answer


def test_a_proxy_header_from_an_untrusted_peer_is_an_invalid_pdu(stack: Stack) -> None:
    claimed = "127.0.0.9"
    request = associate_rq(calling="MODP")
    for header in (_v2_inet(claimed, "127.0.0.1", 40000, stack.pacs.port),
                   f"PROXY TCP4 {claimed} 127.0.0.1 40000 {stack.pacs.port}\r\n".encode()):
        answer = _raw(stack, "127.0.0.1", header + request)
        assert answer[:1] in (b"", b"\x07"), f"aborted or closed, never associated: {answer[:1]!r}"
    # the control: the same bytes from the trusted proxy's address are believed and associate
    assert _raw(stack, PROXY, _v2_inet(claimed, "127.0.0.1", 40000, stack.pacs.port) + request)[:1] == b"\x02"
    with stack.pacs.ctx.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 0, "nothing stored"
    refusal = "aborting association with 127.0.0.1: a PROXY protocol header from a peer not in PACS_TRUSTED_PROXIES"
    assert stack.log().count(refusal) == 2


def test_a_trusted_proxy_connection_without_a_valid_header_is_closed(stack: Stack) -> None:
    request = associate_rq(calling="GARBAGE")
    for payload in (b"PROXY TCP4 banana 127.0.0.1 1 2\r\n" + request,  # garbage header
                    V2_SIGNATURE + struct.pack(">BBH", 0x21, 0x11, 0xFFFF) + request,  # oversized
                    request):  # no header at all
        assert _raw(stack, PROXY, payload) == b"", "closed without an answer"
    assert _raw(stack, PROXY, b"PROXY TCP4 banana 127.0.0.1 1 2\r\n", port=stack.tls_port) == b""  # TLS too
    wait_until(lambda: f"from {PROXY} closed at once: invalid PROXY protocol header" in stack.log(), timeout=5,
               what="the refusal logged")
    with stack.pacs.ctx.sessions() as session:
        assert not session.scalars(select(AuditEvent.id).where(AuditEvent.actor == "GARBAGE")).all()


def test_a_silent_trusted_proxy_connection_is_closed_at_the_header_deadline(stack: Stack) -> None:
    with socket.socket() as sock:
        sock.bind((PROXY, 0))
        sock.connect(("127.0.0.1", stack.pacs.port))
        started = time.monotonic()
        sock.settimeout(HEADER_TIMEOUT_S + 10)
        assert sock.recv(100) == b""
        waited = time.monotonic() - started
    assert HEADER_TIMEOUT_S - 0.5 < waited < HEADER_TIMEOUT_S + 5, waited
    wait_until(lambda: f"no PROXY protocol header within {HEADER_TIMEOUT_S:g} s" in stack.log(), timeout=5,
               what="the refusal logged")
    # HAProxy's health checks (v2 LOCAL, then closed; one a second since the module started) end at once, so
    # they never fill the proxy's own per-address connection limit (4 here)
    assert f"from {PROXY} closed at once: " not in "".join(line for line in stack.log().splitlines(keepends=True)
                                                           if "connections open from this peer" in line)


# -- HTTP ------------------------------------------------------------------------------------------------


def _http(stack: Stack, source: str) -> http.client.HTTPConnection:
    port = int(stack.pacs.env["PACS_HTTP_PORT"])
    return http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))


def _failed_login(stack: Stack, source: str, user: str, xff: str) -> None:
    conn = _http(stack, source)
    try:
        conn.request("POST", "/api/auth/login", body=json.dumps({"username": user, "password": "wrong"}),
                     headers={"content-type": "application/json", "x-forwarded-for": xff})
        assert conn.getresponse().status == 401
    finally:
        conn.close()


def _login_source(stack: Stack, user: str) -> str:
    with stack.pacs.ctx.sessions() as session:
        rows = session.scalars(select(AuditEvent.source_address).where(AuditEvent.action == "auth.login",
                                                                       AuditEvent.actor.contains(user))).all()
    assert len(rows) == 1, rows
    return rows[0].rpartition(":")[0]


def test_x_forwarded_for_is_believed_from_the_trusted_proxy_only(stack: Stack) -> None:
    _failed_login(stack, "127.0.0.1", "xffuntrusted", "203.0.113.7")
    _failed_login(stack, PROXY, "xfftrusted", "198.51.100.66, 203.0.113.8")
    assert _login_source(stack, "xffuntrusted") == "127.0.0.1"  # the socket address
    assert _login_source(stack, "xfftrusted") == "203.0.113.8"  # the hop the proxy appended


def test_the_http_connection_cap_counts_the_client_behind_the_proxy(stack: Stack) -> None:
    """``PACS_HTTP_MAX_CONNECTIONS_PER_CLIENT`` = 2: a third keep-alive connection of one client through the
    proxy is refused, while another client through the same proxy still gets in."""

    def get(conn: http.client.HTTPConnection, client: str) -> int:
        conn.request("GET", "/no-such-page", headers={"x-forwarded-for": client})
        response = conn.getresponse()
        response.read()
        return response.status

    held = [_http(stack, PROXY) for _ in range(HTTP_PER_CLIENT + 2)]
    try:
        statuses = [get(conn, "203.0.113.20") for conn in held[:HTTP_PER_CLIENT]]  # kept alive: still counted
        assert 503 not in statuses, statuses
        assert get(held[HTTP_PER_CLIENT], "203.0.113.20") == 503
        assert get(held[HTTP_PER_CLIENT + 1], "203.0.113.21") != 503  # the proxy as a whole is not capped
    finally:
        for conn in held:
            conn.close()
