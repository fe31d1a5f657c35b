"""Cache-induced noise measurement and correction (OmniCache, trajectory-oriented).

While a span is reused the model output is ``eps~ = eps + q``.  At a computed step the
graph also evaluates what reuse *would* have produced — every span replaced by
``in + cached residual`` (``in`` plus the span's side additions, see
:mod:`~omnicompile.passes.rewrite`) and the rest of the graph after the first span re-run on those
values (the blocks are not re-run, so this costs the epilogue only) — and returns
``q = out_reuse - out`` per model output.  At the next reuse step the runtime passes the
last measured ``q`` and a coefficient ``gamma`` and the graph returns
``out_reuse - gamma * q`` (q_{s} ≈ gamma_s q_{s-1}).

Signatures (``n`` spans, ``m`` floating model outputs):

``build_measure_variant``: ``(*orig, *res[all spans]) -> (*orig_out, *res'[all spans], *q[m])``;
with ``finite=True`` also ``ok``, a 0-d bool: every new residual and every ``q`` is finite (a
``q`` measured against a residual of a non-finite step must not be replayed as a correction)
``build_corrected_reuse``: ``(*orig, *res[all spans], gamma, *q[m]) -> (*orig_out)``
"""
from __future__ import annotations

import math
import operator
from typing import Optional, Sequence

import torch
import torch.fx as fx

from .collectives import eliminate_dead_code
from .common import example_value
from .edit import add_placeholder, copy_graph_module, output_values, safe_name, set_outputs
from .rewrite import build_variant, finite_flag, stream_base
from .spans import Span

__all__ = ["build_measure_variant", "build_corrected_reuse", "float_outputs", "grid_layout", "BandFilter"]


def float_outputs(gm: fx.GraphModule) -> list[int]:
    """Indices of the graph outputs that are floating-point tensors (the ones q covers)."""
    _, outs = output_values(gm.graph)
    idx = []
    for i, o in enumerate(outs):
        ev = example_value(o) if isinstance(o, fx.Node) else None
        if isinstance(ev, torch.Tensor) and ev.dtype.is_floating_point:
            idx.append(i)
    return idx


def build_measure_variant(gm: fx.GraphModule, spans: Sequence[Span], finite: bool = False) -> fx.GraphModule:
    new, env = copy_graph_module(gm)
    g = new.graph
    out_node, outs = output_values(g)
    order = {n: i for i, n in enumerate(g.nodes)}
    # what a reuse skips: the span bodies (kept nodes stay on the reuse path, re-run on it
    # where they read a value the reuse changed)
    span_nodes = [{env[n] for n in sp.nodes if n not in set(sp.keep)} for sp in spans]
    in_any_span = set().union(*span_nodes)
    res_phs = [[add_placeholder(g, f"omni_res_{safe_name(sp.name)}_{s.name}", example_value(s.input))
                for s in sp.live_streams] for sp in spans]
    new_res: list[fx.Node] = []
    alt: dict[fx.Node, fx.Node] = {}
    created: set = set()
    for sp, phs in zip(spans, res_phs):
        for s, r in zip(sp.live_streams, phs):
            o = env[s.output]
            x, after = stream_base(g, env, {}, s, o)
            with g.inserting_after(after):
                d = g.call_function(operator.sub, (o, x))
            d.meta["example_value"] = example_value(s.output)
            new_res.append(d)
    # the reuse path: walk the graph after the first span; span outputs become in + res,
    # every other node that reads an alternative value is copied onto the alternative path
    first = min(order[env[n]] for n in spans[0].nodes)
    stream_out = {env[s.output]: (env[s.input], [env[h] for h in s.adds], r)
                  for sp, phs in zip(spans, res_phs) for s, r in zip(sp.live_streams, phs)}
    for n in list(g.nodes):
        if n.op in ("placeholder", "output") or order.get(n, -1) < first:
            continue
        if n in stream_out:
            x, adds, r = stream_out[n]
            base, after = alt.get(x, x), n
            for h in adds:        # the side additions of this call, on the reuse path too
                with g.inserting_after(after):
                    base = g.call_function(operator.add, (base, alt.get(h, h)))
                base.meta["example_value"] = example_value(n)
                created.add(base)
                after = base
            with g.inserting_after(after):
                y = g.call_function(operator.add, (base, r))
            y.meta["example_value"] = example_value(n)
            alt[n] = y
            created.add(y)
            continue
        if n in in_any_span or n in created:
            continue
        if any(a in alt for a in n.all_input_nodes):
            with g.inserting_after(n):
                c = g.node_copy(n, lambda a: alt.get(a, a))
            alt[n] = c
            created.add(c)
    qs = []
    for i in float_outputs(gm):
        o = outs[i]
        if o in alt:
            with g.inserting_before(out_node):
                q = g.call_function(operator.sub, (alt[o], o))
        else:   # the output does not depend on any span: reuse changes nothing
            with g.inserting_before(out_node):
                q = g.call_function(torch.zeros_like, (o,))
        qs.append(q)
    flag = []
    if finite:
        before = out_node.prev
        flag = [finite_flag(g, new_res + qs, before)]
    set_outputs(out_node, outs + new_res + qs + flag)
    eliminate_dead_code(g)         # dead collectives too (passes.collectives)
    g.lint()
    new.recompile()
    return new


def build_corrected_reuse(gm: fx.GraphModule, spans: Sequence[Span]) -> fx.GraphModule:
    new = build_variant(gm, spans, (True,) * len(spans))
    g = new.graph
    out_node, outs = output_values(g)
    gamma = add_placeholder(g, "omni_gamma", torch.empty(()))
    idx = float_outputs(gm)
    qs = [add_placeholder(g, f"omni_q_{i}", example_value(outs[i])) for i in idx]
    fixed = list(outs)
    for i, q in zip(idx, qs):
        with g.inserting_before(out_node):
            gq = g.call_function(operator.mul, (gamma, q))
            fixed[i] = g.call_function(operator.sub, (outs[i], gq))
    set_outputs(out_node, fixed)
    g.lint()
    new.recompile()
    return new


# ---------------------------------------------------------------- frequency band of the correction


def grid_layout(shape: Sequence[int]) -> tuple[Optional[str], str]:
    """How an output of ``shape`` lays out a spatial grid, for the band filter:
    ``("image", why)`` — channels first, the grid in the last two dims (``(B, C, H, W)``,
    ``(B, C, F, H, W)``); ``("tokens", why)`` — ``(B, N, C)`` with ``N`` a perfect square (a
    square token grid, row-major: Flux/SD3/DiT's packed latents); ``(None, why)`` otherwise."""
    shape = tuple(shape)
    if len(shape) in (4, 5) and shape[-1] > 1 and shape[-2] > 1:
        return "image", f"grid {shape[-2]}x{shape[-1]} (last two dims)"
    if len(shape) == 3:
        side = math.isqrt(shape[1])
        if side > 1 and side * side == shape[1]:
            return "tokens", f"token grid {side}x{side} (N={shape[1]})"
        return None, f"{shape[1]} tokens do not form a square grid"
    return None, f"shape {list(shape)} has no recognisable spatial grid"


class BandFilter:
    """Keeps the spatial frequencies ``lo <= r <= hi`` of a tensor laid out as
    :func:`grid_layout` says, ``r = max(|f_y|, |f_x|) / 0.5`` (0 = constant, 1 = the highest
    frequency of the grid).  Device ops only (FFT, a precomputed mask): no host sync."""

    def __init__(self, shape: Sequence[int], band: tuple, device=None):
        self.layout, self.why = grid_layout(shape)
        if self.layout is None:
            raise ValueError(self.why)
        shape = tuple(shape)
        h, w = (shape[-2], shape[-1]) if self.layout == "image" else (math.isqrt(shape[1]),) * 2
        self.hw = (h, w)
        fy = torch.fft.fftfreq(h, device=device).abs()
        fx = torch.fft.rfftfreq(w, device=device).abs()
        r = torch.maximum(fy[:, None], fx[None, :]) / 0.5
        lo, hi = band
        self.mask = ((r >= lo) & (r <= hi + 1e-9)).float()

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        h, w = self.hw
        if self.layout == "tokens":
            b, n, c = q.shape
            grid = q.reshape(b, h, w, c).movedim(-1, 1)          # (B, C, h, w)
        else:
            grid = q
        spec = torch.fft.rfft2(grid.float(), s=(h, w)) * self.mask
        out = torch.fft.irfft2(spec, s=(h, w))
        if self.layout == "tokens":
            out = out.movedim(1, -1).reshape(b, n, c)
        return out.to(q.dtype)
