"""Exceptions of the FX passes.

A pass says *why* it cannot do something with a :class:`~omnicompile.passes.common.Reason`.
Where a pass cannot return one (deep inside a rewrite), it raises :class:`RewriteError`,
which carries the same three fields: the backend turns it into the graph's refusal, a
deliberate decision.  Every other exception out of a pass is a bug: in strict mode
(``strict=True``, ``OMNICACHE_STRICT=1``) the backend lets it propagate.

This module imports nothing of omnicompile's (``passes`` never imports the package above it);
``omnicompile.errors`` re-exports :class:`RewriteError`.
"""
from __future__ import annotations

from .common import Reason

__all__ = ["PassError", "RewriteError", "OptionError"]


class PassError(Exception):
    """Base class of the exceptions the passes raise on purpose."""


class RewriteError(PassError):
    """A rewrite cannot be applied safely: a deliberate refusal, with a stable ``code``."""

    def __init__(self, code: str, message: str, subject: str = ""):
        self.code, self.message, self.subject = code, message, subject
        super().__init__(message)

    @property
    def reason(self) -> Reason:
        return Reason(self.code, self.message, self.subject)

    @classmethod
    def from_reason(cls, why: Reason) -> "RewriteError":
        return cls(why.code, why.message, why.subject)


class OptionError(PassError, ValueError):
    """An option of a pass has a wrong type or value; ``omnicompile.config`` turns it into a
    ``ConfigError`` naming the same field."""

    def __init__(self, field: str, value, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"option {field!r}: got {value!r}; {allowed}")
