"""The server-side TLS context of the DICOM listener (PS3.15 B.1 secure transport)."""

from __future__ import annotations

import ssl

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
