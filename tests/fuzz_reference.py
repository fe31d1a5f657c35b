"""Plain-PyTorch references for the trajectory and probe policies, on Dynamo's original graph
(test helper for ``test_fuzz.py``; the host-decided policies use ``reference_executor.replay``).

Like :mod:`reference_executor`, each recorded call is run again with ``torch.fx.Interpreter`` on
Dynamo's graph — never on a graph omnicompile built — with the textbook semantics of the policy:

* **trajectory** (:func:`replay_trajectory`): a computed call runs every span and keeps ``out - in``
  of each live stream (per model, generation and CFG slot).  A reused call skips every span and adds
  the kept residual; when correction is on and the slot's last computed call had a residual before
  it, the noise a reuse would have made there, ``q = out(reuse with the older residual) - out``, is
  subtracted, scaled by the coefficient the runtime reports (``signals["gamma"]``): the reference
  recomputes ``q`` itself, and a reuse with a ``q`` but no coefficient (or the reverse) is an error.
* **probe** (:func:`replay_probe`): DiCache.  The probe blocks always run; the reference measures
  the probe's input ``x`` and output ``p`` itself, accumulates ``err = mean|p - p_prev| / mean|p_prev|``
  (or ``|delta_y - delta_x|``), and checks the recorded decision against ``acc + err < threshold``
  (unless within a hair of the threshold) and the forced steps (first ``ret_ratio`` of the steps,
  the last step, a slot's first call); a reuse adds ``(1 - g) r_prev + g r_last`` (two residuals
  kept and ``align``) or ``r_last``, with ``g`` computed here from the probe-residual window.

Every output must equal the recorded one.  :class:`Mismatch` (an ``AssertionError``) says which
call, model, generation, slot and step differ, and by how much.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.fx as fx

from omnicompile.passes.probe import PACE, PACE_RANGE

__all__ = ["Mismatch", "replay_trajectory", "replay_probe", "compare"]


class Mismatch(AssertionError):
    """A call of the compiled model differs from the reference (or breaks a rule of its policy)."""


def compare(got, want, where: str, atol: float, rtol: float) -> None:
    """Each tensor of ``got`` equals ``want``; :class:`Mismatch` with the largest difference."""
    if len(got) != len(want):
        raise Mismatch(f"{where}: {len(got)} outputs, reference {len(want)}")
    for i, (o, w) in enumerate(zip(got, want)):
        if not isinstance(w, torch.Tensor):
            continue
        if o.shape != w.shape:
            raise Mismatch(f"{where}, output {i}: shape {tuple(o.shape)}, reference {tuple(w.shape)}")
        o, w = o.detach(), w.detach()
        if not torch.allclose(o.float(), w.float(), atol=atol, rtol=rtol, equal_nan=True):
            d = (o.float() - w.float()).abs()
            raise Mismatch(f"{where}, output {i}: max |diff| {float(d.max()):.3g} (reference max |value| "
                           f"{float(w.float().abs().max()):.3g}, atol {atol}, rtol {rtol})")


class _Run(fx.Interpreter):
    """Dynamo's graph with some spans reused: ``reuse`` holds ``(span, residuals)`` pairs, the
    residual per live stream or a function of the run so far returning it (evaluated where the
    span ends)."""

    def __init__(self, gm: fx.GraphModule, reuse: list):
        super().__init__(gm, garbage_collect_values=False)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.skip: set = set()
        self.reuse_at: dict = {}
        for sp, res in reuse:
            keep = set(sp.keep)
            self.skip |= {n for n in sp.nodes if n not in keep}
            last = max(sp.nodes, key=lambda n: order[n])
            self.reuse_at.setdefault(last, []).append((sp, res))

    def run_node(self, n):
        out = None if n in self.skip else super().run_node(n)
        for sp, res in self.reuse_at.get(n, []):
            if callable(res):
                res = res(self)
            for s, r in zip(sp.live_streams, res):
                self.env[s.output] = self.env[s.input] + r
                if s.output is n:
                    out = self.env[n]
        return out

    def value(self, n):
        return self.env[n]

    def residuals(self, sp) -> list:
        return [self.env[s.output] - self.env[s.input] for s in sp.live_streams]


def _run(gm, args, reuse: list):
    r = _Run(gm, reuse)
    out = r.run(*args)
    return r, list(out if isinstance(out, (tuple, list)) else (out,))


def _key(rec):
    return (rec.model, rec.generation, rec.slot)


def _where(i, rec) -> str:
    return (f"call {i} (model {rec.model}, generation {rec.generation}, slot {rec.slot}, step {rec.step}, "
            f"t {rec.timestep:g}, {rec.decisions}{', signals ' + str(rec.signals) if rec.signals else ''})")


def _all_or_none(rec, where) -> Optional[bool]:
    vals = set(rec.decisions.values())
    if len(vals) != 1 or not vals <= {"reused", "computed"}:
        raise Mismatch(f"{where}: the policy decides for the whole stack, got {rec.decisions}")
    return vals == {"reused"}


def replay_trajectory(grec, atol: float = 1e-5, rtol: float = 1e-5) -> dict:
    rt = grec.runtime
    rt.flush()
    steps = rt.report.steps
    if len(steps) != len(grec.calls):
        raise Mismatch(f"{len(grec.calls)} calls but {len(steps)} step records")
    spans = list(rt.spans)
    correction = bool(rt.config.correction)
    state: dict = {}
    counts = {"calls": 0, "reused": 0, "computed": 0, "corrected": 0}
    for i, ((args, outs), rec) in enumerate(zip(grec.calls, steps)):
        where = _where(i, rec)
        st = state.setdefault(_key(rec), {})
        reused = _all_or_none(rec, where)
        coef = rec.signals.get("gamma")
        if reused:
            if "res" not in st:
                raise Mismatch(f"{where}: reused without a cache of its own model, generation and slot")
            _, want = _run(grec.gm, args, list(zip(spans, st["res"])))
            q = _noise(grec.gm, spans, st) if correction else None
            if q is not None:
                if coef is None or not math.isfinite(coef):
                    raise Mismatch(f"{where}: a reuse after a measured step, but no correction coefficient")
                want = [w - coef * q[j] if j in q else w for j, w in enumerate(want)]
                counts["corrected"] += 1
            elif coef is not None:
                raise Mismatch(f"{where}: corrected by {coef} with no noise measured before the run")
            counts["reused"] += 1
        else:
            if coef is not None:
                raise Mismatch(f"{where}: a computed call reports a correction coefficient")
            r, want = _run(grec.gm, args, [])
            new = [r.residuals(sp) for sp in spans]
            # what the noise q of the next reuse is measured from: this call, with the residual before it
            st["measure"] = (args, want, st["res"]) if "res" in st else None
            st.pop("q", None)
            st["res"] = new
            counts["computed"] += 1
        compare(outs, want, where, atol, rtol)
        counts["calls"] += 1
    return counts


def _noise(gm, spans, st) -> Optional[dict]:
    """``q`` per floating output, of the slot's last computed call (computed once per run)."""
    if "q" in st:
        return st["q"]
    m = st.get("measure")
    if m is None:
        st["q"] = None
        return None
    args, computed, older = m
    _, reused = _run(gm, args, list(zip(spans, older)))
    st["q"] = {j: r - c for j, (r, c) in enumerate(zip(reused, computed))
               if isinstance(c, torch.Tensor) and c.dtype.is_floating_point}
    return st["q"]


def _rel(a, b):
    return (a.float() - b.float()).abs().mean() / b.float().abs().mean()


def replay_probe(grec, atol: float = 1e-5, rtol: float = 1e-5, margin: float = 1e-4) -> dict:
    rt = grec.runtime
    rt.flush()
    c = rt.config
    steps = rt.report.steps
    if len(steps) != len(grec.calls):
        raise Mismatch(f"{len(grec.calls)} calls but {len(steps)} step records")
    plan = rt.plan
    spans = list(plan.spans)
    lo, hi = c.align_clip
    num_steps = {(g.model, g.generation): g.num_steps for g in rt.report.generation_log}
    state: dict = {}
    paced: dict = {}        # (model, slot) -> the reuse budget's threshold, carried over generations
    counts = {"calls": 0, "reused": 0, "computed": 0, "decisions_checked": 0}
    for i, ((args, outs), rec) in enumerate(zip(grec.calls, steps)):
        where = _where(i, rec)
        reused = _all_or_none(rec, where)
        first = _key(rec) not in state
        st = state.setdefault(_key(rec), {"count": 0, "acc": 0.0, "q": [], "win": {sp.name: [] for sp in spans}})
        n = num_steps.get((rec.model, rec.generation))
        static_force = (n is None or rec.step < rt.policy.leading(n) or rec.step == n - 1)
        budget = rt.policy.budget(n)[0]
        threshold = paced.get((rec.model, rec.slot), c.threshold) if budget >= 0 else c.threshold
        if reused and (first or static_force or rec.uncertain):
            raise Mismatch(f"{where}: reused a step the probe must compute (first call of its slot {first}, "
                           f"within ret_ratio / last of {n} steps {static_force}, uncertain {rec.uncertain!r})")
        # run once with the decision taken; the probe blocks run either way (they are not in a span)
        gamma = 1.0
        if reused:
            if st["count"] < 1:
                raise Mismatch(f"{where}: reused with no computed step in the window")
            two = st["count"] >= 2 and c.align
            got = {}

            def aligned(sp):
                def res(run):       # the probe's nodes precede every span: x and p are known here
                    if "gamma" not in got:
                        got["gamma"] = _gamma(run.value(plan.probe_out) - run.value(plan.x), st["q"], lo, hi)
                    g, win = got["gamma"], st["win"][sp.name]
                    return [(1 - g) * a + g * b for a, b in zip(win[-2], win[-1])] if two else win[-1]
                return res
            r, want = _run(grec.gm, args, [(sp, aligned(sp)) for sp in spans])
            x, p = r.value(plan.x), r.value(plan.probe_out)
            gamma = got.get("gamma", _gamma(p - x, st["q"], lo, hi))
        else:
            r, want = _run(grec.gm, args, [])
            x, p = r.value(plan.x), r.value(plan.probe_out)
        # the decision the probe signal gives, where the call was not forced
        if st["count"] >= 1 and "x_prev" in st:
            dy = float(_rel(p, st["p_prev"]))
            err = dy if c.error == "delta_y" else abs(dy - float(_rel(x, st["x_prev"])))
            cand = st["acc"] + err
            if rec.signals:
                if not _close(rec.signals.get("error"), err):
                    raise Mismatch(f"{where}: probe error {rec.signals.get('error')}, reference {err}")
                if abs(cand - threshold) > margin * max(1.0, abs(threshold)):
                    if (cand < threshold) != reused:
                        raise Mismatch(f"{where}: accumulated error {cand:.6g} vs threshold {threshold}: the "
                                       f"reference {'reuses' if cand < threshold else 'computes'}")
                    counts["decisions_checked"] += 1
            if budget >= 0 and not static_force and not rec.uncertain:   # the reuse budget paces it
                th = threshold * math.exp(PACE * (budget - float(reused)))
                paced[(rec.model, rec.slot)] = min(max(th, c.threshold / PACE_RANGE), c.threshold * PACE_RANGE)
        else:
            cand = 0.0
        if reused:
            if rec.signals and st["count"] >= 2 and c.align and not _close(rec.signals.get("gamma"), gamma):
                raise Mismatch(f"{where}: alignment gamma {rec.signals.get('gamma')}, reference {gamma}")
            st["acc"] = cand
            counts["reused"] += 1
        else:
            st["acc"] = 0.0
            st["count"] = min(st["count"] + 1, 2)
            st["q"] = (st["q"] + [p - x])[-2:]
            for sp in spans:
                st["win"][sp.name] = (st["win"][sp.name] + [r.residuals(sp)])[-2:]
            counts["computed"] += 1
        st["x_prev"], st["p_prev"] = x, p
        compare(outs, want, where, atol, rtol)
        counts["calls"] += 1
    return counts


def _gamma(q_now, window: list, lo: float, hi: float) -> float:
    """DiCache's alignment coefficient from the probe-residual window (zeros before two computes)."""
    q_last = window[-1] if window else torch.zeros_like(q_now)
    q_prev = window[-2] if len(window) >= 2 else torch.zeros_like(q_now)
    g = float((q_now.float() - q_prev.float()).abs().mean() / (q_last.float() - q_prev.float()).abs().mean())
    if not math.isfinite(g):
        return 1.0
    return min(max(g, lo), hi)


def _close(a, b, rtol: float = 1e-4, atol: float = 1e-6) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if not (math.isfinite(a) and math.isfinite(b)):
        return (math.isnan(a) and math.isnan(b)) or a == b
    return abs(a - b) <= atol + rtol * abs(b)
