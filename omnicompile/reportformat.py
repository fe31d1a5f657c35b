"""Number and text formatting of the reports: percentiles without numpy, byte counts, table cells."""
from __future__ import annotations

import math
from typing import Any, Sequence

__all__ = ["percentile", "format_bytes", "format_number", "md_escape"]


def percentile(values: Sequence[float], p: float, presorted: bool = False) -> float:
    """The ``p``-th percentile (0..100) with linear interpolation between closest ranks
    (numpy's default), without numpy.  Raises ``ValueError`` on an empty sequence."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0 <= p <= 100:
        raise ValueError(f"percentile p must be in [0, 100], got {p}")
    vs = list(values) if presorted else sorted(values)
    pos = (len(vs) - 1) * p / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(vs) - 1)
    return vs[lo] + (vs[hi] - vs[lo]) * (pos - lo)


def format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def format_number(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def md_escape(text: str) -> str:
    return text.replace("|", "\\|")
