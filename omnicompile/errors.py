"""Exception classes.  Each message says what was wrong and what is allowed."""
from __future__ import annotations

__all__ = ["OmniCacheError", "ConfigError", "RewriteError", "CalibrationError", "ScheduleError"]


class OmniCacheError(Exception):
    """Base class of every error omnicompile raises on purpose."""


class ConfigError(OmniCacheError, ValueError):
    """An option has an unknown name, a wrong type or an out-of-range value."""

    def __init__(self, field: str, value, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"omnicache option {field!r}: got {value!r}; {allowed}")


class RewriteError(OmniCacheError):
    """A rewrite could not be applied safely; the backend falls back to the unchanged graph."""

    def __init__(self, code: str, message: str, subject: str = ""):
        self.code, self.subject = code, subject
        super().__init__(message)


class CalibrationError(OmniCacheError, ValueError):
    """A calibration file is malformed or does not match the model / run it is used for."""


class ScheduleError(CalibrationError):
    """A layered profile or schedule (JSON) is malformed or does not fit the graph it is used for."""
