"""The tests' own pynetdicom clients (the modalities, workstations and EMRs the tests play) keep the response
they are waiting for.

pynetdicom 3.0's requestor runs a reactor thread beside the thread that calls ``send_c_echo``/``send_c_store``/
``send_c_find``...; the race described in :mod:`pacs.dimse_responses` (the reactor taking the response off the
DIMSE queue, logging "Received unexpected C-ECHO service message" and dropping it) makes the sender wait out
its DIMSE timeout. The archive's own requested associations (forwarding, C-MOVE and C-GET sub-operations,
storage-commitment reports) hold their responses with :class:`pacs.dimse_responses.ResponseKeeper`; a test's
client sending several messages on one association met the race once on a loaded CI machine (the server under
test then ended the idle association, and the test read an empty response). The tests judge the archive, not
pynetdicom's client, so their clients get the same cure, for every requested association of the test process.
"""

from __future__ import annotations

import logging
from typing import Any

from pynetdicom.association import Association

log = logging.getLogger("tests.pynetdicom_clients")


def hold_responses(serve_request: Any) -> Any:
    """``Association._serve_request`` that puts a response back on the queue while a sender waits for it.

    A sender pauses the reactor by clearing ``_reactor_checkpoint`` before it sends and sets it again once it
    has its response: a response the reactor takes while the checkpoint is clear is that sender's.
    """

    def _serve_request(self: Association, msg: Any, context_id: int) -> None:
        if self.is_requestor and not msg.is_valid_request and not self._reactor_checkpoint.is_set():
            self.dimse.msg_queue.put((context_id, msg))
            log.info("%s response taken by the reactor returned to the sender (pynetdicom race)", msg.msg_type)
            return
        serve_request(self, msg, context_id)

    return _serve_request
