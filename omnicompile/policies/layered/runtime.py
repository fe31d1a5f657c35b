"""The layered runtime: the plan's regions as guarded spans, host-decided per step.

A :class:`~omnicompile.runtime.spans.SpanRuntime` whose schedule is a plan: one span per region
that reuses at least once (regions that always compute stay in the main graph), one compiled
variant per distinct step row.  Plans are kept per model and step count (the calibrator's
results: a profile, planned with this config's target, or a schedule): a generation runs the
plan for its model and step count, and a generation of a step count without one computes every
step (the report says why).  A calibration generation (``calibrate="first"``) and the
profiling modes run one span per reusable unit: ``mode="compute"`` (all computed: the
profile's reference generation) and ``mode=("probe", span, step)`` (reuse one unit at one
step: :func:`omnicompile.policies.layered.profiling.profile`, method ``final``).
"""
from __future__ import annotations

import logging
from typing import Any, Optional

from omnicompile.errors import RewriteError, ScheduleError
from omnicompile.graphs.plan import LayeredPlan
from omnicompile.passes.common import Reason
from omnicompile.passes.spans import Span
from omnicompile.policies.layered.files import Schedule, dag_from_json, same_structure
from omnicompile.policies.layered.proxy import ResidualProxy
from omnicompile.policies.layered.units import UnitGraph, analyze_units
from omnicompile.runtime.spans import SpanRuntime

log = logging.getLogger("omnicompile")

__all__ = ["LayeredRuntime"]


class LayeredRuntime(SpanRuntime):
    def __init__(self, ctx, policy):
        self.policy = policy
        self.config, self.report = ctx.config, ctx.report   # (read by the file checks, before Runtime.__init__)
        self.ug: UnitGraph = analyze_units(ctx.gm, ctx.analysis, ctx.node_seconds)
        if not any(sp is not None for sp in self.ug.unit_spans.values()):
            first = self.ug.refused[0] if self.ug.refused else None
            raise RewriteError("no_reusable_unit", "layered: no unit can be reused on its own"
                               + (f" ({first})" if first else ""), first.subject if first else "")
        #: "plan" (follow the plans), "compute" (every unit computed: profiling baseline) or
        #: ("probe", span index, step) (reuse one unit at one step)
        self.mode: Any = "plan"
        self._plans: dict[int, tuple] = {}        # id(result) -> (result, plan, spans, rows)
        self._ready = False                        # (compiling waits for Runtime.__init__)
        self.calibrator = ResidualProxy(self, ctx.config.calibrate)
        c = ctx.config
        if c.calibrate not in (None, "first"):
            self.calibrator.load(c.calibrate)
        first = self.calibrator.result
        super().__init__(ctx, policy, self.plan_of(first)[2] if first is not None else self.unit_spans())
        for r in self.ug.refused:
            if r not in self.report.refused:
                self.report.refused.append(r)
        self._ready = True
        if first is None and c.calibrate is None:
            self.report.refused.append(Reason("not_calibrated", "calibrate=None and no profile given: every step is "
                                              "computed until oc.calibrate(fn) or "
                                              "omnicompile.policies.layered.profile runs"))

    # ---------------------------------------------------------------- spans
    def unit_spans(self) -> list[Span]:
        """One span per reusable unit (profiling, calibration, no plan)."""
        ug = self.ug
        return [ug.unit_spans[u] for u in ug.units if ug.unit_spans[u] is not None]

    def plan_spans(self, plan: LayeredPlan) -> tuple[list[Span], list[tuple]]:
        """One span per region of ``plan`` that reuses at least once (regions that always
        compute stay in the main graph), with its row; a region the rewrite refuses as a whole
        is split into its units."""
        ug = self.ug
        spans, rows = [], []
        for r in plan.regions:
            if not any(r.row) or not all(ug.dag.nodes[u]["cacheable"] for u in r.units):
                continue
            sp = ug.span(r.chain, r.first, r.last)
            if sp is not None:
                spans.append(sp)
                rows.append(r.row)
            else:
                for u in r.units:
                    spans.append(ug.unit_spans[u])
                    rows.append(r.row)
        return spans, rows

    @property
    def plan(self) -> Optional[LayeredPlan]:
        """The plan of the most recent profile or schedule (None without one)."""
        res = self.calibrator.result
        return self.plan_of(res)[1] if res is not None else None

    def plan_of(self, result) -> tuple:
        """(result, plan, spans, rows) of a profile or schedule (planned once)."""
        got = self._plans.get(id(result))
        if got is None or got[0] is not result:
            plan = result.plan(self.ug.dag) if isinstance(result, Schedule) else self.policy.plan(result, self.ug.dag)
            if not plan.reached:
                log.warning("omnicache layered: target speedup %.2fx is out of reach under cache_interval=%d; "
                            "the plan reaches %.2fx", plan.target or self.config.target_speedup,
                            self.config.cache_interval, plan.ideal_speedup)
            spans, rows = self.plan_spans(plan)
            got = self._plans[id(result)] = (result, plan, spans, rows)
        return got

    def prepare(self, result) -> None:
        """A new profile or schedule: compile its plan's variants now (one per distinct step
        row), not one by one inside the next generation."""
        if self._ready and self.mode == "plan":
            self.build(self.plan_of(result)[2])

    def spans_for(self, call) -> list:
        data = call.session.data
        res = None
        if self.mode == "plan" and not self.calibrator.calibrating(call):
            res = self.calibrator.lookup_call(call)
        if res is None:
            data["rows"] = None
            return self.unit_spans()
        _, _, spans, rows = self.plan_of(res)
        data["rows"] = rows
        return spans

    # ---------------------------------------------------------------- files
    def check_file(self, obj, source: str = "") -> None:
        """Raise ScheduleError unless ``obj`` (a Profile or Schedule) was made for this graph."""
        ug, c = self.ug, self.config
        kind = "schedule" if isinstance(obj, Schedule) else "profile"
        if obj.fingerprint != ug.fingerprint or list(obj.units) != ug.units:
            raise ScheduleError(f"layered {kind} field 'fingerprint': {source or 'it'} was made for another model or "
                                f"graph (units {obj.units[:3]}..., this graph: {ug.units[:3]}...); profile this model")
        if not same_structure(dag_from_json(obj.dag, kind), ug.dag):
            raise ScheduleError(f"layered {kind} field 'dag': its unit graph differs from this graph's")
        if c.num_steps is not None and c.num_steps != obj.num_steps:
            raise ScheduleError(f"layered {kind} field 'num_steps': made for {obj.num_steps} steps, option "
                                f"num_steps is {c.num_steps}")

    # ---------------------------------------------------------------- the schedule
    def want(self, step, num_steps, spans, call=None):
        n = len(spans)
        mode = self.mode
        if isinstance(mode, tuple):
            _, k, t = mode
            return tuple(i == k and step == t for i in range(n))
        if mode == "compute":
            return (False,) * n
        rows = call.session.data.get("rows") if call is not None else self._preview_rows(num_steps, spans)
        if not rows or len(rows) != n or not 0 <= step < len(rows[0]):
            return (False,) * n
        return tuple(row[step] for row in rows)

    def _preview_rows(self, num_steps, spans):
        res = self.calibrator.for_steps(num_steps) if num_steps is not None else None
        if res is None:
            return None
        _, _, pspans, rows = self.plan_of(res)
        return rows if [s.name for s in pspans] == [s.name for s in spans] else None

    def variants(self, spans):
        n = len(spans)
        for res, plan, pspans, rows in self._plans.values():
            if [s.name for s in pspans] == [s.name for s in spans] and self.mode == "plan":
                seen: dict = {}
                for t in range(plan.steps):
                    seen.setdefault(tuple(row[t] for row in rows), None)
                return list(seen)
        return [(False,) * n]

    # ---------------------------------------------------------------- calls
    def generation_started(self, call) -> None:
        super().generation_started(call)
        if self.mode != "plan" or self.calibrator.calibrating(call) or call.num_steps is None:
            return
        if self.calibrator.lookup_call(call) is None and self.calibrator.results:
            have = self.calibrator.step_counts()
            why = Reason("plan_steps_mismatch", f"the layered plans are for {', '.join(map(str, have))} steps, this "
                         f"generation has {call.num_steps}: every step is computed")
            if why not in self.report.refused:
                self.report.refused.append(why)
                log.warning("omnicache: graph %d: %s", self.report.graph_id, why.message)

    def generation_plan(self, call) -> str:
        if self.mode != "plan":
            return f"profiling ({self.mode if isinstance(self.mode, str) else 'one unit at one step'})"
        res, words = self.calibrator.for_generation(call, "profile")
        if res is None:
            return words
        plan = self.plan_of(res)[1]
        return (f"plan of {plan.steps} steps ({self.calibrator.source_of(call.model, plan.steps)}; ideal "
                f"{plan.ideal_speedup:.2f}x, {len(plan.rows())} step rows)")

    def after_call(self, call, args, outs) -> None:
        if self.calibrator.calibrating(call):
            self.calibrator.record(call, args, outs, call.slots.get(0))

    def preview_spans(self, steps: int) -> list:
        res = self.calibrator.for_steps(steps)
        return self.plan_of(res)[2] if res is not None else self.unit_spans()

    def preview_note(self, steps):
        if self.calibrator.for_steps(steps) is not None:
            return None
        have = self.calibrator.step_counts()
        if not have:
            return (f"policy {self.policy.name!r} has no plan yet: every step is computed until a profile runs "
                    "(option calibrate='first' profiles the first generation)")
        return (f"the plans are for {', '.join(map(str, have))} steps: a generation of {steps} computes every step "
                "(calibrate='first' profiles its first generation of that length)")
