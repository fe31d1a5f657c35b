"""The layered policy's files: profiles (the quality cost of reusing each unit at each step)
and schedules (a refined plan), as validated JSON (never pickle), each carrying the unit DAG
so that a schedule can be planned without the model.  A malformed field raises
:class:`~omnicompile.errors.ScheduleError` naming it."""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Optional

from omnicompile.errors import ScheduleError
from omnicompile.graphs.dag import PlanError, make_dag, unit_names
from omnicompile.graphs.plan import LayeredPlan, check_plan, derive_plan, refine
from omnicompile.jsonfile import read_json

__all__ = ["Profile", "Schedule", "load_file", "dag_to_json", "dag_from_json", "same_structure",
           "PROFILE_FORMAT", "SCHEDULE_FORMAT", "VERSION", "METHODS"]

PROFILE_FORMAT = "omnicompile-layered-profile"
SCHEDULE_FORMAT = "omnicompile-layered-schedule"
VERSION = 1
METHODS = ("final", "residual")



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
        if (not isinstance(u, dict) or set(u) != {"name", "cost", "cacheable", "chain", "position"}
                or not isinstance(u.get("name"), str) or not _is_num(u.get("cost"))
                or u["cost"] < 0 or not isinstance(u.get("cacheable"), bool) or not isinstance(u.get("chain"), str)
                or not isinstance(u.get("position"), int) or isinstance(u.get("position"), bool)
                or u["position"] < 0):
            _fail(kind, f"dag.units[{i}]", u, "{name: str, cost: number >= 0, cacheable: bool, chain: str, "
                                               "position: int >= 0}")
    edges = d.get("edges", [])
    if not isinstance(edges, list) or not all(isinstance(e, list) and len(e) == 2 and all(isinstance(x, str) for x in e)
                                              for e in edges):
        _fail(kind, "dag.edges", edges, "a list of [unit, unit] pairs")
    sides = d.get("sides", [])
    if not isinstance(sides, list) or not all(
            isinstance(s, dict) and isinstance(s.get("name"), str) and _is_num(s.get("cost")) and s["cost"] >= 0
            and isinstance(s.get("consumers"), list) and all(isinstance(c, str) for c in s["consumers"])
            for s in sides):
        _fail(kind, "dag.sides", sides, "a list of {name: str, cost: number >= 0, consumers: [unit, ...]}")
    fixed = d.get("fixed", 0.0)
    if not _is_num(fixed) or fixed < 0:
        _fail(kind, "dag.fixed", fixed, "a number >= 0")
    unknown = sorted(set(d) - {"units", "edges", "sides", "fixed"})
    if unknown:
        _fail(kind, f"dag.{unknown[0]}", d[unknown[0]], "no such field (dag fields: units, edges, sides, fixed)")
    # costs are FLOPs (latencies): the planner sums them, so their sum must be a float too
    if not math.isfinite(math.fsum([u["cost"] for u in units] + [s["cost"] for s in sides] + [fixed])):
        _fail(kind, "dag.units", "costs summing past the largest float", "costs whose sum is finite")
    names = [u["name"] for u in units]
    try:
        return make_dag(names, [tuple(e) for e in edges], {u["name"]: u["cost"] for u in units},
                        {u["name"]: u["cacheable"] for u in units},
                        {s["name"]: (s["cost"], s["consumers"]) for s in sides},
                        {u["name"]: (u["chain"], u["position"]) for u in units}, fixed)
    except PlanError as e:
        raise ScheduleError(f"layered {kind} field 'dag': {e}") from None


def same_structure(a, b) -> bool:
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


def _keyed_head(d, fmt: str, kind: str, fields) -> tuple[str, int, list]:
    """Format and version checked, no field but ``fields``; the fields every layered file is
    keyed by: the graph's fingerprint, the step count and the unit names."""
    _head(d, fmt, kind)
    unknown = sorted(set(d) - set(fields) - {"format", "version"})
    if unknown:
        _fail(kind, unknown[0], d[unknown[0]], f"no such field (a layered {kind} has {', '.join(fields)})")
    fp = _need(d, kind, "fingerprint", str, lambda v: len(v) > 0, "a non-empty string")
    n = _need(d, kind, "num_steps", int, lambda v: v >= 1, "a positive integer")
    units = _need(d, kind, "units", list, lambda v: len(v) > 0 and all(isinstance(x, str) for x in v),
                  "a non-empty list of unit names")
    return fp, n, units


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
        fp, n, units = _keyed_head(d, PROFILE_FORMAT, k, [f.name for f in dataclasses.fields(cls)])
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
        if not _is_num(seconds) or seconds < 0:
            _fail(k, "seconds", seconds, "a number >= 0")
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
    def from_plan(cls, plan: LayeredPlan, dag, fingerprint: str, interval: int, source: str = "") -> "Schedule":
        return cls(fingerprint, plan.steps, list(plan.units), plan.marks(), plan.target, interval,
                   plan.ideal_speedup, plan.reached, dag_to_json(dag), [list(r.units) for r in plan.regions], source)

    @classmethod
    def from_json(cls, d) -> "Schedule":
        k = "schedule"
        fp, n, units = _keyed_head(d, SCHEDULE_FORMAT, k, [f.name for f in dataclasses.fields(cls)])
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
        if not isinstance(regions, list) or not all(
                isinstance(r, list) and r and all(isinstance(u, str) and u in marks for u in r) for r in regions):
            _fail(k, "regions", regions, "a list of non-empty lists of the schedule's unit names")
        source = d.get("source", "")
        if not isinstance(source, str):
            _fail(k, "source", source, "a string (the profile it was planned from)")
        return cls(fp, n, units, marks, ts, interval, float(ideal), reached, dag, regions, source)

    def plan(self, dag) -> LayeredPlan:
        """The plan on ``dag``, checked: it must be what refinement leaves (every invariant
        of :mod:`omnicompile.graphs.plan` holds)."""
        table = [[c == "R" for c in self.marks[u]] for u in unit_names(dag)]
        p = refine(dag, table, self.cache_interval)
        if p.reuse != table:
            broken = check_plan(dag, derive_plan(dag, table, self.num_steps), self.cache_interval)
            why = next((b for b in broken if not b.startswith(("dropped", "writes", "coalesced"))), "refinement changes it")
            raise ScheduleError(f"layered schedule field 'marks': breaks the planner's invariants ({why}); "
                                "re-plan it from its profile")
        p.target = self.target_speedup
        p.reached = self.reached
        return p


def load_file(path: str):
    """A :class:`Profile` or a :class:`Schedule` from JSON (told apart by ``format``)."""
    d = read_json(path, "layered profile/schedule file", ScheduleError)
    fmt = d.get("format") if isinstance(d, dict) else None
    if fmt == SCHEDULE_FORMAT:
        return Schedule.from_json(d)
    if fmt == PROFILE_FORMAT:
        return Profile.from_json(d)
    raise ScheduleError(f"layered file {path!r} field 'format': got {_short(fmt)}; expected "
                        f"{PROFILE_FORMAT!r} or {SCHEDULE_FORMAT!r}")
