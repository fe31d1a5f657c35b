"""DiCache's online probe, decided inside the compiled graph.

Plan (:func:`plan_probe`): the first ``probe_depth`` units of the first group are the
*probe*; they are always computed.  Everything after them — the rest of the first group and
every later group — becomes guarded spans that share one in-graph predicate.  The probe
signal is measured on the *primary* stream: the stream entering the probe with the most
elements (the image tokens of Flux; DiCache uses the image hidden states).

Build (:func:`build_probe`): after the probe output the graph computes, with no host
synchronisation,

* ``delta_x = mean|x - x_prev| / mean|x_prev|`` (x: the primary stream entering the probe),
  ``delta_y = mean|p - p_prev| / mean|p_prev|`` (p: the probe output),
  ``err = delta_y`` or ``|delta_y - delta_x|`` (option ``error``), ``cand = acc + err``;
* ``reuse = not force and cand < threshold and window >= 1 and ok_last and isfinite(cand)``
  (``force`` is the host's static part: the first ``ret_ratio`` of the steps and the last
  step; ``ok_last``: the last cached residuals are all finite — computed in the compute branch
  where they are refreshed; a non-finite ``x_prev``/``p_prev`` makes ``cand`` non-finite);
* DiCache's alignment coefficient ``gamma = clip(mean|(p - x) - q_prev| /
  mean|q_last - q_prev|, lo, hi)`` from the probe-residual window ``q``; with two cached
  residuals the reused contribution is ``(1 - gamma) r_prev + gamma r_last``, else
  ``r_last`` (also when ``r_prev`` is not finite, ``ok_prev``: it is left out, not multiplied
  by zero);
* the new state: ``acc' = reuse ? cand : 0``, ``x_prev' = x``, ``p_prev' = p``, the probe
  window shifts on compute, the window count saturates at 2, ``ok_prev' , ok_last'`` shift
  with the residual window.  A step that would have been up to the threshold test but whose
  state was not finite is recorded (``nonfinite``): it was computed, never replayed.

Each guarded span is ``cond(reuse, in + a r_prev + b r_last, compute)`` (see
:func:`~omnicompile.passes.rewrite.guard_span`, kind ``"window"``); computing refreshes
the span's residual window.  Because the reused contribution is linear in the residuals,
spans sharing the predicate add up to one residual over the whole rest of the stack.

Unlike DiCache's reference code, a reused step keeps the probe's exact output and adds the
cached residual of the remaining blocks (``out - p``), as diffusers' FirstBlockCache does,
instead of adding a full-stack residual to the probe's input and discarding its work.

Reuse budget (``budget >= 0``, set by ``target_speedup``): the threshold is state (``th``; 0 =
the configured ``threshold``) and, on every step the probe decides, moves by
``exp(PACE * (budget - reused))`` — up after a compute, down after a reuse — so the share of
reused decided steps settles at ``budget`` wherever the error allows it; it stays within
``threshold / PACE_RANGE .. threshold * PACE_RANGE``.  The host carries the last value into the
next generation (records).  No host sync: the threshold never leaves the device in the loop.

Signature of the built graph::

    (*orig, force, budget, x_prev, p_prev, q_prev, q_last, acc, count, *[r_prev..., r_last...] per
     span, ok_last, ok_prev, th)
      -> (*orig_out, x_prev', p_prev', q_prev', q_last', acc', count', *span windows',
          ok_last', ok_prev', th', reuse, err, gamma, nonfinite, th')
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.fx as fx

from .collectives import cp_group, eliminate_dead_code
from .common import Reason, example_value, tensor_meta
from .edit import add_placeholder, copy_graph_module, output_values, safe_name, set_outputs
from .rewrite import guard_span
from .spans import Span, SpanAnalysis, follow_stream, make_span, stream_inputs

__all__ = ["ProbePlan", "StateSpec", "plan_probe", "build_probe", "N_RECORDS"]

N_RECORDS = 5  # reuse, err, gamma, nonfinite, th (the threshold after this step)


@dataclasses.dataclass
class StateSpec:
    name: str
    shape: tuple
    dtype: torch.dtype


@dataclasses.dataclass
class ProbePlan:
    probe_depth: int
    x: fx.Node
    probe_out: fx.Node
    primary: str
    spans: list[Span]
    probe_flops: int

    def state_specs(self) -> list[StateSpec]:
        shape, dtype, _ = tensor_meta(self.x)
        specs = [StateSpec(n, shape, dtype) for n in ("x_prev", "p_prev", "q_prev", "q_last")]
        specs += [StateSpec("acc", (), torch.float32), StateSpec("count", (), torch.float32)]
        for sp in self.spans:
            for which in ("r_prev", "r_last"):
                specs += [StateSpec(f"{sp.name}:{s.name}:{which}", s.shape, s.dtype) for s in sp.live_streams]
        specs += [StateSpec("ok_last", (), torch.bool), StateSpec("ok_prev", (), torch.bool)]
        specs += [StateSpec("th", (), torch.float32)]
        return specs


def plan_probe(gm: fx.GraphModule, analysis: SpanAnalysis, probe_depth: int) -> tuple[Optional[ProbePlan], Optional[Reason]]:
    groups = analysis.groups
    if not groups:
        return None, Reason("no_groups", "no block list to probe")
    g0 = groups[0]
    if probe_depth > len(g0.units):
        return None, Reason("probe_too_deep", f"probe_depth {probe_depth} exceeds the {len(g0.units)} units of "
                            f"{g0.name}", g0.name)
    xs = stream_inputs(g0, 0)
    def numel(n):      # by the traced sizes: comparing symbolic ones would guard (specialise)
        tm = tensor_meta(n)
        return math.prod(d if isinstance(d, int) else (d.node.hint or 0) for d in tm[0]) if tm else -1
    x = max(xs, key=numel)
    p = follow_stream(g0, x, 0, probe_depth - 1)
    if p is None:
        return None, Reason("probe_stream_dead", f"stream {x.name} does not survive the probe", g0.name)
    if tensor_meta(p)[:2] != tensor_meta(x)[:2]:
        return None, Reason("probe_shape", f"probe output {p.name} differs from its input {x.name} in shape", g0.name)
    spans: list[Span] = []
    if probe_depth < len(g0.units):
        sp, why = make_span(gm, g0, probe_depth, len(g0.units) - 1)
        if sp is None:
            return None, why
        spans.append(sp)
    for g in groups[1:]:
        sp, why = make_span(gm, g, 0, len(g.units) - 1)
        if sp is None:
            return None, why
        spans.append(sp)
    if not spans:
        return None, Reason("nothing_after_probe", "the probe covers every block; nothing left to skip", g0.name)
    from ..graphs.cost import node_flops
    probe_nodes = [n for u in g0.units[:probe_depth] for n in u.nodes]
    return ProbePlan(probe_depth, x, p, x.name, spans, sum(node_flops(n) for n in probe_nodes)), None


#: the paced threshold moves by exp(PACE * (budget - reused)) per decided step, within
#: [threshold / PACE_RANGE, threshold * PACE_RANGE]
PACE = 0.5
PACE_RANGE = 64.0


def _decide_module(threshold: float, error: str, align: bool, lo: float, hi: float,
                   group: Optional[str] = None) -> fx.GraphModule:
    ops = getattr(torch.ops, "_c10d_functional", None)

    def m(t):
        """mean |t| — under context parallelism the sum over every rank's shard (only ratios of
        two of these decide, so sums and means agree; every rank then decides alike)"""
        if group is None:
            return t.float().abs().mean()
        return ops.wait_tensor(ops.all_reduce(t.float().abs().sum(), "sum", group))

    def decide(x, probe, x_prev, p_prev, q_prev, q_last, acc, count, force, ok_last, ok_prev, th, budget):
        dx_den, dy_den = m(x_prev), m(p_prev)
        dx = m(x.float() - x_prev.float()) / dx_den
        dy = m(probe.float() - p_prev.float()) / dy_den
        err = dy if error == "delta_y" else (dy - dx).abs()
        cand = acc + err
        eligible = torch.logical_not(force) & (count >= 1)
        # the cached state is finite: the residual window (flag set where it was refreshed) and the
        # probe's previous values (their means are computed anyway); a non-finite input of this
        # step makes cand non-finite too and computes, but is not the cache's fault
        state_ok = ok_last & torch.isfinite(dy_den)
        if error != "delta_y":
            state_ok = state_ok & torch.isfinite(dx_den)
        th_now = torch.where(th > 0, th, torch.full_like(th, threshold))
        reuse = eligible & (cand < th_now) & state_ok
        nonfinite = eligible & torch.logical_not(state_ok)
        q_now = probe - x
        gamma = (m(q_now.float() - q_prev.float()) / m(q_last.float() - q_prev.float())).clamp(lo, hi)
        gamma = torch.where(torch.isfinite(gamma), gamma, torch.ones_like(gamma))
        two = ((count >= 2) & ok_prev) if align else torch.zeros_like(reuse)
        a = torch.where(two, 1.0 - gamma, torch.zeros_like(gamma))
        b = torch.where(two, gamma, torch.ones_like(gamma))
        acc2 = torch.where(reuse, cand, torch.zeros_like(cand))
        count2 = torch.where(reuse, count, torch.clamp(count + 1.0, max=2.0))
        q_prev2 = torch.where(reuse, q_prev, q_last)
        q_last2 = torch.where(reuse, q_last, q_now)
        # reuse budget: on every step the probe decides, pace the threshold towards the share of
        # reuses asked for (budget < 0: the fixed threshold)
        paced = (th_now * torch.exp(PACE * (budget - reuse.float()))).clamp(threshold / PACE_RANGE,
                                                                           threshold * PACE_RANGE)
        th2 = torch.where(eligible & (budget >= 0), paced, th_now)
        return reuse, a, b, acc2, count2, q_prev2, q_last2, err, gamma, nonfinite, th2
    return fx.symbolic_trace(decide)


def _inline(g: fx.Graph, sub: fx.GraphModule, args: list[fx.Node], after: fx.Node) -> list[fx.Node]:
    env: dict[fx.Node, fx.Node] = {}
    phs = [n for n in sub.graph.nodes if n.op == "placeholder"]
    for ph, a in zip(phs, args):
        env[ph] = a
    cur = after
    result = None
    for n in sub.graph.nodes:
        if n.op == "placeholder":
            continue
        if n.op == "output":
            result = fx.node.map_arg(n.args[0], lambda v: env[v])
            break
        with g.inserting_after(cur):
            env[n] = g.node_copy(n, lambda v: env[v])
        cur = env[n]
    return list(result)


def build_probe(gm: fx.GraphModule, plan: ProbePlan, threshold: float, error: str, align: bool,
                align_clip: tuple[float, float], pull_scalars: bool = False) -> fx.GraphModule:
    new, env = copy_graph_module(gm)
    g = new.graph
    force = add_placeholder(g, "omni_force", None)
    budget = add_placeholder(g, "omni_budget", None)
    specs = plan.state_specs()
    state = [add_placeholder(g, "omni_" + safe_name(s.name), None) for s in specs]
    x_prev, p_prev, q_prev, q_last, acc, count = state[:6]
    ok_last, ok_prev, th = state[-3:]
    x, p = env[plan.x], env[plan.probe_out]
    dec = _decide_module(threshold, error, align, *align_clip, group=cp_group(gm.graph))
    reuse, a, b, acc2, count2, q_prev2, q_last2, err, gamma, nonfinite, th2 = _inline(
        g, dec, [x, p, x_prev, p_prev, q_prev, q_last, acc, count, force, ok_last, ok_prev, th, budget], after=p)
    for node, like in ((a, acc), (b, acc), (gamma, acc), (th2, acc)):
        node.meta["example_value"] = torch.empty(())
    repl: dict = {}
    span_state: list[fx.Node] = []
    flags: list[fx.Node] = []
    k = 6
    for i, sp in enumerate(plan.spans):
        n = len(sp.live_streams)
        prev, last = state[k:k + n], state[k + n:k + 2 * n]
        k += 2 * n
        for ph, s in zip(prev + last, sp.live_streams + sp.live_streams):
            ph.meta["example_value"] = example_value(s.input)
        got = guard_span(new, env, repl, i, sp, reuse, [prev, last], "window", (a, b), finite_in=ok_last,
                         pull_scalars=pull_scalars)
        flags.append(got.pop())
        span_state += got
    # the new residual window's flags: reuse keeps both, compute shifts (every span's flag ANDed)
    cur = max(flags, key=lambda n: list(g.nodes).index(n))
    ok_new = flags[0]
    for f in flags[1:]:
        with g.inserting_after(cur):
            ok_new = cur = g.call_function(torch.logical_and, (ok_new, f))
    with g.inserting_after(cur):
        ok_prev2 = g.call_function(torch.where, (reuse, ok_prev, ok_last))
    out_node, outs = output_values(g)      # after the spans: a stream output may be a graph output
    set_outputs(out_node, outs + [x, p, q_prev2, q_last2, acc2, count2] + span_state + [ok_new, ok_prev2, th2]
                + [reuse, err, gamma, nonfinite, th2])
    eliminate_dead_code(g)         # dead collectives too (passes.collectives)
    g.lint()
    new.recompile()
    return new
