"""``target_speedup`` for every policy: from "2x" to each policy's own knobs.

A reused step skips the guarded spans: it saves the fraction ``c`` of a computed step.  With
``target_cost="measured"`` (the default) ``c`` is the measured share of an eager call's time spent
in the spans' nodes (:mod:`omnicompile.timing`: one eager forward at compile time, each node
timed); with ``target_cost="flops"`` it is the share of the FLOPs (``c = sum of the spans' FLOPs
/ the graph's FLOPs per call``, both from the cost model the report uses; deterministic, but it
overstates what a reuse saves where the ops outside the spans cost time and few FLOPs).  Over ``N`` steps with ``R`` reuses the generation costs ``1 - R c / N`` of the uncached
one, so a target ``s`` asks for

    share = R / N = (1 - 1/s) / c        (of all steps)

Each policy turns that share into its knobs:

* ``static`` (and the presets ``quality`` / ``balanced`` / ``fast``): the uniform schedule of
  that share — ``R`` reuses spread evenly over the steps after warm-up
  (:func:`uniform_reuse`; share 1/2 is interval 2, 2/3 interval 3, 3/5 "R R C R C" ...).  With
  the step count unknown: the integer interval nearest to the share (:func:`interval_for`).
* ``trajectory``: its budget (a share of all steps) is the share, and runs of reuses long enough
  to hold it (:func:`run_for`) unless ``max_run`` is set.
* ``probe``: a reuse *budget* over the steps it may decide: the threshold is paced inside the
  graph towards the share (:mod:`omnicompile.passes.probe`).
* ``layered``: its own plan (Algorithm 1 already reads ``target_speedup``).

The cost of a call (:class:`CallCosts`, relative to the uncached call): the model above is
``compute = 1`` and ``reuse = 1 - c``.  With ``target_cost="measured"`` the policies that build
their graphs up front (``static`` and its presets, ``trajectory``, ``probe``) also time the
rewritten graph itself at compile time — every span computed, every span reused — against the
graph it was rewritten from (:class:`omnicompile.timing.CallTimer`, eager), so the cache's own
work counts: the residuals it stores, the extrapolation, the probe's block and its in-graph
measurements (on the suite's small models a probe call costs 1.1x an uncached one computed and
0.3x reused, where the node share says 1.0x and 0.18x).  Then

    share = (compute - 1/s) / (compute - reuse)

A target the policy cannot reach (at most :data:`MAX_REUSE_RUN` reuses between two computed
steps; warm-up and the last steps stay computed) is capped and reported (``target_unreachable``)
with the speedup the cost model predicts.  Neither model counts the host's per-call work (the
runtime, Dynamo's guards); on a small model on a CPU the measured speedup is a little lower
(``bench/RESULTS.md``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

__all__ = ["MAX_REUSE_RUN", "CallCosts", "saved_fraction", "reuse_share", "reuse_cap", "reuse_count", "uniform_reuse", "interval_for",
           "run_for", "predicted_speedup", "PRESETS"]

#: the most reuses in a row any target schedule uses (a cache refreshed at least every 5 steps):
#: with 4, 3x is reachable on 28 steps where a reuse skips 95 % of a call (20 of the 26 steps
#: after warm-up)
MAX_REUSE_RUN = 4

#: preset policies defined by their target (the uniform schedule: ``omnicompile.policies.static``)
PRESETS = {"quality": 1.5, "balanced": 2.0, "fast": 2.5}


@dataclasses.dataclass(frozen=True)
class CallCosts:
    """What a call costs, relative to the uncached call: with every span computed (the cache's
    own work included) and with every span reused.  ``measured``: timed on the rewritten graph
    (:class:`omnicompile.timing.CallTimer`); else the share model ``(1, 1 - c)``."""
    compute: float = 1.0
    reuse: float = 0.0
    measured: bool = False

    @classmethod
    def of(cls, costs: Union["CallCosts", float]) -> "CallCosts":
        """``costs`` as it is, or a saved fraction ``c`` as ``(1, 1 - c)``."""
        return costs if isinstance(costs, CallCosts) else cls(1.0, 1.0 - float(costs))

    @property
    def saved(self) -> float:
        """What a reuse saves against a computed call (in uncached calls)."""
        return max(1e-9, self.compute - self.reuse)


def saved_fraction(spans, flops_per_call: int, node_seconds: Optional[dict] = None) -> float:
    """``c``: the fraction of a call a reuse of every span in ``spans`` skips.  With
    ``node_seconds`` (``target_cost="measured"``: each node's eager seconds on this machine,
    :func:`omnicompile.timing.node_seconds`) the measured share of the time spent in the spans'
    nodes (those a reuse skips: not the ones it keeps); else the share of the FLOPs (1.0 when the
    graph's FLOPs are unknown)."""
    if node_seconds:
        total = sum(node_seconds.values())
        skipped = {n.name for s in spans for n in s.nodes} - {n.name for s in spans for n in s.keep}
        spent = sum(v for k, v in node_seconds.items() if k in skipped)
        if total > 0 and spent > 0:
            return min(1.0, spent / total)
    saved = sum(int(s.flops) for s in spans)
    if flops_per_call <= 0 or saved <= 0:
        return 1.0
    return min(1.0, saved / flops_per_call)


def reuse_share(target: float, costs: Union[CallCosts, float]) -> float:
    """The share of all steps to reuse for ``target`` (uncapped; > 1 means unreachable);
    ``costs``: :class:`CallCosts` or the saved fraction ``c``."""
    k = CallCosts.of(costs)
    return max(0.0, k.compute - 1.0 / target) / k.saved


def reuse_cap(num_steps: int, warmup: int, cooldown: int) -> int:
    """The most reuses a generation holds: :data:`MAX_REUSE_RUN` per computed step between
    warm-up and cool-down."""
    return (max(0, num_steps - warmup - cooldown) * MAX_REUSE_RUN) // (MAX_REUSE_RUN + 1)


def reuse_count(target: float, costs: Union[CallCosts, float], num_steps: int, warmup: int,
                cooldown: int) -> tuple[int, bool]:
    """(reused steps, reachable) for a generation of ``num_steps``: the nearest count to the share,
    capped at :data:`MAX_REUSE_RUN` reuses per computed step after warm-up."""
    cap = reuse_cap(num_steps, warmup, cooldown)
    want = round(reuse_share(target, costs) * num_steps)
    return max(0, min(want, cap)), want <= cap


def uniform_reuse(step: int, num_steps: int, reused: int, warmup: int, cooldown: int) -> bool:
    """Is ``step`` one of ``reused`` reuses spread evenly over ``[warmup, num_steps - cooldown)``?
    The first step after warm-up is reused (its cache is the last warm-up step's), then every
    step where ``ceil(j R / E)`` moves on (``j``: the step's index in that range of ``E``)."""
    e = num_steps - warmup - cooldown
    j = step - warmup
    if reused <= 0 or e <= 0 or not 0 <= j < e:
        return False
    return -(-(j + 1) * reused // e) > -(-j * reused // e)


def interval_for(share: float) -> int:
    """The static interval whose share of reused steps, ``(i - 1) / i``, is nearest ``share``
    (1 to ``MAX_REUSE_RUN + 1``)."""
    if share <= 0:
        return 1
    best = min(range(1, MAX_REUSE_RUN + 2), key=lambda i: abs((i - 1) / i - share))
    return best


def run_for(share: float) -> int:
    """The shortest run of reuses (``max_run``) that can hold ``share`` of the steps reused with
    one computed step between runs: ``run / (run + 1) >= share``."""
    if share <= 0.5:
        return 1
    if share >= MAX_REUSE_RUN / (MAX_REUSE_RUN + 1):
        return MAX_REUSE_RUN
    return min(MAX_REUSE_RUN, math.ceil(share / (1.0 - share)))


def predicted_speedup(reused: int, num_steps: int, costs: Union[CallCosts, float]) -> float:
    """The cost model's speedup of ``reused`` reuses in ``num_steps`` steps."""
    if num_steps <= 0:
        return 1.0
    k = CallCosts.of(costs)
    return 1.0 / max(1e-9, k.compute - reused * k.saved / num_steps)


def describe_target(target: Optional[float], costs: Union[CallCosts, float]) -> dict:
    """What a policy's ``describe()`` adds for a target."""
    if target is None:
        return {}
    k = CallCosts.of(costs)
    d = {"target_speedup": target, "saved_per_reuse": round(k.saved, 4),
         "share": round(min(1.0, reuse_share(target, k)), 4)}
    if k.measured:
        d["call_cost"] = {"computed": round(k.compute, 4), "reused": round(k.reuse, 4)}
    return d
