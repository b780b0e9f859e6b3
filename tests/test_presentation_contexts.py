"""Each association's copy of the supported presentation contexts: the same as pynetdicom's deepcopy, and
independent of the server's (dicom_scp.presentation_contexts)."""

from __future__ import annotations

import copy

from pynetdicom import AE, AllStoragePresentationContexts
from pynetdicom.presentation import QueryRetrievePresentationContexts

from dicom_scp.presentation_contexts import CheaplyCopiedContext, cheaply_copied

_SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5"]


def _server_contexts() -> list:
    ae = AE()
    for context in AllStoragePresentationContexts[:60] + QueryRetrievePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, _SYNTAXES)
    ae.add_supported_context("1.2.840.10008.5.1.4.1.1.2", _SYNTAXES, scu_role=True, scp_role=True)
    return ae.supported_contexts


def _described(contexts: list) -> list[tuple]:
    return [(c.context_id, c.abstract_syntax, list(c.transfer_syntax), c.scu_role, c.scp_role, c.as_scu, c.as_scp,
             c.result) for c in contexts]


def test_the_copy_holds_what_deepcopy_holds() -> None:
    original = _server_contexts()
    cheap = copy.deepcopy(cheaply_copied(original))
    assert _described(cheap) == _described(copy.deepcopy(original))
    assert all(isinstance(c, CheaplyCopiedContext) for c in cheap)
    assert str(cheap[0]) == str(original[0])  # pynetdicom's own rendering (UID names) works on the copy


def test_an_association_changing_its_copy_leaves_the_server_alone() -> None:
    server = cheaply_copied(_server_contexts())
    before = _described(server)
    mine = copy.deepcopy(server)
    mine[0].transfer_syntax.remove("1.2.840.10008.1.2")
    mine[0].context_id = 7
    mine[1].result = 0x00
    mine[2].scp_role = True
    assert _described(server) == before
    assert _described(copy.deepcopy(server)) == before


def test_a_role_selection_request_negotiates_against_the_copy() -> None:
    """The acceptor side of negotiation reads roles and syntaxes from the copy (what a C-GET SCU asks for)."""
    from pynetdicom.presentation import negotiate_as_acceptor

    server = copy.deepcopy(cheaply_copied(_server_contexts()))
    ae = AE()
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.4.90"])
    requested = copy.deepcopy(ae.requested_contexts)
    requested[0].context_id = 1
    accepted, _ = negotiate_as_acceptor(requested, server, {"1.2.840.10008.5.1.4.1.1.2": (False, True)})
    assert accepted[0].result == 0x00 and accepted[0].transfer_syntax[0] == "1.2.840.10008.1.2.4.90"
    assert accepted[0].as_scu is True
