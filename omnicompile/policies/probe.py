"""Policy ``probe`` (DiCache): an online shallow-layer probe decides, per sample and step,
inside the graph.

The first ``probe_depth`` blocks always run; their output's relative change against the
previous step, accumulated, is compared with ``threshold``; below it the remaining blocks are
skipped and their residual is extrapolated along the last two cached ones (``align``).  Steps
within the first ``ret_ratio`` of sampling and the last step are always computed — the host
knows those from the step index, everything else is decided on the device
(:mod:`omnicompile.passes.probe`).  With ``probe_depth=1`` and ``align=False`` this is
First-Block-Cache.  CFG batched in one call decides once for the whole batch (compute if the
batch's mean error says so); CFG run as separate calls keeps a separate probe state per call.

:class:`ProbeRuntime` keeps the probe state per CFG slot and passes the host's force flag;
the graph takes ``(*orig, force, *state)`` and returns ``(*orig_out, *state', reuse, err,
gamma, nonfinite)``.  The state carries finiteness flags of the cached residual window (computed
in the graph where the window is refreshed): a state that is not finite is never replayed, the
step computes and ``nonfinite`` records it.  The records (device tensors) are not read in the
step loop: they wait in ``pending`` and are read back in ``flush()`` — when the report is read,
when a new generation starts (the previous one's work is queued by then: one sync per
generation), and whenever ``MAX_PENDING`` calls are waiting (a stream that never starts a new
generation) — so the device memory they hold stays bounded however many calls run.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch

from omnicompile import targets
from omnicompile.errors import RewriteError
from omnicompile.passes.common import Reason
from omnicompile.passes.probe import build_probe, plan_probe
from omnicompile.policy import Policy
from omnicompile.preview import Preview
from omnicompile.registry import register_policy
from omnicompile.report import StepRecord
from omnicompile.runtime.base import Runtime
from omnicompile.targets import saved_fraction

__all__ = ["ProbePolicy", "ProbeRuntime", "MAX_PENDING"]

log = logging.getLogger("omnicompile")

#: calls whose device records may wait unread (``ProbeRuntime.pending``) before they are read
MAX_PENDING = 256


@register_policy("probe")
class ProbePolicy(Policy):
    """DiCache (see the module docstring)."""

    guards = ("cond",)
    options = ("threshold", "probe_depth", "ret_ratio", "error", "align", "align_clip", "target_speedup", "target_cost")

    def __init__(self, config):
        super().__init__(config)
        #: what a computed and a reused call cost (the runtime binds it: ``targets.CallCosts``)
        self.costs = targets.CallCosts(1.0, 0.0)

    @property
    def target(self) -> Optional[float]:
        c = self.config
        return float(c.target_speedup) if c.is_set("target_speedup") else None

    def budget(self, num_steps: Optional[int]) -> tuple[float, bool]:
        """(the share of the steps the probe decides that the target asks it to reuse, or -1
        without a target; reachable).  Those are the steps after the first ``ret_ratio`` and
        before the last."""
        if self.target is None or num_steps is None:
            return -1.0, True
        decided = num_steps - self.leading(num_steps) - 1
        if decided <= 0:
            return -1.0, True
        want = targets.reuse_share(self.target, self.costs) * num_steps / decided
        cap = targets.MAX_REUSE_RUN / (targets.MAX_REUSE_RUN + 1)
        return min(want, cap), want <= cap

    def forced(self, step: int, num_steps: Optional[int]) -> bool:
        """Steps computed whatever the probe says: the first ``ret_ratio`` of sampling and the
        last step (DiCache: ``step <= int(ret_ratio * N) or step == N - 1``).  With the step
        count unknown (no generation context, no ``num_steps``, no earlier generation of the
        same schedule) any step may be the last: every step is computed."""
        if num_steps is None:
            return True
        return step < self.leading(num_steps) or step == num_steps - 1

    def leading(self, num_steps: int) -> int:
        """How many steps at the start are always computed: ``int(ret_ratio * N) + 1``; with a
        target the user left ``ret_ratio`` unset for, fewer (not under 2) where the target needs
        more decided steps than that leaves."""
        k = int(self.config.ret_ratio * num_steps) + 1
        if self.target is None or self.config.is_set("ret_ratio"):
            return k
        cap = targets.MAX_REUSE_RUN / (targets.MAX_REUSE_RUN + 1)
        need = math.ceil(targets.reuse_share(self.target, self.costs) * num_steps / cap)
        return max(2, min(k, num_steps - 1 - need))

    def make_runtime(self, ctx):
        return ProbeRuntime(ctx, self)

    def describe(self):
        c = self.config
        return {"policy": "probe", "threshold": c.threshold, "probe_depth": c.probe_depth,
                "ret_ratio": c.ret_ratio, "error": c.error, "align": c.align,
                **targets.describe_target(self.target, self.costs)}


class ProbeRuntime(Runtime):
    def __init__(self, ctx, policy: ProbePolicy):
        c = ctx.config
        plan, why = plan_probe(ctx.gm, ctx.analysis, c.probe_depth)
        if plan is None:
            raise RewriteError.from_reason(why)
        self.policy = policy
        self.plan = plan
        super().__init__(ctx, plan.spans)
        self.specs = plan.state_specs()
        self.pending: list = []
        self._flags = {b: torch.tensor(b, device=self.device) for b in (False, True)}
        self._budgets: dict = {}
        g = build_probe(self.gm, plan, float(c.threshold), c.error, c.align, c.align_clip,
                        pull_scalars=c.inner_backend == "eager")
        sig = ("(*inputs, force, budget, x_prev, p_prev, q_prev, q_last, acc, count, *[r_prev, r_last] per span, "
               "ok_last, ok_prev, th) -> (*outputs, *state', reuse, err, gamma, nonfinite, th')")
        self._fn = self.compile("probe", g, [self._flags[False], self._budget(-1.0)] + self.examples(self.specs), sig)
        policy.costs = self.call_costs(saved_fraction(self.spans, self.report.flops_per_call, ctx.node_seconds),
                                       lambda timer: self._timed_configs(timer, g))
        self.report.policy = policy.describe()
        self._th: dict = {}          # (model, slot) -> the paced threshold the last generation ended with

    def _timed_configs(self, timer, g) -> tuple:
        """For :meth:`call_costs`: the probe graph forced to compute (zero state), and deciding to
        reuse (a full window of finite state, any error under the threshold)."""
        def state(reuse: bool) -> list:
            st = timer.zeros(self.specs)
            if reuse:
                fill = {"x_prev": 1.0, "p_prev": 1.0, "count": 2.0, "ok_last": True, "ok_prev": True,
                        "th": float("inf")}
                for i, spec in enumerate(self.specs):
                    if spec.name in fill:
                        st[i] = torch.full_like(st[i], fill[spec.name])
            return st
        flag = lambda b: torch.tensor(b, device=timer.device)                        # noqa: E731
        budget = torch.tensor(-1.0, device=timer.device)
        return ((g, [flag(True), budget] + state(False)),
                (g, [flag(False), budget] + state(True)))

    def _budget(self, value: float) -> torch.Tensor:
        """The budget input (one device tensor per value: no host-to-device copy per call)."""
        t = self._budgets.get(value)
        if t is None:
            t = self._budgets[value] = torch.tensor(value, dtype=torch.float32, device=self.device)
        return t

    def __call__(self, *args):
        call = self.advance(args)
        st = call.slots.get(call.slot)
        force = self.policy.forced(call.step, call.num_steps) or st is None or not call.certain
        if st is None:
            st = self.zeros(call, self.specs)
            th = self._th.get((call.place.model, call.slot))
            if th is not None:           # pacing goes on from where the last generation ended
                st[-1] = torch.tensor(th, dtype=torch.float32, device=self.device)
        budget, reachable = self.policy.budget(call.num_steps)
        if not reachable:
            self._unreachable(call.num_steps, budget)
        outs = self.invoke(call, self._fn, list(args) + [self._flags[bool(force)], self._budget(budget)] + st)
        n_state = len(self.specs)
        # state goes back into the graph compiled for contiguous examples (Inductor asserts strides)
        call.slots[call.slot] = [t.contiguous() for t in outs[self.n_out:self.n_out + n_state]]
        records = outs[self.n_out + n_state:]
        self.pending.append((call.place, call.timestep, bool(force), records))   # not the session: no caches kept
        if len(self.pending) >= MAX_PENDING:
            self.flush()
        self.report.cache_bytes = self.held_bytes()
        return tuple(outs[:self.n_out])

    def generation_started(self, call) -> None:
        self.flush()                 # the earlier generations' records first (one sync per generation)
        super().generation_started(call)

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        for place, t, force, records in pending:
            if self.policy.target is not None:
                self._th[(place.model, place.slot)] = float(records[4])
            reuse = bool(records[0]) and not force
            signals = {} if force else {"error": float(records[1]), "gamma": float(records[2])}
            nonfinite = [] if force or not bool(records[3]) else [sp.name for sp in self.spans]
            self.report.add_step(StepRecord(
                place.generation, place.step, place.slot, t if t is not None else float("nan"),
                {sp.name: ("reused" if reuse else "computed") for sp in self.spans},
                sum(sp.flops for sp in self.spans) if reuse else 0, signals=signals, model=place.model,
                uncertain=place.why, nonfinite=nonfinite))

    def _unreachable(self, num_steps: int, budget: float) -> None:
        decided = num_steps - self.policy.leading(num_steps) - 1
        k = self.policy.costs
        why = Reason("target_unreachable",
                     f"target_speedup {self.policy.target:g} needs more reuses than the probe may decide in "
                     f"{num_steps} steps (the first {self.policy.leading(num_steps)} and the last computed, at most "
                     f"{budget:.0%} of the decided steps reused): predicted at most "
                     f"{targets.predicted_speedup(round(budget * decided), num_steps, k):.2f}x (a call costs "
                     f"{k.compute:.2f} of an uncached one computed, {k.reuse:.2f} reused)")
        if why not in self.report.refused:
            self.report.refused.append(why)
            log.warning("omnicompile: %s", why.message)

    def preview(self, steps: int) -> Preview:
        rows = []
        for step in range(steps):
            computed = step == 0 or self.policy.forced(step, steps)
            rows.append(["computed" if computed else "dynamic"] * len(self.spans))
        note = (f"policy {self.policy.name!r} decides at run time ('?' steps); the ideal speedup counts every "
                "such step as reused: an upper bound")
        return Preview(steps, [s.name for s in self.spans], [s.flops for s in self.spans],
                       self.report.flops_per_call, rows, note)
