"""Errors the domain raises, so callers can map them to HTTP status codes and CLI exits.

Each error carries a message that is safe to show to the caller: it never
contains secrets or the internals of another team.
"""

from __future__ import annotations


class DomainError(Exception):
    """Base of every refusal the domain makes on purpose."""


class NotFound(DomainError):
    """An unknown id, or one that belongs to another team.

    Both cases raise the same error with the same message, so that a caller
    cannot learn that another team's resource exists.
    """

    def __init__(self, kind: str, ident: object) -> None:
        super().__init__(f"{kind} {ident} not found")
        self.kind = kind
        self.ident = str(ident)


class InvalidInput(DomainError):
    """Input that breaks a rule; names the field and the rule it broke."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


class Conflict(DomainError):
    """A command that the aggregate's current state does not allow.

    For example results recorded on a run that has already ended, or a run
    started on an account that was unlinked.
    """
