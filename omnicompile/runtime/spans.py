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
adds the forced-compute rule; both ``__call__`` and ``preview`` go through them.

Non-finite caches are never replayed: every compiled graph also returns, per span it computes,
whether the new residuals are all finite (computed in the graph where the cache is refreshed).
With variants the host reads that flag only when it is about to reuse the cache, right after the
timestep read that already synchronises the call (once per cache); a cache that is not finite is
dropped and the span computed (``StepRecord.nonfinite``, ``GraphReport.nonfinite_recomputes``).
With ``cond`` the flag is graph state and part of the predicate (no host read); which spans it
turned into computes is read back in ``flush()``, with the report.  The spans a
generation guards may differ per model and step count (the layered plan): a runtime keeps the
compiled graphs of every span set it used.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from omnicompile.passes.common import Reason
from omnicompile.passes.rewrite import build_cond, build_variant
from omnicompile.targets import saved_fraction
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
        #: variants rewritten to be timed (:meth:`_timed_variants`), compiled by :meth:`build` as they are
        self._prebuilt: dict[str, object] = {}
        bind = getattr(policy, "bind_cost", None)      # a policy with a target speedup sizes its schedule
        if bind is not None:
            bind(self.call_costs(saved_fraction(self.spans, self.report.flops_per_call, ctx.node_seconds),
                                 self._timed_variants), self.report)
        self._pred = {False: torch.tensor(False), True: torch.tensor(True)}
        self._scalars: dict = {}                  # host float -> 0-d device tensor (extrapolate)
        if getattr(policy, "extrapolate", False) and self.guard != "variants":
            self.report.refused.append(Reason(
                "extrapolate_cond", f"extrapolate: guard={self.guard!r} reuses the plain last residual (the "
                "extrapolation's window and coefficient are kept by host-picked variants: guard='variants')"))
        #: cond guard: (step record, span names, blocked flags) read back in flush()
        self._pending: list = []
        self._oks: dict = {}
        self.build(self.spans)
        self._prebuilt.clear()        # those the guard did not compile (cond) are not kept

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

    @property
    def extrapolate(self) -> bool:
        """Reused spans extrapolate along their last two residuals (the policy's ``extrapolate``;
        host-picked variants only)."""
        return self.guard == "variants" and bool(getattr(self.policy, "extrapolate", False))

    def _variant(self, spans: Sequence, dec: tuple) -> Callable:
        key = self._name(spans, variant_key(dec))
        fn = self.compiled.get(key)
        if fn is None:
            reused = [sp.name for sp, d in zip(spans, dec) if d] or "no span"
            computed = [sp.name for sp, d in zip(spans, dec) if not d] or "no span"
            if self.extrapolate:
                sig = ("(*inputs, *per span: r_last per live stream, r_prev per live stream, 0-d float (reused: "
                       f"alpha * k / d; computed: k_new)) -> (*outputs, *residuals of {computed}, *per computed span "
                       "a 0-d bool: its new residuals are all finite, *per computed span its new alpha)")
                examples = []
                for sp in spans:
                    examples += self.examples(sp.live_streams) * 2 + [torch.zeros((), device=self.device)]
            else:
                sig = (f"(*inputs, *residuals of {reused}) -> (*outputs, *residuals of {computed}); "
                       "residuals: live streams, span by span")
                sig += "; then per computed span a 0-d bool: its new residuals are all finite"
                examples = self.examples(self._residual_specs(spans, dec))
            g = self._prebuilt.pop(key, None)
            if g is None:
                g = build_variant(self.gm, spans, dec, finite=True, extrapolate=self.extrapolate)
            fn = self.compile(key, g, examples, sig)
        return fn

    def _timed_variants(self, timer) -> tuple:
        """For :meth:`call_costs`: every span computed and every span reused, with zero state
        (the extrapolated variants' coefficient 0.5: the fused op runs as it would)."""
        out = []
        for d in (False, True):
            dec = (d,) * len(self.spans)
            g = build_variant(self.gm, self.spans, dec, finite=True, extrapolate=self.extrapolate)
            self._prebuilt[self._name(self.spans, variant_key(dec))] = g
            if self.extrapolate:
                extra = []
                for sp in self.spans:
                    extra += timer.zeros(sp.live_streams) * 2 + [torch.tensor(0.5, device=timer.device)]
            else:
                extra = timer.zeros(self._residual_specs(self.spans, dec))
            out.append((g, extra))
        return tuple(out)

    def _window_inputs(self, call: Call, spans: Sequence, dec: tuple, slot_cache: list, win: list) -> list:
        """``extrapolate``: per span ``r_last..., r_prev..., scalar`` (see :meth:`_variant`).
        ``win[i]``: ``{"prev", "prev_ok", "steps", "alpha"}`` of span ``i`` in this slot (None
        before its first compute).  A missing or non-finite ``r_prev`` is ``r_last`` (no
        extrapolation); a span never computed gets zeros."""
        extra = []
        for i, sp in enumerate(spans):
            last, w = slot_cache[i], win[i]
            if last is None:
                last = self.zeros(call, sp.live_streams)
            prev = w["prev"] if w is not None else None
            if prev is not None and dec[i] and isinstance(w["prev_ok"], torch.Tensor):
                w["prev_ok"] = bool(w["prev_ok"])      # read where a reuse reads its own flag anyway
            if prev is not None and w["prev_ok"] is False:
                prev = None
            ratio = 0.0
            if prev is not None and w["steps"][0] is not None and w["steps"][1] > w["steps"][0]:
                s0, s1 = w["steps"]
                ratio = (call.step - s1) / (s1 - s0)
            scalar = self._scalar(ratio)
            if dec[i]:
                scalar = w["alpha"] * scalar if prev is not None else self._scalar(0.0)
            extra += list(last) + list(last if prev is None else prev) + [scalar]
        return extra

    def _scalar(self, value: float) -> torch.Tensor:
        t = self._scalars.get(value)
        if t is None:
            if len(self._scalars) > 256:
                self._scalars.clear()
            t = self._scalars[value] = torch.tensor(float(value), dtype=torch.float32, device=self.device)
        return t

    def _cond(self, spans: Sequence) -> Callable:
        key = self._name(spans, "cond")
        fn = self.compiled.get(key)
        if fn is None:
            preds = [torch.tensor(False) for _ in spans]
            oks = [torch.tensor(True, device=self.device) for _ in spans]
            sig = ("(*inputs, *predicates (True = reuse) per span, *residuals of every span, *finite flag per span) -> "
                   "(*outputs, *residuals, *finite flags', *blocked per span (wanted a reuse, cache not finite))")
            fn = self.compile(key, build_cond(self.gm, spans, finite=True,
                                               pull_scalars=self.ctx.config.inner_backend == "eager"),
                              preds + self.examples(self._residual_specs(spans, [True] * len(spans))) + oks, sig)
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
        # per slot and span: is the cache finite (a device flag until the host reads it, then a bool)
        slot_ok = call.session.data.setdefault("finite", {}).setdefault(call.slot, [True] * n)
        want = self.want(call.step, call.num_steps, spans, call)
        nonfinite: list[str] = []
        win = call.session.data.setdefault("window", {}).setdefault(call.slot, [None] * n)
        if self.guard == "variants":
            for i in range(n):
                if want[i] and slot_cache[i] is not None and call.certain:
                    if isinstance(slot_ok[i], torch.Tensor):
                        slot_ok[i] = bool(slot_ok[i])     # after the timestep read: no new stall
                    if not slot_ok[i]:                     # never replay a non-finite residual
                        slot_cache[i] = None
                        win[i] = None
                        nonfinite.append(spans[i].name)
        dec, forced = self.decisions(want, [c is not None for c in slot_cache], call.certain)
        forced = [i for i in forced if spans[i].name not in nonfinite]
        if self.guard == "variants":
            fn = self._variant(spans, dec)
            if self.extrapolate:
                extra = self._window_inputs(call, spans, dec, slot_cache, win)
            else:
                extra = [r for i in range(n) if dec[i] for r in slot_cache[i]]
            outs = self.invoke(call, fn, list(args) + extra)
            n_comp = sum(not d for d in dec)
            n_res = sum(counts[i] for i in range(n) if not dec[i])
            new_res = _contiguous(outs[self.n_out:self.n_out + n_res])
            flags = list(outs[self.n_out + n_res:self.n_out + n_res + n_comp])
            alphas = list(outs[self.n_out + n_res + n_comp:self.n_out + n_res + 2 * n_comp]) if self.extrapolate else []
            k = 0
            for i in range(n):
                if not dec[i]:
                    w = win[i]
                    if self.extrapolate:    # shift the window: the old r_last becomes r_prev
                        win[i] = {"prev": slot_cache[i], "prev_ok": slot_ok[i],
                                  "steps": (w["steps"][1] if w is not None else None, call.step),
                                  "alpha": alphas.pop(0)}
                    slot_cache[i] = new_res[k:k + counts[i]]
                    slot_ok[i] = flags.pop(0)
                    k += counts[i]
            outs = outs[:self.n_out + n_res]
        else:
            fn = self._cond(spans)
            preds = [self._pred[d] for d in dec]
            res = []
            for i in range(n):
                res.extend(slot_cache[i] if slot_cache[i] is not None
                           else self.zeros(call, self._residual_specs(spans, [j == i for j in range(n)])))
            oks = [ok if isinstance(ok, torch.Tensor) else self._ok(ok) for ok in slot_ok]
            outs = self.invoke(call, fn, list(args) + preds + res + oks)
            n_res = sum(counts)
            new_res = _contiguous(outs[self.n_out:self.n_out + n_res])
            slot_ok[:] = list(outs[self.n_out + n_res:self.n_out + n_res + n])
            blocked = list(outs[self.n_out + n_res + n:self.n_out + n_res + 2 * n])
            k = 0
            for i in range(n):
                slot_cache[i] = new_res[k:k + counts[i]]
                k += counts[i]
            outs = outs[:self.n_out + n_res]
        self.record(call, {sp.name: ("reused" if d else "computed") for sp, d in zip(spans, dec)},
                    sum(sp.flops for sp, d in zip(spans, dec) if d), [spans[i].name for i in forced])
        rec = self.report.steps[-1]
        rec.nonfinite = nonfinite
        if self.guard != "variants" and any(dec):
            self._pending.append((rec, [sp.flops for sp in spans], [sp.name for sp in spans], blocked))
        self.after_call(call, args, outs)
        return tuple(outs[:self.n_out])

    def _ok(self, value: bool) -> torch.Tensor:
        ok = self._oks.get(bool(value))
        if ok is None:
            ok = self._oks[bool(value)] = torch.tensor(bool(value), device=self.device)
        return ok

    def flush(self) -> None:
        """``cond``: read back which wanted reuses the finiteness flag turned into computes."""
        for rec, flops, names, blocked in self._pending:
            for name, fl, b in zip(names, flops, blocked):
                if rec.decisions.get(name) == "reused" and bool(b):
                    rec.decisions[name] = "computed"
                    rec.flops_saved -= fl
                    rec.nonfinite.append(name)
        self._pending.clear()

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
