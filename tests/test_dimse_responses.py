"""pacs.dimse_responses.rejection_of: the A-ASSOCIATE-RJ a peer answered with, as our SCU paths (forwarding,
commitment reports) and the association-limit tests read it, including when pynetdicom 3.0 reports it as an
abort (its requestor thread checks the socket after the DUL thread has read the RJ and closed the connection)."""

from __future__ import annotations

from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ABORT, A_ASSOCIATE

from pacs.dimse_responses import rejection_of


def _rejection(result: int = 0x02, source: int = 0x03, diagnostic: int = 0x02) -> A_ASSOCIATE:
    primitive = A_ASSOCIATE()
    primitive.result, primitive.result_source, primitive.diagnostic = result, source, diagnostic
    return primitive


def test_a_rejection_pynetdicom_reported_is_read_from_the_accepted_answer() -> None:
    assoc = Association(AE(), "requestor")
    assoc.is_rejected = True
    assoc.acceptor.primitive = _rejection(0x01, 0x01, 0x07)  # permanent, service user, called AE not recognized
    assert rejection_of(assoc) == (1, 1, 7)


def test_a_rejection_reported_as_an_abort_is_read_from_the_dul_queue() -> None:
    assoc = Association(AE(), "requestor")
    assoc.is_aborted = True
    assoc.dul.to_user_queue.put(_rejection())
    assert rejection_of(assoc) == (2, 3, 2)  # transient, service provider (presentation), local limit exceeded


def test_an_abort_with_no_rejection_behind_it_is_none() -> None:
    assoc = Association(AE(), "requestor")
    assoc.is_aborted = True
    assert rejection_of(assoc) is None  # nothing answered (unreachable, or the connection closed)
    assoc.dul.to_user_queue.put(A_ABORT())
    accepted = A_ASSOCIATE()
    accepted.result = 0x00
    assoc.dul.to_user_queue.put(accepted)
    assert rejection_of(assoc) is None  # an abort, or an acceptance, is not a rejection


def test_an_association_that_was_not_rejected_or_aborted_is_none() -> None:
    assert rejection_of(Association(AE(), "requestor")) is None


def test_the_tests_own_clients_keep_the_response_a_sender_waits_for() -> None:
    """tests/support/pynetdicom_clients.py, installed for the whole test process by tests/conftest.py: the
    pynetdicom race replayed by hand on a test's client (the reactor takes a C-ECHO response off the queue)."""
    from pynetdicom import dimse_primitives

    assoc = Association(AE(), "requestor")
    rsp = dimse_primitives.C_ECHO()
    rsp.MessageIDBeingRespondedTo, rsp.Status = 1, 0x0000
    assoc._reactor_checkpoint.clear()  # what send_c_echo does before it sends
    assoc._serve_request(rsp, 1)  # the reactor caught between its checkpoint wait and the queue
    assert assoc.dimse.get_msg(block=False) == (1, rsp)  # still there for the sender
    assoc._reactor_checkpoint.set()  # nobody waiting: pynetdicom's own handling (logged and dropped)
    assoc._serve_request(rsp, 1)
    assert assoc.dimse.get_msg(block=False) == (None, None)
