"""The one error hierarchy of the core. Library errors are wrapped where they occur."""

from __future__ import annotations


class PacsError(Exception):
    """Base of every error the core raises on purpose."""


class IndexUnavailable(PacsError):
    """The index database could not be reached or refused the transaction (transient)."""


class NotFound(PacsError):
    """The requested object does not exist."""


class Conflict(PacsError):
    """The request conflicts with existing state (e.g. an AE title already registered)."""


class InvalidInput(PacsError, ValueError):
    """The caller's input is not acceptable; the message says why."""
