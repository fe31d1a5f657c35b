"""Per compiled graph: the cache state, the step counter and the choice of branch.

The graph Dynamo hands us is called once per denoising step (or twice, for CFG run as two
calls).  The runtime

* reads the timestep input to know where it is: a value equal to the previous one is
  another call of the same step (the next *slot*, e.g. uncond after cond); a value that
  continues the direction of the trajectory is the next step; a value that reverses it,
  repeats an earlier step, or arrives with new input shapes/dtypes/devices starts a new
  *generation* and clears the cache;
* keeps one cache per slot: for each span, the residual of each live stream;
* asks the policy what to reuse, forces a compute where the slot has no cache yet, and
  runs the matching compiled variant (``guard="variants"``) or the single ``torch.cond``
  graph with host-made predicates (``guard="cond"``);
* records what happened in the graph's :class:`~omnicompile.report.GraphReport`.

Reading the timestep is one scalar device-to-host copy per call; the schedule itself needs
no other synchronisation.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Optional, Sequence

import torch
import torch.fx as fx

from omnicompile.config import OmniCacheConfig
from omnicompile.passes.rewrite import build_cond, build_variant, residual_specs
from omnicompile.passes.spans import SpanAnalysis
from omnicompile.policies import Policy
from omnicompile.report import GraphReport, StepRecord

log = logging.getLogger("omnicompile")

__all__ = ["StepTracker", "GraphRuntime", "call_compiled"]


def call_compiled(fn: Callable, args: Sequence):
    """Call an inner backend's result the way Dynamo calls a backend's result: ``fn(*args)``
    (compile_fx's wrapper copies ``_boxed_call`` from its inner function but takes *args)."""
    return fn(*args)


class StepTracker:
    """Turns the sequence of (timestep, input signature) of the calls into
    (generation, step, slot)."""

    def __init__(self):
        self.generation = -1
        self.last_length: Optional[int] = None
        self._forced = False
        self._start(None)

    def _start(self, signature) -> None:
        self.signature = signature
        self.t0: Optional[float] = None   # first timestep of the generation
        self.step = -1
        self.slot = 0
        self.t: Optional[float] = None
        self.direction = 0
        self.seen: set[float] = set()

    def reset(self) -> None:
        """The next call starts a new generation (numbering keeps counting up)."""
        self._forced = True

    def advance(self, t: float, signature) -> tuple[int, int, int, bool]:
        new = False
        if self.generation < 0 or signature != self.signature or self._forced:
            new = True
            self._forced = False
        elif t == self.t:
            self.slot += 1
            return self.generation, self.step, self.slot, False
        else:
            d = 1 if t > self.t else -1
            if (self.direction and d != self.direction) or t in self.seen or math.isnan(t):
                new = True
            else:
                self.direction = d
                self.step += 1
                self.slot = 0
        if new:
            if self.generation >= 0 and signature == self.signature:
                self.last_length = self.step + 1 if self.step >= 0 else self.last_length
            elif signature != self.signature:
                self.last_length = None
            self.generation += 1
            self._start(signature)
            self.step = 0
        self.t = t
        if self.t0 is None:
            self.t0 = t
        self.seen.add(t)
        return self.generation, self.step, self.slot, new


class _RuntimeBase:
    """What every runtime shares: where the timestep and user inputs are, the step
    tracker, the device, and the graph's report."""

    def __init__(self, gm: fx.GraphModule, example_inputs: list, analysis: SpanAnalysis,
                 config: OmniCacheConfig, policy: Policy, report: GraphReport,
                 compile_fn: Callable[[fx.GraphModule, list], Callable]):
        self.gm = gm
        self.example_inputs = list(example_inputs)
        self.config = config
        self.policy = policy
        self.report = report
        self.compile_fn = compile_fn
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.ts_index = placeholders.index(analysis.timestep)
        self.user_index = [placeholders.index(n) for n in analysis.user_inputs]
        out = next(n for n in gm.graph.nodes if n.op == "output")
        val = out.args[0]
        self.n_out = len(val) if isinstance(val, (tuple, list)) else 1
        self.tracker = StepTracker()
        #: per CFG slot, what the runtime keeps between calls (caches, policy state);
        #: cleared when a generation starts
        self.slots: dict[int, object] = {}
        self.compiled: dict = {}
        self.dumps: dict[str, str] = {}
        self.graphs: dict[str, fx.GraphModule] = {}   # the rewritten graphs, for dumps
        self.device = self.example_inputs[self.ts_index].device
        for i in self.user_index:
            x = self.example_inputs[i]
            if isinstance(x, torch.Tensor) and x.dim() > 1:
                self.device = x.device
                break

    def _compile(self, key: str, g: fx.GraphModule, extra_examples: list) -> Callable:
        fn = self.compile_fn(g, self.example_inputs + list(extra_examples))
        self.compiled[key] = fn
        self.dumps[key] = g.code
        self.graphs[key] = g
        return fn

    def _signature(self, args) -> tuple:
        sig = []
        for i in self.user_index:
            a = args[i]
            if isinstance(a, torch.Tensor):
                sig.append((tuple(a.shape), a.dtype, a.device))
            else:
                sig.append(a)
        return tuple(sig)

    def _advance(self, args) -> tuple[int, int, int, bool, float]:
        ts = args[self.ts_index]
        t = float(ts.reshape(-1)[0]) if isinstance(ts, torch.Tensor) else float(ts)
        gen, step, slot, new = self.tracker.advance(t, self._signature(args))
        if new:
            self.report.generations += 1
            self.slots.clear()
        return gen, step, slot, new, t

    def _held_bytes(self) -> int:
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

    def flush(self) -> None:
        """Bring the report up to date (runtimes that decide in the graph read their
        decisions back here, not in the step loop)."""

    def reset(self) -> None:
        self.tracker.reset()
        self.slots.clear()
        self.report.cache_bytes = 0


class GraphRuntime(_RuntimeBase):
    """Runtime of host-decided policies (``static``): per slot, one cached residual per
    live stream of each span; the host picks the decisions and the compiled graph."""

    def __init__(self, gm, example_inputs, analysis, config, policy, report, compile_fn, guard: str):
        super().__init__(gm, example_inputs, analysis, config, policy, report, compile_fn)
        self.spans = policy.select_spans(gm, analysis)
        self.guard = guard
        self.counts = [len(s.live_streams) for s in self.spans]
        self._pred = {False: torch.tensor(False), True: torch.tensor(True)}
        if guard == "variants":
            for dec in policy.variants(len(self.spans)):
                self._variant(dec)
        else:
            self._cond()

    def _zeros(self, which: Sequence[bool]) -> list[torch.Tensor]:
        return [torch.zeros(s.shape, dtype=s.dtype, device=self.device)
                for sp, on in zip(self.spans, which) if on for s in sp.live_streams]

    def _variant(self, dec: tuple) -> Callable:
        key = "variant_" + "".join("R" if d else "C" for d in dec)
        fn = self.compiled.get(key)
        if fn is None:
            fn = self._compile(key, build_variant(self.gm, self.spans, dec), self._zeros(dec))
        return fn

    def _cond(self) -> Callable:
        fn = self.compiled.get("cond")
        if fn is None:
            preds = [torch.tensor(False) for _ in self.spans]
            fn = self._compile("cond", build_cond(self.gm, self.spans), preds + self._zeros([True] * len(self.spans)))
        return fn

    def __call__(self, *args):
        gen, step, slot, new, t = self._advance(args)
        n = len(self.spans)
        slot_cache = self.slots.setdefault(slot, [None] * n)
        dec = list(self.policy.decide(step, self.num_steps, n))
        forced = []
        for i in range(n):
            if dec[i] and slot_cache[i] is None:
                dec[i] = False
                forced.append(self.spans[i].name)
        dec_t = tuple(dec)
        if self.guard == "variants":
            fn = self._variant(dec_t)
            extra = [r for i in range(n) if dec_t[i] for r in slot_cache[i]]
            outs = call_compiled(fn, list(args) + extra)
            new_res = list(outs[self.n_out:])
            k = 0
            for i in range(n):
                if not dec_t[i]:
                    slot_cache[i] = new_res[k:k + self.counts[i]]
                    k += self.counts[i]
        else:
            fn = self._cond()
            preds = [self._pred[d] for d in dec_t]
            res = []
            for i, sp in enumerate(self.spans):
                res.extend(slot_cache[i] if slot_cache[i] is not None else self._zeros(
                    [j == i for j in range(n)]))
            outs = call_compiled(fn, list(args) + preds + res)
            new_res = list(outs[self.n_out:])
            k = 0
            for i in range(n):
                slot_cache[i] = new_res[k:k + self.counts[i]]
                k += self.counts[i]
        self.report.cache_bytes = self._held_bytes()
        saved = sum(sp.flops for sp, d in zip(self.spans, dec_t) if d)
        self.report.steps.append(StepRecord(
            gen, step, slot, t,
            {sp.name: ("reused" if d else "computed") for sp, d in zip(self.spans, dec_t)},
            saved, forced))
        return tuple(outs[:self.n_out])


class InGraphRuntime(_RuntimeBase):
    """Runtime of policies that decide inside the graph (``probe``).

    The policy's ``build(gm, analysis)`` returns the rewritten graph and the specs of its
    state tensors; the graph takes ``(*orig, *host_inputs, *state)`` and returns
    ``(*orig_out, *state', *records)``.  The runtime keeps the state per CFG slot, passes
    the host inputs the policy derives from the step index (no device value is read), and
    keeps the records (device tensors) until the report is read.
    """

    def __init__(self, gm, example_inputs, analysis, config, policy, report, compile_fn, guard=None):
        super().__init__(gm, example_inputs, analysis, config, policy, report, compile_fn)
        built = policy.build(gm, analysis)
        self.plan = built
        self.spans = built.spans
        self.specs = built.state_specs()
        self.pending: list = []
        self._flags = {b: torch.tensor(b, device=self.device) for b in (False, True)}
        g = policy.build_graph(gm, built)
        self._fn = self._compile("probe", g, [self._flags[False]] + self._init_state())

    def _init_state(self) -> list[torch.Tensor]:
        return [torch.zeros(s.shape, dtype=s.dtype, device=self.device) for s in self.specs]

    def __call__(self, *args):
        gen, step, slot, new, t = self._advance(args)
        st = self.slots.get(slot)
        force = self.policy.force(step, self.num_steps, t, self.tracker) or st is None
        if st is None:
            st = self._init_state()
        outs = call_compiled(self._fn, list(args) + [self._flags[bool(force)]] + st)
        n_state = len(self.specs)
        self.slots[slot] = list(outs[self.n_out:self.n_out + n_state])
        records = outs[self.n_out + n_state:]
        self.pending.append((gen, step, slot, t, bool(force), records))
        self.report.cache_bytes = self._held_bytes()
        return tuple(outs[:self.n_out])

    def flush(self) -> None:
        for gen, step, slot, t, force, records in self.pending:
            reuse = bool(records[0]) and not force
            signals = {} if force else {"error": float(records[1]), "gamma": float(records[2])}
            self.report.steps.append(StepRecord(
                gen, step, slot, t,
                {sp.name: ("reused" if reuse else "computed") for sp in self.spans},
                sum(sp.flops for sp in self.spans) if reuse else 0, signals=signals))
        self.pending.clear()
