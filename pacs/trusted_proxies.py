"""Which peers may tell us who the real client is: ``PACS_TRUSTED_PROXIES`` (addresses and CIDRs).

Behind a load balancer every connection comes from the balancer's address. A peer in this list is
believed when it names the real client: on DICOM with a PROXY protocol header (``pacs.proxy_protocol``,
applied by ``dicom_scp.server``), on HTTP with ``X-Forwarded-For`` (or, when that is absent,
``Forwarded: for=``) and ``X-Forwarded-Proto`` (applied by ``viewer_api.http_server``). From any other
peer those headers are ignored, so a client cannot choose the address that host checks, throttles,
connection limits and audit rows see. The default, an empty list, trusts nobody.

The client of a forwarded HTTP request is the rightmost address of ``X-Forwarded-For`` that is not a
trusted proxy: the entries to its left were written by that untrusted client and prove nothing. So
configure the proxy to append to ``X-Forwarded-For`` (HAProxy ``option forwardfor``, nginx
``$proxy_add_x_forwarded_for``): a proxy that only writes ``Forwarded`` leaves a client-sent
``X-Forwarded-For`` to be believed.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Headers = Iterable[tuple[bytes, bytes]]  # ASGI style: lower-case names, raw values


def parse_networks(entries: Iterable[str]) -> tuple[Network, ...]:
    """The networks of a trust list ('10.0.0.7', '10.0.0.0/24', '::1', 'fd00::/8'); ValueError names a bad one."""
    networks: list[Network] = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is not an IP address or CIDR network") from None
    return tuple(networks)


class TrustedProxies:
    """A trust list, asked per connection (``is_trusted``) and per forwarded request (``client_address``)."""

    def __init__(self, entries: Iterable[str] = ()) -> None:
        self.networks = parse_networks(entries)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def is_trusted(self, host: str) -> bool:
        address = _ip(host)
        return address is not None and any(address in network for network in self.networks
                                           if network.version == address.version)

    def client_address(self, socket_peer: str, headers: Headers) -> str:
        """The real client's host: the socket peer unless it is a trusted proxy that names another."""
        if not self.is_trusted(socket_peer):
            return socket_peer
        entries = forwarded_for(headers)
        client = socket_peer
        for entry in reversed(entries):
            address = _ip(_strip_port(entry))
            if address is None:  # 'unknown', an obfuscated name, garbage: the last trusted hop stands
                return client
            client = str(address)
            if not self.is_trusted(client):
                return client
        return client  # every hop is a trusted proxy: the leftmost is the client

    def forwarded_proto(self, socket_peer: str, headers: Headers) -> str | None:
        """'http' or 'https' as a trusted proxy received the request, else None (the connection's own scheme)."""
        if not self.is_trusted(socket_peer):
            return None
        proto = None
        for name, value in headers:
            if name.lower() == b"x-forwarded-proto":
                proto = value.decode("latin-1").split(",")[-1].strip().lower()
        return proto if proto in ("http", "https") else None


@functools.lru_cache(maxsize=16)
def trusted_proxies(entries: tuple[str, ...]) -> TrustedProxies:
    """The parsed trust list of ``tuple(settings.trusted_proxies)`` (cached: parsed once per process)."""
    return TrustedProxies(entries)


def forwarded_for(headers: Headers) -> list[str]:
    """The hops of ``X-Forwarded-For`` (all its headers, in order), else the ``for=`` values of ``Forwarded``."""
    xff: list[str] = []
    forwarded: list[str] = []
    for name, value in headers:
        name = name.lower()
        if name == b"x-forwarded-for":
            xff += [item.strip() for item in value.decode("latin-1").split(",") if item.strip()]
        elif name == b"forwarded":
            for element in value.decode("latin-1").split(","):
                for pair in element.split(";"):
                    key, _, val = pair.strip().partition("=")
                    if key.strip().lower() == "for":
                        forwarded.append(val.strip().strip('"'))
    return xff or forwarded


def _strip_port(entry: str) -> str:
    """'1.2.3.4:80' → '1.2.3.4', '[2001:db8::1]:80' → '2001:db8::1'; a bare address is unchanged."""
    if entry.startswith("["):
        return entry[1:].partition("]")[0]
    if entry.count(":") == 1:
        return entry.partition(":")[0]
    return entry


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # a dual-stack listener's view of an IPv4 peer
    return address
