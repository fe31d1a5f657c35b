"""What the backend did, per compiled graph and per call.

``OmniCache.report()`` returns a :class:`Report`; ``str(report)`` is a readable table.
Everything is plain dataclasses so later tools (the CLI, notebooks, CI) read the same facts.

Exports, all derived from the same fields (nothing here is measured twice):

* ``str(report)`` — the console table (latest generation of each graph);
* ``report.to_markdown()`` — the same facts as Markdown: a summary row per graph, the block
  lists, spans, refusals, the per-step timeline and the statistics of any policy signal;
* ``report.to_dict()`` / ``report.to_json()`` — every field, JSON-safe (non-finite floats
  become the strings ``"nan"``/``"inf"``/``"-inf"``); ``Report.from_json(text)`` rebuilds the
  dataclasses, so ``Report.from_json(r.to_json()).to_json() == r.to_json()``;
* ``graph.timeline()`` — one row per (generation, step): the calls of that step (CFG
  slots), the decision of every span in every slot (``C`` computed, ``R`` reused, ``F``
  computed because the slot had no cache yet although the policy asked for reuse) and the
  FLOPs saved;
* ``graph.signal_stats()`` — count / mean / min / percentiles / max of each per-call signal
  a policy records in ``StepRecord.signals`` (e.g. a probe's relative change; the static
  policy records none).

Generations are counted from 0 in the data (``StepRecord.generation``, ``timeline()``, JSON)
and from 1 in the text (``str(report)``, Markdown): the third of three generations reads
"generation 3 of 3".

Hit rate, FLOPs saved and bytes held keep their meaning: a *hit* is a span decision
``"reused"``; FLOPs are the cost model's estimate (:mod:`omnicompile.graphs.cost`); bytes
held are the cache tensors alive after the latest call.
"""
from __future__ import annotations

import dataclasses
import json
import math
import threading
from typing import Optional, Sequence

from omnicompile.errors import ReportError
from omnicompile.jsonfile import parse_json
from omnicompile.passes.common import Reason
from omnicompile.reportformat import format_bytes, format_number, md_escape, percentile
from omnicompile.reportjson import from_json_value, json_safe, json_value, type_name

__all__ = ["SpanReport", "StepRecord", "GenerationRecord", "GraphReport", "Report", "percentile"]

#: percentiles reported by ``signal_stats``
PERCENTILES = (50, 90, 99)
#: generations kept in ``GraphReport.generation_log``
MAX_GENERATIONS = 256
#: generations whose calls ``GraphReport.steps`` keeps in detail, by default (the option
#: ``report_generations``); older calls are counted in ``GraphReport.dropped`` only
DETAIL_GENERATIONS = 8
#: at most this many detailed calls per kept generation (a stream that never starts a new
#: generation still has bounded detail)
DETAIL_CALLS_PER_GENERATION = 256

_MARK = {"computed": "C", "reused": "R"}


@dataclasses.dataclass
class SpanReport:
    name: str
    units: int
    streams: list[str]
    side_inputs: list[str]
    flops: int
    # values added into a stream between the span's blocks (ControlNet residuals, VACE hints):
    # "stream += value", applied fresh on reused steps
    side_additions: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class StepRecord:
    generation: int
    step: int
    slot: int
    timestep: float
    decisions: dict[str, str]   # span -> "computed" | "reused"
    flops_saved: int
    forced: list[str] = dataclasses.field(default_factory=list)  # spans computed for lack of a cache
    #: per-call values a policy measured (e.g. a probe's relative change), name -> value
    signals: dict[str, float] = dataclasses.field(default_factory=dict)
    #: which model made the call (0, 1, ... in order of first call: models of one class share
    #: a graph and keep separate caches)
    model: int = 0
    #: why the call could not be placed with certainty (it computed every span), else ""
    uncertain: str = ""
    #: spans the policy wanted to reuse but computed because their cached state (residual, the
    #: trajectory's correction, the probe's state) was not finite: never replayed
    nonfinite: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class GenerationRecord:
    """One generation of one model: where its steps came from and what it ran by."""
    generation: int
    model: int
    #: "pipeline" (compile_pipeline), "context" (omnicompile.generation) or "inferred"
    source: str
    num_steps: Optional[int]      # None: unknown when it started
    #: the schedule / calibration / plan it used, in words ("" when the policy has none)
    plan: str = ""
    #: the generation context it ran in (its id: one per pipeline call), None without one
    context: Optional[int] = None
    #: its calls so far and the FLOPs they saved (exact, whatever ``GraphReport.steps`` keeps)
    calls: int = 0
    flops_saved: int = 0


@dataclasses.dataclass
class GraphReport:
    graph_id: int
    nodes: int
    cached: bool
    policy: dict
    guard: str = ""
    inner_backend: str = ""
    fallback: Optional[Reason] = None
    block_lists: list[dict] = dataclasses.field(default_factory=list)
    spans: list[SpanReport] = dataclasses.field(default_factory=list)
    refused: list[Reason] = dataclasses.field(default_factory=list)
    timestep_input: Optional[str] = None
    flops_per_call: int = 0
    steps: list[StepRecord] = dataclasses.field(default_factory=list)
    cache_bytes: int = 0
    generations: int = 0
    #: token / frame / block caches (omnicompile.merging): geometry, wrapped regions, calls
    #: merged / full and FLOPs saved by merging (included in ``flops_saved``)
    token_cache: dict = dataclasses.field(default_factory=dict)
    #: models seen by this graph (instances of one class share it, with separate caches)
    models: int = 0
    #: rewritten graphs the runtime compiled (variants, cond, measure, ...) and the seconds the
    #: inner backend took for them (the first compile of a graph warms Inductor's caches)
    compiled_graphs: int = 0
    compile_seconds: float = 0.0
    #: compiled for one concrete shape of a graph Dynamo traced with symbolic sizes (the
    #: token/frame/block caches need concrete row counts: one such graph per shape)
    specialised: bool = False
    #: the generations, most recent last (at most MAX_GENERATIONS kept)
    generation_log: list[GenerationRecord] = dataclasses.field(default_factory=list)
    #: ``steps`` keeps the calls of the last this many generations (at most
    #: DETAIL_CALLS_PER_GENERATION calls each); older calls move into ``dropped``
    report_generations: int = DETAIL_GENERATIONS
    #: the calls no longer in ``steps``, aggregated: ``calls``, ``generations`` (whose detail is
    #: gone entirely), ``computed`` / ``reused`` span decisions, ``flops_saved``,
    #: ``uncertain_calls`` and the first one's reason ``uncertain_first``, and per signal
    #: ``count`` / ``sum`` / ``min`` / ``max``.  The totals (``calls``, ``span_decisions``,
    #: ``flops_saved``, ...) add them to the detail: they stay exact however long the graph runs.
    dropped: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self._index_of = None          # (steps list, its length) the generation index was built for
        self._gens: dict[int, int] = {}  # generation -> its calls in ``steps``, oldest first
        self._lock = threading.Lock()  # runtimes record from every thread that calls the model

    def __getstate__(self):            # (copy / pickle: the fields only)
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.__post_init__()

    def add_generation(self, rec: GenerationRecord) -> None:
        self.generation_log.append(rec)
        del self.generation_log[:-MAX_GENERATIONS]

    def add_step(self, rec: StepRecord) -> None:
        """Record one call: kept in detail; the oldest generation's calls (beyond
        ``report_generations``, or beyond DETAIL_CALLS_PER_GENERATION calls per kept generation)
        move into the ``dropped`` aggregates."""
        with self._lock:
            self._add_step(rec)

    def _add_step(self, rec: StepRecord) -> None:
        for g in reversed(self.generation_log):       # its generation's running totals
            if g.generation == rec.generation:
                g.calls += 1
                g.flops_saved += rec.flops_saved
                break
        gens = self._generation_index()
        self.steps.append(rec)
        gens[rec.generation] = gens.get(rec.generation, 0) + 1
        keep = max(1, int(self.report_generations))
        if len(gens) > keep:
            old = next(iter(gens))
            gone = [r for r in self.steps if r.generation == old]
            self.steps[:] = [r for r in self.steps if r.generation != old]
            del gens[old]
            self._drop(gone, whole=True)
        cap = keep * DETAIL_CALLS_PER_GENERATION
        if len(self.steps) > cap:
            gone = self.steps[:len(self.steps) - cap]
            del self.steps[:len(gone)]
            for r in gone:
                gens[r.generation] -= 1
                if not gens[r.generation]:
                    del gens[r.generation]
            self._drop(gone, whole=False)
        self._index_of = (self.steps, len(self.steps))

    def _generation_index(self) -> dict:
        if self._index_of is None or self._index_of[0] is not self.steps or self._index_of[1] != len(self.steps):
            self._gens = {}
            for r in self.steps:
                self._gens[r.generation] = self._gens.get(r.generation, 0) + 1
        return self._gens

    def _drop(self, records: Sequence[StepRecord], whole: bool) -> None:
        d = self.dropped
        if not records:
            return
        for k in ("calls", "generations", "computed", "reused", "flops_saved", "uncertain_calls", "nonfinite"):
            d.setdefault(k, 0)
        d["calls"] += len(records)
        d["generations"] += int(whole)
        signals = d.setdefault("signals", {})
        for r in records:
            vs = list(r.decisions.values())
            d["computed"] += sum(v == "computed" for v in vs)
            d["reused"] += sum(v == "reused" for v in vs)
            d["flops_saved"] += r.flops_saved
            if r.uncertain:
                d["uncertain_calls"] += 1
                d.setdefault("uncertain_first", r.uncertain)
            if r.nonfinite:
                d["nonfinite"] += 1
                d.setdefault("nonfinite_first", f"step {r.step}, {', '.join(r.nonfinite)}")
            for name, v in r.signals.items():
                if v is None or not math.isfinite(float(v)):
                    continue
                v = float(v)
                st = signals.get(name)
                if st is None:
                    signals[name] = {"count": 1, "sum": v, "min": v, "max": v}
                else:
                    st["count"] += 1
                    st["sum"] += v
                    st["min"] = min(st["min"], v)
                    st["max"] = max(st["max"], v)

    @property
    def dropped_calls(self) -> int:
        """Calls counted in the totals whose detail is no longer in ``steps``."""
        return int(self.dropped.get("calls", 0))

    @property
    def uncertain_calls(self) -> int:
        """Calls that could not be placed with certainty (each computed every span)."""
        return int(self.dropped.get("uncertain_calls", 0)) + sum(1 for r in self.steps if r.uncertain)

    @property
    def first_uncertain(self) -> str:
        """Why the first uncertain call was uncertain ("" if none)."""
        return self.dropped.get("uncertain_first") or next((r.uncertain for r in self.steps if r.uncertain), "")

    @property
    def nonfinite_recomputes(self) -> int:
        """Calls that computed a span the policy wanted to reuse because its cached state was
        not finite (NaN or infinity: never replayed)."""
        return int(self.dropped.get("nonfinite", 0)) + sum(1 for r in self.steps if r.nonfinite)

    @property
    def first_nonfinite(self) -> str:
        """Where the first non-finite refusal was ("step N, span"; "" if none)."""
        first = next((r for r in self.steps if r.nonfinite), None)
        return self.dropped.get("nonfinite_first") or (f"step {first.step}, {', '.join(first.nonfinite)}"
                                                       if first else "")

    @property
    def calls(self) -> int:
        return self.dropped_calls + len(self.steps)

    @property
    def span_decisions(self) -> tuple[int, int]:
        computed = sum(v == "computed" for r in self.steps for v in r.decisions.values())
        reused = sum(v == "reused" for r in self.steps for v in r.decisions.values())
        return computed + int(self.dropped.get("computed", 0)), reused + int(self.dropped.get("reused", 0))

    @property
    def hit_rate(self) -> float:
        c, r = self.span_decisions
        return r / (c + r) if c + r else 0.0

    @property
    def flops_saved(self) -> int:
        return (sum(r.flops_saved for r in self.steps) + int(self.dropped.get("flops_saved", 0))
                + int(self.token_cache.get("flops_saved", 0)))

    @property
    def flops_saved_fraction(self) -> float:
        total = self.flops_per_call * self.calls
        return self.flops_saved / total if total else 0.0

    # ------------------------------------------------------------------ views
    def timeline(self, generation: Optional[int] = None) -> list[dict]:
        """One row per (generation, step), in call order; ``generation`` selects one.

        Row keys: ``generation``, ``step``, ``timestep`` (of the step's first call),
        ``calls`` (CFG slots seen), ``decisions`` (span -> one letter per slot: ``C``
        computed, ``R`` reused, ``F`` forced compute), ``reused`` / ``computed`` (span
        decisions summed over slots), ``flops_saved`` and ``flops_saved_fraction`` (of the
        step's total estimated FLOPs).
        """
        rows: dict[tuple[int, int], dict] = {}
        names = [s.name for s in self.spans]
        for r in self.steps:
            if generation is not None and r.generation != generation:
                continue
            key = (r.generation, r.step)
            row = rows.get(key)
            if row is None:
                row = rows[key] = {"generation": r.generation, "step": r.step, "timestep": r.timestep,
                                   "calls": 0, "decisions": {}, "reused": 0, "computed": 0,
                                   "flops_saved": 0, "flops_saved_fraction": 0.0}
            row["calls"] += 1
            row["flops_saved"] += r.flops_saved
            for name in names or list(r.decisions):
                d = r.decisions.get(name)
                mark = "-" if d is None else ("F" if name in r.forced else _MARK.get(d, "?"))
                row["decisions"][name] = row["decisions"].get(name, "") + mark
                row["reused"] += d == "reused"
                row["computed"] += d == "computed"
        out = list(rows.values())
        for row in out:
            total = self.flops_per_call * row["calls"]
            row["flops_saved_fraction"] = row["flops_saved"] / total if total else 0.0
        return out

    def signal_stats(self, percentiles: Sequence[float] = PERCENTILES) -> dict[str, dict]:
        """Statistics of every signal recorded in ``StepRecord.signals``:
        ``{name: {"count", "mean", "min", "p50", "p90", "p99", "max"}}`` (non-finite
        values are left out).  ``count``, ``mean``, ``min`` and ``max`` cover every call; the
        percentiles the calls kept in detail (``steps``; NaN when none of them has the signal)."""
        values: dict[str, list[float]] = {}
        for r in self.steps:
            for k, v in r.signals.items():
                if v is not None and math.isfinite(float(v)):
                    values.setdefault(k, []).append(float(v))
        old = self.dropped.get("signals", {})
        out = {}
        for k in list(old) + [k for k in values if k not in old]:
            vs = sorted(values.get(k, []))
            o = old.get(k, {"count": 0, "sum": 0.0, "min": math.inf, "max": -math.inf})
            count = len(vs) + int(o["count"])
            st = {"count": count, "mean": (sum(vs) + float(o["sum"])) / count,
                  "min": min(vs[:1] + [float(o["min"])])}
            for p in percentiles:
                st[f"p{p:g}"] = percentile(vs, p, presorted=True) if vs else math.nan
            st["max"] = max(vs[-1:] + [float(o["max"])])
            out[k] = st
        return out

    def summary(self) -> dict:
        """The headline numbers (what cache-dit's ``summary()`` shows, and more)."""
        c, u = self.span_decisions
        return {"graph_id": self.graph_id, "cached": self.cached, "policy": dict(self.policy),
                "guard": self.guard, "calls": self.calls, "generations": self.generations,
                "span_decisions_computed": c, "span_decisions_reused": u, "hit_rate": self.hit_rate,
                "flops_per_call": self.flops_per_call, "flops_saved": self.flops_saved,
                "flops_saved_fraction": self.flops_saved_fraction, "cache_bytes": self.cache_bytes,
                "models": self.models, "uncertain_calls": self.uncertain_calls,
                "compiled_graphs": self.compiled_graphs, "compile_seconds": self.compile_seconds,
                "detail_dropped_calls": self.dropped_calls, "nonfinite_recomputes": self.nonfinite_recomputes,
                "fallback": self.fallback.to_dict() if self.fallback else None}

    # ------------------------------------------------------------------ export
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)   # Reason is a dataclass too: becomes a dict
        d["summary"] = self.summary()
        d["timeline"] = self.timeline()
        d["signal_stats"] = self.signal_stats()
        return json_safe(d)

    @classmethod
    def from_dict(cls, d: dict) -> "GraphReport":
        """A graph report from :meth:`to_dict`'s value; a missing or ill-typed field raises
        :class:`~omnicompile.errors.ReportError` naming it (the derived ``summary``,
        ``timeline`` and ``signal_stats`` and any unknown key are ignored)."""
        return from_json_value(cls, d, "graphs[?]")

    def to_markdown(self, all_generations: bool = False) -> str:
        """This graph as Markdown (the timeline shows the latest generation unless
        ``all_generations``)."""
        g = self
        lines = [f"## graph {g.graph_id}", ""]
        if g.cached:
            lines.append(f"cached: guard `{g.guard}`, inner backend `{g.inner_backend}`, "
                         f"timestep input `{g.timestep_input}`, policy `{_policy_text(g.policy)}`")
        else:
            why = g.fallback or Reason("unchanged", "graph compiled unchanged")
            lines.append(f"compiled unchanged: `{why.code}` {md_escape(why.subject + ': ' if why.subject else '')}"
                         f"{md_escape(why.message)}")
        lines += ["", f"{g.nodes} nodes, {g.flops_per_call / 1e6:.3f} MFLOP per call (estimated)", ""]
        if g.block_lists:
            lines += ["| block list | blocks | found by | nodes per block |", "|---|---:|---|---|"]
            for bl in g.block_lists:
                npb = bl.get("nodes_per_block") or []
                shown = str(npb[0]) if npb and len(set(npb)) == 1 else ", ".join(map(str, npb))
                lines.append(f"| `{bl['name']}` | {bl['count']} | {bl['method']} | {shown} |")
            lines.append("")
        if g.spans:
            lines += ["| span | units | streams | side inputs | MFLOP |", "|---|---:|---|---|---:|"]
            for s in g.spans:
                lines.append(f"| `{s.name}` | {s.units} | {', '.join(s.streams)} | "
                             f"{', '.join(s.side_inputs) or '-'} | {s.flops / 1e6:.3f} |")
            lines.append("")
        tc = g.token_cache
        if tc.get("wrapped"):
            lines += [f"token / frame / block caches: {tc.get('merged_calls', 0)} merged calls, "
                      f"{tc.get('full_calls', 0)} full, {tc.get('flops_saved', 0) / 1e6:.3f} MFLOP saved"
                      + (f"; {tc['nonfinite_refreshes']} full call(s) because a cached row was not finite (NaN/inf)"
                         if tc.get("nonfinite_refreshes") else ""), "",
                      "| block | axis | rows skipped | merged inputs | MFLOP (merged / full) | predicted saving ms |",
                      "|---|---|---:|---|---:|---:|"]
            for w in tc["wrapped"]:
                lines.append(f"| `{w['block']}` | {w['axis']} | {w['skipped']} of {w['rows']} | "
                             f"{md_escape(', '.join(w['inputs']))} | {w['flops_merged'] / 1e6:.3f} / {w['flops_full'] / 1e6:.3f} "
                             f"| {_saving(w)} |")
            lines.append("")
        if g.refused:
            lines.append("not cached:")
            lines += [f"- `{r.code}` {md_escape(r.subject + ': ' if r.subject else '')}{md_escape(r.message)}"
                      for r in g.refused]
            lines.append("")
        if g.steps:
            c, u = g.span_decisions
            if g.models > 1:
                lines += [f"{g.models} models share this graph (instances of one class), each with its own caches", ""]
            if g.generation_log:
                lines += ["generations:", ""] + [f"- {r.generation + 1}: {md_escape(_generation_text(r, g.models))}"
                                                 for r in g.generation_log[-8:]] + [""]
            if g.uncertain_calls:
                lines += [f"{g.uncertain_calls} call(s) could not be placed with certainty and computed every "
                          f"span (first: {md_escape(g.first_uncertain)})", ""]
            if g.dropped_calls:
                lines += [md_escape(_dropped_text(g)), ""]
            if g.nonfinite_recomputes:
                lines += [f"{g.nonfinite_recomputes} call(s) computed instead of reusing a cache that was not finite "
                          f"(NaN/inf; first: {md_escape(g.first_nonfinite)})", ""]
            lines += [f"calls {g.calls} in {g.generations} generation(s); span decisions computed {c}, "
                      f"reused {u} (hit rate {g.hit_rate:.1%}); FLOPs saved {g.flops_saved_fraction:.1%} "
                      f"({g.flops_saved / 1e6:.3f} MFLOP); cache held {format_bytes(g.cache_bytes)}", ""]
            gen = None if all_generations else g.steps[-1].generation
            rows = g.timeline(gen)
            names = [s.name for s in g.spans] or sorted({k for r in rows for k in r["decisions"]})
            head = "| gen | step | timestep | calls | " + " | ".join(f"`{n}`" for n in names) + " | FLOPs saved |"
            lines += ["timeline (C computed, R reused, F computed for lack of a cache; one letter per call):",
                      "", head, "|" + "---:|" * 4 + ":---:|" * len(names) + "---:|"]
            for r in rows:
                marks = " | ".join(r["decisions"].get(n, "-") for n in names)
                lines.append(f"| {r['generation'] + 1} | {r['step']} | {format_number(r['timestep'])} | {r['calls']} | "
                             f"{marks} | {r['flops_saved_fraction']:.0%} |")
            lines.append("")
        stats = g.signal_stats()
        if stats:
            keys = [k for k in next(iter(stats.values())) if k != "count"]
            lines += ["| signal | count | " + " | ".join(keys) + " |", "|---|---:|" + "---:|" * len(keys)]
            for name, st in stats.items():
                lines.append(f"| `{name}` | {st['count']} | " + " | ".join(f"{st[k]:.4g}" for k in keys) + " |")
            lines.append("")
        return "\n".join(lines).rstrip() + "\n"


@dataclasses.dataclass
class Report:
    graphs: list[GraphReport]
    #: what the user should know beyond the graphs (Dynamo's recompile limit hit, ...)
    warnings: list[str] = dataclasses.field(default_factory=list)
    #: model calls that reached no omnicache graph (compile_pipeline counts them: Dynamo ran them
    #: without compiling, e.g. past its recompile limit)
    bypassed_calls: int = 0

    @property
    def flops_saved_fraction(self) -> float:
        tot = sum(g.flops_per_call * g.calls for g in self.graphs)
        return sum(g.flops_saved for g in self.graphs) / tot if tot else 0.0

    @property
    def calls(self) -> int:
        return sum(g.calls for g in self.graphs)

    @property
    def hit_rate(self) -> float:
        c = sum(g.span_decisions[0] for g in self.graphs)
        r = sum(g.span_decisions[1] for g in self.graphs)
        return r / (c + r) if c + r else 0.0

    @property
    def flops_saved(self) -> int:
        return sum(g.flops_saved for g in self.graphs)

    @property
    def cache_bytes(self) -> int:
        return sum(g.cache_bytes for g in self.graphs)

    def timeline(self) -> list[dict]:
        """Every graph's :meth:`GraphReport.timeline`, rows tagged with ``graph_id``."""
        return [{"graph_id": g.graph_id, **row} for g in self.graphs for row in g.timeline()]

    def summary(self) -> dict:
        return {"graphs": len(self.graphs), "cached_graphs": sum(g.cached for g in self.graphs),
                "bypassed_calls": self.bypassed_calls, "warnings": list(self.warnings), "calls": self.calls, "hit_rate": self.hit_rate, "flops_saved": self.flops_saved,
                "flops_saved_fraction": self.flops_saved_fraction, "cache_bytes": self.cache_bytes}

    # ------------------------------------------------------------------ export
    def to_dict(self) -> dict:
        return {"summary": json_safe(self.summary()), "graphs": [g.to_dict() for g in self.graphs]}

    def to_json(self, indent: Optional[int] = 2) -> str:
        """Strict JSON (``json.loads`` reads it back; so does :meth:`from_json`)."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict) -> "Report":
        """A report from :meth:`to_dict`'s value, every field checked: a wrong one raises
        :class:`~omnicompile.errors.ReportError` naming it (``graphs[1].steps[3].slot``)."""
        if not isinstance(d, dict):
            raise ReportError(f"report: expected a JSON object with 'graphs', got {type_name(d)}")
        if "graphs" not in d:
            raise ReportError("report field 'graphs' is missing")
        graphs = d["graphs"]
        if not isinstance(graphs, list):
            raise ReportError(f"report field 'graphs': got {type_name(graphs)}; expected a list of graph reports")
        summary = d.get("summary", {})
        if not isinstance(summary, dict):
            raise ReportError(f"report field 'summary': got {type_name(summary)}; expected an object")
        warnings = json_value(summary.get("warnings", []), list[str], "summary.warnings")
        bypassed = json_value(summary.get("bypassed_calls", 0), int, "summary.bypassed_calls")
        return cls([from_json_value(GraphReport, g, f"graphs[{i}]") for i, g in enumerate(graphs)], warnings,
                   bypassed)

    @classmethod
    def from_json(cls, text) -> "Report":
        """:meth:`to_json`'s text (``str`` or UTF-8 ``bytes``) back as a report; anything else —
        not JSON, not UTF-8, nested past :data:`omnicompile.jsonfile.MAX_DEPTH`, a missing or
        ill-typed field — raises :class:`~omnicompile.errors.ReportError`."""
        return cls.from_dict(parse_json(text, "report JSON", ReportError))

    def to_markdown(self, all_generations: bool = False) -> str:
        """A summary table of every graph, then one section per graph."""
        if not self.graphs:
            return "# omnicache report\n\nno graph compiled yet\n"
        lines = ["# omnicache report", ""] + [f"> warning: {md_escape(w)}" for w in self.warnings]
        if self.bypassed_calls:
            lines.append(f"> warning: {self.bypassed_calls} model call(s) reached no omnicache graph (run eagerly by "
                         "Dynamo)")
        if len(lines) > 2:
            lines.append("")
        lines += ["| graph | nodes | status | policy | calls | hit rate | FLOPs saved | cache held |",
                  "|---:|---:|---|---|---:|---:|---:|---:|"]
        for g in self.graphs:
            status = f"cached ({g.guard})" if g.cached else \
                f"unchanged: `{(g.fallback or Reason('unchanged', '')).code}`"
            lines.append(f"| {g.graph_id} | {g.nodes} | {status} | `{_policy_text(g.policy)}` | {g.calls} | "
                         f"{g.hit_rate:.1%} | {g.flops_saved_fraction:.1%} | {format_bytes(g.cache_bytes)} |")
        if len(self.graphs) > 1:
            lines.append(f"| all | | | | {self.calls} | {self.hit_rate:.1%} | {self.flops_saved_fraction:.1%} "
                         f"| {format_bytes(self.cache_bytes)} |")
        lines.append("")
        body = "\n".join(g.to_markdown(all_generations) for g in self.graphs)
        return "\n".join(lines) + "\n" + body

    def __str__(self) -> str:
        if not self.graphs:
            return "omnicache report: no graph compiled yet"
        lines = [f"warning: {w}" for w in self.warnings]
        if self.bypassed_calls:
            lines.append(f"warning: {self.bypassed_calls} model call(s) reached no omnicache graph (run eagerly by Dynamo)")
        for g in self.graphs:
            head = f"graph {g.graph_id}: {g.nodes} nodes, policy {g.policy}"
            if g.specialised:
                head += " (specialised to one shape of a symbolic graph)"
            if not g.cached:
                why = g.fallback or Reason("unchanged", "graph compiled unchanged")
                lines.append(f"{head} -> unchanged ({why})")
            else:
                lines.append(f"{head} -> cached, guard={g.guard}, inner={g.inner_backend}, "
                             f"timestep input {g.timestep_input}")
            for bl in g.block_lists:
                lines.append(f"  block list {bl['name']}: {bl['count']} blocks ({bl['method']}), "
                             f"{bl['nodes_per_block'][0]} nodes each")
            for s in g.spans:
                lines.append(f"  span {s.name}: {s.units} units, streams {', '.join(s.streams)}, "
                             f"side inputs {', '.join(s.side_inputs) or '-'}, {s.flops / 1e6:.2f} MFLOP"
                             + (f", added between blocks (fresh on reuse): {', '.join(s.side_additions)}"
                                if s.side_additions else ""))
            for w in g.token_cache.get("wrapped", []):
                lines.append(f"  wraps {w['block']} along {w['axis']}: {w['skipped']} of {w['rows']} rows skipped, "
                             f"{w['flops_merged'] / 1e6:.2f} of {w['flops_full'] / 1e6:.2f} MFLOP, "
                             f"predicted saving {_saving(w)} ms per call")
            if g.token_cache.get("wrapped"):
                tc = g.token_cache
                lines.append(f"  token/frame/block caches: {tc['merged_calls']} merged calls, {tc['full_calls']} full"
                             + (f" ({tc['nonfinite_refreshes']} because a cached row was not finite)"
                                if tc.get("nonfinite_refreshes") else ""))
            for r in g.refused:
                lines.append(f"  not cached: {r}")
            if g.steps:
                names = [s.name for s in g.spans]
                last_gen = g.steps[-1].generation
                shown = [r for r in g.steps if r.generation == last_gen]
                lines.append(f"  generation {last_gen + 1} of {g.generations}:")
                rec = next((r for r in reversed(g.generation_log) if r.generation == last_gen), None)
                if rec is not None:
                    lines.append(f"  ({_generation_text(rec, g.models)})")
                lines.append("  gen step slot  timestep  " + "  ".join(f"{n:>12}" for n in names))
                for r in shown:
                    marks = "  ".join(f"{r.decisions.get(n, '-'):>12}" for n in names)
                    lines.append(f"  {r.generation + 1:>3} {r.step:>4} {r.slot:>4} {r.timestep:>9.4f}  {marks}")
                c, u = g.span_decisions
                if g.uncertain_calls:
                    lines.append(f"  {g.uncertain_calls} call(s) could not be placed with certainty and computed "
                                 f"every span (first: {g.first_uncertain})")
                if g.dropped_calls:
                    lines.append("  " + _dropped_text(g))
                if g.nonfinite_recomputes:
                    lines.append(f"  {g.nonfinite_recomputes} call(s) computed instead of reusing a cache that was not "
                                 f"finite (NaN/inf; first: {g.first_nonfinite})")
                lines.append(f"  compiled {g.compiled_graphs} rewritten graph(s) in {g.compile_seconds:.1f} s")
                lines.append(f"  calls {g.calls}, span decisions computed {c} / reused {u} "
                             f"(hit rate {g.hit_rate:.1%}), FLOPs saved {g.flops_saved_fraction:.1%}, "
                             f"cache held {g.cache_bytes / 1024:.1f} KiB")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- helpers


def _dropped_text(g: GraphReport) -> str:
    gens = int(g.dropped.get("generations", 0))
    return (f"detail kept for the last {g.report_generations} generation(s): {g.dropped_calls} earlier call(s)"
            + (f" ({gens} generation(s))" if gens else "") + " are counted in the totals only")


def _generation_text(r: GenerationRecord, models: int) -> str:
    who = f"model {r.model}, " if models > 1 else ""
    steps = f"{r.num_steps} steps" if r.num_steps is not None else "step count unknown"
    return f"{who}{steps} from the {r.source if r.source != 'inferred' else 'timestep (no context)'}" + \
        (f": {r.plan}" if r.plan else "")


def _policy_text(policy: dict) -> str:
    rest = " ".join(f"{k}={v}" for k, v in policy.items() if k != "policy")
    return f"{policy.get('policy', '?')}{' ' + rest if rest else ''}"


def _saving(wrapped: dict) -> str:
    """A wrapped region's predicted saving per call (the cost gate, ``omnicompile.merge_cost``)."""
    p = wrapped.get("predicted")
    return "-" if p is None else f"{p['saving_ms']:+.3f}"
