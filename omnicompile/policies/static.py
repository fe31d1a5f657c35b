"""Policies ``none`` (the parity baseline), ``static`` (a fixed schedule) and its presets
``quality`` / ``balanced`` / ``fast`` (the uniform schedule at a target speedup)."""
from __future__ import annotations

import logging
from typing import Optional

from omnicompile import targets
from omnicompile.errors import ConfigError, RewriteError
from omnicompile.passes.common import Reason
from omnicompile.policy import Policy, SchedulePolicy
from omnicompile.registry import register_policy

__all__ = ["NonePolicy", "StaticPolicy", "QualityPreset", "BalancedPreset", "FastPreset"]

log = logging.getLogger("omnicompile")


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

    With ``target_speedup`` (or a preset: ``quality`` 1.5x, ``balanced`` 2x, ``fast`` 2.5x) the
    interval is replaced by the uniform schedule that reaches the target under the cost model
    (:mod:`omnicompile.targets`): the reuses a generation of that many steps needs, spread
    evenly after warm-up; with the step count unknown, the nearest integer interval.

    With ``extrapolate`` (the default) a reused span adds its last residual extrapolated along
    the last two, by a coefficient the computed steps fit in the graph (see
    :func:`omnicompile.passes.rewrite.build_variant` and the runtime's ``_window_inputs``).
    """

    options = ("interval", "warmup", "cooldown", "reuse_steps", "target_speedup", "target_cost", "extrapolate")
    #: presets set this: the target when the user sets none
    default_target: Optional[float] = None

    def __init__(self, config):
        super().__init__(config)
        #: what a computed and a reused call cost (the runtime binds it: ``targets.CallCosts``)
        self.costs = targets.CallCosts(1.0, 0.0)
        self.report = None
        self._counts: dict = {}     # num_steps -> reused steps of the target schedule

    @classmethod
    def validate(cls, config) -> None:
        target = config.is_set("target_speedup") or cls.default_target is not None
        clash = [n for n in ("interval", "reuse_steps") if config.is_set(n)]
        if target and clash:
            what = f"policy {config.policy!r}" if not config.is_set("target_speedup") else "target_speedup"
            raise ConfigError(clash[0], getattr(config, clash[0]),
                              f"{what} chooses the schedule itself; set either a target or {clash[0]}, not both")

    @property
    def target(self) -> Optional[float]:
        c = self.config
        if c.is_set("target_speedup"):
            return float(c.target_speedup)
        return self.default_target

    def bind_cost(self, costs: targets.CallCosts, report) -> None:
        """The runtime's cost model: what a computed and a reused call cost
        (:meth:`omnicompile.runtime.base.Runtime.call_costs`)."""
        self.costs = costs
        self.report = report
        report.policy = self.describe()

    def _reused_count(self, num_steps: int) -> int:
        got = self._counts.get(num_steps)
        if got is None:
            c = self.config
            r, ok = targets.reuse_count(self.target, self.costs, num_steps, c.warmup, c.cooldown)
            got = self._counts[num_steps] = r
            if not ok and self.report is not None:
                why = Reason("target_unreachable",
                             f"target_speedup {self.target:g} needs more reuses than {num_steps} steps allow "
                             f"(warm-up {c.warmup}, at most {targets.MAX_REUSE_RUN} reuses in a row): "
                             f"{r} reused, predicted "
                             f"{targets.predicted_speedup(r, num_steps, self.costs):.2f}x")
                if why not in self.report.refused:
                    self.report.refused.append(why)
                    log.warning("omnicompile: %s", why.message)
        return got

    def is_reuse_step(self, step: int, num_steps: Optional[int]) -> bool:
        c = self.config
        if c.reuse_steps is not None:
            return step in c.reuse_steps
        if self.target is not None:
            if num_steps is not None:
                return targets.uniform_reuse(step, num_steps, self._reused_count(num_steps), c.warmup, c.cooldown)
            interval = targets.interval_for(targets.reuse_share(self.target, self.costs))
        else:
            interval = c.interval
        if step < c.warmup or interval <= 1:
            return False
        if c.cooldown and (num_steps is None or step >= num_steps - c.cooldown):
            return False
        return (step - c.warmup) % interval != interval - 1

    def decide(self, step, num_steps, n_spans):
        return (self.is_reuse_step(step, num_steps),) * n_spans

    def variants(self, n_spans):
        c = self.config
        if c.reuse_steps is None and self.target is None and c.interval <= 1:
            return [(False,) * n_spans]
        return super().variants(n_spans)

    @property
    def extrapolate(self) -> bool:
        """A reused span extrapolates along its last two residuals, fitted online (the runtime:
        :class:`omnicompile.runtime.spans.SpanRuntime`; ``guard="variants"`` only)."""
        return bool(self.config.extrapolate)

    def describe(self):
        c = self.config
        ex = {"extrapolate": bool(c.extrapolate)}
        if c.reuse_steps is not None:
            return {"policy": self.name, "reuse_steps": list(c.reuse_steps), **ex}
        if self.target is not None:
            return {"policy": self.name, **targets.describe_target(self.target, self.costs), "warmup": c.warmup,
                    "cooldown": c.cooldown, **ex}
        return {"policy": self.name, "interval": c.interval, "warmup": c.warmup, "cooldown": c.cooldown, **ex}


class _TargetPreset(StaticPolicy):
    """A preset: the uniform schedule at a fixed target (``omnicompile.targets.PRESETS``)."""

    options = ("warmup", "cooldown", "target_speedup", "target_cost", "extrapolate")


@register_policy("quality")
class QualityPreset(_TargetPreset):
    """Preset ``quality``: the uniform schedule at 1.5x (cost model)."""
    default_target = targets.PRESETS["quality"]


@register_policy("balanced")
class BalancedPreset(_TargetPreset):
    """Preset ``balanced``: the uniform schedule at 2x (cost model)."""
    default_target = targets.PRESETS["balanced"]


@register_policy("fast")
class FastPreset(_TargetPreset):
    """Preset ``fast``: the uniform schedule at 2.5x (cost model)."""
    default_target = targets.PRESETS["fast"]
