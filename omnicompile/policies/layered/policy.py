"""The layered policy: options, and planning a profile into a refined (unit, step) plan."""
from __future__ import annotations

from omnicompile.graphs.plan import LayeredPlan, plan_layered
from omnicompile.policies.layered.files import Profile, dag_from_json
from omnicompile.policies.layered.runtime import LayeredRuntime
from omnicompile.policy import Policy
from omnicompile.registry import register_policy

__all__ = ["LayeredPolicy", "plan_profile", "plan_text"]


def plan_profile(prof: Profile, target_speedup: float, interval: int, dag=None) -> LayeredPlan:
    """The refined plan of a profile (on ``dag``, default the profile's own)."""
    dag = dag if dag is not None else dag_from_json(prof.dag)
    return plan_layered(dag, prof.weights(dag), target_speedup, interval)


def plan_text(plan: LayeredPlan, dag) -> str:
    """The plan as text: one row of marks per unit, then the regions (``omnicache plan``)."""
    lines = [f"plan over {plan.steps} steps: ideal speedup {plan.ideal_speedup:.2f}x "
             f"({plan.saved_fraction:.0%} of FLOPs saved){'' if plan.reached else ' — target NOT reached'}, "
             f"{len(plan.regions)} region(s), {len(plan.rows())} distinct step row(s)"]
    width = max(len(u) for u in plan.units)
    for u, m in plan.marks().items():
        lines.append(f"  {u:<{width}}  {m}")
    lines.append("  regions: " + ", ".join("+".join(r.units) for r in plan.regions))
    return "\n".join(lines)


@register_policy("layered")
class LayeredPolicy(Policy):
    """OmniCache's Layered Cache (see :mod:`omnicompile.policies.layered`).  The plan, the
    profile and the profiling modes live in the runtime (:class:`LayeredRuntime`)."""

    options = ("target_speedup", "cache_interval", "calibrate", "target_cost")
    calibratable = True

    @property
    def target(self) -> float:
        """The target speedup (the backend times the graph for ``target_cost="measured"``)."""
        return float(self.config.target_speedup)

    def make_runtime(self, ctx):
        return LayeredRuntime(ctx, self)

    def plan(self, prof: Profile, dag=None) -> LayeredPlan:
        """The plan of ``prof`` under this config's ``target_speedup`` and ``cache_interval``."""
        return plan_profile(prof, self.config.target_speedup, self.config.cache_interval, dag)

    def describe(self):
        c = self.config
        return {"policy": "layered", "target_speedup": c.target_speedup, "cache_interval": c.cache_interval,
                "calibrate": c.calibrate}
