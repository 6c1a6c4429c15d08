"""The one error a user sees for a bad policy: it names the field, the value, what is allowed."""

from __future__ import annotations

from typing import Any


class PolicyError(ValueError):
    """A policy declaration that cannot be used, with the field that makes it so."""

    def __init__(self, field: str, value: Any, allowed: str) -> None:
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"policy field '{field}' = {value!r} is not allowed: {allowed}")

    def within(self, prefix: str) -> "PolicyError":
        """The same error, with its field path under ``prefix`` (e.g. 'strategy')."""
        return PolicyError(f"{prefix}.{self.field}", self.value, self.allowed)


def check(ok: bool, field: str, value: Any, allowed: str) -> None:
    if not ok:
        raise PolicyError(field, value, allowed)
