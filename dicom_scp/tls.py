"""The server-side TLS context of the DICOM listener (PS3.15 B.1 secure transport), and the client
certificate an association presented (what an AE registered with ``--tls-subject`` is checked against)."""

from __future__ import annotations

import hashlib
import ssl
from typing import Any

from pacs.ae_access import PeerCertificate
from pacs.settings import Settings


def server_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """A TLS 1.2+ server context from the configured files; None when DICOM TLS is not configured."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(settings.tls_cert_file), str(settings.tls_key_file))
    if settings.tls_ca_file is not None:
        context.load_verify_locations(cafile=str(settings.tls_ca_file))
    # Mutual TLS: a peer must present a certificate that chains to tls_ca_file; otherwise one is
    # verified when offered (CERT_OPTIONAL) or not asked for at all (no CA configured).
    if settings.tls_require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
    elif settings.tls_ca_file is not None:
        context.verify_mode = ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def peer_certificate(assoc: Any) -> PeerCertificate | None:
    """The verified client certificate of the association's TLS connection; None on plain TCP, when the
    peer presented none, or when it was not verified (no ``PACS_TLS_CA_FILE``: it is then never asked for).

    Only a certificate that chained to the configured CA counts: ``getpeercert()`` is empty otherwise.
    """
    sock = getattr(getattr(assoc, "dul", None), "socket", None)
    sock = getattr(sock, "socket", None)
    if not isinstance(sock, ssl.SSLSocket):
        return None
    try:
        parsed = sock.getpeercert()
        der = sock.getpeercert(binary_form=True)
    except (OSError, ValueError):
        return None
    if not parsed or not der:
        return None
    # (key, value) pairs, indexed rather than unpacked: typeshed types every value of this dict as str-or-tuple
    common_names = tuple(str(pair[1]) for rdn in parsed.get("subject", ()) for pair in rdn
                         if pair[0] == "commonName")
    dns_names = tuple(str(pair[1]) for pair in parsed.get("subjectAltName", ()) if pair[0] == "DNS")
    return PeerCertificate(hashlib.sha256(der).hexdigest(), common_names, dns_names)
