"""Exception classes.  Each message says what was wrong and what is allowed.

:class:`RewriteError` (a pass refusing a rewrite: a deliberate refusal the backend reports)
lives in :mod:`omnicompile.passes.errors` and is re-exported here.
"""
from __future__ import annotations

from omnicompile.passes.errors import PassError, RewriteError

__all__ = ["OmniCacheError", "ConfigError", "RewriteError", "PassError", "CalibrationError", "ScheduleError",
           "ReportError", "StepCountError"]


class OmniCacheError(Exception):
    """Base class of every error omnicompile raises on purpose at the user."""


class ConfigError(OmniCacheError, ValueError):
    """An option has an unknown name, a wrong type or an out-of-range value."""

    def __init__(self, field: str, value, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"omnicache option {field!r}: got {value!r}; {allowed}")


class CalibrationError(OmniCacheError, ValueError):
    """A calibration file is malformed or does not match the model / run it is used for."""


class ScheduleError(CalibrationError):
    """A layered profile or schedule (JSON) is malformed or does not fit the graph it is used for."""


class ReportError(OmniCacheError, ValueError):
    """A report given as JSON (:meth:`omnicompile.report.Report.from_json`) is malformed: the
    message names the field and what it should be."""


class StepCountError(OmniCacheError, ValueError):
    """A generation has more steps than its policy can schedule (the message names the limit
    and the step count seen)."""
