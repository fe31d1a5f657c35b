"""Do the token / frame / block caches pay for themselves?  Predicted against measured, and the
crossover size on the machine at hand.

    python bench/merge_cost.py                       # the default grid (about 25 min on 2 CPU cores)
    python bench/merge_cost.py --sizes 8x16,8x32 --repeats 3
    python bench/merge_cost.py --inner-backend eager # quicker; not what users run

A random-weight Latte of the shipped video reference's width (``bench/reference_video``: 4 spatial
+ 4 temporal blocks, 4 heads x 16, patch 2, batch 2 = batched CFG) at several sizes
``FRAMESxSIDE`` (latent side; tokens per frame = (SIDE/2)^2).  Per size, one model compiled
uncached (``policy="none"``, Inductor) and one per cache: frame 0.3, block 0.4, token 0.2 (the
paper's Latte ratios, :data:`~omnicompile.passes.merge.AUTO_RATIOS`) and the three at ``"auto"``
(the cost gate of :mod:`omnicompile.merge_cost` keeps a region only where it predicts a saving).
Timing: one full and one merged call to warm up, then ``--repeats`` merged calls of every row
interleaved with uncached ones (U R1 R2 ... U R1 R2 ...), median per call; measured saving =
uncached - cached.  Predicted saving = the sum over the wrapped regions of the gate's prediction
(the report's ``predicted.saving_ms``; made for fixed ratios too).  The crossover of an axis is
the smallest size at which its measured saving is positive.

Writes ``bench/out/merge_cost.json`` and prints a markdown table (copied into ``bench/RESULTS.md``).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import omnicompile  # noqa: E402

#: row name -> OmniCache options besides policy="none" and the inner backend
ROWS = {
    "frame 0.3": dict(frame_ratio=0.3),
    "block 0.4": dict(block_ratio=0.4),
    "token 0.2": dict(token_ratio=0.2),
    "auto": dict(token_ratio="auto", frame_ratio="auto", block_ratio="auto"),
}
DEFAULT_SIZES = "8x16,8x32,8x48,8x64,16x32,32x32"


def build(frames: int, side: int, seed: int = 0):
    """The random-weight Latte and its call arguments at one size."""
    from diffusers import LatteTransformer3DModel

    cfg = json.loads((ROOT / "bench" / "reference_video" / "config.json").read_text())["transformer"]
    cfg = dict(cfg, sample_size=side, video_length=frames)
    torch.manual_seed(seed)
    m = LatteTransformer3DModel(**cfg).eval()
    kw = dict(hidden_states=torch.randn(2, cfg["in_channels"], frames, side, side),
              encoder_hidden_states=torch.randn(2, 4, cfg["caption_channels"]),
              timestep=torch.full((2,), 900.0), enable_temporal_attentions=True, return_dict=False)
    return m, kw


def wrapped(oc) -> list[dict]:
    rep = oc.report()
    return [w for g in rep.graphs for w in (g.token_cache or {}).get("wrapped", [])]


def refused_unprofitable(oc) -> int:
    rep = oc.report()
    return sum(1 for g in rep.graphs for r in g.refused if r.code == "merge_unprofitable")


def run_size(frames: int, side: int, rows: list[str], args) -> list[dict]:
    torch._dynamo.reset()                    # new sizes: else Dynamo recompiles with dynamic shapes
    m, kw = build(frames, side)
    fns = {}
    t0 = time.perf_counter()
    for name in ["uncached"] + rows:
        opts = dict(policy="none", inner_backend=args.inner_backend, **ROWS.get(name, {}))
        oc = omnicompile.OmniCache(**opts)
        fn = torch.compile(copy.deepcopy(m), backend=oc, fullgraph=True, dynamic=False)
        with torch.no_grad():
            for t in (900.0, 880.0):          # a full call, then a merged one
                fn(**dict(kw, timestep=torch.full((2,), t)))
        fns[name] = (fn, oc)
    compile_s = time.perf_counter() - t0
    times: dict = {name: [] for name in fns}
    with torch.no_grad():
        for r in range(args.repeats):
            for name, (fn, _) in fns.items():
                t = torch.full((2,), 860.0 - 10 * r)
                t1 = time.perf_counter()
                fn(**dict(kw, timestep=t))
                times[name].append(time.perf_counter() - t1)
    base = statistics.median(times["uncached"]) * 1e3
    out = []
    for name in rows:
        fn, oc = fns[name]
        ms = statistics.median(times[name]) * 1e3
        ws = wrapped(oc)
        pred = [w["predicted"]["saving_ms"] for w in ws if w.get("predicted")]
        out.append({"frames": frames, "side": side, "tokens_per_frame": (side // 2) ** 2, "row": name,
                    "uncached_ms": base, "cached_ms": ms, "ratio": base / ms, "measured_saving_ms": base - ms,
                    "predicted_saving_ms": sum(pred) if pred else 0.0, "wrapped": len(ws),
                    "refused_unprofitable": refused_unprofitable(oc),
                    "predictions": [dict(w["predicted"], block=w["block"], axis=w["axis"]) for w in ws
                                    if w.get("predicted")],
                    "times": times[name], "baseline_times": times["uncached"]})
        print(f"[merge_cost] F={frames} side={side} {name}: {base:.1f} -> {ms:.1f} ms ({base / ms:.2f}x), "
              f"saving measured {base - ms:+.2f} ms, predicted {out[-1]['predicted_saving_ms']:+.2f} ms, "
              f"{len(ws)} wrapped", file=sys.stderr, flush=True)
    print(f"[merge_cost] F={frames} side={side}: compiled in {compile_s:.0f} s", file=sys.stderr, flush=True)
    return out


def crossover(results: list[dict]) -> dict:
    """Per cache: the smallest size (by uncached time) at which the measured saving is positive,
    and where the prediction says so."""
    out = {}
    for row in ROWS:
        rs = sorted((r for r in results if r["row"] == row), key=lambda r: r["uncached_ms"])
        meas = next((f"{r['frames']}x{r['side']}" for r in rs if r["measured_saving_ms"] > 0), None)
        pred = next((f"{r['frames']}x{r['side']}" for r in rs if r["predicted_saving_ms"] > 0), None)
        out[row] = {"measured": meas, "predicted": pred}
    return out


def table(results: list[dict]) -> str:
    lines = ["| frames x side | tokens/frame | row | uncached ms | cached ms | speedup | saving measured ms "
             "| saving predicted ms | regions wrapped |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['frames']}x{r['side']} | {r['tokens_per_frame']} | {r['row']} | {r['uncached_ms']:.1f} "
                     f"| {r['cached_ms']:.1f} | {r['ratio']:.2f}x | {r['measured_saving_ms']:+.2f} "
                     f"| {r['predicted_saving_ms']:+.2f} | {r['wrapped']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=DEFAULT_SIZES, help="comma list of FRAMESxSIDE (latent side, patch 2)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma list; known: {', '.join(ROWS)}")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--inner-backend", default="inductor", choices=("inductor", "eager"))
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "merge_cost.json"))
    args = p.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"--rows: unknown {', '.join(unknown)}; known: {', '.join(ROWS)}")
    try:
        sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        p.error(f"--sizes: {args.sizes!r} is not a comma list of FRAMESxSIDE, e.g. 8x16,8x32")
    if any(len(s) != 2 or s[0] < 2 or s[1] < 4 or s[1] % 2 for s in sizes):
        p.error("--sizes: each FRAMESxSIDE needs frames >= 2 and an even side >= 4")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for frames, side in sizes:
        results.extend(run_size(frames, side, rows, args))
    cross = crossover(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": {"threads": torch.get_num_threads(), "torch": torch.__version__,
                                           "inner_backend": args.inner_backend},
                               "results": results, "crossover": cross}, indent=1))
    print(table(results))
    print()
    for row, c in cross.items():
        print(f"- {row}: first saving measured at {c['measured'] or 'none of the sizes'}, "
              f"predicted at {c['predicted'] or 'none of the sizes'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
