"""Association lifecycle handlers bound by ``dicom_scp.server``: no Nagle delay on accepted connections, a
log line when an association is accepted, released (with how many objects it stored) or aborted, and the
association metrics (:mod:`pacs.metrics`: open, accepted, rejected, aborted)."""

from __future__ import annotations

import contextlib
import logging
import socket

from pynetdicom import evt

from pacs import metrics

log = logging.getLogger("dicom_scp")


def on_conn_open(event: evt.Event) -> None:
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def on_accepted(event: evt.Event) -> None:
    event.assoc.__dict__["_pacs_open"] = True  # counted open until its connection closes (on_conn_close)
    metrics.association_accepted()
    r = event.assoc.requestor
    log.info("association accepted: %s@%s:%s -> %s (max PDU %s)", r.ae_title, r.address, r.port,
             event.assoc.acceptor.ae_title, r.maximum_length)


def on_released(event: evt.Event) -> None:
    r = event.assoc.requestor
    counts = event.assoc.__dict__.get("_pacs_counts", {"ok": 0, "failed": 0})
    log.info("association released: %s@%s:%s stored=%d failed=%d", r.ae_title, r.address, r.port,
             counts["ok"], counts["failed"])


def on_aborted(event: evt.Event) -> None:
    event.assoc.__dict__["_pacs_aborted"] = True
    r = event.assoc.requestor
    log.warning("association aborted: %s@%s:%s", r.ae_title, r.address, r.port)


def on_rejected(event: evt.Event) -> None:
    metrics.association_rejected()


def on_conn_close(event: evt.Event) -> None:
    """The connection of an accepted association closed, however it ended: it is no longer open."""
    state = event.assoc.__dict__
    if state.pop("_pacs_open", False):
        metrics.association_closed(aborted=bool(state.get("_pacs_aborted")))
