"""Profile the shipped reference model for the ``layered`` policy, plan schedules from it, and
check them against uniform intervals.

    python bench/profile_layered.py                      # profile (final-sample deviation), write JSON
    python bench/profile_layered.py --evaluate           # also: quality of the plans vs static N=2, 3

Profiling: the reference (``bench.models.load_reference``) samples ``--labels`` with batched CFG
over ``--steps`` Euler steps through ``OmniCache(policy="layered", inner_backend="eager")``;
:func:`omnicompile.policies.layered.profile` runs one generation with every unit computed, then one per
(unit, step >= 1) reusing that unit at that step only, and records the relative L2 deviation of
the final images (and the one-generation proxy, with its rank correlation).  Latency is the cost
model's FLOPs.  The profile goes to ``--out`` (default ``bench/profiles/layered_reference_<steps>.json``);
use it with ``options={"policy": "layered", "calibrate": PATH, "target_speedup": S}``.

``--evaluate`` samples other seeds (``--eval-seeds``) with every plan and with the static policy
(DeepCache-style uniform intervals), and prints the relative L2 deviation and PSNR of the images
against the uncached ones, with the ideal (FLOPs) speedup of each schedule.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.models import load_reference  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--labels", default="0,3,5,8", help="digits sampled while profiling (batched CFG)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    p.add_argument("--reuse", action="store_true", help="reuse an existing profile at --out instead of profiling")
    p.add_argument("--evaluate", action="store_true")
    p.add_argument("--eval-seeds", default="1,2")
    p.add_argument("--eval-labels", default="0,1,2,3,4,5,6,7,8,9")
    p.add_argument("--targets", default="1.5,2,2.5,3")
    p.add_argument("--cache-interval", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from omnicompile import OmniCache
    from omnicompile.policies.layered import Profile, dag_from_json, load_file, plan_profile, profile

    out = Path(args.out or ROOT / "bench" / "profiles" / f"layered_reference_{args.steps}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    ref = load_reference(classifier=False)
    labels = [int(x) for x in args.labels.split(",")]

    if args.reuse and out.exists():
        prof = load_file(str(out))
        assert isinstance(prof, Profile)
    else:
        oc = OmniCache(policy="layered", inner_backend="eager", calibrate=None, cache_interval=args.cache_interval)
        model = torch.compile(ref.transformer, backend=oc, fullgraph=True, dynamic=False)
        t0 = time.perf_counter()
        prof = profile(oc, lambda: ref.sample(labels, steps=args.steps, transformer=model, seed=args.seed),
                       str(out))[0]
        prof.settings.update(labels=labels, seed=args.seed, steps=args.steps, threads=args.threads,
                             sampler="bench.models.Reference.sample(cfg='batched')")
        prof.save(str(out))
        corr = ", ".join(f"{m} {v:.3f}" for m, v in prof.correlation.items() if v is not None)
        print(f"profiled {len(prof.units)} units x {prof.num_steps} steps in {time.perf_counter() - t0:.0f}s "
              f"(wall, incl. compile); Spearman rank correlation of the proxies with it: {corr}; wrote {out}")
        torch._dynamo.reset()

    dag = dag_from_json(prof.dag)
    targets = [float(x) for x in args.targets.split(",")]
    plans = {}
    for s in targets:
        plan = plan_profile(prof, s, args.cache_interval, dag)
        plans[s] = plan
        print(f"\ntarget {s}x (N={args.cache_interval}): ideal {plan.ideal_speedup:.2f}x, "
              f"{len(plan.regions)} regions, {len(plan.rows())} variants{'' if plan.reached else ', NOT reached'}")
        for u, m in plan.marks().items():
            print(f"  {u:<28} {m}")
    if not args.evaluate:
        return 0

    from bench.metrics import psnr

    seeds = [int(x) for x in args.eval_seeds.split(",")]
    ev_labels = [int(x) for x in args.eval_labels.split(",")]

    def run(options):
        oc = OmniCache(inner_backend="eager", **options)
        model = torch.compile(ref.transformer, backend=oc, fullgraph=True, dynamic=False)
        imgs = [ref.sample(ev_labels, steps=args.steps, transformer=model, seed=s) for s in seeds]
        rep = oc.report()
        torch._dynamo.reset()
        return torch.cat(imgs), rep

    base, _ = run({"policy": "none"})
    rows = []
    configs = [(f"static N={n}", {"policy": "static", "interval": n, "warmup": w}) for n, w in ((2, 2), (3, 3))]
    configs += [(f"layered {s}x", {"policy": "layered", "calibrate": str(out), "target_speedup": s,
                                   "cache_interval": args.cache_interval}) for s in targets]
    for name, opt in configs:
        imgs, rep = run(opt)
        g = rep.graphs[0]
        total = g.flops_per_call * g.calls             # (the totals: every call, whatever the detail kept)
        saved = g.flops_saved
        speed = total / (total - saved) if total > saved else math.inf
        rel = float((imgs - base).norm() / base.norm())
        rows.append((name, speed, rel, psnr(imgs, base)))
    print(f"\nquality vs uncached, {len(seeds)} seed(s) x {len(ev_labels)} labels, {args.steps} steps:")
    print(f"  {'schedule':<16} {'ideal speedup':>13} {'rel L2':>8} {'PSNR dB':>8}")
    for name, speed, rel, ps in rows:
        print(f"  {name:<16} {speed:>12.2f}x {rel:>8.4f} {ps:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
