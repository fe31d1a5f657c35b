"""Policy ``layered``: OmniCache's Layered Cache — a budgeted (unit, step) schedule, refined on
the unit dependency graph (``../shared/seeds/002_…`` §3.4, Algorithms 1–3, Appendix B).

1. **Units and costs.**  Every unit of every block group (one transformer block, roughly) is
   a candidate; the rewrite can reuse it when it is a span on its own
   (``passes.spans.make_span(gm, group, i, i)``).  Its latency is the cost model's FLOPs
   (:mod:`omnicompile.graphs.cost`, symbolic in the graph's sizes, evaluated at the traced
   ones); the unit DAG (:func:`omnicompile.graphs.plan.unit_dag`) records which units read
   which, and the side computations only units consume.
2. **Profile** — the quality cost ``Δ(u, t)`` of reusing unit ``u`` at step ``t`` (all else
   computed), two ways (:func:`profile`; ``omnicache profile SPEC``;
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
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx

from omnicompile.config import OmniCacheConfig
from omnicompile.errors import CalibrationError, ConfigError, RewriteError, ScheduleError
from omnicompile.graphs.cost import Cost, graph_size_symbols, node_flops, region_cost
from omnicompile.graphs.plan import (
    Plan, PlanError, check_plan, coalesce, make_dag, plan_layered, refine, saved_latency, unit_names,
)
from omnicompile.passes.common import Reason, is_param_placeholder, node_signature
from omnicompile.passes.spans import Span, make_span, stream_inputs
from omnicompile.policies import Policy, register_policy
from omnicompile.report import SpanReport
from omnicompile.runtime import GraphRuntime

log = logging.getLogger("omnicompile")

__all__ = ["LayeredPolicy", "LayeredRuntime", "UnitGraph", "Profile", "Schedule", "analyze_units", "profile",
           "plan_profile", "load_file", "dag_to_json", "dag_from_json", "unit_fingerprint",
           "PROFILE_FORMAT", "SCHEDULE_FORMAT"]

PROFILE_FORMAT = "omnicompile-layered-profile"
SCHEDULE_FORMAT = "omnicompile-layered-schedule"
VERSION = 1
METHODS = ("final", "residual")


# ============================================================================ units


@dataclasses.dataclass
class UnitGraph:
    """What the layered policy knows about one graph: its units (``group#index``, DAG
    order), the single-unit spans (None where a unit cannot be reused alone, with the
    reason), the unit DAG with FLOPs as latency, and the symbolic costs."""

    gm: fx.GraphModule
    analysis: Any
    units: list[str]
    where: dict[str, tuple]                 # unit -> (group object, index)
    unit_spans: dict[str, Optional[Span]]
    refused: list[Reason]
    dag: Any
    costs: dict[str, Cost]                  # unit / "fixed" -> symbolic cost
    sizes: dict[str, int]                   # traced values of the size symbols
    fingerprint: str
    _merged: dict = dataclasses.field(default_factory=dict)

    def span(self, chain: str, first: int, last: int) -> Optional[Span]:
        """The span of units ``first..last`` of group ``chain`` (cached); None if refused."""
        key = (chain, first, last)
        if key not in self._merged:
            if first == last:
                self._merged[key] = self.unit_spans[f"{chain}#{first}"]
            else:
                g = next(g for g in self.analysis.groups if g.name == chain)
                sp, _ = make_span(self.gm, g, first, last)
                self._merged[key] = sp
        return self._merged[key]


def unit_fingerprint(gm: fx.GraphModule, units: Sequence[str]) -> str:
    """Hash of the op sequence and the unit names — not of the input shapes: a profile is a
    property of the model and its sampler, valid at other batch sizes and resolutions."""
    h = hashlib.sha256()
    for n in gm.graph.nodes:
        if n.op == "placeholder" and is_param_placeholder(n):
            continue
        h.update(node_signature(n).encode())
    h.update("|".join(units).encode())
    return h.hexdigest()[:32]


def analyze_units(gm: fx.GraphModule, analysis) -> UnitGraph:
    """Units, single-unit spans, the DAG and the costs of an analysed graph."""
    nodes = list(gm.graph.nodes)
    units, where, unit_nodes, streams, chains = [], {}, {}, {}, {}
    spans: dict[str, Optional[Span]] = {}
    refused: list[Reason] = []
    for g in analysis.groups:
        for u in g.units:
            name = f"{g.name}#{u.index}"
            units.append(name)
            where[name] = (g, u.index)
            unit_nodes[name] = list(u.nodes)
            streams[name] = list(stream_inputs(g, u.index))
            chains[name] = (g.name, u.index)
            sp, why = make_span(gm, g, u.index, u.index)
            spans[name] = sp
            if sp is None:
                refused.append(why)
    sym = graph_size_symbols(gm, is_param_placeholder)
    from omnicompile.graphs.plan import unit_dag

    dag = unit_dag(nodes, unit_nodes, stream_inputs=streams, chains=chains,
                   cacheable={u: spans[u] is not None for u in units},
                   cost=lambda ns: float(sum(node_flops(n) for n in ns)))
    costs = {u: region_cost(unit_nodes[u], sym, is_param_placeholder) for u in units}
    in_units = {n for ns in unit_nodes.values() for n in ns}
    costs["other"] = region_cost([n for n in nodes if n not in in_units], sym, is_param_placeholder)
    sizes = {s.name: v for s, v in sym.values.items()}
    return UnitGraph(gm, analysis, units, where, spans, refused, dag, costs, sizes, unit_fingerprint(gm, units))


# ============================================================================ JSON


def dag_to_json(dag) -> dict:
    units = unit_names(dag)
    return {
        "units": [{"name": u, "cost": dag.nodes[u]["cost"], "cacheable": dag.nodes[u]["cacheable"],
                   "chain": dag.nodes[u]["chain"], "position": dag.nodes[u]["position"]} for u in units],
        "edges": [[a, b] for a, b in dag.edges if dag.nodes[a]["kind"] == "unit"],
        "sides": [{"name": s, "cost": d["cost"], "consumers": list(dag.successors(s))}
                  for s, d in dag.nodes(data=True) if d["kind"] == "side"],
        "fixed": float(dag.graph.get("fixed", 0.0)),
    }


def _fail(kind: str, field: str, got, want: str):
    raise ScheduleError(f"layered {kind} field {field!r}: got {_short(got)}; expected {want}")


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def dag_from_json(d, kind: str = "profile"):
    if not isinstance(d, dict):
        _fail(kind, "dag", d, "an object with units, edges, sides, fixed")
    units = d.get("units")
    if not isinstance(units, list) or not units:
        _fail(kind, "dag.units", units, "a non-empty list of units")
    for i, u in enumerate(units):
        if (not isinstance(u, dict) or not isinstance(u.get("name"), str) or not _is_num(u.get("cost"))
                or u["cost"] < 0 or not isinstance(u.get("cacheable"), bool) or not isinstance(u.get("chain"), str)
                or not isinstance(u.get("position"), int) or isinstance(u.get("position"), bool)):
            _fail(kind, f"dag.units[{i}]", u, "{name: str, cost: number >= 0, cacheable: bool, chain: str, "
                                               "position: int}")
    edges = d.get("edges", [])
    if not isinstance(edges, list) or not all(isinstance(e, list) and len(e) == 2 and all(isinstance(x, str) for x in e)
                                              for e in edges):
        _fail(kind, "dag.edges", edges, "a list of [unit, unit] pairs")
    sides = d.get("sides", [])
    if not isinstance(sides, list) or not all(
            isinstance(s, dict) and isinstance(s.get("name"), str) and _is_num(s.get("cost"))
            and isinstance(s.get("consumers"), list) for s in sides):
        _fail(kind, "dag.sides", sides, "a list of {name, cost, consumers}")
    fixed = d.get("fixed", 0.0)
    if not _is_num(fixed) or fixed < 0:
        _fail(kind, "dag.fixed", fixed, "a number >= 0")
    names = [u["name"] for u in units]
    try:
        return make_dag(names, [tuple(e) for e in edges], {u["name"]: u["cost"] for u in units},
                        {u["name"]: u["cacheable"] for u in units},
                        {s["name"]: (s["cost"], s["consumers"]) for s in sides},
                        {u["name"]: (u["chain"], u["position"]) for u in units}, fixed)
    except PlanError as e:
        raise ScheduleError(f"layered {kind} field 'dag': {e}") from None


def _same_structure(a, b) -> bool:
    ua, ub = unit_names(a), unit_names(b)
    if ua != ub:
        return False
    ea = {(x, y) for x, y in a.edges if a.nodes[x]["kind"] == "unit"}
    eb = {(x, y) for x, y in b.edges if b.nodes[x]["kind"] == "unit"}
    return ea == eb and all(a.nodes[u]["cacheable"] == b.nodes[u]["cacheable"] for u in ua)


def _head(d, fmt: str, kind: str) -> None:
    if not isinstance(d, dict):
        raise ScheduleError(f"layered {kind}: expected a JSON object, got {type(d).__name__}")
    if d.get("format") != fmt:
        _fail(kind, "format", d.get("format"), repr(fmt))
    if d.get("version") != VERSION:
        _fail(kind, "version", d.get("version"), str(VERSION))


def _need(d, kind, name, types, check=lambda v: True, want=""):
    """``d[name]``, checked: present, of ``types`` (a bool is no number), and ``check`` holds."""
    if name not in d:
        raise ScheduleError(f"layered {kind} field {name!r} is missing")
    v = d[name]
    wants_bool = types is bool or (isinstance(types, tuple) and bool in types)
    if not isinstance(v, types) or (isinstance(v, bool) and not wants_bool) or not check(v):
        _fail(kind, name, v, want)
    return v


class _JsonFile:
    """A dataclass saved as JSON with its format name and version."""

    FORMAT = ""

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(format=self.FORMAT, version=VERSION)
        return d

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=1)


@dataclasses.dataclass
class Profile(_JsonFile):
    """Per (unit, step): the quality cost of reusing the unit at that step (``delta``, None
    where undefined — step 0 and units that cannot be reused)."""

    FORMAT = PROFILE_FORMAT
    fingerprint: str
    num_steps: int
    units: list[str]
    method: str                          # "final" or "residual"
    delta: list[list[Optional[float]]]   # [unit][step]
    dag: dict                            # dag_to_json of the graph profiled
    #: the one-generation proxies measured alongside ({method: table})
    proxies: dict = dataclasses.field(default_factory=dict)
    #: Spearman rank correlation of each proxy with ``final`` over all (unit, step) pairs
    correlation: dict = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    settings: dict = dataclasses.field(default_factory=dict)

    def weights(self, dag) -> list[list[float]]:
        """``w = Δ / latency`` (latency: the DAG's unit cost); inf where Δ is undefined."""
        out = []
        for i, u in enumerate(unit_names(dag)):
            lat = dag.nodes[u]["cost"]
            row = []
            for x in self.delta[i]:
                row.append(x / lat if x is not None and lat > 0 else math.inf)
            out.append(row)
        return out

    @classmethod
    def from_json(cls, d) -> "Profile":
        k = "profile"
        _head(d, PROFILE_FORMAT, k)
        fp = _need(d, k, "fingerprint", str, lambda v: len(v) > 0, "a non-empty string")
        n = _need(d, k, "num_steps", int, lambda v: v >= 1, "a positive integer")
        units = _need(d, k, "units", list, lambda v: len(v) > 0 and all(isinstance(x, str) for x in v),
                      "a non-empty list of unit names")
        method = _need(d, k, "method", str, lambda v: v in METHODS, f"one of {METHODS}")

        def table(v):
            return len(v) == len(units) and all(
                isinstance(r, list) and len(r) == n and all(x is None or (_is_num(x) and x >= 0) for x in r) for r in v)
        delta = _need(d, k, "delta", list, table, f"{len(units)} rows of {n} numbers >= 0 or nulls (unit x step)")
        dag = dag_from_json(_need(d, k, "dag", dict, want="an object"), k)
        if unit_names(dag) != units:
            _fail(k, "dag.units", unit_names(dag), f"the profile's units {units}")
        proxies = d.get("proxies", {})
        if not isinstance(proxies, dict) or not all(m in METHODS and isinstance(v, list) and table(v)
                                                    for m, v in proxies.items()):
            _fail(k, "proxies", proxies, f"an object {{method: {len(units)} rows of {n} numbers or nulls}}")
        corr = d.get("correlation", {})
        if not isinstance(corr, dict) or not all(m in METHODS and (v is None or (_is_num(v) and -1 <= v <= 1))
                                                 for m, v in corr.items()):
            _fail(k, "correlation", corr, "an object {method: null or a number in [-1, 1]}")
        seconds = d.get("seconds", 0.0)
        if not _is_num(seconds):
            _fail(k, "seconds", seconds, "a number")
        settings = d.get("settings", {})
        if not isinstance(settings, dict):
            _fail(k, "settings", settings, "an object")
        return cls(fp, n, units, method, delta, d["dag"], proxies, corr, float(seconds), settings)


@dataclasses.dataclass
class Schedule(_JsonFile):
    """A refined plan as a file: per unit its row (``C`` computed, ``R`` reused)."""

    FORMAT = SCHEDULE_FORMAT
    fingerprint: str
    num_steps: int
    units: list[str]
    marks: dict[str, str]
    target_speedup: Optional[float]
    cache_interval: int
    ideal_speedup: float
    reached: bool
    dag: dict
    regions: list = dataclasses.field(default_factory=list)   # [[unit, ...], ...]
    source: str = ""

    @classmethod
    def from_plan(cls, plan: Plan, dag, fingerprint: str, interval: int, source: str = "") -> "Schedule":
        return cls(fingerprint, plan.steps, list(plan.units), plan.marks(), plan.target, interval,
                   plan.ideal_speedup, plan.reached, dag_to_json(dag), [list(r.units) for r in plan.regions], source)

    @classmethod
    def from_json(cls, d) -> "Schedule":
        k = "schedule"
        _head(d, SCHEDULE_FORMAT, k)
        fp = _need(d, k, "fingerprint", str, lambda v: len(v) > 0, "a non-empty string")
        n = _need(d, k, "num_steps", int, lambda v: v >= 1, "a positive integer")
        units = _need(d, k, "units", list, lambda v: len(v) > 0 and all(isinstance(x, str) for x in v),
                      "a non-empty list of unit names")
        marks = _need(d, k, "marks", dict, lambda v: set(v) == set(units) and all(
            isinstance(m, str) and len(m) == n and set(m) <= {"C", "R"} for m in v.values()),
                      f"one string of {n} letters C/R per unit")
        ts = d.get("target_speedup")
        if ts is not None and not (_is_num(ts) and ts >= 1):
            _fail(k, "target_speedup", ts, "null or a number >= 1")
        interval = _need(d, k, "cache_interval", int, lambda v: v >= 1, "an integer >= 1")
        ideal = _need(d, k, "ideal_speedup", (int, float), lambda v: _is_num(v) and v >= 1, "a number >= 1")
        reached = _need(d, k, "reached", bool, want="true or false")
        dag = _need(d, k, "dag", dict, want="an object")
        dag_from_json(dag, k)
        regions = d.get("regions", [])
        if not isinstance(regions, list):
            _fail(k, "regions", regions, "a list of lists of unit names")
        return cls(fp, n, units, marks, ts, interval, float(ideal), reached, dag, regions, str(d.get("source", "")))

    def plan(self, dag) -> Plan:
        """The plan on ``dag``, checked: it must be what refinement leaves (every invariant
        of :mod:`omnicompile.graphs.plan` holds)."""
        table = [[c == "R" for c in self.marks[u]] for u in unit_names(dag)]
        p = refine(dag, table, self.cache_interval)
        if p.reuse != table:
            broken = check_plan(dag, _as_is(dag, table, self.num_steps), self.cache_interval)
            why = next((b for b in broken if not b.startswith(("dropped", "writes", "coalesced"))), "refinement changes it")
            raise ScheduleError(f"layered schedule field 'marks': breaks the planner's invariants ({why}); "
                                "re-plan it from its profile")
        p.target = self.target_speedup
        p.reached = self.reached
        return p


def _as_is(dag, table, steps) -> Plan:
    from omnicompile.graphs.plan import _dropped, _writes, _total  # the derived parts, unrefined
    dropped = _dropped(dag, table)
    return Plan(unit_names(dag), steps, table, dropped, _writes(table), coalesce(dag, table),
                saved_latency(dag, table, dropped), _total(dag, steps))


def load_file(path: str):
    """A :class:`Profile` or a :class:`Schedule` from JSON (told apart by ``format``)."""
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise ScheduleError(f"layered profile/schedule file {path!r} does not exist") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ScheduleError(f"layered profile/schedule file {path!r} is not readable JSON: {e}") from None
    fmt = d.get("format") if isinstance(d, dict) else None
    if fmt == SCHEDULE_FORMAT:
        return Schedule.from_json(d)
    if fmt == PROFILE_FORMAT:
        return Profile.from_json(d)
    raise ScheduleError(f"layered file {path!r} field 'format': got {_short(fmt)}; expected "
                        f"{PROFILE_FORMAT!r} or {SCHEDULE_FORMAT!r}")


def plan_profile(prof: Profile, target_speedup: float, interval: int, dag=None) -> Plan:
    """The refined plan of a profile (on ``dag``, default the profile's own)."""
    dag = dag if dag is not None else dag_from_json(prof.dag)
    return plan_layered(dag, prof.weights(dag), target_speedup, interval)


# ============================================================================ policy


@register_policy("layered")
class LayeredPolicy(Policy):
    """OmniCache's Layered Cache (see the module docstring)."""

    calibratable = True

    def __init__(self, config: OmniCacheConfig):
        super().__init__(config)
        self.ug: Optional[UnitGraph] = None
        self.plan: Optional[Plan] = None
        self.profile: Optional[Profile] = None
        self.source = ""
        #: "plan" (follow the plan), "compute" (every unit computed: profiling baseline,
        #: proxy recording) or ("probe", span index, step) (reuse one span at one step)
        self.mode: Any = "plan"
        self.span_rows: list[tuple] = []

    @classmethod
    def runtime_class(cls):
        return LayeredRuntime

    # ---------------------------------------------------------------- planning
    def select_spans(self, gm, analysis) -> list:
        if self.ug is None:
            self.ug = analyze_units(gm, analysis)
            if not any(sp is not None for sp in self.ug.unit_spans.values()):
                first = self.ug.refused[0] if self.ug.refused else None
                raise RewriteError("no_reusable_unit", "layered: no unit can be reused on its own"
                                   + (f" ({first})" if first else ""), first.subject if first else "")
            c = self.config
            if c.calibrate not in (None, "first"):
                self.use_file(load_file(c.calibrate), source=c.calibrate)
        return self.spans_for_plan() if self.plan is not None else self.unit_spans()

    def unit_spans(self) -> list[Span]:
        """One span per reusable unit (profiling)."""
        ug = self.ug
        spans = [ug.unit_spans[u] for u in ug.units if ug.unit_spans[u] is not None]
        self.span_rows = []
        return spans

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

    def use_file(self, obj, source: str = "") -> None:
        ug, c = self.ug, self.config
        if obj.fingerprint != ug.fingerprint or list(obj.units) != ug.units:
            raise ScheduleError(f"layered {'schedule' if isinstance(obj, Schedule) else 'profile'} field "
                                f"'fingerprint': {source or 'it'} was made for another model or graph (units "
                                f"{obj.units[:3]}..., this graph: {ug.units[:3]}...); profile this model")
        kind = "schedule" if isinstance(obj, Schedule) else "profile"
        if not _same_structure(dag_from_json(obj.dag, kind), ug.dag):
            raise ScheduleError(f"layered {kind} field 'dag': its unit graph differs from this graph's")
        if c.num_steps is not None and c.num_steps != obj.num_steps:
            raise ScheduleError(f"layered {kind} field 'num_steps': made for {obj.num_steps} steps, option "
                                f"num_steps is {c.num_steps}")
        if isinstance(obj, Schedule):
            self.set_plan(obj.plan(ug.dag), source)
        else:
            self.profile = obj
            self.set_plan(plan_profile(obj, c.target_speedup, c.cache_interval, ug.dag), source)

    def set_plan(self, plan: Plan, source: str = "") -> None:
        self.plan = plan
        self.source = source
        if not plan.reached:
            log.warning("omnicache layered: target speedup %.2fx is out of reach under cache_interval=%d; "
                        "the plan reaches %.2fx", plan.target or self.config.target_speedup,
                        self.config.cache_interval, plan.ideal_speedup)

    def schedule_file(self) -> Optional[Schedule]:
        if self.plan is None:
            return None
        return Schedule.from_plan(self.plan, self.ug.dag, self.ug.fingerprint, self.config.cache_interval, self.source)

    # ---------------------------------------------------------------- protocol
    def decide(self, step, num_steps, n_spans):
        mode = self.mode
        if isinstance(mode, tuple):
            _, k, t = mode
            return tuple(i == k and step == t for i in range(n_spans))
        if mode == "compute" or self.plan is None:
            return (False,) * n_spans
        if num_steps is not None and num_steps != self.plan.steps:
            return (False,) * n_spans      # a plan is for one step count (the runtime reports it)
        if not 0 <= step < self.plan.steps or len(self.span_rows) != n_spans:
            return (False,) * n_spans
        return tuple(row[step] for row in self.span_rows)

    def variants(self, n_spans):
        if self.plan is None or len(self.span_rows) != n_spans or self.mode != "plan":
            return [(False,) * n_spans]
        seen: dict = {}
        for t in range(self.plan.steps):
            seen.setdefault(tuple(row[t] for row in self.span_rows), None)
        return list(seen)

    def describe(self):
        c = self.config
        d = {"policy": "layered", "target_speedup": c.target_speedup, "cache_interval": c.cache_interval,
             "calibrate": c.calibrate}
        if self.plan is not None:
            d["ideal_speedup"] = round(self.plan.ideal_speedup, 3)
        return d


# ============================================================================ runtime


class LayeredRuntime(GraphRuntime):
    """:class:`~omnicompile.runtime.GraphRuntime` plus the proxy profile: a generation to
    profile runs with one span per unit, all computed, and records per unit the change of
    its residual (slot 0); at its end the plan is made and the spans switch to the plan's
    regions.  ``oc.calibrate(fn)`` and ``omnicache calibrate`` drive it like the
    trajectory policy's calibration; :func:`profile` drives it per (unit, step)."""

    def __init__(self, gm, example_inputs, analysis, config, policy, report, compile_fn, guard):
        self.force_calibrate = False
        self.calibrating = False
        self.calibration: Optional[Profile] = None
        self._rec: Optional[dict] = None
        super().__init__(gm, example_inputs, analysis, config, policy, report, compile_fn, guard)
        for r in policy.ug.refused:
            if r not in report.refused:
                report.refused.append(r)
        if policy.plan is None and config.calibrate is None:
            report.refused.append(Reason("not_calibrated", "calibrate=None and no profile given: every step is "
                                         "computed until oc.calibrate(fn) or omnicompile.layered.profile runs"))

    # ---------------------------------------------------------------- spans
    def set_spans(self, spans: list) -> None:
        """Switch the guarded spans (per unit for profiling, per region for the plan)."""
        if [s.name for s in spans] == [s.name for s in self.spans]:
            return
        self.spans = list(spans)
        self.counts = [len(s.live_streams) for s in self.spans]
        self.compiled.clear()
        self.dumps.clear()
        self.graphs.clear()
        self.slots.clear()
        self.report.spans = [SpanReport(s.name, s.last_unit - s.first_unit + 1, [st.name for st in s.live_streams],
                                        [n.name for n in s.side_inputs], s.flops) for s in self.spans]
        if self.guard == "variants":
            for dec in self.policy.variants(len(self.spans)):
                self._variant(dec)

    def use_plan(self) -> None:
        self.policy.mode = "plan"
        self.set_spans(self.policy.spans_for_plan() if self.policy.plan is not None else self.policy.unit_spans())

    def use_units(self, mode: Any = "compute") -> None:
        self.policy.mode = mode
        self.set_spans(self.policy.unit_spans())

    # ---------------------------------------------------------------- proxy recording
    def _advance(self, args):
        gen, step, slot, new, t = super()._advance(args)
        if new:
            if self.calibrating:
                self._finish_calibration()
            want = self.force_calibrate or (self.policy.mode == "plan" and self.policy.plan is None
                                            and self.config.calibrate == "first" and self.calibration is None)
            if want:
                self.force_calibrate = False
                self.calibrating = True
                self.use_units("compute")
                self._rec = {"prev": None, "residual": []}
        plan, ns = self.policy.plan, self.num_steps
        if new and plan is not None and self.policy.mode == "plan" and ns is not None and ns != plan.steps:
            why = Reason("plan_steps_mismatch", f"the layered plan is for {plan.steps} steps, this generation "
                         f"has {ns}: every step is computed")
            if why not in self.report.refused:
                self.report.refused.append(why)
                log.warning("omnicache: graph %d: %s", self.report.graph_id, why.message)
        return gen, step, slot, new, t

    def __call__(self, *args):
        out = super().__call__(*args)
        rec = self._rec if self.calibrating else None
        if rec is not None and self.tracker.slot == 0 and self.tracker.step == len(rec["residual"]):
            self._record(rec, args, out)
        return out

    def _record(self, rec: dict, args, out) -> None:
        """Slot 0 of a profiled step: per unit, the L2 change of its residual (all streams)
        from the previous step — the error a reuse at this step would inject."""
        res = self.slots.get(0)
        cur = [[r.detach().float() for r in rs] if rs is not None else None for rs in res]
        prev = rec["prev"]
        row = []
        for i, rs in enumerate(cur):
            if prev is None or rs is None or prev[i] is None:
                row.append(None)
            else:
                row.append(float(math.sqrt(sum(float((a - b).pow(2).sum()) for a, b in zip(rs, prev[i])))))
        rec["residual"].append(row)
        rec["prev"] = cur

    def _finish_calibration(self) -> None:
        rec, self._rec = self._rec, None
        self.calibrating = False
        if rec is None or len(rec["residual"]) < 2:
            self.use_plan()
            return
        prof = self.make_profile("residual", rec["residual"])
        self.calibration = prof
        self.policy.profile = prof
        c = self.config
        self.policy.set_plan(plan_profile(prof, c.target_speedup, c.cache_interval, self.policy.ug.dag), "residual")
        self.use_plan()

    def make_profile(self, method: str, per_step: list, seconds: float = 0.0, **extra) -> Profile:
        """A :class:`Profile` from ``per_step[step][span index]`` (spans = reusable units)."""
        ug = self.policy.ug
        reusable = [u for u in ug.units if ug.unit_spans[u] is not None]
        n = len(per_step)
        delta = []
        for u in ug.units:
            if u not in reusable:
                delta.append([None] * n)
                continue
            k = reusable.index(u)
            delta.append([None if t == 0 else per_step[t][k] for t in range(n)])
        return Profile(ug.fingerprint, n, list(ug.units), method, delta, dag_to_json(ug.dag), seconds=seconds,
                       settings={"sizes": ug.sizes, "flops": {u: str(ug.costs[u].flops) for u in ug.units}}, **extra)


# ============================================================================ profiling (final)


def _first_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (list, tuple)):
        for v in x:
            if isinstance(v, torch.Tensor):
                return v
    if isinstance(x, dict):
        for v in x.values():
            if isinstance(v, torch.Tensor):
                return v
    v = getattr(x, "sample", None)
    if isinstance(v, torch.Tensor):
        return v
    raise CalibrationError(f"the generation function must return the final sample (a tensor), got {type(x).__name__}")


def _rank(xs: Sequence[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2.0
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> Optional[float]:
    """Spearman rank correlation of two equally long sequences (None when undefined)."""
    if len(a) != len(b) or len(a) < 3:
        return None
    ra, rb = _rank(a), _rank(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = math.sqrt(sum((x - ma) ** 2 for x in ra))
    vb = math.sqrt(sum((y - mb) ** 2 for y in rb))
    return cov / (va * vb) if va > 0 and vb > 0 else None


def profile(oc, generate: Callable[[], Any], path: Optional[str] = None, *, method: str = "final",
            progress: bool = True, steps: Optional[Sequence[int]] = None) -> list[Profile]:
    """Profile every layered graph of ``oc``; returns one :class:`Profile` per graph.

    ``generate()`` runs one full generation through the model compiled with ``oc`` and
    returns the final sample; it must be deterministic (same seed every call).  Per graph,
    one generation with every unit computed (the reference) records the proxy; ``method``:

    * ``"residual"`` — ``Δ`` = the L2 change of the unit's residual from the previous step
      (the reference generation only);
    * ``"final"`` (the paper's) — then one generation per (reusable unit, step >= 1)
      reusing that unit at that step only, ``Δ = |y - y_ref| / |y_ref|`` (L2) of the final
      samples; the proxy and its Spearman rank correlation with it are kept (``proxies``,
      ``correlation``).  ``steps`` restricts the steps profiled (others get
      ``Δ = None``: never reused).  A tqdm progress bar shows on stderr when installed.

    Afterwards each graph is planned from its profile with ``oc``'s options; ``path`` saves
    the profiles (``path`` for one graph, ``path`` with ``.N`` before the suffix for more)."""
    if oc.config.policy != "layered":
        raise CalibrationError(f"profile() needs an OmniCache with policy 'layered', not {oc.config.policy!r}")
    if method not in METHODS:
        raise CalibrationError(f"profile method {method!r}: expected one of {METHODS}")
    if not oc.runtimes:
        with torch.no_grad():
            generate()               # compiles the graphs
    rts = [rt for rt in oc.runtimes if isinstance(rt, LayeredRuntime)]
    if not rts:
        raise CalibrationError("the generation ran no graph through the layered policy (nothing was cached: "
                               "see oc.report() for why)")
    out = []
    bar = None
    for rt in rts:
        rt.use_units("compute")      # every graph computes everything while one is probed
    for rt in rts:
        t_start = time.perf_counter()
        rt.force_calibrate = True     # the reference generation records the proxy
        oc.reset()
        with torch.no_grad():
            ref = _first_tensor(generate()).detach().float().clone()
        rec = rt._rec if rt.calibrating else None
        rt._rec, rt.calibrating = None, False
        n_steps = rt.tracker.step + 1 if rt.tracker.step >= 0 else 0
        if rec is None or len(rec["residual"]) != n_steps or n_steps < 2:
            raise CalibrationError(f"the reference generation made {n_steps} step(s) of graph "
                                   f"{rt.report.graph_id}; profiling needs two or more")
        proxies = {"residual": rt.make_profile("residual", rec["residual"]).delta}
        if method != "final":
            prof = rt.make_profile(method, rec[method], seconds=time.perf_counter() - t_start)
            prof.proxies = proxies
        else:
            n_spans = len(rt.spans)
            todo = [(k, t) for k in range(n_spans) for t in range(1, n_steps) if steps is None or t in steps]
            if progress:
                try:
                    from tqdm import tqdm
                    bar = tqdm(total=len(todo), desc=f"layered profile (graph {rt.report.graph_id})", unit="gen",
                               file=sys.stderr)
                except ImportError:
                    bar = None
            per_step = [[None] * n_spans for _ in range(n_steps)]
            norm = float(ref.norm()) or 1.0
            try:
                for k, t in todo:
                    rt.policy.mode = ("probe", k, t)
                    oc.reset()
                    with torch.no_grad():
                        y = _first_tensor(generate()).detach().float()
                    per_step[t][k] = float((y - ref).norm()) / norm
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(unit=rt.spans[k].name, step=t)
            finally:
                if bar is not None:
                    bar.close()
                    bar = None
                rt.policy.mode = "compute"
                oc.reset()
            prof = rt.make_profile("final", per_step, seconds=time.perf_counter() - t_start)
            prof.proxies = proxies
            for m, table in proxies.items():
                pairs = [(p, f) for pr, fr in zip(table, prof.delta) for p, f in zip(pr, fr)
                         if p is not None and f is not None]
                prof.correlation[m] = spearman([p for p, _ in pairs], [f for _, f in pairs])
        rt.calibration = prof
        rt.policy.profile = prof
        c = rt.config
        rt.policy.set_plan(plan_profile(prof, c.target_speedup, c.cache_interval, rt.policy.ug.dag), "profile")
        out.append(prof)
    for rt in rts:
        rt.use_plan()
    if path is not None:
        root, ext = os.path.splitext(os.fspath(path))
        for i, p in enumerate(out):
            p.save(os.fspath(path) if len(out) == 1 else f"{root}.{i}{ext}")
    return out


# ============================================================================ text


def plan_text(plan: Plan, dag) -> str:
    """The plan as text: one row of marks per unit, then the regions (``omnicache plan``)."""
    lines = [f"plan over {plan.steps} steps: ideal speedup {plan.ideal_speedup:.2f}x "
             f"({plan.saved_fraction:.0%} of FLOPs saved){'' if plan.reached else ' — target NOT reached'}, "
             f"{len(plan.regions)} region(s), {len(plan.rows())} distinct step row(s)"]
    width = max(len(u) for u in plan.units)
    for u, m in plan.marks().items():
        lines.append(f"  {u:<{width}}  {m}")
    lines.append("  regions: " + ", ".join("+".join(r.units) for r in plan.regions))
    return "\n".join(lines)
