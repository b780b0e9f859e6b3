"""Keeps a DIMSE response for the thread waiting on it, on associations we request (forwarding, C-MOVE and
C-GET sub-operations, storage-commitment reports); and reads the A-ASSOCIATE-RJ a peer answered with even when
pynetdicom reports it as an abort (:func:`rejection_of`).

pynetdicom (3.0) runs a reactor thread beside the thread that calls ``send_c_store``/``send_n_event_report``.
Those pause the reactor by clearing a checkpoint and waiting for its ``_is_paused`` flag, but the reactor sets
that flag just *before* its checkpoint wait: caught right after the wait, it goes on to take the response off
the DIMSE queue, logs "Received unexpected C-STORE service message" and drops it, and the sender waits out the
whole DIMSE timeout (then aborts: a forward stalls a minute and is sent again, a move loses the rest of its
sub-operations). Rare on an idle machine, seen on a loaded one (pynetdicom issue 875 reports the same for
C-FIND). A response the reactor takes while a send is in progress is put back on the queue, where the sender
waits for it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE

log = logging.getLogger("pacs.dimse_responses")

_KEEPER = "_pacs_response_keeper"


class ResponseKeeper:
    """Installed once per requested association (:func:`keeper_for`); wrap each send in :meth:`sending`."""

    def __init__(self, assoc: Association) -> None:
        self._sending = threading.Event()
        self._assoc = assoc
        self._serve_request = assoc._serve_request
        assoc._serve_request = self._serve  # type: ignore[method-assign]  # this association only

    @contextmanager
    def sending(self) -> Iterator[None]:
        self._sending.set()
        try:
            yield
        finally:
            self._sending.clear()

    def _serve(self, msg: Any, context_id: int) -> None:
        if self._sending.is_set() and not msg.is_valid_request:
            self._assoc.dimse.msg_queue.put((context_id, msg))
            log.info("%s response taken by the reactor returned to the sender (pynetdicom race)", msg.msg_type)
            return
        self._serve_request(msg, context_id)


def keeper_for(assoc: Association) -> ResponseKeeper:
    """The association's keeper, installed on first use."""
    keeper = assoc.__dict__.get(_KEEPER)
    if keeper is None:
        keeper = assoc.__dict__[_KEEPER] = ResponseKeeper(assoc)
    return keeper


def rejection_of(assoc: Association) -> tuple[int, int, int] | None:
    """The (result, source, reason) of the A-ASSOCIATE-RJ the peer answered ``assoc``'s request with, or None
    (it accepted, or never answered).

    pynetdicom 3.0's requestor can report a rejection it received as an abort: after sending the request it waits
    for its socket to be ready and then checks that it is still connected, and when its thread is slower than the
    DUL thread, which has already read the A-ASSOCIATE-RJ and closed the connection as PS3.8 says, it aborts
    without reading the answer. The answer's primitive is then still in the DUL's queue; it is read from there.
    """
    if assoc.is_rejected:
        primitive = assoc.acceptor.primitive
    elif assoc.is_aborted:
        primitive = next((p for p in list(assoc.dul.to_user_queue.queue)
                          if isinstance(p, A_ASSOCIATE) and p.result in (0x01, 0x02)), None)
    else:
        return None
    if primitive is None or primitive.result is None:
        return None
    return int(primitive.result), int(primitive.result_source or 0), int(primitive.diagnostic or 0)
