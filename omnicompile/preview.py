"""What a runtime says it will do over one generation, before it runs: :class:`Preview`.

Every runtime answers ``runtime.preview(steps)`` from the same rules its ``__call__`` applies
(:mod:`omnicompile.policy`), so ``omnicache explain``, the dumps and the plan heatmap never
re-simulate a policy.  A graph compiled unchanged previews as every step computed
(:meth:`Preview.computed`).

States per (step, span): ``computed``; ``reused``; ``forced`` (reuse asked for, but the span
has no cache yet: the runtime computes it); ``dynamic`` (decided at run time on the device,
e.g. by a probe).  With dynamic steps the ideal speedup is an upper bound (every dynamic step
counted as reused): ``bound`` is True.  The *ideal speedup* divides the estimated FLOPs of the
generation by the FLOPs left after skipping the reused spans — it ignores elementwise work,
the residual adds and dispatch overhead.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

__all__ = ["Preview", "STATES", "MARKS"]

STATES = ("computed", "reused", "forced", "dynamic")
MARKS = {"computed": "C", "reused": "R", "forced": "F", "dynamic": "?"}


@dataclasses.dataclass
class Preview:
    steps: int
    spans: list[str]
    span_flops: list[int]
    flops_per_call: int
    decisions: list[list[str]]     # [step][span], one of STATES
    #: how far the preview can be trusted (not calibrated yet, decided on the device, ...)
    note: Optional[str] = None

    @classmethod
    def computed(cls, steps: int, spans: Sequence = (), flops_per_call: int = 0,
                 note: Optional[str] = None) -> "Preview":
        """Every step of every span computed (a graph compiled unchanged, a policy waiting
        for its calibration)."""
        spans = list(spans)
        return cls(steps, [s.name for s in spans], [s.flops for s in spans], flops_per_call,
                   [["computed"] * len(spans) for _ in range(steps)], note)

    def marks(self, span: int) -> str:
        return "".join(MARKS[row[span]] for row in self.decisions)

    @property
    def bound(self) -> bool:
        return any(d == "dynamic" for row in self.decisions for d in row)

    @property
    def flops_saved(self) -> int:
        return sum(f for row in self.decisions for f, d in zip(self.span_flops, row) if d in ("reused", "dynamic"))

    @property
    def flops_saved_fraction(self) -> float:
        total = self.flops_per_call * self.steps
        return self.flops_saved / total if total else 0.0

    @property
    def ideal_speedup(self) -> float:
        total = self.flops_per_call * self.steps
        left = total - self.flops_saved
        return total / left if total and left > 0 else 1.0

    def reuse_fraction(self, span: int) -> float:
        if not self.decisions:
            return 0.0
        return sum(row[span] in ("reused", "dynamic") for row in self.decisions) / len(self.decisions)

    def to_dict(self) -> dict:
        return {"steps": self.steps, "spans": list(self.spans), "span_flops": list(self.span_flops),
                "flops_per_call": self.flops_per_call,
                "marks": {s: self.marks(k) for k, s in enumerate(self.spans)},
                "decisions": self.decisions, "flops_saved_fraction": self.flops_saved_fraction,
                "ideal_speedup": self.ideal_speedup, "ideal_speedup_is_bound": self.bound, "note": self.note}
