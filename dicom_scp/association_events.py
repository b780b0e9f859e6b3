"""Association lifecycle handlers bound by ``dicom_scp.server``: no Nagle delay on accepted connections, and a
log line when an association is accepted, released (with how many objects it stored) or aborted."""

from __future__ import annotations

import contextlib
import logging
import socket

from pynetdicom import evt

log = logging.getLogger("dicom_scp")


def on_conn_open(event: evt.Event) -> None:
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def on_accepted(event: evt.Event) -> None:
    r = event.assoc.requestor
    log.info("association accepted: %s@%s:%s -> %s (max PDU %s)", r.ae_title, r.address, r.port,
             event.assoc.acceptor.ae_title, r.maximum_length)


def on_released(event: evt.Event) -> None:
    r = event.assoc.requestor
    counts = event.assoc.__dict__.get("_pacs_counts", {"ok": 0, "failed": 0})
    log.info("association released: %s@%s:%s stored=%d failed=%d", r.ae_title, r.address, r.port,
             counts["ok"], counts["failed"])


def on_aborted(event: evt.Event) -> None:
    r = event.assoc.requestor
    log.warning("association aborted: %s@%s:%s", r.ae_title, r.address, r.port)
