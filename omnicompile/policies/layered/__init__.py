"""Policy ``layered``: OmniCache's Layered Cache — a budgeted (unit, step) schedule, refined on
the unit dependency graph (``../shared/seeds/002_…`` §3.4, Algorithms 1–3, Appendix B).

1. **Units and costs.**  Every unit of every block group (one transformer block, roughly) is
   a candidate; the rewrite can reuse it when it is a span on its own
   (``passes.spans.make_span(gm, group, i, i)``).  Its latency is the cost model's FLOPs
   (:mod:`omnicompile.graphs.cost`, symbolic in the graph's sizes, evaluated at the traced
   ones); the unit DAG (:func:`omnicompile.graphs.dag.unit_dag`) records which units read
   which, and the side computations only units consume.
2. **Profile** — the quality cost ``Δ(u, t)`` of reusing unit ``u`` at step ``t`` (all else
   computed), two ways (:func:`~.profiling.profile`; ``omnicache profile SPEC``;
   ``python bench/profile_layered.py`` for the reference model):

   * ``method="final"`` — the paper's: one generation per pair, ``Δ`` = relative L2 deviation
     of the final sample from the uncached one, ``units × (steps - 1) + 1`` generations
     (reference model: 6 units × 28 steps, 163 generations, 3–8 minutes on 2 CPU cores);
   * ``method="residual"`` — one generation computed in full, ``Δ`` = the L2 change of the
     unit's residual from the previous step (the error a reuse injects into the stream).
     ``calibrate="first"``, ``oc.calibrate(fn)`` and ``omnicache calibrate`` use it.  It is
     the weaker signal: Spearman rank correlation 0.53 with ``final`` on the reference model
     (a ``final`` profile stores the proxy and the correlation), and its plans land near the
     uniform-interval curve where ``final``'s land above it (bench/profile_layered.py).

   Weight ``w = Δ / latency``; profiles are JSON (never pickle) and carry the DAG, so a
   schedule can be planned without the model (``omnicache plan``).
3. **Schedule** — :func:`omnicompile.graphs.plan.plan_layered`: Algorithm 1 (greedy by lowest
   ``w`` until ``1 - 1/target_speedup`` of the generation's FLOPs is saved, caching interval
   ``cache_interval``; the ``k``-th reuse in a row priced ``k·w``) and Algorithms 2–3 (prune,
   align with parents, drop dead side work, dead cache writes, coalesce adjacent units with
   identical rows into one guarded region).  On the reference model (bench/profile_layered.py,
   20 images, PSNR against the uncached ones): 2.06x at 42.3 dB and 2.72x at 37.9 dB, where
   the uniform intervals give 1.86x at 43.0 dB and 2.52x at 37.1 dB.
4. **Runtime** — the plan is static: per step, each region computes or reuses; the runtime
   picks the compiled variant of that step's row from the host (no device sync), one variant
   per distinct row, compiled up front.  Regions that never reuse stay in the main graph.

``calibrate`` (one option for all calibrated policies) is ``"first"`` (profile the first
generation of each graph with ``method="residual"``, then plan), a JSON path (a profile — planned with
this config's ``target_speedup``/``cache_interval`` — or a schedule, used as it is), or None
(every step computed until ``oc.calibrate(fn)`` or :func:`profile` runs).  Files are keyed
by a fingerprint of the graph's op sequence and by its unit names; a mismatch, a malformed
field or a schedule that breaks the planner's invariants raises
:class:`~omnicompile.errors.ScheduleError` naming the field.

A plan is for one step count: a generation of another length (``num_steps`` or the previous
generation's) computes every step and the report says why.

Modules: :mod:`.units` (units, single-unit spans, DAG, costs), :mod:`.files` (profile and
schedule JSON), :mod:`.policy` (the policy, planning), :mod:`.runtime` (the plan's spans and
the profiling modes), :mod:`.proxy` (the one-generation profile: the calibrator),
:mod:`.profiling` (``profile()``, the paper's per-pair profile).
"""
from omnicompile.policies.layered.files import (
    METHODS, PROFILE_FORMAT, SCHEDULE_FORMAT, Profile, Schedule, dag_from_json, dag_to_json, load_file,
)
from omnicompile.policies.layered.policy import LayeredPolicy, plan_profile, plan_text
from omnicompile.policies.layered.profiling import profile, spearman
from omnicompile.policies.layered.proxy import ResidualProxy
from omnicompile.policies.layered.runtime import LayeredRuntime
from omnicompile.policies.layered.units import UnitGraph, analyze_units, unit_fingerprint

__all__ = ["LayeredPolicy", "LayeredRuntime", "ResidualProxy", "UnitGraph", "Profile", "Schedule", "analyze_units",
           "profile", "spearman", "plan_profile", "plan_text", "load_file", "dag_to_json", "dag_from_json",
           "unit_fingerprint", "PROFILE_FORMAT", "SCHEDULE_FORMAT", "METHODS"]
