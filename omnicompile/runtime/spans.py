"""The runtime of host-decided schedules (policies ``static``, ``layered``, plugins built on
:class:`~omnicompile.policy.SchedulePolicy`): per CFG slot, one cached residual per live
stream of each span; per call the host asks the schedule which spans to reuse, computes a
span that has no cache yet instead (*forced*), and runs

* ``guard="variants"``: the compiled variant specialised to that decision tuple
  (:func:`~omnicompile.passes.rewrite.build_variant`; every variant the schedule lists is
  compiled up front, others on first use), or
* ``guard="cond"``: the one ``torch.cond`` graph (:func:`~omnicompile.passes.rewrite.build_cond`)
  with host-made predicates.

:meth:`SpanRuntime.want` is the schedule (the policy's ``decide``; a subclass may hold its own,
e.g. the layered plan) and :meth:`SpanRuntime.decisions` adds the forced-compute rule; both
``__call__`` and ``preview`` go through them.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from omnicompile.passes.rewrite import build_cond, build_variant
from omnicompile.preview import Preview
from omnicompile.runtime.base import Runtime, RuntimeContext, call_compiled

__all__ = ["SpanRuntime", "variant_key"]


def variant_key(decision: Sequence[bool]) -> str:
    """``variant_`` + one letter per span: ``R`` reused, ``C`` computed."""
    return "variant_" + "".join("R" if d else "C" for d in decision)


class SpanRuntime(Runtime):
    def __init__(self, ctx: RuntimeContext, policy, spans: Optional[Sequence] = None):
        self.policy = policy
        super().__init__(ctx, spans if spans is not None else policy.select_spans(ctx))
        self._pred = {False: torch.tensor(False), True: torch.tensor(True)}
        self.build()

    # ------------------------------------------------------------------ the schedule
    def want(self, step: int, num_steps: Optional[int]) -> tuple[bool, ...]:
        """The schedule's decision for ``step`` (True = reuse that span)."""
        return tuple(bool(d) for d in self.policy.decide(step, num_steps, len(self.spans)))

    def variants(self) -> list[tuple[bool, ...]]:
        """The decision tuples compiled up front (``guard="variants"``)."""
        return self.policy.variants(len(self.spans))

    def decisions(self, step: int, num_steps: Optional[int], has_cache: Sequence[bool]
                  ) -> tuple[tuple[bool, ...], list[int]]:
        """(decision per span, indices forced to compute because they have no cache yet)."""
        dec = list(self.want(step, num_steps))
        forced = [i for i, d in enumerate(dec) if d and not has_cache[i]]
        for i in forced:
            dec[i] = False
        return tuple(dec), forced

    # ------------------------------------------------------------------ graphs
    def build(self) -> None:
        """Compile what the guard needs up front."""
        if self.guard == "variants":
            for dec in self.variants():
                self._variant(dec)
        else:
            self._cond()

    def _residual_specs(self, which: Sequence[bool]) -> list:
        return [s for sp, on in zip(self.spans, which) if on for s in sp.live_streams]

    def _variant(self, dec: tuple) -> Callable:
        key = variant_key(dec)
        fn = self.compiled.get(key)
        if fn is None:
            reused = [sp.name for sp, d in zip(self.spans, dec) if d] or "no span"
            computed = [sp.name for sp, d in zip(self.spans, dec) if not d] or "no span"
            sig = (f"(*inputs, *residuals of {reused}) -> (*outputs, *residuals of {computed}); "
                   "residuals: live streams, span by span")
            fn = self.compile(key, build_variant(self.gm, self.spans, dec),
                              self.zeros(self._residual_specs(dec)), sig)
        return fn

    def _cond(self) -> Callable:
        fn = self.compiled.get("cond")
        if fn is None:
            preds = [torch.tensor(False) for _ in self.spans]
            sig = "(*inputs, *predicates (True = reuse) per span, *residuals of every span) -> (*outputs, *residuals)"
            fn = self.compile("cond", build_cond(self.gm, self.spans),
                              preds + self.zeros(self._residual_specs([True] * len(self.spans))), sig)
        return fn

    # ------------------------------------------------------------------ calls
    def __call__(self, *args):
        call = self.advance(args)
        n = len(self.spans)
        counts = [len(s.live_streams) for s in self.spans]
        slot_cache = self.slots.setdefault(call.slot, [None] * n)
        dec, forced = self.decisions(call.step, self.num_steps, [c is not None for c in slot_cache])
        if self.guard == "variants":
            fn = self._variant(dec)
            extra = [r for i in range(n) if dec[i] for r in slot_cache[i]]
            outs = call_compiled(fn, list(args) + extra)
            new_res = list(outs[self.n_out:])
            k = 0
            for i in range(n):
                if not dec[i]:
                    slot_cache[i] = new_res[k:k + counts[i]]
                    k += counts[i]
        else:
            fn = self._cond()
            preds = [self._pred[d] for d in dec]
            res = []
            for i in range(n):
                res.extend(slot_cache[i] if slot_cache[i] is not None
                           else self.zeros(self._residual_specs([j == i for j in range(n)])))
            outs = call_compiled(fn, list(args) + preds + res)
            new_res = list(outs[self.n_out:])
            k = 0
            for i in range(n):
                slot_cache[i] = new_res[k:k + counts[i]]
                k += counts[i]
        self.record(call, {sp.name: ("reused" if d else "computed") for sp, d in zip(self.spans, dec)},
                    sum(sp.flops for sp, d in zip(self.spans, dec) if d), [self.spans[i].name for i in forced])
        self.after_call(call, args, outs)
        return tuple(outs[:self.n_out])

    def after_call(self, call, args, outs) -> None:
        """Hook: the call is done and recorded (the layered runtime records its profile here)."""

    def preview(self, steps: int) -> Preview:
        n = len(self.spans)
        has_cache = [False] * n
        rows = []
        for step in range(steps):
            want = self.want(step, steps)
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
        return Preview(steps, [s.name for s in self.spans], [s.flops for s in self.spans],
                       self.report.flops_per_call, rows, self.preview_note(steps))

    def preview_note(self, steps: int) -> Optional[str]:
        return None
