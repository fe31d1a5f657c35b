"""The layered runtime: the plan's regions as guarded spans, host-decided per step.

A :class:`~omnicompile.runtime.spans.SpanRuntime` whose schedule is the plan (one row per
region that reuses at least once; regions that always compute stay in the main graph; one
compiled variant per distinct step row).  It also runs the profiling modes: ``"compute"``
(one span per reusable unit, all computed: the profile's reference generation and the proxy
recording of ``calibrate="first"``) and ``("probe", span, step)`` (reuse one unit at one
step: :func:`omnicompile.policies.layered.profiling.profile`, method ``final``).

A plan is for one step count: a generation of another length (``num_steps`` or the previous
generation's) computes every step and the report says why.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

from omnicompile.errors import RewriteError, ScheduleError
from omnicompile.graphs.plan import LayeredPlan
from omnicompile.passes.common import Reason
from omnicompile.passes.spans import Span
from omnicompile.policies.layered.files import Profile, Schedule, dag_from_json, same_structure
from omnicompile.policies.layered.proxy import ResidualProxy
from omnicompile.policies.layered.units import UnitGraph, analyze_units
from omnicompile.runtime.spans import SpanRuntime

log = logging.getLogger("omnicompile")

__all__ = ["LayeredRuntime"]


class LayeredRuntime(SpanRuntime):
    def __init__(self, ctx, policy):
        self.policy = policy
        self.config, self.report = ctx.config, ctx.report   # (read by the file checks, before Runtime.__init__)
        self.spans: list = []            # chosen below, once the file (if any) is read
        self.ug: UnitGraph = analyze_units(ctx.gm, ctx.analysis)
        if not any(sp is not None for sp in self.ug.unit_spans.values()):
            first = self.ug.refused[0] if self.ug.refused else None
            raise RewriteError("no_reusable_unit", "layered: no unit can be reused on its own"
                               + (f" ({first})" if first else ""), first.subject if first else "")
        self.plan: Optional[LayeredPlan] = None
        self.profile: Optional[Profile] = None
        #: where the plan came from: a file path, "residual" (calibrated on a generation), "profile"
        self.source = ""
        #: "plan" (follow the plan), "compute" (every unit computed: profiling baseline, proxy
        #: recording) or ("probe", span index, step) (reuse one span at one step)
        self.mode: Any = "plan"
        self.span_rows: list[tuple] = []
        self.calibrator = ResidualProxy(self, ctx.config.calibrate)
        c = ctx.config
        if c.calibrate not in (None, "first"):
            self.calibrator.load(c.calibrate)
        super().__init__(ctx, policy, self.spans_for_plan() if self.plan is not None else self.unit_spans())
        for r in self.ug.refused:
            if r not in self.report.refused:
                self.report.refused.append(r)
        if self.plan is None and c.calibrate is None:
            self.report.refused.append(Reason("not_calibrated", "calibrate=None and no profile given: every step is "
                                              "computed until oc.calibrate(fn) or omnicompile.policies.layered.profile runs"))

    # ---------------------------------------------------------------- spans
    def unit_spans(self) -> list[Span]:
        """One span per reusable unit (profiling)."""
        ug = self.ug
        self.span_rows = []
        return [ug.unit_spans[u] for u in ug.units if ug.unit_spans[u] is not None]

    def spans_for_plan(self) -> list[Span]:
        """One span per region of the plan that reuses at least once (regions that always
        compute stay in the main graph); a region the rewrite refuses as a whole is split
        into its units."""
        ug, plan = self.ug, self.plan
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
        self.span_rows = rows
        return spans

    def switch_spans(self, spans: list) -> None:
        """Guard other spans (per unit for profiling, per region for the plan): the compiled
        graphs and the caches are dropped, the schedule's variants compiled."""
        if [s.name for s in spans] == [s.name for s in self.spans]:
            return
        self.set_spans(spans)
        self.forget_graphs()
        self.slots.clear()
        self.build()

    def use_plan(self) -> None:
        self.mode = "plan"
        self.switch_spans(self.spans_for_plan() if self.plan is not None else self.unit_spans())

    def use_units(self, mode: Any = "compute") -> None:
        self.mode = mode
        self.switch_spans(self.unit_spans())

    # ---------------------------------------------------------------- plans
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

    def use_file(self, obj, source: str = "", switch: bool = True) -> None:
        """Plan from a profile (this config's target) or take a schedule as it is."""
        self.check_file(obj, source)
        if isinstance(obj, Schedule):
            self.set_plan(obj.plan(self.ug.dag), source, switch)
        else:
            self.set_profile(obj, source, switch)

    def set_profile(self, prof: Profile, source: str, switch: bool = True) -> None:
        self.profile = prof
        self.set_plan(self.policy.plan(prof, self.ug.dag), source, switch)

    def set_plan(self, plan: LayeredPlan, source: str = "", switch: bool = True) -> None:
        self.plan = plan
        self.source = source
        if not plan.reached:
            log.warning("omnicache layered: target speedup %.2fx is out of reach under cache_interval=%d; "
                        "the plan reaches %.2fx", plan.target or self.config.target_speedup,
                        self.config.cache_interval, plan.ideal_speedup)
        if switch and self.spans:        # (during __init__ the spans are chosen afterwards)
            self.use_plan()

    # ---------------------------------------------------------------- the schedule
    def want(self, step, num_steps):
        n = len(self.spans)
        mode = self.mode
        if isinstance(mode, tuple):
            _, k, t = mode
            return tuple(i == k and step == t for i in range(n))
        if mode == "compute" or self.plan is None:
            return (False,) * n
        if num_steps is not None and num_steps != self.plan.steps:
            return (False,) * n      # a plan is for one step count (the runtime reports it)
        if not 0 <= step < self.plan.steps or len(self.span_rows) != n:
            return (False,) * n
        return tuple(row[step] for row in self.span_rows)

    def variants(self):
        n = len(self.spans)
        if self.plan is None or len(self.span_rows) != n or self.mode != "plan":
            return [(False,) * n]
        seen: dict = {}
        for t in range(self.plan.steps):
            seen.setdefault(tuple(row[t] for row in self.span_rows), None)
        return list(seen)

    # ---------------------------------------------------------------- calls
    def advance(self, args):
        call = super().advance(args)
        plan, ns = self.plan, self.num_steps
        if call.new and plan is not None and self.mode == "plan" and ns is not None and ns != plan.steps:
            why = Reason("plan_steps_mismatch", f"the layered plan is for {plan.steps} steps, this generation "
                         f"has {ns}: every step is computed")
            if why not in self.report.refused:
                self.report.refused.append(why)
                log.warning("omnicache: graph %d: %s", self.report.graph_id, why.message)
        return call

    def after_call(self, call, args, outs) -> None:
        if self.calibrator.active:
            self.calibrator.record(call.step, call.slot, args, outs, self.slots.get(0))

    def preview_note(self, steps):
        if self.plan is None:
            return (f"policy {self.policy.name!r} has no plan yet: every step is computed until a profile runs "
                    "(option calibrate='first' profiles the first generation)")
        if self.plan.steps != steps:
            return f"the plan is for {self.plan.steps} steps: a generation of {steps} computes every step"
        return None
