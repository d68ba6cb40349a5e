"""Errors of the extension, each carrying the HTTP status the routes answer with."""

from __future__ import annotations


class LoraExtError(Exception):
    """A refused operation; ``status`` is the HTTP status, the message the JSON error."""

    status: int = 400

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class UnknownAdapterError(LoraExtError):
    status = 404


class InvalidAdapterError(LoraExtError):
    """The adapter on disk cannot be loaded (missing, incomplete, corrupt, too large)."""

    status = 400


class IncompleteAdapterError(InvalidAdapterError):
    """Files missing or shorter than they say: maybe not all written (or visible) yet."""


class UnauthorizedError(LoraExtError):
    status = 401


class AdapterBusyError(LoraExtError):
    """An operation waited for the adapter longer than its bound."""

    status = 503
