"""Speed of omnicache against eager and Inductor on a Flux-architecture transformer.

One run measures every method side by side on the same model and inputs: a diffusers
``FluxTransformer2DModel`` with random weights, driven by a ``FlowMatchEulerDiscreteScheduler``
loop.  Methods: eager, Inductor, omnicache ``none``, omnicache ``static interval=2`` with
both guard forms (host-chosen variants, in-graph torch.cond); on request (``--methods``)
``probe``, ``trajectory`` and its presets ``trajectory-slow`` / ``trajectory-fast``.  Each
method is compiled and warmed up once (Dynamo's cache is reset once, at the start, never
between methods, so no method recompiles later), one untimed round runs in the timed order,
then the repeats are interleaved across methods (so drift in machine load hits all of them
alike) and the median is reported, with the ideal speedup implied by the
skipped FLOPs (from the report's cost model).

    python bench/speed.py                 # the default size (minutes on 2 CPU cores)
    python bench/speed.py --small         # a quick run (make demo)
    python bench/speed.py --json out.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

import omnicompile


def build(args):
    torch.manual_seed(0)
    side = args.side
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=args.dual, num_single_layers=args.single,
        attention_head_dim=args.head_dim, num_attention_heads=args.heads, joint_attention_dim=64,
        pooled_projection_dim=64, axes_dims_rope=[args.head_dim // 4, args.head_dim // 4, args.head_dim // 2],
    ).eval()
    ids = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
    kw = dict(
        encoder_hidden_states=torch.randn(1, args.text, 64), pooled_projections=torch.randn(1, 64),
        img_ids=torch.cat([torch.zeros(side * side, 1), ids.float()], 1), txt_ids=torch.zeros(args.text, 3),
        return_dict=False)
    x0 = torch.randn(1, side * side, 16, generator=torch.Generator().manual_seed(1))
    return model, kw, x0


def sample(fn, kw, x0, steps):
    sched = FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(steps)
    x = x0.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            v = fn(hidden_states=x, timestep=torch.full((1,), float(t) / 1000.0), **kw)[0]
            x = sched.step(v, t, x).prev_sample
    return x


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dual", type=int, default=4)
    p.add_argument("--single", type=int, default=8)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=48)
    p.add_argument("--side", type=int, default=24, help="latent side: tokens = side**2")
    p.add_argument("--text", type=int, default=32)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine more threads oversubscribe "
                        "and timings become noise; 0: torch's default)")
    p.add_argument("--small", action="store_true", help="a quick configuration")
    p.add_argument("--methods", default="eager,inductor,none,static-variants,static-cond")
    p.add_argument("--probe-threshold", type=float, default=0.4)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.small:
        args.dual, args.single, args.side, args.steps, args.repeats = 2, 4, 12, 12, 3
        args.heads, args.head_dim = 2, 32
        if args.methods == p.get_default("methods"):
            args.methods = "inductor,static-variants"
    if args.threads:
        torch.set_num_threads(args.threads)
    model, kw, x0 = build(args)
    static = dict(policy="static", interval=2, warmup=2)
    makers = {
        "eager": lambda: (model, None),
        "inductor": lambda: (torch.compile(model, fullgraph=True), None),
        "none": lambda: _oc(model, policy="none"),
        "static-variants": lambda: _oc(model, guard="variants", **static),
        "static-cond": lambda: _oc(model, guard="cond", **static),
        # the first (warm-up) run of trajectory is its calibration generation
        "trajectory": lambda: _oc(model, policy="trajectory", budget=0.45),
        "trajectory-slow": lambda: _oc(model, policy="trajectory-slow"),
        "trajectory-fast": lambda: _oc(model, policy="trajectory-fast"),
        "probe": lambda: _oc(model, policy="probe", threshold=args.probe_threshold, num_steps=args.steps),
    }
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in makers:
            p.error(f"--methods: unknown method {m!r}; choose from {', '.join(makers)}")
    fns, ocs, compile_s, outs = {}, {}, {}, {}
    # no torch._dynamo.reset() between methods: it would drop the code compiled for the earlier
    # ones, and their first timed repeat would recompile.  Every method keeps its own cache entry
    # (guarded by its backend), so the cache limit must hold them all.
    torch._dynamo.reset()
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 8 * len(methods)))
    for m in methods:
        fn, oc = makers[m]()
        t0 = time.perf_counter()
        outs[m] = sample(fn, kw, x0, args.steps)       # compile + warm-up
        compile_s[m] = time.perf_counter() - t0
        fns[m], ocs[m] = fn, oc
        print(f"[speed] {m}: first run (compile + warm-up) {compile_s[m]:.1f}s", file=sys.stderr, flush=True)
    times = {m: [] for m in methods}
    for r in range(-1, args.repeats):          # r = -1: one untimed round, in the timed order
        for m in methods:
            if ocs[m] is not None:
                ocs[m].reset()
            t0 = time.perf_counter()
            sample(fns[m], kw, x0, args.steps)
            if r >= 0:
                times[m].append(time.perf_counter() - t0)
        if r >= 0:
            print(f"[speed] repeat {r + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    base = "inductor" if "inductor" in methods else methods[0]
    med = {m: statistics.median(v) for m, v in times.items()}
    rows = []
    for m in methods:
        oc = ocs[m]
        ideal = None
        rep = None
        if oc is not None:
            rep = oc.report()
            g = rep.graphs[0]
            if g.cached and g.calls:
                # the ideal speedup counts only the matmul work the cache skips, over the
                # last timed generation (not the warm-up / calibration one)
                last = [s for s in g.steps if s.generation == g.steps[-1].generation]
                frac = sum(s.flops_saved for s in last) / (g.flops_per_call * len(last))
                ideal = 1.0 / (1.0 - frac)
        speed = med[base] / med[m]
        rows.append({
            "method": m, "median_s": med[m], "times_s": times[m], "compile_s": compile_s[m],
            "speedup_vs_" + base: speed, "speedup_vs_eager": (med["eager"] / med[m]) if "eager" in med else None,
            "ideal_speedup": ideal, "fraction_of_ideal": (speed / ideal) if ideal else None,
            "max_abs_diff_vs_" + base: float((outs[m] - outs[base]).abs().max()),
        })
    cfg = {k: getattr(args, k) for k in ("dual", "single", "heads", "head_dim", "side", "text", "steps",
                                         "repeats")}
    cfg["threads"] = torch.get_num_threads()
    cfg["torch"] = torch.__version__
    print(f"\nFlux-architecture transformer {args.dual}+{args.single} blocks, width {args.heads * args.head_dim}, "
          f"{args.side ** 2}+{args.text} tokens, {args.steps} steps, {cfg['threads']} threads, "
          f"median of {args.repeats}")
    print(f"| method | median s | vs {base} | vs eager | ideal | of ideal | max diff vs {base} |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        f = lambda v, fmt="{:.2f}": "-" if v is None else fmt.format(v)
        print(f"| {r['method']} | {r['median_s']:.2f} | {f(r['speedup_vs_' + base])}x | {f(r['speedup_vs_eager'])}x "
              f"| {f(r['ideal_speedup'])}x | {f(r['fraction_of_ideal'], '{:.0%}')} | "
              f"{r['max_abs_diff_vs_' + base]:.3g} |")
    for m in methods:
        if ocs[m] is not None and ocs[m].report().graphs[0].cached:
            g = ocs[m].report().graphs[0]
            print(f"{m}: hit rate {g.hit_rate:.1%} over all calls (warm-up included), "
                  f"FLOPs saved {g.flops_saved_fraction:.1%}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"config": cfg, "rows": rows}, fh, indent=2)
    return rows


def _oc(model, **options):
    oc = omnicompile.OmniCache(**options)
    return torch.compile(model, backend=oc, fullgraph=True), oc


if __name__ == "__main__":
    main()
