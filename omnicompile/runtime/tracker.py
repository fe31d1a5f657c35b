"""Where a call sits: :class:`StepTracker` turns the sequence of (timestep, input signature)
of a graph's calls into (generation, step, slot).

A value equal to the previous one is another call of the same step (the next *slot*, e.g.
uncond after cond); a value that continues the direction of the trajectory is the next step;
a value that reverses it, repeats an earlier step, arrives with new input
shapes/dtypes/devices, or follows ``reset()`` starts a new *generation*.
"""
from __future__ import annotations

import math
from typing import Optional

__all__ = ["StepTracker"]


class StepTracker:
    """Turns the sequence of (timestep, input signature) of the calls into
    (generation, step, slot)."""

    def __init__(self):
        self.generation = -1
        self.last_length: Optional[int] = None
        self._forced = False
        self._start(None)

    def _start(self, signature) -> None:
        self.signature = signature
        self.t0: Optional[float] = None   # first timestep of the generation
        self.step = -1
        self.slot = 0
        self.t: Optional[float] = None
        self.direction = 0
        self.seen: set[float] = set()

    def reset(self) -> None:
        """The next call starts a new generation (numbering keeps counting up)."""
        self._forced = True

    def advance(self, t: float, signature) -> tuple[int, int, int, bool]:
        new = False
        if self.generation < 0 or signature != self.signature or self._forced:
            new = True
            self._forced = False
        elif t == self.t:
            self.slot += 1
            return self.generation, self.step, self.slot, False
        else:
            d = 1 if t > self.t else -1
            if (self.direction and d != self.direction) or t in self.seen or math.isnan(t):
                new = True
            else:
                self.direction = d
                self.step += 1
                self.slot = 0
        if new:
            if self.generation >= 0 and signature == self.signature:
                self.last_length = self.step + 1 if self.step >= 0 else self.last_length
            elif signature != self.signature:
                self.last_length = None
            self.generation += 1
            self._start(signature)
            self.step = 0
        self.t = t
        if self.t0 is None:
            self.t0 = t
        self.seen.add(t)
        return self.generation, self.step, self.slot, new
