"""Token, frame and block caches on the shipped video reference model (Latte), side by side.

    python bench/video_bench.py                  # the default grid (about 15 min on 2 CPU cores)
    python bench/video_bench.py --quick          # a few minutes: fewer rows, 2 repeats
    python bench/video_bench.py --rows token-0.5,all-0.25 --repeats 3
    python bench/video_bench.py --scaling-only   # only the cost-growth table (random-weight Latte)
    python bench/video_bench.py --inner-backend eager --repeats 1 --no-scaling \
        --rows "token-0.25 norotate,token-0.25 rotate refresh=2"   # merge_rotate / merge_refresh
                                                                 # ablation (ROTATION_ROWS)

The paper's Table 3 on our model (``bench/reference_video/``: 4 spatial + 4 temporal Latte blocks,
8 frames of 16x16, 64 tokens per frame): each cache alone at several ratios, all three together,
together with a step policy (``static`` interval 2), the placement of the paper (S2T/T2S: token and
frame caches in spatial layers, block cache in temporal layers) against what ``merge_fill`` and
``merge_ffn`` change, and the cost growth with frames and resolution.

Protocol: every row samples the same labels and seeds (one video per digit, batched CFG, 20 Euler
steps) with ``torch.compile(transformer, backend=OmniCache(...), fullgraph=True)``; the reference is
the same model compiled with Inductor uncached, and PSNR / SSIM (per frame) and the temporal
metrics of ``bench/video.py`` are measured against its videos; frame / video accuracy and valid
motion come from the digit classifier (``VideoDigitMetrics``).  Timing: after one warm-up
generation, ``--repeats`` timed generations of the row interleaved with generations of the
baseline (R B R B R), speedup = ratio of the medians — load drift on a shared machine hits both
alike.  One Dynamo cache holds every compiled row (no reset between rows; the cache limit is
raised), so no row recompiles while timed.  FLOPs: the backend's report (cost model) over one
generation, relative to the uncached graph.

Cost growth (``--scaling``): a random-weight Latte of the same width at (frames, side) in
{(8, 16), (16, 16), (8, 32)}, uncached vs token+frame+block caches at 0.5: wall time per call
and the cached/uncached ratio (the caches skip a fixed fraction of the rows, so their share of the
cost should stay flat or fall as the sequence grows, where attention is quadratic).

Writes ``bench/out/video_bench.json`` and prints a markdown table (copied into ``bench/RESULTS.md``
by hand, with the date and machine).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import omnicompile  # noqa: E402

#: row name -> OmniCache options (besides inner_backend)
ROWS = {
    # (defaults: merge_rotate=True, merge_fill="auto" = residual on these blocks, attention only)
    "static-2": dict(policy="static", interval=2, warmup=2),
    "token-0.2": dict(policy="none", token_ratio=0.2),
    "token-0.4": dict(policy="none", token_ratio=0.4),
    "frame-0.3": dict(policy="none", frame_ratio=0.3),
    "frame-0.5": dict(policy="none", frame_ratio=0.5),
    "block-0.4": dict(policy="none", block_ratio=0.4),
    "block-0.5": dict(policy="none", block_ratio=0.5),
    # the paper's Latte setting: r_f 30 %, r_b 40 %, r_t 20 %
    "all (paper: f0.3 b0.4 t0.2)": dict(policy="none", token_ratio=0.2, frame_ratio=0.3, block_ratio=0.4),
    "all (paper) +ffn": dict(policy="none", token_ratio=0.2, frame_ratio=0.3, block_ratio=0.4, merge_ffn=True),
    "all (paper) + static-2": dict(policy="static", interval=2, warmup=2, token_ratio=0.2, frame_ratio=0.3,
                                   block_ratio=0.4),
    # S2T/T2S against the swapped placement S2S/T2T (no token cache: the paper's ablation)
    "frame+block S2T/T2S": dict(policy="none", frame_ratio=0.3, block_ratio=0.4),
    "frame+block swapped S2S/T2T": dict(policy="none", frame_ratio=0.3, block_ratio=0.4, merge_placement="swapped"),
    # reuse (cache) against plain interpolation, and the fill ablation
    "all (paper) fill=interpolate": dict(policy="none", token_ratio=0.2, frame_ratio=0.3, block_ratio=0.4,
                                         merge_fill="interpolate"),
    "all (paper) fill=output": dict(policy="none", token_ratio=0.2, frame_ratio=0.3, block_ratio=0.4,
                                    merge_fill="output"),
    "all (paper) fixed split": dict(policy="none", token_ratio=0.2, frame_ratio=0.3, block_ratio=0.4,
                                    merge_rotate=False),
    "all-0.5 refresh=2": dict(policy="none", token_ratio=0.5, frame_ratio=0.5, block_ratio=0.5, merge_refresh=2),
    # the cost gate: each cache only on the blocks where it is predicted to pay on this machine
    "all auto": dict(policy="none", token_ratio="auto", frame_ratio="auto", block_ratio="auto"),
    "all auto + static-2": dict(policy="static", interval=2, warmup=2, token_ratio="auto", frame_ratio="auto",
                                block_ratio="auto"),
}
QUICK = ["static-2", "token-0.4", "frame-0.5", "block-0.5", "all (paper: f0.3 b0.4 t0.2)"]

#: ``merge_rotate`` / ``merge_refresh`` ablation (not in the default grid; name rows with ``--rows``):
#: each cache alone, fill output / residual, the split fixed (``norotate``) or rotated, with a
#: full refresh every 2 or 3 steps
ROTATION_ROWS = {}
for _base, _opts in (("token-0.25", dict(token_ratio=0.25)), ("frame-0.3", dict(frame_ratio=0.3)),
                     ("block-0.4", dict(block_ratio=0.4)),
                     ("all-0.25", dict(token_ratio=0.25, frame_ratio=0.25, block_ratio=0.25)),
                     ("all-0.5", dict(token_ratio=0.5, frame_ratio=0.5, block_ratio=0.5))):
    for _fill in ("output", "residual"):
        _name = _base + ("" if _fill == "output" else " fill=residual")
        for _rot in (False, True):
            for _n in (None, 2, 3):
                ROTATION_ROWS[_name + (" rotate" if _rot else " norotate") + (f" refresh={_n}" if _n else "")] = dict(
                    policy="none", merge_fill=_fill, merge_rotate=_rot, merge_refresh=_n, **_opts)
KNOWN = {**ROWS, **ROTATION_ROWS}


def generate(ref, model, labels, steps, seed):
    return ref.sample(labels, steps=steps, seed=seed, transformer=model, use_cache_context=False)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def report_numbers(oc) -> dict:
    rep = oc.report()
    out = {"graphs": len(rep.graphs), "cached": [g.cached for g in rep.graphs],
           "refused": sorted({r.code for g in rep.graphs for r in g.refused}),
           "fallback": [g.fallback.code if g.fallback else None for g in rep.graphs]}
    g = rep.graphs[0] if rep.graphs else None
    if g is not None:
        out["flops_saved_fraction"] = g.flops_saved_fraction
        tc = getattr(g, "token_cache", None)
        if tc:
            out["token_cache"] = tc if isinstance(tc, (dict, list)) else str(tc)
    return out


def run_quality(args) -> list[dict]:
    from bench.video import VideoDigitMetrics, compare_videos, load_video_reference

    ref = load_video_reference()
    metrics = VideoDigitMetrics.load()
    labels = list(range(10)) * args.samples_per_class
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    torch._dynamo.reset()
    base_model = torch.compile(copy.deepcopy(ref.transformer), fullgraph=True)
    gen_base = lambda: generate(ref, base_model, labels, args.steps, args.seed)
    t_compile, ref_videos = timed(gen_base)
    base_eval = metrics.evaluate(ref_videos, labels)
    rows = [{"name": "compiled (Inductor, uncached)", "speedup": 1.0, "flops": 1.0, "psnr": math.inf, "ssim": 1.0,
             **{k: v for k, v in base_eval.items()}, "compile_s": t_compile}]
    print(f"[video] baseline compiled in {t_compile:.1f}s; accuracy {base_eval['frame_accuracy']:.2f}",
          file=sys.stderr, flush=True)
    for row in args.rows:
        opts = dict(KNOWN[row])
        oc = omnicompile.OmniCache(inner_backend=args.inner_backend, **opts)
        model = torch.compile(copy.deepcopy(ref.transformer), backend=oc, fullgraph=True)
        gen = lambda: generate(ref, model, labels, args.steps, args.seed)
        t_first, _ = timed(gen)                       # compile + warm-up
        oc.reset()
        mine, base = [], []
        videos = None
        for r in range(args.repeats):
            oc.reset()
            t, videos = timed(gen)
            mine.append(t)
            if r < args.repeats - 1:
                base.append(timed(gen_base)[0])
        if not base:
            base.append(timed(gen_base)[0])
        speed = statistics.median(base) / statistics.median(mine)
        info = report_numbers(oc)
        saved = info.get("flops_saved_fraction")
        d = {"name": row, "options": opts, "speedup": speed, "flops": None if saved is None else 1 - saved,
             **compare_videos(videos, ref_videos), **metrics.evaluate(videos, labels), "compile_s": t_first,
             "times": mine, "baseline_times": base, "report": info}
        rows.append(d)
        print(f"[video] {row}: {speed:.2f}x, PSNR {d['psnr']:.1f} dB, acc {d['frame_accuracy']:.2f}, "
              f"refused {info['refused']}", file=sys.stderr, flush=True)
    return rows


def run_scaling(args) -> list[dict]:
    from diffusers import LatteTransformer3DModel

    out = []
    for frames, side in ((8, 16), (16, 16), (8, 32)):
        torch._dynamo.reset()      # else the new sizes recompile with dynamic shapes
        torch.manual_seed(0)
        m = LatteTransformer3DModel(num_attention_heads=4, attention_head_dim=16, in_channels=1, out_channels=1,
                                    num_layers=4, sample_size=side, patch_size=2, video_length=frames,
                                    norm_type="ada_norm_single", caption_channels=32, cross_attention_dim=64,
                                    activation_fn="gelu-approximate", attention_bias=True).eval()
        kw = dict(hidden_states=torch.randn(2, 1, frames, side, side), timestep=torch.full((2,), 500.0),
                  encoder_hidden_states=torch.randn(2, 4, 32), enable_temporal_attentions=True, return_dict=False)
        times = {}
        fns = {}
        for name, opts in (("uncached", dict(policy="none")),
                           ("token+frame+block 0.5", dict(policy="none", token_ratio=0.5, frame_ratio=0.5,
                                                          block_ratio=0.5))):
            oc = omnicompile.OmniCache(inner_backend=args.inner_backend, **opts)
            fn = torch.compile(copy.deepcopy(m), backend=oc, fullgraph=True, dynamic=False)
            with torch.no_grad():
                for t in (900.0, 800.0):            # full call, then a merged one
                    fn(**dict(kw, timestep=torch.full((2,), t)))
            fns[name] = (fn, oc)
        for name in fns:
            times[name] = []
        with torch.no_grad():
            for r in range(args.repeats + 2):
                for name, (fn, oc) in fns.items():
                    t0 = time.perf_counter()
                    fn(**dict(kw, timestep=torch.full((2,), 700.0 - 10 * r)))
                    times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v[1:]) for k, v in times.items()}
        row = {"frames": frames, "side": side, "tokens_per_frame": (side // 2) ** 2,
               "uncached_ms": med["uncached"] * 1e3, "cached_ms": med["token+frame+block 0.5"] * 1e3,
               "ratio": med["token+frame+block 0.5"] / med["uncached"]}
        out.append(row)
        print(f"[video] scaling F={frames} side={side}: uncached {row['uncached_ms']:.1f} ms, cached "
              f"{row['cached_ms']:.1f} ms ({row['ratio']:.2f})", file=sys.stderr, flush=True)
    return out


def table(rows: list[dict]) -> str:
    head = ("| row | speedup vs compiled | FLOPs | PSNR dB | SSIM | diff corr | flicker | frame acc | video acc "
            "| valid motion |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        fl = "–" if r.get("flops") is None else f"{r['flops']:.2f}"
        lines.append(f"| {r['name']} | {r['speedup']:.2f}x | {fl} | {r['psnr']:.1f} | {r['ssim']:.4f} | "
                     f"{r.get('diff_corr', 1.0):.3f} | {r.get('flicker_ratio', 1.0):.2f} | "
                     f"{r['frame_accuracy']:.2f} | {r['video_accuracy']:.2f} | {r['valid_motion']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma list of rows; known: {', '.join(KNOWN)}")
    p.add_argument("--samples-per-class", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--inner-backend", choices=("inductor", "eager"), default="inductor")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--scaling", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--scaling-only", action="store_true")
    p.add_argument("--json", default=str(ROOT / "bench" / "out" / "video_bench.json"))
    args = p.parse_args(argv)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if args.quick:
        args.rows, args.repeats = [r for r in args.rows if r in QUICK] or QUICK, 2
    unknown = [r for r in args.rows if r not in KNOWN]
    if unknown:
        p.error(f"--rows: unknown {unknown}; known: {', '.join(KNOWN)}")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    result = {"config": {k: v for k, v in vars(args).items() if k != "json"}}
    if not args.scaling_only:
        result["rows"] = run_quality(args)
        print(table(result["rows"]))
    if args.scaling or args.scaling_only:
        result["scaling"] = run_scaling(args)
        print("\n| frames | side | tokens/frame | uncached ms/call | cached ms/call | cached/uncached |\n|---|---|---|---|---|---|")
        for r in result["scaling"]:
            print(f"| {r['frames']} | {r['side']} | {r['tokens_per_frame']} | {r['uncached_ms']:.1f} | "
                  f"{r['cached_ms']:.1f} | {r['ratio']:.2f} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    print(f"\nruntime {(time.perf_counter() - t0) / 60:.1f} min; wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
