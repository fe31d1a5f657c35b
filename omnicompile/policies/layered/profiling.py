"""Profiling the layered policy: the quality cost ``Δ(u, t)`` of reusing unit ``u`` at step
``t`` (:func:`profile`; ``omnicache profile SPEC``; ``python bench/profile_layered.py`` for the
reference model), and :func:`spearman` to compare a proxy with it."""
from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, Callable, Optional, Sequence

import torch

from omnicompile.errors import CalibrationError
from omnicompile.policies.layered.files import METHODS, Profile
from omnicompile.policies.layered.policy import LayeredPolicy
from omnicompile.policies.layered.runtime import LayeredRuntime
from omnicompile.registry import policy_class

__all__ = ["profile", "spearman"]


def _first_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (list, tuple)):
        for v in x:
            if isinstance(v, torch.Tensor):
                return v
    if isinstance(x, dict):
        for v in x.values():
            if isinstance(v, torch.Tensor):
                return v
    v = getattr(x, "sample", None)
    if isinstance(v, torch.Tensor):
        return v
    raise CalibrationError(f"the generation function must return the final sample (a tensor), got {type(x).__name__}")


def _rank(xs: Sequence[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2.0
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> Optional[float]:
    """Spearman rank correlation of two equally long sequences (None when undefined)."""
    if len(a) != len(b) or len(a) < 3:
        return None
    ra, rb = _rank(a), _rank(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = math.sqrt(sum((x - ma) ** 2 for x in ra))
    vb = math.sqrt(sum((y - mb) ** 2 for y in rb))
    return cov / (va * vb) if va > 0 and vb > 0 else None


def profile(oc, generate: Callable[[], Any], path: Optional[str] = None, *, method: str = "final",
            progress: bool = True, steps: Optional[Sequence[int]] = None) -> list[Profile]:
    """Profile every layered graph of ``oc``; returns one :class:`Profile` per graph.

    ``generate()`` runs one full generation through the model compiled with ``oc`` and
    returns the final sample; it must be deterministic (same seed every call).  Per graph,
    one generation with every unit computed (the reference) records the proxy; ``method``:

    * ``"residual"`` — ``Δ`` = the L2 change of the unit's residual from the previous step
      (the reference generation only);
    * ``"final"`` (the paper's) — then one generation per (reusable unit, step >= 1)
      reusing that unit at that step only, ``Δ = |y - y_ref| / |y_ref|`` (L2) of the final
      samples; the proxy and its Spearman rank correlation with it are kept (``proxies``,
      ``correlation``).  ``steps`` restricts the steps profiled (others get
      ``Δ = None``: never reused).  A tqdm progress bar shows on stderr when installed.

    Afterwards each graph is planned from its profile with ``oc``'s options; ``path`` saves
    the profiles (``path`` for one graph, ``path`` with ``.N`` before the suffix for more)."""
    if not issubclass(policy_class(oc.config.policy), LayeredPolicy):
        raise CalibrationError(f"profile() needs an OmniCache with policy 'layered', not {oc.config.policy!r}")
    if method not in METHODS:
        raise CalibrationError(f"profile method {method!r}: expected one of {METHODS}")
    if not oc.runtimes:
        with torch.no_grad():
            generate()               # compiles the graphs
    rts = [rt for rt in oc.runtimes if isinstance(rt, LayeredRuntime)]
    if not rts:
        raise CalibrationError("the generation ran no graph through the layered policy (nothing was cached: "
                               "see oc.report() for why)")
    out = []
    bar = None
    for rt in rts:
        rt.mode = "compute"          # every graph computes everything while one is probed
    for rt in rts:
        t_start = time.perf_counter()
        rt.calibrator.request()       # the reference generation records the proxy
        oc.reset()
        with torch.no_grad():
            ref = _first_tensor(generate()).detach().float().clone()
        rows = rt.calibrator.take()
        n_steps = len(rows) if rows is not None else 0
        if n_steps < 2:
            raise CalibrationError(f"the reference generation made {n_steps} step(s) of graph "
                                   f"{rt.report.graph_id}; profiling needs two or more")
        proxies = {"residual": rt.calibrator.make_profile("residual", rows).delta}
        if method != "final":
            prof = rt.calibrator.make_profile(method, rows, seconds=time.perf_counter() - t_start)
            prof.proxies = proxies
        else:
            n_spans = len(rt.unit_spans())
            todo = [(k, t) for k in range(n_spans) for t in range(1, n_steps) if steps is None or t in steps]
            if progress:
                try:
                    from tqdm import tqdm
                    bar = tqdm(total=len(todo), desc=f"layered profile (graph {rt.report.graph_id})", unit="gen",
                               file=sys.stderr)
                except ImportError:
                    bar = None
            per_step = [[None] * n_spans for _ in range(n_steps)]
            norm = float(ref.norm()) or 1.0
            try:
                for k, t in todo:
                    rt.mode = ("probe", k, t)
                    oc.reset()
                    with torch.no_grad():
                        y = _first_tensor(generate()).detach().float()
                    per_step[t][k] = float((y - ref).norm()) / norm
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(unit=rt.unit_spans()[k].name, step=t)
            finally:
                if bar is not None:
                    bar.close()
                    bar = None
                rt.mode = "compute"
                oc.reset()
            prof = rt.calibrator.make_profile("final", per_step, seconds=time.perf_counter() - t_start)
            prof.proxies = proxies
            for m, table in proxies.items():
                pairs = [(p, f) for pr, fr in zip(table, prof.delta) for p, f in zip(pr, fr)
                         if p is not None and f is not None]
                prof.correlation[m] = spearman([p for p, _ in pairs], [f for _, f in pairs])
        rt.calibrator.adopt(prof, "profile")   # planned now, used once every graph is profiled
        out.append(prof)
    for rt in rts:
        rt.mode = "plan"
    if path is not None:
        root, ext = os.path.splitext(os.fspath(path))
        for i, p in enumerate(out):
            p.save(os.fspath(path) if len(out) == 1 else f"{root}.{i}{ext}")
    return out
