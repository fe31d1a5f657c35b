"""The runtime protocol: what the backend returns to Dynamo for a cached graph.

Dynamo calls a compiled graph once per denoising step (or twice, for CFG run as two calls).
A *runtime* is that callable: it knows where the call sits (generation, step, CFG slot —
:class:`~omnicompile.runtime.tracker.StepTracker`), keeps the cache state per slot, picks the
compiled graph and its extra inputs, and records what happened in the graph's
:class:`~omnicompile.report.GraphReport`.  A policy builds its runtime from a
:class:`RuntimeContext` (``policy.make_runtime(ctx)``, :mod:`omnicompile.policy`).

Every runtime is a :class:`Runtime` and provides, besides ``__call__``:

* ``spans`` — the spans it guards (``set_spans`` also updates the report);
* ``graphs`` / ``signatures`` — every rewritten graph it compiled, by name, and what its
  extra inputs and outputs are (the dumps write them as they are: nothing is rebuilt);
* ``preview(steps)`` — a :class:`~omnicompile.preview.Preview` of one generation of
  ``steps`` steps, from the same rules ``__call__`` applies;
* ``calibrator`` — a :class:`~omnicompile.calibration.Calibrator`, or None;
* ``flush()`` (bring the report up to date; runtimes that decide on the device read their
  records back here) and ``reset()`` (the next call starts a new generation).

Reading the timestep costs one scalar device-to-host copy per call; nothing else syncs.
"""
from __future__ import annotations

import abc
import dataclasses
import logging
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
import torch.fx as fx

from omnicompile.preview import Preview
from omnicompile.report import GraphReport, SpanReport, StepRecord
from omnicompile.runtime.tracker import StepTracker

log = logging.getLogger("omnicompile")

__all__ = ["RuntimeContext", "Runtime", "Call", "call_compiled", "span_reports"]


def call_compiled(fn: Callable, args: Sequence):
    """Call an inner backend's result the way Dynamo calls a backend's result: ``fn(*args)``
    (compile_fx's wrapper copies ``_boxed_call`` from its inner function but takes *args)."""
    return fn(*args)


def span_reports(spans: Sequence) -> list[SpanReport]:
    return [SpanReport(s.name, s.last_unit - s.first_unit + 1, [st.name for st in s.live_streams],
                       [n.name for n in s.side_inputs], s.flops) for s in spans]


@dataclasses.dataclass
class RuntimeContext:
    """What a policy gets to build its runtime from (one compiled graph)."""

    gm: fx.GraphModule                  # Dynamo's graph (never mutated)
    example_inputs: list
    blocks: Any                         # omnicompile.passes.blocks.BlockAnalysis
    analysis: Any                       # omnicompile.passes.spans.SpanAnalysis
    config: Any                         # omnicompile.config.OmniCacheConfig
    report: GraphReport
    #: compiles a rewritten graph: the inner backend, wrapped by the token/frame/block caches
    #: (:class:`omnicompile.merging.MergeLayer`) when they are on
    compile_fn: Callable[[fx.GraphModule, list], Callable]
    #: "variants" or "cond" (the config's choice, or the policy's default for "auto")
    guard: str
    #: the token / frame / block caches of this graph, or None
    merge: Any = None


class Call(NamedTuple):
    generation: int
    step: int
    slot: int
    new: bool          # the first call of a generation
    timestep: float


class Runtime(abc.ABC):
    #: the calibration state of policies that learn from a first generation, else None
    calibrator = None

    def __init__(self, ctx: RuntimeContext, spans: Sequence):
        self.ctx = ctx
        self.gm = ctx.gm
        self.example_inputs = list(ctx.example_inputs)
        self.config = ctx.config
        self.report = ctx.report
        self.compile_fn = ctx.compile_fn
        self.guard = ctx.guard
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        self.ts_index = placeholders.index(ctx.analysis.timestep)
        self.user_index = [placeholders.index(n) for n in ctx.analysis.user_inputs]
        out = next(n for n in self.gm.graph.nodes if n.op == "output")
        val = out.args[0]
        self.n_out = len(val) if isinstance(val, (tuple, list)) else 1
        self.tracker = StepTracker()
        #: per CFG slot, what the runtime keeps between calls (caches, policy state);
        #: cleared when a generation starts
        self.slots: dict[int, Any] = {}
        self.compiled: dict[str, Callable] = {}
        self.graphs: dict[str, fx.GraphModule] = {}
        self.signatures: dict[str, str] = {}
        self.device = self.example_inputs[self.ts_index].device
        for i in self.user_index:
            x = self.example_inputs[i]
            if isinstance(x, torch.Tensor) and x.dim() > 1:
                self.device = x.device
                break
        if ctx.merge is not None:
            ctx.merge.bind(self.tracker)
        self.spans: list = []
        self.set_spans(spans)

    # ------------------------------------------------------------------ spans and graphs
    def set_spans(self, spans: Sequence) -> None:
        """The spans this runtime guards (the report lists them)."""
        self.spans = list(spans)
        self.report.spans = span_reports(self.spans)

    def forget_graphs(self) -> None:
        """Drop every compiled graph (the spans changed; they compile again on demand)."""
        self.compiled.clear()
        self.graphs.clear()
        self.signatures.clear()

    def compile(self, key: str, g: fx.GraphModule, extra_examples: Sequence = (), signature: str = "") -> Callable:
        """Compile the rewritten graph ``g`` (the original inputs plus ``extra_examples``) and
        keep it under ``key`` for the dumps."""
        fn = self.compile_fn(g, self.example_inputs + list(extra_examples))
        self.compiled[key] = fn
        self.graphs[key] = g
        self.signatures[key] = signature
        if self.ctx.merge is not None:       # what the token/frame/block caches made of it
            for suffix, (mg, sig) in self.ctx.merge.rewritten(fn).items():
                self.graphs[f"{key}_{suffix}"] = mg
                self.signatures[f"{key}_{suffix}"] = sig
        return fn

    def zeros(self, specs: Sequence) -> list[torch.Tensor]:
        """Zero tensors for ``(shape, dtype)`` specs (objects with ``.shape``/``.dtype``) on the
        graph's device: example inputs, or the state of a slot without a cache."""
        return [torch.zeros(s.shape, dtype=s.dtype, device=self.device) for s in specs]

    # ------------------------------------------------------------------ calls
    def signature_of(self, args) -> tuple:
        sig = []
        for i in self.user_index:
            a = args[i]
            if isinstance(a, torch.Tensor):
                sig.append((tuple(a.shape), a.dtype, a.device))
            else:
                sig.append(a)
        return tuple(sig)

    def advance(self, args) -> Call:
        """Place the call (reads the timestep) and start a generation where it begins one:
        clear the slots, count it, and let the calibrator begin or end."""
        ts = args[self.ts_index]
        t = float(ts.reshape(-1)[0]) if isinstance(ts, torch.Tensor) else float(ts)
        gen, step, slot, new = self.tracker.advance(t, self.signature_of(args))
        if new:
            self.report.generations += 1
            self.slots.clear()
            self.generation_started()
        return Call(gen, step, slot, new, t)

    def generation_started(self) -> None:
        """Hook: a generation starts (after the slots were cleared)."""
        if self.calibrator is not None:
            self.calibrator.generation_started()

    def record(self, call: Call, decisions: dict, flops_saved: int, forced: Sequence[str] = (),
               signals: Optional[dict] = None) -> None:
        self.report.cache_bytes = self.held_bytes()
        self.report.steps.append(StepRecord(call.generation, call.step, call.slot, call.timestep, decisions,
                                            flops_saved, list(forced), signals or {}))

    def held_bytes(self) -> int:
        """Bytes of every tensor the slots hold (nested lists / dicts)."""
        def walk(v):
            if isinstance(v, torch.Tensor):
                return v.numel() * v.element_size()
            if isinstance(v, dict):
                return sum(walk(x) for x in v.values())
            if isinstance(v, (list, tuple)):
                return sum(walk(x) for x in v)
            return 0
        return walk(self.slots)

    @property
    def num_steps(self) -> Optional[int]:
        return self.config.num_steps or self.tracker.last_length

    # ------------------------------------------------------------------ the protocol
    @abc.abstractmethod
    def __call__(self, *args):
        """One call of the graph: the original outputs, as Dynamo expects them."""

    @abc.abstractmethod
    def preview(self, steps: int) -> Preview:
        """What one generation of ``steps`` steps would do, from the rules ``__call__`` applies."""

    def flush(self) -> None:
        """Bring the report up to date (runtimes that decide in the graph read their
        decisions back here, not in the step loop)."""

    def reset(self) -> None:
        """The next call starts a new generation: caches and step counters are forgotten."""
        self.tracker.reset()
        self.slots.clear()
        self.report.cache_bytes = 0
        if self.ctx.merge is not None:
            self.ctx.merge.reset()
