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
