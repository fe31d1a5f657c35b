"""A toy policy written as a plugin: everything it needs is in this file.

``toy-tail`` guards one span per block group (the default of ``SchedulePolicy``) and reuses
only the *last* one — on Flux, the single-stream blocks — on every other step after
``warmup``, never on the last step of a generation of known length.  It shows the protocol
a plugin implements (``omnicompile.policy``): ``decide`` per step and span, ``variants`` to
compile up front, ``describe`` for reports.  The runtime (forced compute where a slot has no
cache yet, variants or cond, the preview for ``explain``/``dump``) comes from
``SchedulePolicy``.  README.md, "Writing a policy", walks through it.
"""
from __future__ import annotations

from typing import Optional

import omnicompile
from omnicompile.policy import SchedulePolicy


@omnicompile.register_policy("toy-tail")
class TailPolicy(SchedulePolicy):
    """Reuse the last span on steps warmup, warmup + 2, ... (not the last step)."""

    options = ("warmup",)      # the config options it reads (any other one set is refused)

    def reuse_tail(self, step: int, num_steps: Optional[int]) -> bool:
        warmup = self.config.warmup
        last = num_steps is not None and step == num_steps - 1
        return step >= warmup and (step - warmup) % 2 == 0 and not last

    def decide(self, step, num_steps, n_spans):
        return (False,) * (n_spans - 1) + (self.reuse_tail(step, num_steps),)

    def variants(self, n_spans):
        return [(False,) * n_spans, (False,) * (n_spans - 1) + (True,)]

    def describe(self):
        return {"policy": self.name, "warmup": self.config.warmup}
