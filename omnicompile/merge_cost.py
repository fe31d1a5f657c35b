"""The cost gate of the token / frame / block caches: ``token_ratio="auto"`` (and frame, block).

A wrapped region pays for itself only when running it on the kept rows, plus the ops the rewrite
adds around it (similarity scoring and top-k, the gathers of the kept rows, the scatter of its
outputs into the state, the residual's subtract and add), is faster than running it in full.  On
a GPU at the paper's sizes it is; on a CPU with 64-token frames it is not (``bench/RESULTS.md``).
With a ratio of ``"auto"`` the planner's regions are kept only where this module predicts a
saving on the machine at hand, by more than :data:`MARGIN` of the region's time; the others are refused (``merge_unprofitable``, with
the numbers).  The prediction of every region it looked at is in the report
(``token_cache["wrapped"][i]["predicted"]``) and ``bench/merge_cost.py`` sets it against the
measured wall time.

The model, per region::

    saving  = T_full - T_kept - T_merge
    T_kept  = L + (T_full - L) * (a F_kept + b B_kept) / (a F_full + b B_full)

* ``T_full``: the region in full, **measured** (its nodes extracted from the graph and run eagerly
  at their traced shapes on the device).
* ``L``: its ops' launch latency, which running on fewer rows does not save: the region's ops
  times the latency of one tiny add, **measured** (at most ``T_full``).
* ``F`` / ``B``: FLOPs and bytes moved of the region in full and of its copy on the kept rows
  (:mod:`omnicompile.graphs.cost`, whose symbolic form is sympy in the graph's data sizes;
  evaluated at the traced sizes — a merged graph is compiled for one shape).  Bytes are counted
  unfused, an upper bound of what Inductor moves.
* ``a``: seconds per FLOP, **measured**: the region's FLOP-bearing nodes (matmuls, attention)
  timed at their full and their kept shapes, the slope (a launch latency cancels).
* ``b``: seconds per byte, **measured**: the slope between an elementwise add of the region's
  main input and one on the kept share of it.
* ``T_merge``: **measured**: the nodes the rewrite added for the region (tagged
  ``omni.merge_op`` in the merged graph) run eagerly at the region's shapes with its real split
  indices, so scoring, gather and scatter cost what they cost here (the torch reference ops on a
  CPU, the Triton kernels on a GPU).

Not in the model: the host side of a merged call (state lookup and store, the finiteness flag
of the state); ``bench/merge_cost.py`` measures the whole call and ``bench/RESULTS.md`` gives
the gap.

Timings are the fastest of a few runs after a warm-up, cached per process by op and shapes (the
blocks of a list share one measurement); a few milliseconds per distinct block shape at compile
time.  Tests pass a ``timer`` to make the gate deterministic.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Optional

import torch
import torch.fx as fx

from omnicompile.graphs.cost import node_bytes, node_flops
from omnicompile.passes.common import Reason, example_value
from omnicompile.timing import measure

__all__ = ["Prediction", "predict", "gate", "time_nodes", "TIMINGS", "TIMER"]

#: process-wide cache of measured times: (kind, key) -> seconds
TIMINGS: dict = {}

#: an "auto" region is merged only where the predicted saving exceeds this share of the region's
#: measured time: the model's error on a 2-core CPU (``bench/merge_cost.py``) is 1-2 ms per region
#: of overhead it does not see (host-side state handling, fusion Inductor loses around the custom
#: ops), which turned predicted savings of up to 7 % of a region into measured losses
MARGIN = 0.10

#: when set, replaces every measurement: ``TIMER(kind, nodes, device, given) -> seconds`` (see
#: :func:`predict`); tests set it to make the gate deterministic
TIMER: Optional[Callable] = None

_INDEX_PLACEHOLDER = re.compile(r"^omni_tok\d+_")


@dataclasses.dataclass(frozen=True)
class Prediction:
    """The cost gate's prediction for one region, milliseconds per call (one call of the graph)."""

    full_ms: float           # the region in full, measured
    kept_ms: float           # its copy on the kept rows: latency + the rest scaled by the cost model
    merge_ms: float          # the added ops, measured
    s_per_gflop: float       # a, measured (seconds per 1e9 FLOPs)
    s_per_gb: float          # b, measured (seconds per 1e9 bytes)
    fixed_ms: float = 0.0    # the region's ops' launch latency (ops x the latency of one add)

    @property
    def saving_ms(self) -> float:
        return self.full_ms - self.kept_ms - self.merge_ms

    def describe(self) -> dict:
        return {"full_ms": self.full_ms, "kept_ms": self.kept_ms, "merge_ms": self.merge_ms,
                "saving_ms": self.saving_ms, "s_per_gflop": self.s_per_gflop, "s_per_gb": self.s_per_gb,
                "fixed_ms": self.fixed_ms}


def _random_like(node, device, given: dict):
    """A real tensor for an input of the extracted graph: the given one, else random of its shape."""
    if node.name in given:
        return given[node.name]
    v = example_value(node)
    if not isinstance(v, torch.Tensor):
        raise ValueError(f"{node.name}: no example tensor to time the region with")
    shape = tuple(int(d) for d in v.shape)
    if v.dtype.is_floating_point:
        return torch.randn(shape, dtype=v.dtype, device=device)
    if v.dtype == torch.bool:
        return torch.ones(shape, dtype=torch.bool, device=device)
    return torch.zeros(shape, dtype=v.dtype, device=device)


def _extract(nodes: list) -> tuple[fx.GraphModule, list]:
    """A graph of ``nodes`` alone: their other inputs become placeholders (in first-use order)
    and every node without a user in the set is an output."""
    graph = fx.Graph()
    env: dict = {}
    inputs: list = []
    inside = set(nodes)

    def arg(a):
        if a not in env:
            env[a] = graph.placeholder(f"in{len(inputs)}")
            inputs.append(a)
        return env[a]

    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside:
                arg(a)
        env[n] = graph.node_copy(n, lambda a: env[a])
    outs = [env[n] for n in nodes if not any(u in inside for u in n.users)]
    graph.output(tuple(outs))
    return fx.GraphModule(torch.nn.Module(), graph), inputs


def time_nodes(nodes: list, device, given: Optional[dict] = None, repeats: int = 5) -> float:
    """Seconds to run ``nodes`` (of one graph, in graph order) eagerly at their traced shapes on
    ``device``, their inputs random (or ``given``: input node name -> tensor).  Cached by the
    nodes' ops and shapes."""
    given = given or {}
    key = ("nodes", str(device), tuple((str(n.target), tuple(_shape_key(a) for a in n.all_input_nodes))
                                      for n in nodes))
    if key in TIMINGS:
        return TIMINGS[key]
    gm, inputs = _extract(nodes)
    args = [_random_like(a, device, given) for a in inputs]
    seconds = measure(lambda: gm(*args), device, repeats)
    TIMINGS[key] = seconds
    return seconds


def _shape_key(node):
    v = example_value(node)
    if isinstance(v, torch.Tensor):
        return (tuple(int(d) for d in v.shape), str(v.dtype))
    return repr(v)


def _byte_seconds(main: fx.Node, device, keep: float) -> tuple[float, float]:
    """(seconds per byte, seconds of latency) of an elementwise add, measured: the slope and
    intercept between an add of the region's main input and one of ``keep`` of its elements."""
    v = example_value(main)
    numel, dtype = v.numel(), v.dtype
    small = max(1, int(numel * keep))
    key = ("add", str(device), numel, small, str(dtype))
    if key not in TIMINGS:
        ts = []
        for n in (numel, small, 1):
            x = torch.randn(n, dtype=dtype, device=device)
            y = torch.randn(n, dtype=dtype, device=device)
            ts.append(measure(lambda: torch.add(x, y), device))
        per_byte = max(0.0, ts[0] - ts[1]) / (3 * (numel - small) * v.element_size()) if numel > small else 0.0
        TIMINGS[key] = (per_byte, ts[2])
    return TIMINGS[key]


def predict(gm: fx.GraphModule, merged: fx.GraphModule, consts: list, wraps: list,
            timer: Optional[Callable] = None) -> dict:
    """The :class:`Prediction` of every wrap in ``wraps`` (block name -> prediction).

    ``merged`` is :func:`~omnicompile.passes.merge.apply_merge`'s merged graph of ``gm`` holding
    these wraps and ``consts`` its split indices for phase 0 (in the order of the graph's index
    placeholders).  ``timer(kind, nodes, device, given)`` replaces the measurement, for tests
    (kinds: ``"region"`` — seconds of the region's nodes, ``"flops"`` — of its FLOP-bearing
    nodes (called with the full and the kept ones), ``"bytes"`` — (seconds per byte, seconds of
    one op's latency), ``"merge"`` — seconds of the added ops)."""
    by = {n.name: n for n in gm.graph.nodes}
    index_ph = [n for n in merged.graph.nodes if n.op == "placeholder" and _INDEX_PLACEHOLDER.match(n.name)]
    given = {n.name: t for n, t in zip(index_ph, consts)}
    added: dict = {}
    for n in merged.graph.nodes:
        blk = n.meta.get("omni.merge_op")
        if blk is not None:
            added.setdefault(blk, []).append(n)
    timer = timer if timer is not None else TIMER
    by_m = {n.name: n for n in merged.graph.nodes}
    out = {}
    for w in wraps:
        device = w.device
        region = [by[r] for r in w.region]
        heavy = [n for n in region if node_flops(n) > 0]
        heavy_kept = [by_m[f"{n.name}_m"] for n in heavy if f"{n.name}_m" in by_m]
        main_node = by[w.sites[w.main][0]].all_input_nodes[w.sites[w.main][1]]
        n_ops = sum(1 for n in region if node_bytes(n) > 0 or node_flops(n) > 0)
        if timer is not None:
            t_region = timer("region", region, device, {})
            t_full, t_kept = timer("flops", heavy, device, {}), timer("flops", heavy_kept, device, {})
            s_byte, t_op = timer("bytes", [main_node], device, {"kept": w.kept, "rows": w.rows})
            t_merge = timer("merge", added.get(w.block, []), device, given)
        else:
            t_region = time_nodes(region, device)
            t_full = sum(time_nodes([n], device) for n in heavy)
            t_kept = sum(time_nodes([n], device) for n in heavy_kept)
            s_byte, t_op = _byte_seconds(main_node, device, w.kept / w.rows)
            t_merge = time_nodes(added.get(w.block, []), device, given) if added.get(w.block) else 0.0
        d_flops = sum(node_flops(n) for n in heavy) - sum(node_flops(n) for n in heavy_kept)
        s_flop = max(0.0, t_full - t_kept) / d_flops if d_flops > 0 else 0.0
        model_full = s_flop * w.flops_full + s_byte * w.bytes_full
        model_kept = s_flop * w.flops_kept + s_byte * w.bytes_kept
        fixed = min(t_region, n_ops * t_op)          # the ops' launch latency: the same on fewer rows
        scale = model_kept / model_full if model_full > 0 else 1.0
        kept = fixed + (t_region - fixed) * scale
        out[w.block] = Prediction(t_region * 1e3, kept * 1e3, t_merge * 1e3, s_flop * 1e9, s_byte * 1e9,
                                  fixed * 1e3)
    return out


def gate(gm: fx.GraphModule, plan, timer: Optional[Callable] = None, strict: bool = False):
    """Predict every wrap of ``plan`` (recorded on it: ``Wrap.predicted``, in the report) and keep
    those of fixed-ratio axes and those of ``"auto"`` axes whose predicted saving exceeds
    :data:`MARGIN` of the region's time;
    returns ``(wraps kept, refusals)``.  A failed measurement refuses the auto wraps
    (``merge_cost_failed``) and leaves the others unpredicted, unless ``strict``."""
    from omnicompile.passes.merge import MergePlan, apply_merge

    opts = plan.options
    if not plan.wraps:
        return [], []
    try:
        if plan.merged is not None:          # built by the planner's FLOP measurement
            merged, consts = plan.merged
        else:
            merged, _, consts = apply_merge(gm, MergePlan(plan.wraps, [], None, opts), merged=True)
        preds = predict(gm, merged, consts, plan.wraps, timer)
    except Exception as e:
        if strict:
            raise
        why = f"the cost model's measurement failed ({type(e).__name__}: {e}); 'auto' merges nothing"
        return ([w for w in plan.wraps if not opts.auto(w.axis)],
                [Reason("merge_cost_failed", why, f"{w.block}:{w.axis}") for w in plan.wraps if opts.auto(w.axis)])
    kept, refused = [], []
    for w in plan.wraps:
        p = preds[w.block]
        w.predicted = p.describe()
        if opts.auto(w.axis) and p.saving_ms <= MARGIN * p.full_ms:
            refused.append(Reason(
                "merge_unprofitable",
                f"{w.axis}_ratio='auto': predicted {p.saving_ms:+.3f} ms per call (region {p.full_ms:.3f} ms "
                f"in full, {p.kept_ms:.3f} ms on {w.kept} of {w.rows} rows, + {p.merge_ms:.3f} ms scoring/"
                f"gather/scatter measured on {w.device}); merged only where the saving exceeds "
                f"{MARGIN:.0%} of the region's time (the model's error margin)",
                f"{w.block}:{w.axis}"))
            continue
        kept.append(w)
    return kept, refused
