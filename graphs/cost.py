"""Cost model: FLOPs of the matmul-like work in an FX region, from the shapes Dynamo
recorded in ``node.meta["example_value"]``.

Counted: linear / matmul / bmm / addmm / baddbmm (2·M·N·K), scaled_dot_product_attention
(4·B·H·L·S·D: QKᵀ and PV), convolutions (2·out·Cin/groups·kernel).  Elementwise ops are
ignored — they are a few percent of a transformer block and memory-bound anyway.  This is
the estimate used for "FLOPs saved" in reports.
"""
from __future__ import annotations

import math

import torch

__all__ = ["node_flops"]


def _val(x):
    if hasattr(x, "meta"):
        return x.meta.get("example_value", x.meta.get("val"))
    return x


def _shape(x):
    v = _val(x)
    if isinstance(v, torch.Tensor):
        try:
            return [int(d) for d in v.shape]
        except Exception:  # symbolic sizes: use their hints where available
            out = []
            for d in v.shape:
                hint = getattr(getattr(d, "node", None), "hint", None)
                if hint is None:
                    return None
                out.append(int(hint))
            return out
    return None


def node_flops(node) -> int:
    """FLOPs of one FX node (0 for anything that is not matmul-like or lacks shapes)."""
    if node.op not in ("call_function", "call_method"):
        return 0
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    name = name.split(".")[0]
    out = _shape(node)
    args = node.args
    try:
        if name == "linear":
            x, w = _shape(args[0]), _shape(args[1])
            if x is None or w is None:
                return 0
            return 2 * math.prod(x[:-1]) * w[0] * w[1]
        if name in ("matmul", "bmm", "mm", "__matmul__", "baddbmm", "addmm"):
            a_i, b_i = (1, 2) if name in ("baddbmm", "addmm") else (0, 1)
            a, b = _shape(args[a_i]), _shape(args[b_i])
            if a is None or b is None or out is None:
                return 0
            k = a[-1]
            return 2 * math.prod(out) * k
        if name == "scaled_dot_product_attention":
            q, k = _shape(args[0]), _shape(args[1])
            v = _shape(args[2]) if len(args) > 2 else None
            if q is None or k is None:
                return 0
            lq, d = q[-2], q[-1]
            lk = k[-2]
            dv = v[-1] if v is not None else d
            batch = math.prod(q[:-2])
            return 2 * batch * lq * lk * d + 2 * batch * lq * lk * dv
        if name.startswith("conv") and out is not None:
            w = _shape(args[1])
            if w is None:
                return 0
            return 2 * math.prod(out) * math.prod(w[1:])
    except (IndexError, TypeError):
        return 0
    return 0
