"""Policies ``none`` (the parity baseline) and ``static`` (a fixed schedule)."""
from __future__ import annotations

from typing import Optional

from omnicompile.errors import RewriteError
from omnicompile.policy import Policy, SchedulePolicy
from omnicompile.registry import register_policy

__all__ = ["NonePolicy", "StaticPolicy"]


@register_policy("none")
class NonePolicy(Policy):
    """No caching: the graph goes to the inner backend unchanged (the parity baseline; the
    token/frame/block caches still apply when their ratios are set)."""

    rewrites = False

    def make_runtime(self, ctx):
        raise RewriteError("policy_none", f"policy {self.name!r} does not rewrite graphs")


@register_policy("static")
class StaticPolicy(SchedulePolicy):
    """A fixed schedule: every span is reused at the same steps.

    With ``reuse_steps`` those steps are reused.  Otherwise steps ``< warmup`` and the last
    ``cooldown`` steps are computed; after warm-up, reuse starts at once and every
    ``interval``-th step refreshes the cache: step ``s`` is computed when
    ``(s - warmup) % interval == interval - 1`` (interval 2: C C R C R C ... for warmup 2).
    With ``cooldown`` and the step count unknown, any step may be one of the last: every step
    is computed.
    """

    options = ("interval", "warmup", "cooldown", "reuse_steps")

    def is_reuse_step(self, step: int, num_steps: Optional[int]) -> bool:
        c = self.config
        if c.reuse_steps is not None:
            return step in c.reuse_steps
        if step < c.warmup or c.interval <= 1:
            return False
        if c.cooldown and (num_steps is None or step >= num_steps - c.cooldown):
            return False
        return (step - c.warmup) % c.interval != c.interval - 1

    def decide(self, step, num_steps, n_spans):
        return (self.is_reuse_step(step, num_steps),) * n_spans

    def variants(self, n_spans):
        c = self.config
        if c.reuse_steps is None and c.interval <= 1:
            return [(False,) * n_spans]
        return super().variants(n_spans)

    def describe(self):
        c = self.config
        if c.reuse_steps is not None:
            return {"policy": "static", "reuse_steps": list(c.reuse_steps)}
        return {"policy": "static", "interval": c.interval, "warmup": c.warmup, "cooldown": c.cooldown}
