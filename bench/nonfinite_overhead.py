"""Cost of the finiteness flags (a cached residual that is not finite is never replayed).

The rewritten graphs return, per span they compute, ``all(isfinite(out - in))`` (variants), or
carry it as state and fold it into the ``torch.cond`` predicate (cond).  This times, on one
mid-size Flux-architecture model and the same inputs, the graphs the static policy runs with
the flag and the same graphs built without it (``finite=False``), side by side:

* ``variants computed``: every span computed (the residuals and their flags are outputs);
* ``variants reused``: every span reused (no flag in the graph; the host reads the cached
  flag once per cache, where the call already synchronised on its timestep — timed too);
* ``cond computed`` / ``cond reused``: the one ``torch.cond`` graph, predicates False / True.

Repeats are interleaved (every graph once per round, the order shuffled per round) and the median
is reported with the ratio; on a loaded machine the difference of two full steps is mostly noise,
so the flag's own work (``all(isfinite(r))`` of every residual a computed step refreshes, and the
host read) is also timed alone and given as a fraction of a computed step.

    python bench/nonfinite_overhead.py                       # eager inner backend
    python bench/nonfinite_overhead.py --inner inductor      # Inductor (minutes to compile)
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

import omnicompile
from omnicompile.passes.rewrite import build_cond, build_variant
from omnicompile.testing import tiny_flux


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inner", default="eager", choices=["eager", "inductor"])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--single", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, kw = tiny_flux(num_layers=args.layers, num_single_layers=args.single, tokens=args.tokens,
                          heads=args.heads, head_dim=args.head_dim)
    oc = omnicompile.OmniCache(policy="static", guard="variants", inner_backend=args.inner)
    with torch.no_grad():
        torch.compile(model, backend=oc, fullgraph=True)(**kw)     # trace once: the runtime has the spans
        rt = oc.runtimes[0]
        spans, n = rt.spans, len(rt.spans)
        ex = rt.example_inputs
        res = rt.examples(rt._residual_specs(spans, [True] * n))
        preds = {d: [torch.tensor(d) for _ in spans] for d in (False, True)}
        oks = [torch.tensor(True) for _ in spans]

        def compiled(g, extra):
            return rt.compile_fn(g, ex + list(extra))

        cases = {}
        for finite in (True, False):
            tag = "with flag" if finite else "without"
            cases[("variants computed", tag)] = (compiled(build_variant(rt.gm, spans, (False,) * n, finite=finite), []), [])
            cases[("variants reused", tag)] = (compiled(build_variant(rt.gm, spans, (True,) * n, finite=finite), res), res)
            cond = compiled(build_cond(rt.gm, spans, finite=finite), preds[False] + res + (oks if finite else []))
            for d in (False, True):
                extra = preds[d] + res + (oks if finite else [])
                cases[(f"cond {'reused' if d else 'computed'}", tag)] = (cond, extra)
        flag = torch.tensor(True)
        times: dict = {k: [] for k in cases}
        for k, (fn, extra) in cases.items():        # warm up
            fn(*ex, *extra)
        rng = random.Random(0)
        order = list(cases)
        flag_alone = []
        for _ in range(args.repeats):
            rng.shuffle(order)
            t0 = time.perf_counter()
            ok = torch.stack([torch.isfinite(r).all() for r in res]).all()
            bool(ok)
            flag_alone.append(time.perf_counter() - t0)
            for k in order:
                fn, extra = cases[k]
                t0 = time.perf_counter()
                fn(*ex, *extra)
                if k[0] == "variants reused" and k[1] == "with flag":
                    bool(flag)                       # the host's read of the cached flag
                times[k].append(time.perf_counter() - t0)
    rows = []
    for what in ("variants computed", "variants reused", "cond computed", "cond reused"):
        a = statistics.median(times[(what, "with flag")])
        b = statistics.median(times[(what, "without")])
        rows.append({"graph": what, "with_flag_ms": a * 1e3, "without_ms": b * 1e3, "ratio": a / b})
    print(f"Flux {args.layers}+{args.single} blocks, {args.tokens} tokens, {args.heads}x{args.head_dim} heads, "
          f"inner {args.inner}, {args.threads} thread(s), median of {args.repeats}")
    print(f"{'graph':<20} {'with flag ms':>13} {'without ms':>11} {'ratio':>7}")
    for r in rows:
        print(f"{r['graph']:<20} {r['with_flag_ms']:>13.2f} {r['without_ms']:>11.2f} {r['ratio']:>7.4f}")
    alone = statistics.median(flag_alone)
    step = rows[0]["without_ms"] / 1e3
    print(f"the flags alone (isfinite + all of {len(res)} residuals, one host read): {alone * 1e3:.3f} ms = "
          f"{alone / step:.3%} of a computed step")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "flag_alone_ms": alone * 1e3,
                       "flag_fraction_of_step": alone / step}, f, indent=1)


if __name__ == "__main__":
    main()
