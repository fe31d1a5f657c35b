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
import contextlib
import contextvars
import dataclasses
import logging
import time
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx

from omnicompile.passes.collectives import cp_group
from omnicompile.passes.common import is_param_placeholder
from omnicompile.preview import Preview
from omnicompile.report import GenerationRecord, GraphReport, SpanReport, StepRecord
from omnicompile.runtime.placement import Place, Session, Sessions
from omnicompile.targets import CallCosts

log = logging.getLogger("omnicompile")

__all__ = ["RuntimeContext", "Runtime", "Call", "call_compiled", "span_reports", "model_call", "note_reached"]

#: set by a model call that wants to know whether it reached omnicache (compile_pipeline counts the
#: calls Dynamo ran without compiling, e.g. past its recompile limit): a list the graphs append to
_MODEL_CALL: contextvars.ContextVar = contextvars.ContextVar("omnicompile_model_call", default=None)


def note_reached() -> None:
    """A graph of omnicache runs for the current model call."""
    marks = _MODEL_CALL.get()
    if marks is not None:
        marks.append(True)


@contextlib.contextmanager
def model_call():
    """Yields a list that is non-empty after the block iff some omnicache graph ran in it."""
    marks: list = []
    token = _MODEL_CALL.set(marks)
    try:
        yield marks
    finally:
        _MODEL_CALL.reset(token)


def call_compiled(fn: Callable, args: Sequence):
    """Call an inner backend's result the way Dynamo calls a backend's result: ``fn(*args)``
    (compile_fx's wrapper copies ``_boxed_call`` from its inner function but takes *args)."""
    return fn(*args)


def _is_symbol(d) -> bool:
    import sympy
    return isinstance(d.node.expr, sympy.Symbol)


def span_reports(spans: Sequence) -> list[SpanReport]:
    return [SpanReport(s.name, s.last_unit - s.first_unit + 1, [st.name for st in s.live_streams],
                       [n.name for n in s.side_inputs], s.flops,
                       [f"{st.name} += {h.name}" for st in s.live_streams for h in st.adds]) for s in spans]


@dataclasses.dataclass
class RuntimeContext:
    """What a policy gets to build its runtime from (one compiled graph)."""

    gm: fx.GraphModule                  # Dynamo's graph (never mutated)
    #: Dynamo's example inputs; the runtime replaces them with fake tensors (Runtime.example_inputs)
    #: so that nothing keeps the model's parameters alive
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
    #: placement without a context shared by the backend's graphs (runtime.placement), or None
    shared_placement: Any = None
    #: each node's eager seconds on this machine (``target_cost="measured"`` and a policy with a
    #: target speedup: :func:`omnicompile.timing.node_seconds`), or None
    node_seconds: Optional[dict] = None
    #: times rewritten graphs against ``gm`` on the real example inputs (with ``node_seconds``:
    #: :class:`omnicompile.timing.CallTimer`); the backend closes it once the runtime is built
    timer: Any = None


@dataclasses.dataclass
class Call:
    """One call, placed: where it sits (:class:`~omnicompile.runtime.placement.Place`), its
    session and its timestep (None for a graph without a timestep input)."""
    place: Place
    session: Session
    timestep: Optional[float]
    args: Sequence = ()
    #: the graph's size symbols -> their values in this call (computed when first needed)
    bindings: Optional[dict] = None

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
        #: the context-parallel group of the graph's collectives (None: not parallel)
        self.cp_group = cp_group(ctx.gm.graph)
        self.config = ctx.config
        self.report = ctx.report
        self.compile_fn = ctx.compile_fn
        self.guard = ctx.guard
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        ts = ctx.analysis.timestep
        self.ts_index = placeholders.index(ts) if ts is not None else None
        self.user_index = [placeholders.index(n) for n in ctx.analysis.user_inputs]
        params = [i for i, n in enumerate(placeholders) if is_param_placeholder(n)]
        #: where each size symbol of the graph can be read in a call: (input, dim or None, symbol)
        self._symbols: list[tuple] = []
        self._fake_mode = None
        for i, n in enumerate(placeholders):
            ev = n.meta.get("example_value")
            if isinstance(ev, torch.SymInt) and _is_symbol(ev):
                self._symbols.append((i, None, ev.node.expr))
            elif isinstance(ev, torch.Tensor) and not is_param_placeholder(n):
                self._fake_mode = self._fake_mode or getattr(ev, "fake_mode", None)
                for k, d in enumerate(ev.shape):
                    if isinstance(d, torch.SymInt) and _is_symbol(d):
                        self._symbols.append((i, k, d.node.expr))
        real = list(ctx.example_inputs)
        #: the concrete sizes of the example inputs (None for a non-tensor input)
        self.input_sizes: list = [tuple(int(d) for d in x.shape) if isinstance(x, torch.Tensor) else None
                                  for x in real]
        #: what the inner compiler gets as the graph's example inputs: fake tensors (Dynamo's
        #: ``example_value`` of each placeholder), never the real tensors — those are the model's
        #: parameters and the caller's inputs, which a runtime must not keep alive
        self.example_inputs = [self._metadata(n, x) for n, x in zip(placeholders, real)]
        ctx.example_inputs = self.example_inputs
        del real
        out = next(n for n in self.gm.graph.nodes if n.op == "output")
        val = out.args[0]
        self.n_out = len(val) if isinstance(val, (tuple, list)) else 1
        #: the sessions (one model in one generation stream) and the placement of each call
        self.sessions = Sessions(params[0] if params else None, self.config.num_steps, ctx.shared_placement)
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

    def _metadata(self, node: fx.Node, x):
        """The example input ``x`` of placeholder ``node`` as metadata: a fake tensor of the same
        shape, strides, dtype and device (Dynamo's own ``example_value`` where the placeholder has
        one; a hand-built graph's real example is converted once); a non-tensor input as it is."""
        from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
        if not isinstance(x, torch.Tensor) or isinstance(x, FakeTensor):
            return x
        ev = node.meta.get("example_value")
        if isinstance(ev, FakeTensor) and ev.dtype == x.dtype and ev.dim() == x.dim():
            return ev
        mode = self._fake_mode or getattr(self, "_own_fake_mode", None)
        if mode is None:
            mode = self._own_fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        return mode.from_tensor(x, static_shapes=True)

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
        t0 = time.perf_counter()
        fn = self.compile_fn(g, self.example_inputs + list(extra_examples))
        self.report.compile_seconds += time.perf_counter() - t0
        self.report.compiled_graphs += 1
        self.compiled[key] = fn
        self.graphs[key] = g
        self.signatures[key] = signature
        if self.ctx.merge is not None:       # what the token/frame/block caches made of it
            for suffix, (mg, sig) in self.ctx.merge.rewritten(fn).items():
                self.graphs[f"{key}_{suffix}"] = mg
                self.signatures[f"{key}_{suffix}"] = sig
        return fn

    def examples(self, specs: Sequence) -> list[torch.Tensor]:
        """Example inputs for the state a rewritten graph takes, from ``(shape, dtype)`` specs
        (objects with ``.shape``/``.dtype``): zeros on the graph's device, or — where a size is
        symbolic (Dynamo's automatic dynamic shapes) — fake tensors of Dynamo's fake mode with
        those symbolic sizes, so the inner compiler keeps them symbolic."""
        out = []
        for s in specs:
            if all(isinstance(d, int) for d in s.shape):
                out.append(torch.zeros(tuple(s.shape), dtype=s.dtype, device=self.device))
            else:
                with self._fake_mode:
                    out.append(torch.zeros(tuple(s.shape), dtype=s.dtype, device=self.device))
        return out

    def zeros(self, call: "Call", specs: Sequence) -> list[torch.Tensor]:
        """Zero state for a call (a slot without a cache yet), at the call's concrete sizes."""
        return [torch.zeros(self.concrete(call, s.shape), dtype=s.dtype, device=self.device) for s in specs]

    def concrete(self, call: "Call", shape: Sequence) -> tuple:
        """``shape`` with its symbolic sizes evaluated for the call's inputs."""
        if all(isinstance(d, int) for d in shape):
            return tuple(shape)
        if call.bindings is None:
            call.bindings = self._bind(call.args)
        return tuple(d if isinstance(d, int) else int(d.node.expr.xreplace(call.bindings)) for d in shape)

    def _bind(self, args) -> dict:
        """The values of the graph's size symbols in this call: from its SymInt inputs and the
        symbolic dims of its tensor inputs."""
        out = {}
        for i, k, sym in self._symbols:
            a = args[i]
            out[sym] = int(a) if k is None else int(a.shape[k])
        return out

    # ------------------------------------------------------------------ calls
    def signature_of(self, args) -> tuple:
        """The input tensors' shapes, dtypes and devices, as a sorted multiset (a change starts a
        new generation).  Only tensors, in no particular order: graphs Dynamo recompiled for the
        same model lift different sizes as integer inputs (``dynamic=True``: a stride-0 input adds
        a symbol) and share the model's placement only if their calls have the same signature
        (``make fuzz`` seed 20261204, case 456: an uncond call counted as a new stream)."""
        sig = []
        for i in self.user_index:
            a = args[i]
            if isinstance(a, torch.Tensor):
                sig.append((tuple(a.shape), str(a.dtype), str(a.device)))
        return tuple(sorted(sig))

    def advance(self, args) -> Call:
        """Place the call (reads the timestep: one scalar copy) and, where its session begins
        a generation, count it and let the calibrator begin."""
        note_reached()
        t, dtype = None, None
        if self.ts_index is not None:
            ts = args[self.ts_index]
            if isinstance(ts, torch.Tensor):
                t, dtype = float(ts.reshape(-1)[0]), ts.dtype
            else:
                t = float(ts)
        place, session = self.sessions.place(args, t, self.signature_of(args), dtype)
        call = Call(place, session, t, args)
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
        self.report.add_step(StepRecord(call.generation, call.step, call.slot, t, decisions, flops_saved,
                                            list(forced), signals or {}, call.model, call.place.why))

    def call_costs(self, saved: float, configs: Callable) -> CallCosts:
        """What a computed and a reused call cost (:class:`~omnicompile.targets.CallCosts`):
        with the backend's timer (``target_cost="measured"``) the two graphs
        ``configs(timer) -> ((graph, extra inputs), (graph, extra inputs))`` timed eagerly
        against Dynamo's graph; else — or when timing fails outside strict mode, or measures no
        saving — the share model ``(1, 1 - saved)``."""
        share = CallCosts.of(saved)
        timer = self.ctx.timer
        if timer is None:
            return share
        try:
            compute, reuse = timer.ratios(list(configs(timer)))
            # a computed call runs every node of Dynamo's graph and the cache's work besides:
            # measured cheaper than the uncached call is the machine's noise (it counts as 1)
            got = CallCosts(max(1.0, compute), reuse, measured=True)
        except Exception:
            if self.config.strict:
                raise
            log.warning("omnicache: timing the rewritten graph for target_cost='measured' failed; using the "
                        "time share of the spans", exc_info=True)
            return share
        if not got.reuse < got.compute:
            log.warning("omnicache: target_cost='measured': a reused call measured no faster than a computed one "
                        "(%.3f vs %.3f of an uncached call); using the time share of the spans", got.reuse,
                        got.compute)
            return share
        return got

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
