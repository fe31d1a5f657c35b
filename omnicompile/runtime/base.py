"""The runtime protocol: what the backend returns to Dynamo for a cached graph.

Dynamo calls a compiled graph once per denoising step (or twice, for CFG run as two calls).
A *runtime* is that callable: it knows where the call sits — which model, generation, step,
step count and CFG slot (:mod:`~omnicompile.runtime.placement`: from the generation context,
or inferred conservatively) — keeps the cache state per session (one model in one generation
stream) and slot, picks the compiled graph and its extra inputs, and records what happened in
the graph's :class:`~omnicompile.report.GraphReport`.  A call the runtime cannot place with
certainty computes every span.  A policy builds its runtime from a
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
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx

from omnicompile.passes.common import is_param_placeholder
from omnicompile.preview import Preview
from omnicompile.report import GenerationRecord, GraphReport, SpanReport, StepRecord
from omnicompile.runtime.placement import Place, Session, Sessions

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


@dataclasses.dataclass
class Call:
    """One call, placed: where it sits (:class:`~omnicompile.runtime.placement.Place`), its
    session and its timestep (None for a graph without a timestep input)."""
    place: Place
    session: Session
    timestep: Optional[float]

    @property
    def generation(self) -> int:
        return self.place.generation

    @property
    def step(self) -> int:
        return self.place.step

    @property
    def slot(self) -> int:
        return self.place.slot

    @property
    def new(self) -> bool:
        return self.place.new

    @property
    def model(self) -> int:
        return self.place.model

    @property
    def num_steps(self) -> Optional[int]:
        return self.place.num_steps

    @property
    def certain(self) -> bool:
        return self.place.certain

    @property
    def slots(self) -> dict:
        """The session's caches, per CFG slot."""
        return self.session.slots


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
        ts = ctx.analysis.timestep
        self.ts_index = placeholders.index(ts) if ts is not None else None
        self.user_index = [placeholders.index(n) for n in ctx.analysis.user_inputs]
        params = [i for i, n in enumerate(placeholders) if is_param_placeholder(n)]
        out = next(n for n in self.gm.graph.nodes if n.op == "output")
        val = out.args[0]
        self.n_out = len(val) if isinstance(val, (tuple, list)) else 1
        #: the sessions (one model in one generation stream) and the placement of each call
        self.sessions = Sessions(params[0] if params else None, self.config.num_steps)
        self.compiled: dict[str, Callable] = {}
        self.graphs: dict[str, fx.GraphModule] = {}
        self.signatures: dict[str, str] = {}
        self.device = None
        for i in ([self.ts_index] if self.ts_index is not None else []) + self.user_index:
            x = self.example_inputs[i]
            if isinstance(x, torch.Tensor):
                self.device = x.device
                if x.dim() > 1:
                    break
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
        """The input shapes, dtypes and devices (a change starts a new generation)."""
        sig = []
        for i in self.user_index:
            a = args[i]
            if isinstance(a, torch.Tensor):
                sig.append((tuple(a.shape), a.dtype, a.device))
            else:
                sig.append(a)
        return tuple(sig)

    def advance(self, args) -> Call:
        """Place the call (reads the timestep: one scalar copy) and, where its session begins
        a generation, count it and let the calibrator begin."""
        t, dtype = None, None
        if self.ts_index is not None:
            ts = args[self.ts_index]
            if isinstance(ts, torch.Tensor):
                t, dtype = float(ts.reshape(-1)[0]), ts.dtype
            else:
                t = float(ts)
        place, session = self.sessions.place(args, t, self.signature_of(args), dtype)
        call = Call(place, session, t)
        if call.new:
            if self.calibrator is not None:
                self.calibrator.session_ended(session)     # the stream's previous generation
            session.clear()
            self.report.generations += 1
            self.report.models = self.sessions.models
            self.generation_started(call)
        return call

    def generation_started(self, call: Call) -> None:
        """Hook: a generation starts (its session's caches are empty): the calibrator may
        begin; the report records what the generation runs by."""
        if self.calibrator is not None:
            self.calibrator.generation_started(call)
        self.report.add_generation(GenerationRecord(call.generation, call.model, call.place.source,
                                                    call.num_steps, self.generation_plan(call),
                                                    call.place.context))

    def generation_plan(self, call: Call) -> str:
        """What the generation of ``call`` runs by, for the report (a schedule, a calibration)."""
        return ""

    def invoke(self, call: Call, fn: Callable, args: Sequence):
        """Run a compiled graph for ``call`` (the merge layer keeps its state in the call's
        session)."""
        if self.ctx.merge is None:
            return call_compiled(fn, args)
        with self.ctx.merge.serving(call.session, call.slot):
            return call_compiled(fn, args)

    def record(self, call: Call, decisions: dict, flops_saved: int, forced: Sequence[str] = (),
               signals: Optional[dict] = None) -> None:
        self.report.cache_bytes = self.held_bytes()
        t = call.timestep if call.timestep is not None else float("nan")
        self.report.steps.append(StepRecord(call.generation, call.step, call.slot, t, decisions, flops_saved,
                                            list(forced), signals or {}, call.model, call.place.why))

    def held_bytes(self) -> int:
        """Bytes of every tensor the sessions hold (caches, the merge layer's state)."""
        return sum(s.held_bytes() for s in self.sessions.all())

    def known_spans(self) -> list:
        """Every span this runtime guarded (a runtime whose spans change per generation lists
        them all)."""
        return list(self.spans)

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
        """The next call of every stream starts a new generation: caches are forgotten (a
        calibration in progress ends here)."""
        if self.calibrator is not None:
            self.calibrator.finish()
        self.sessions.reset()
        self.report.cache_bytes = 0
