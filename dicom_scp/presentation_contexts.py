"""Supported presentation contexts that are cheap to copy for each association.

pynetdicom gives every accepted association ``deepcopy(server.contexts)`` (``RequestHandler._create_association``).
With the ~130 abstract syntaxes an archive accepts, that deep copy re-validates every UID through
``UID.__new__`` and cost ~25 ms of CPU per association on this project's 2-core reference machine — most of
the server's work for the one-image associations that CR/DX rooms and ultrasound carts open.

A context holds immutable strings (UIDs) and one list of transfer syntaxes; sharing the strings and copying
the list gives each association the same independent copy that ``deepcopy`` does, at a fraction of the cost.
"""

from __future__ import annotations

from typing import Any

from pynetdicom.presentation import PresentationContext


class CheaplyCopiedContext(PresentationContext):
    """A :class:`PresentationContext` whose ``deepcopy`` shares the UID strings and copies the lists."""

    def __deepcopy__(self, memo: dict[int, Any]) -> CheaplyCopiedContext:
        copied = object.__new__(type(self))
        state = dict(self.__dict__)
        for name, value in state.items():
            if isinstance(value, list):  # the transfer syntaxes: each association may reorder or trim its own
                state[name] = list(value)
        copied.__dict__.update(state)
        memo[id(self)] = copied
        return copied


def cheaply_copied(contexts: list[PresentationContext]) -> list[PresentationContext]:
    """The same contexts (same abstract syntax, transfer syntaxes, roles), as :class:`CheaplyCopiedContext`."""
    converted: list[PresentationContext] = []
    for context in contexts:
        cheap = object.__new__(CheaplyCopiedContext)
        cheap.__dict__.update(context.__dict__)
        cheap.__dict__["_transfer_syntax"] = list(context.transfer_syntax)
        converted.append(cheap)
    return converted
