"""The trajectory policy and its presets: the schedule a calibration gives."""
from __future__ import annotations

import math

from typing import Optional

from omnicompile import targets
from omnicompile.errors import ConfigError
from omnicompile.graphs.schedule import MAX_STEPS, select_reuse_steps
from omnicompile.passes.common import Reason
from omnicompile.policies.trajectory.calibration import Calibration, check_steps
from omnicompile.policies.trajectory.runtime import TrajectoryRuntime
from omnicompile.policy import Policy
from omnicompile.registry import register_policy

__all__ = ["TrajectoryPolicy", "TrajectorySlow", "TrajectoryFast", "MIN_STEPS", "MAX_STEPS"]

#: runs with this many steps or fewer are not cached (too few steps to skip any)
MIN_STEPS = 8


@register_policy("trajectory")
class TrajectoryPolicy(Policy):
    """Trajectory-guided global reuse (see :mod:`omnicompile.policies.trajectory`)."""

    guards = ("variants",)
    options = ("budget", "calibrate", "correction", "curvature", "min_gap", "max_run", "run_correction",
               "correction_band", "warmup", "cooldown", "reuse_steps", "target_speedup", "target_cost")
    calibratable = True
    default_budget: Optional[float] = None   # presets set these
    default_max_run: Optional[int] = None

    #: what a computed and a reused call cost (the runtime binds it: omnicompile.targets)
    costs: targets.CallCosts = targets.CallCosts(1.0, 0.0)

    @classmethod
    def validate(cls, config) -> None:
        if config.is_set("target_speedup") and config.is_set("budget"):
            raise ConfigError("budget", config.budget, "target_speedup sets the trajectory budget itself; "
                              "set either target_speedup or budget, not both")
        if config.num_steps is not None and config.num_steps > MAX_STEPS:
            raise ConfigError("num_steps", config.num_steps, f"policy {config.policy!r} schedules generations of "
                              f"at most {MAX_STEPS} steps (omnicompile.graphs.schedule.MAX_STEPS)")

    def make_runtime(self, ctx):
        return TrajectoryRuntime(ctx, self)

    def bind_cost(self, costs: targets.CallCosts, report) -> None:
        """The runtime's cost model: what a computed and a reused call cost
        (:meth:`omnicompile.runtime.base.Runtime.call_costs`)."""
        self.costs = costs
        report.policy = self.describe()

    @property
    def target(self) -> Optional[float]:
        c = self.config
        return float(c.target_speedup) if c.is_set("target_speedup") else None

    @property
    def budget(self) -> float:
        c = self.config
        if self.target is not None:       # the share of all steps the target needs (capped)
            return min(targets.reuse_share(self.target, self.costs),
                       targets.MAX_REUSE_RUN / (targets.MAX_REUSE_RUN + 1))
        if self.default_budget is not None and not c.is_set("budget"):
            return self.default_budget
        return c.budget

    @property
    def max_run(self) -> Optional[int]:
        c = self.config
        if self.target is not None and not c.is_set("max_run"):
            return targets.run_for(self.budget)
        if self.default_max_run is not None and not c.is_set("max_run"):
            return self.default_max_run
        return c.max_run

    def schedule(self, cal: Calibration) -> tuple[list[int], Optional[Reason]]:
        """The reuse steps for a calibration (and why there are none, where that is a rule)."""
        n = cal.num_steps
        check_steps(self.name, n, "the calibration")
        if n <= MIN_STEPS:
            return [], Reason("few_steps", f"{n} steps: runs of {MIN_STEPS} steps or fewer are not cached")
        c = self.config
        if c.reuse_steps is not None:       # an explicit schedule, corrected with the calibrated gammas
            return [s for s in c.reuse_steps if 1 <= s < n], None
        if c.curvature == "uniform":        # the budget's reuses spread evenly, corrected
            cool = max(1, c.cooldown)
            r = min(round(self.budget * n), targets.reuse_cap(n, c.warmup, cool))
            return [s for s in range(n) if targets.uniform_reuse(s, n, r, c.warmup, cool)], None
        budget = self.budget
        if self.target is not None:     # the nearest whole count of reuses, as static's uniform schedule
            budget = round(budget * n) / n
        run = self.max_run
        while True:
            steps = select_reuse_steps(cal.scores(c.curvature), budget, min_gap=c.min_gap,
                                       warmup=c.warmup, cooldown=max(1, c.cooldown), max_run=run)
            # a target sized the runs by its share alone: where warm-up, cool-down and the phases
            # leave too little room for its count, longer runs (up to MAX_REUSE_RUN) hold it
            if (self.target is None or c.is_set("max_run") or run is None or run >= targets.MAX_REUSE_RUN
                    or len(steps) >= math.floor(budget * n + 1e-9)):
                return steps, None
            run += 1

    def describe(self):
        c = self.config
        d = {"policy": self.name, "budget": self.budget, "curvature": c.curvature, "min_gap": c.min_gap,
             "max_run": self.max_run, "correction": c.correction, "calibrate": c.calibrate}
        if self.target is not None:
            d.update(targets.describe_target(self.target, self.costs))
        if c.correction_band is not None:
            d["correction_band"] = list(c.correction_band)
        if c.reuse_steps is not None:
            d["reuse_steps"] = list(c.reuse_steps)
        return d


@register_policy("trajectory-slow")
class TrajectorySlow(TrajectoryPolicy):
    """Preset: about 2x on the whole-stack span (budget 0.5, runs of up to 2 reuses; reference
    model: 14 of 28 steps reused, 51.5 dB)."""
    default_budget = 0.5
    default_max_run = 2


@register_policy("trajectory-fast")
class TrajectoryFast(TrajectoryPolicy):
    """Preset: about 2.5x on the whole-stack span (budget 0.7, runs of up to 3 reuses; reference
    model: 19 of 28 steps reused, 42.8 dB)."""
    default_budget = 0.7
    default_max_run = 3
