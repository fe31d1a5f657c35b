"""What the backend did, per compiled graph and per call.

``OmniCache.report()`` returns a :class:`Report`; ``str(report)`` is a readable table.
Everything is plain dataclasses so later tools (markdown/JSON export, the CLI) read the
same facts.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from omnicompile.passes.common import Reason

__all__ = ["SpanReport", "StepRecord", "GraphReport", "Report"]


@dataclasses.dataclass
class SpanReport:
    name: str
    units: int
    streams: list[str]
    side_inputs: list[str]
    flops: int


@dataclasses.dataclass
class StepRecord:
    generation: int
    step: int
    slot: int
    timestep: float
    decisions: dict[str, str]   # span -> "computed" | "reused"
    flops_saved: int
    forced: list[str] = dataclasses.field(default_factory=list)  # spans computed for lack of a cache


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

    @property
    def calls(self) -> int:
        return len(self.steps)

    @property
    def span_decisions(self) -> tuple[int, int]:
        computed = sum(v == "computed" for r in self.steps for v in r.decisions.values())
        reused = sum(v == "reused" for r in self.steps for v in r.decisions.values())
        return computed, reused

    @property
    def hit_rate(self) -> float:
        c, r = self.span_decisions
        return r / (c + r) if c + r else 0.0

    @property
    def flops_saved(self) -> int:
        return sum(r.flops_saved for r in self.steps)

    @property
    def flops_saved_fraction(self) -> float:
        total = self.flops_per_call * self.calls
        return self.flops_saved / total if total else 0.0


@dataclasses.dataclass
class Report:
    graphs: list[GraphReport]

    @property
    def flops_saved_fraction(self) -> float:
        tot = sum(g.flops_per_call * g.calls for g in self.graphs)
        return sum(g.flops_saved for g in self.graphs) / tot if tot else 0.0

    def __str__(self) -> str:
        if not self.graphs:
            return "omnicache report: no graph compiled yet"
        lines = []
        for g in self.graphs:
            head = f"graph {g.graph_id}: {g.nodes} nodes, policy {g.policy}"
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
                             f"side inputs {', '.join(s.side_inputs) or '-'}, {s.flops / 1e6:.2f} MFLOP")
            for r in g.refused:
                lines.append(f"  not cached: {r}")
            if g.steps:
                names = [s.name for s in g.spans]
                last_gen = g.steps[-1].generation
                shown = [r for r in g.steps if r.generation == last_gen]
                lines.append(f"  generation {last_gen} of {g.generations}:")
                lines.append("  gen step slot  timestep  " + "  ".join(f"{n:>12}" for n in names))
                for r in shown:
                    marks = "  ".join(f"{r.decisions.get(n, '-'):>12}" for n in names)
                    lines.append(f"  {r.generation:>3} {r.step:>4} {r.slot:>4} {r.timestep:>9.4f}  {marks}")
                c, u = g.span_decisions
                lines.append(f"  calls {g.calls}, span decisions computed {c} / reused {u} "
                             f"(hit rate {g.hit_rate:.1%}), FLOPs saved {g.flops_saved_fraction:.1%}, "
                             f"cache held {g.cache_bytes / 1024:.1f} KiB")
        return "\n".join(lines)
