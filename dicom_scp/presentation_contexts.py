"""The supported presentation contexts, built once and shared read-only by every association.

pynetdicom gives every accepted association ``deepcopy(server.contexts)`` (``RequestHandler._create_association``).
With the ~180 contexts an archive supports, that deep copy re-validates every UID through ``UID.__new__`` (~25 ms
of CPU per association on this project's 2-core reference machine, most of the server's work for the one-image
associations that CR/DX rooms and ultrasound carts open); a shallow copy of each context still cost ~0.7 ms.

Negotiation only reads the acceptor's contexts (``negotiate_as_acceptor`` builds new ones for the result), so
the server's list is a :class:`SharedContexts` whose ``deepcopy`` is itself, holding :class:`SharedContext`
objects that cannot be changed (their transfer syntaxes a tuple, their attributes frozen). An association that
needs other contexts replaces its list (``assoc.acceptor.supported_contexts = [...]``, before negotiation), with
:func:`own_copy` of the contexts it changes: the association checks drop refused contexts, the C-GET service
gives a requester's storage SOP classes the SCU/SCP roles.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NoReturn

from pynetdicom.presentation import PresentationContext


class SharedContext(PresentationContext):
    """A :class:`PresentationContext` shared by every association: read-only, its ``deepcopy`` is itself."""

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_frozen"):
            raise AttributeError(f"a shared presentation context is read-only ({name}): change an own_copy() of it")
        super().__setattr__(name, value)

    def __deepcopy__(self, memo: dict[int, Any]) -> SharedContext:
        return self

    def __copy__(self) -> SharedContext:
        return self


class SharedContexts(list[PresentationContext]):
    """The server's supported contexts: read-only; ``deepcopy`` (pynetdicom's, per association) is the list itself."""

    def _read_only(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError("the shared presentation contexts are read-only: assign a new list to the association")

    append = extend = insert = remove = pop = clear = sort = reverse = _read_only
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _read_only

    def __deepcopy__(self, memo: dict[int, Any]) -> SharedContexts:
        return self

    def __copy__(self) -> SharedContexts:
        return self


def shared(contexts: Iterable[PresentationContext]) -> SharedContexts:
    """The same contexts (abstract syntax, transfer syntaxes in order, roles), frozen and shareable."""
    frozen: list[PresentationContext] = []
    for context in contexts:
        item = object.__new__(SharedContext)
        state = dict(context.__dict__)
        state["_transfer_syntax"] = tuple(context.transfer_syntax)
        state["_frozen"] = True
        item.__dict__.update(state)
        frozen.append(item)
    return SharedContexts(frozen)


def own_copy(context: PresentationContext) -> PresentationContext:
    """A plain, changeable copy of ``context`` for one association."""
    copied = PresentationContext()
    copied.__dict__.update({name: value for name, value in context.__dict__.items() if name != "_frozen"})
    copied.__dict__["_transfer_syntax"] = list(context.transfer_syntax)
    return copied
