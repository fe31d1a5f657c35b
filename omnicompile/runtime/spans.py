"""The runtime of host-decided schedules (policies ``static``, ``layered``, plugins built on
:class:`~omnicompile.policy.SchedulePolicy`): per session and CFG slot, one cached residual
per live stream of each span; per call the host asks the schedule which spans to reuse,
computes a span that has no cache yet instead (*forced*) — and every span when the call could
not be placed with certainty — and runs

* ``guard="variants"``: the compiled variant specialised to that decision tuple
  (:func:`~omnicompile.passes.rewrite.build_variant`; every variant the schedule lists is
  compiled up front, others on first use), or
* ``guard="cond"``: the one ``torch.cond`` graph (:func:`~omnicompile.passes.rewrite.build_cond`)
  with host-made predicates.

:meth:`SpanRuntime.want` is the schedule (the policy's ``decide`` with the call's step and step
count; a subclass may hold its own, e.g. the layered plan) and :meth:`SpanRuntime.decisions`
adds the forced-compute rule; both ``__call__`` and ``preview`` go through them.  The spans a
generation guards may differ per model and step count (the layered plan): a runtime keeps the
compiled graphs of every span set it used.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from omnicompile.passes.rewrite import build_cond, build_variant
from omnicompile.preview import Preview
from omnicompile.runtime.base import Call, Runtime, RuntimeContext

__all__ = ["SpanRuntime", "variant_key"]


def _contiguous(tensors) -> list:
    """State fed back into compiled graphs, in the layout they were compiled for: Inductor may
    return a residual in another stride order (a transposed view), and its compiled graphs assert
    the strides of their inputs (no copy when already contiguous)."""
    return [t.contiguous() for t in tensors]


def variant_key(decision: Sequence[bool]) -> str:
    """``variant_`` + one letter per span: ``R`` reused, ``C`` computed."""
    return "variant_" + "".join("R" if d else "C" for d in decision)


class SpanRuntime(Runtime):
    def __init__(self, ctx: RuntimeContext, policy, spans: Optional[Sequence] = None):
        self.policy = policy
        self._sets: dict[tuple, int] = {}        # span names -> index of the span set (graph names)
        self._known: dict[str, object] = {}       # span name -> span, of every set
        super().__init__(ctx, spans if spans is not None else policy.select_spans(ctx))
        self._pred = {False: torch.tensor(False), True: torch.tensor(True)}
        self.build(self.spans)

    # ------------------------------------------------------------------ the schedule
    def spans_for(self, call: Call) -> list:
        """The spans guarded in the generation of ``call`` (fixed for the generation)."""
        return self.spans

    def want(self, step: int, num_steps: Optional[int], spans: Sequence, call: Optional[Call] = None
             ) -> tuple[bool, ...]:
        """The schedule's decision for ``step`` (True = reuse that span)."""
        return tuple(bool(d) for d in self.policy.decide(step, num_steps, len(spans)))

    def variants(self, spans: Sequence) -> list[tuple[bool, ...]]:
        """The decision tuples compiled up front (``guard="variants"``)."""
        return self.policy.variants(len(spans))

    def decisions(self, want: Sequence[bool], has_cache: Sequence[bool], certain: bool = True
                  ) -> tuple[tuple[bool, ...], list[int]]:
        """(decision per span, indices forced to compute because they have no cache yet).  An
        uncertain call computes everything (not counted as forced: the report gives its
        reason)."""
        if not certain:
            return (False,) * len(want), []
        dec = list(want)
        forced = [i for i, d in enumerate(dec) if d and not has_cache[i]]
        for i in forced:
            dec[i] = False
        return tuple(dec), forced

    # ------------------------------------------------------------------ graphs
    def build(self, spans: Sequence) -> None:
        """Compile what the guard needs up front for ``spans``."""
        if self.guard == "variants":
            for dec in self.variants(spans):
                self._variant(spans, dec)
        else:
            self._cond(spans)

    def _name(self, spans: Sequence, base: str) -> str:
        """Graph names: ``variant_RC``, ``cond`` for the first span set, ``…@k`` for others."""
        key = tuple(s.name for s in spans)
        k = self._sets.get(key)
        if k is None:
            k = self._sets[key] = len(self._sets)
            for s in spans:
                self._known.setdefault(s.name, s)
        return base if k == 0 else f"{base}@{k}"

    def known_spans(self) -> list:
        """Every span any generation of this runtime guarded (or compiled for)."""
        return list(self._known.values())

    @staticmethod
    def _residual_specs(spans: Sequence, which: Sequence[bool]) -> list:
        return [s for sp, on in zip(spans, which) if on for s in sp.live_streams]

    def _variant(self, spans: Sequence, dec: tuple) -> Callable:
        key = self._name(spans, variant_key(dec))
        fn = self.compiled.get(key)
        if fn is None:
            reused = [sp.name for sp, d in zip(spans, dec) if d] or "no span"
            computed = [sp.name for sp, d in zip(spans, dec) if not d] or "no span"
            sig = (f"(*inputs, *residuals of {reused}) -> (*outputs, *residuals of {computed}); "
                   "residuals: live streams, span by span")
            fn = self.compile(key, build_variant(self.gm, spans, dec), self.examples(self._residual_specs(spans, dec)),
                              sig)
        return fn

    def _cond(self, spans: Sequence) -> Callable:
        key = self._name(spans, "cond")
        fn = self.compiled.get(key)
        if fn is None:
            preds = [torch.tensor(False) for _ in spans]
            sig = "(*inputs, *predicates (True = reuse) per span, *residuals of every span) -> (*outputs, *residuals)"
            fn = self.compile(key, build_cond(self.gm, spans),
                              preds + self.examples(self._residual_specs(spans, [True] * len(spans))), sig)
        return fn

    # ------------------------------------------------------------------ calls
    def __call__(self, *args):
        call = self.advance(args)
        spans = call.session.data.get("spans")
        if spans is None:               # chosen once per generation
            spans = call.session.data["spans"] = self.spans_for(call)
            if [s.name for s in spans] != [s.name for s in self.spans]:
                self.set_spans(spans)
        n = len(spans)
        counts = [len(s.live_streams) for s in spans]
        slot_cache = call.slots.setdefault(call.slot, [None] * n)
        dec, forced = self.decisions(self.want(call.step, call.num_steps, spans, call),
                                     [c is not None for c in slot_cache], call.certain)
        if self.guard == "variants":
            fn = self._variant(spans, dec)
            extra = [r for i in range(n) if dec[i] for r in slot_cache[i]]
            outs = self.invoke(call, fn, list(args) + extra)
            new_res = _contiguous(outs[self.n_out:])
            k = 0
            for i in range(n):
                if not dec[i]:
                    slot_cache[i] = new_res[k:k + counts[i]]
                    k += counts[i]
        else:
            fn = self._cond(spans)
            preds = [self._pred[d] for d in dec]
            res = []
            for i in range(n):
                res.extend(slot_cache[i] if slot_cache[i] is not None
                           else self.zeros(call, self._residual_specs(spans, [j == i for j in range(n)])))
            outs = self.invoke(call, fn, list(args) + preds + res)
            new_res = _contiguous(outs[self.n_out:])
            k = 0
            for i in range(n):
                slot_cache[i] = new_res[k:k + counts[i]]
                k += counts[i]
        self.record(call, {sp.name: ("reused" if d else "computed") for sp, d in zip(spans, dec)},
                    sum(sp.flops for sp, d in zip(spans, dec) if d), [spans[i].name for i in forced])
        self.after_call(call, args, outs)
        return tuple(outs[:self.n_out])

    def generation_plan(self, call: Call) -> str:
        n = call.num_steps
        if n is None:
            return "step count unknown: " + ("" if call.certain else "uncertain placement; ") + \
                "the schedule is asked per step"
        spans = self.spans_for(call)
        marks = ["".join("R" if self.want(t, n, spans, call)[k] else "C" for t in range(n)) for k in range(len(spans))]
        return ", ".join(f"{sp.name} {m}" for sp, m in zip(spans, marks))

    def after_call(self, call: Call, args, outs) -> None:
        """Hook: the call is done and recorded (the layered runtime records its profile here)."""

    def preview_spans(self, steps: int) -> list:
        """The spans a generation of ``steps`` steps would guard."""
        return self.spans

    def preview(self, steps: int) -> Preview:
        spans = self.preview_spans(steps)
        n = len(spans)
        has_cache = [False] * n
        rows = []
        for step in range(steps):
            want = self.want(step, steps, spans)
            row = []
            for k in range(n):
                if want[k] and has_cache[k]:
                    row.append("reused")
                elif want[k]:
                    row.append("forced")
                else:
                    row.append("computed")
                has_cache[k] = True
            rows.append(row)
        return Preview(steps, [s.name for s in spans], [s.flops for s in spans],
                       self.report.flops_per_call, rows, self.preview_note(steps))

    def preview_note(self, steps: int) -> Optional[str]:
        return None
