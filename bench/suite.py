"""The validation suite (issue 16): every step policy at the same targets on every trained model.

Models (each trained here, each its own architecture and data):

* ``digits`` — Flux-class on scikit-learn digits (``bench/reference``), 10 images, batched CFG;
* ``video`` — Latte-class on moving digits (``bench/reference_video``), 4 videos;
* ``scenes`` — SD3-class on procedural colour scenes (``bench/reference_scenes``,
  ``bench/train_scenes.py``), 6 images;
* ``heldout`` — PixArt-class on the same scenes (``bench/reference_heldout``, ``train_scenes.py
  --arch pixart``): kept out of every tuning decision and reported separately
  (``--models heldout``).

Methods, each at every ``--targets`` speedup (``target_speedup``, the cost model of
``omnicompile/targets.py``): ``uniform`` (policy ``static`` with a target and ``extrapolate=False``:
the plain uniform schedule, the baseline of every comparison), ``default-target`` (the default
policy — ``static``, extrapolated — at the target),
``trajectory`` (calibrated on the first generation), ``probe`` (reuse budget) and ``layered``
(calibrated on the first generation); for the diagnosis ``trajectory-plain`` (its schedule without
the noise correction) and ``trajectory-error`` (steps scored by the measured error of a reuse on the
calibration generation, ``curvature="error"``); ``default`` is ``OmniCache()`` with no option (one
row, at its own speed).  ``--peers`` adds the real peers at several thresholds each (they take no
speed target): diffusers' ``FirstBlockCacheConfig`` hooks and cache-dit's DBCache F1B0
(``bench/peers.py`` applies them as their docs say), run on the eager transformer.  Per method: a fresh Dynamo cache, ``--prepare`` untimed
generations (compilation, calibration), then ``--repeats`` timed generations interleaved with the
uncached baseline (B M B M ... B); the speedup is the ratio of the medians.  The baseline of our
methods is Dynamo's graph of the model run by the same inner backend (eager: no module Python
overhead, which is a large share of a call at these sizes); the peers, which hook the module,
are timed against the plain eager module.  Quality: PSNR / SSIM
of the last generation against the uncached one (same noise, labels, steps).  The untimed
generations (where calibrated policies fit their schedule and correction) use noise seed 0, the
measured ones ``--eval-seed`` (1): a calibration is judged on noise it never saw.  The table gives the
cost model's prediction next to the measured speedup, and per method and target the worst case
over the models; then the frontier: per model and method, the PSNR at 1.5x, 2x, 2.5x, 3x
*measured* speed, interpolated linearly between the method's measured points (blank outside them),
against the uniform schedule and the best peer at the same speed.

    python bench/suite.py                                  # eager inner backend (CPU minutes)
    python bench/suite.py --inner inductor --models scenes # Inductor (compiles per method)

Writes ``bench/out/suite.json`` and, with ``--results-md``, the table into ``bench/RESULTS.md``
between generated-block markers.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import omnicompile
from omnicompile.targets import CallCosts, predicted_speedup
from bench.metrics import psnr, ssim

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "bench" / "out"
METHODS = {"uniform": dict(policy="static", extrapolate=False),
           # the default policy at a target: the uniform schedule, extrapolated (static's default)
           "default-target": dict(policy="static"),
           "trajectory": dict(policy="trajectory", calibrate="first"),
           "probe": dict(policy="probe"), "layered": dict(policy="layered", calibrate="first"),
           # the diagnosis: the trajectory schedule without its correction, and scored by the measured
           # error of a reuse on the calibration generation instead of curvature
           "trajectory-plain": dict(policy="trajectory", calibrate="first", correction=False),
           "trajectory-error": dict(policy="trajectory", calibrate="first", curvature="error"),
           # the uniform schedule, corrected: is the gain the correction's or the schedule's?
           "trajectory-uniform": dict(policy="trajectory", calibrate="first", curvature="uniform"),
           "default": {}}
#: the peers (family -> thresholds); ``bench/peers.py`` has the adapters
PEERS = {"diffusers-fbc": (0.05, 0.1, 0.2, 0.3, 0.5), "cachedit-dbcache": (0.08, 0.16, 0.24, 0.5, 0.8)}
SEED_METHODS = ("trajectory", "probe", "layered", "trajectory-error", "trajectory-uniform")
#: PSNR of identical images, for interpolation (the tables print inf)
PSNR_CAP = 100.0
BEGIN, END = "<!-- suite:begin -->", "<!-- suite:end -->"
#: the noise seed of the untimed (compiling, calibrating) generations; the measured ones use
#: ``--eval-seed``: a calibration is judged on noise it was not fitted on
CALIBRATION_SEED = 0


class Suite:
    """One model of the suite: its transformer and a sampler ``run(transformer) -> images``."""

    def __init__(self, name: str, steps: int, eval_seed: int = 1):
        self.name, self.steps, self.eval_seed = name, steps, eval_seed
        if name == "digits":
            from bench.models import load_reference
            ref = load_reference()
            self.labels = torch.arange(10)
            self._sample = lambda fn, seed: ref.sample(self.labels, steps=steps, transformer=fn, seed=seed)
        elif name == "video":
            from bench.video import load_video_reference
            ref = load_video_reference()
            self.labels = torch.arange(4)
            self._sample = lambda fn, seed: ref.sample(self.labels, steps=steps, transformer=fn, seed=seed).flatten(0, 1)
        elif name == "scenes":
            from bench.scenes import load_scenes
            ref = load_scenes()
            self.labels = torch.arange(0, 18, 3)
            self._sample = lambda fn, seed: ref.sample(self.labels, steps=steps, transformer=fn, seed=seed)
        elif name == "heldout":
            from bench.scenes import HELDOUT_DIR, load_scenes
            if not (HELDOUT_DIR / "config.json").is_file():
                raise SystemExit(f"the held-out model is not trained: python bench/train_scenes.py --arch pixart "
                                 f"(writes {HELDOUT_DIR})")
            ref = load_scenes(HELDOUT_DIR)
            self.labels = torch.arange(0, 18, 3)
            self._sample = lambda fn, seed: ref.sample(self.labels, steps=steps, transformer=fn, seed=seed)
        else:
            raise SystemExit(f"unknown suite model {name!r}: digits, video, scenes, heldout")
        self.ref = ref
        self.transformer = ref.transformer

    def run(self, fn, seed: int | None = None) -> tuple[torch.Tensor, float]:
        """One generation (noise ``seed``; default: the evaluation seed)."""
        with torch.no_grad(), omnicompile.generation(num_steps=self.steps):
            t = time.perf_counter()
            out = self._sample(fn, self.eval_seed if seed is None else seed)
            return out, time.perf_counter() - t


def _baseline(suite: Suite, inner: str):
    """The uncached model our methods are timed against: Dynamo's graph of it run by the same
    inner backend (``eager``: the captured graph without the module's Python overhead, which
    on these small models is a large share of a call; ``inductor``: plain Inductor).  The peers
    hook the module itself and are timed against the plain eager module."""
    torch._dynamo.reset()
    return torch.compile(copy.deepcopy(suite.transformer), fullgraph=True,
                         backend="eager" if inner == "eager" else "inductor")


def _timed(suite: Suite, base_fn, gen, base_imgs, repeats: int) -> dict:
    """``repeats`` generations of ``gen()`` interleaved with the baseline's (B M B M ... B): the
    ratio of the medians, and the last image's PSNR / SSIM against ``base_imgs``."""
    mine, base = [], []
    imgs = None
    for _ in range(repeats):
        base.append(suite.run(base_fn)[1])
        imgs, dt = gen()
        mine.append(dt)
    base.append(suite.run(base_fn)[1])
    return {"speedup": round(statistics.median(base) / statistics.median(mine), 3),
            "psnr": round(float(psnr(imgs, base_imgs)), 2), "ssim": round(float(ssim(imgs, base_imgs)), 4)}


def measure(suite: Suite, inner: str, method: str, target: float, base_fn, base_imgs, prepare: int,
            repeats: int) -> dict:
    torch._dynamo.reset()
    opts = dict(METHODS[method])
    if target is not None:
        opts["target_speedup"] = target
    oc = omnicompile.OmniCache(inner_backend=inner, **opts)
    fn = torch.compile(copy.deepcopy(suite.transformer), backend=oc, fullgraph=True)
    t0 = time.perf_counter()
    for _ in range(prepare):      # compilation and calibration on other noise than the evaluation's
        suite.run(fn, seed=CALIBRATION_SEED)
    prep = time.perf_counter() - t0
    suite.run(base_fn)      # the reset above dropped the baseline's graph: trace it again, untimed
    timed = _timed(suite, base_fn, lambda: suite.run(fn), base_imgs, repeats)
    rep = oc.report()
    g = rep.graphs[0] if rep.graphs else None
    last = [r for r in g.steps if r.generation == g.steps[-1].generation] if g is not None and g.steps else []
    saved = sum(r.flops_saved for r in last) / max(1, g.flops_per_call * len(last)) if last else 0.0
    reused = sum(1 for r in last if "reused" in r.decisions.values())
    k = (g.policy or {}).get("call_cost") if g is not None else None
    # the policy's own model where it timed its calls (target_cost="measured"), else the FLOP share
    predicted = (predicted_speedup(reused, len(last), CallCosts(k["computed"], k["reused"])) if k and last
                 else 1.0 / max(1e-9, 1.0 - saved))
    return {"model": suite.name, "method": method, "target": target,
            "predicted": round(predicted, 3), "predicted_by": "calls" if k else "flops", **timed,
            "reused": reused, "calls": len(last),
            "notes": sorted({r.code for r in g.refused}) if g is not None else ["uncompiled"],
            "cached": bool(g is not None and g.cached), "prepare_s": round(prep, 1)}


def measure_peer(suite: Suite, family: str, threshold: float, base_fn, base_imgs, prepare: int,
                 repeats: int) -> dict:
    """One peer setting on a fresh copy of the (eager) transformer, timed like :func:`measure`."""
    from bench import peers
    torch._dynamo.reset()
    env = peers.PeerEnv(steps=suite.steps, cfg="batched", generate=lambda m: suite.run(m)[0],
                        fresh=lambda: copy.deepcopy(suite.transformer))
    setting = peers._setting(family, f"t={threshold:g}", threshold=threshold)
    row = {"model": suite.name, "method": f"{family} t={threshold:g}", "target": None, "predicted": None,
           "peer": True, "reused": None, "calls": None}
    no_result = {**row, "speedup": None, "psnr": None, "ssim": None}
    try:
        applied = peers.apply_peer(setting, copy.deepcopy(suite.transformer), env)
    except peers.NotApplicable as e:
        return {**no_result, "notes": [f"not applicable: {e}"]}

    def gen(seed=None):
        applied.reset()
        return suite.run(applied.model, seed)
    try:      # the first generation (untimed) shows whether the hooks run on this model at all
        gen(CALIBRATION_SEED)
    except (RuntimeError, ValueError, AssertionError, TypeError) as e:
        return {**no_result, "notes": [f"fails on this model: {type(e).__name__}: {str(e).splitlines()[0][:160]}"]}
    for _ in range(prepare - 1):
        gen(CALIBRATION_SEED)
    return {**row, **_timed(suite, base_fn, gen, base_imgs, repeats), "notes": list(applied.notes)}


def _family(method: str) -> str:
    return method.split(" t=")[0]


def at_speed(rows: list[dict], speed: float) -> float | None:
    """PSNR at ``speed`` from one method's measured (speedup, PSNR) points: linear between the two
    points around it (by measured speed); ``None`` outside their range."""
    # an identical image (inf dB) counts as PSNR_CAP, so the line to the next point is defined
    pts = sorted((r["speedup"], min(float(r["psnr"]), PSNR_CAP)) for r in rows if r.get("speedup") is not None)
    for (s0, p0), (s1, p1) in zip(pts, pts[1:]):
        if s0 <= speed <= s1:
            return p0 if s1 == s0 else p0 + (p1 - p0) * (speed - s0) / (s1 - s0)
    if pts and any(abs(s - speed) <= 0.03 * speed for s, _ in pts):
        return max(p for s, p in pts if abs(s - speed) <= 0.03 * speed)
    return None


def frontier(rows: list[dict], speeds=(1.5, 2.0, 2.5, 3.0)) -> str:
    models = list(dict.fromkeys(r["model"] for r in rows))
    fams = list(dict.fromkeys(_family(r["method"]) for r in rows))
    out = ["| model | method | " + " | ".join(f"{s:g}x" for s in speeds) + " |",
           "|---|---|" + "---:|" * len(speeds)]
    summary = ["", "Per model at equal measured speed: the best seed policy and the default policy (static, "
               "extrapolated: `default-target`) against the uniform schedule and the best peer (dB; + is better).", "",
               "| model | speed | uniform | best seed policy | Δ vs uniform | default | best peer | default Δ vs best peer |",
               "|---|---:|---:|---|---:|---:|---|---:|"]
    f = lambda v: "" if v is None else f"{v:.1f}"
    for m in models:
        vals = {}
        for fam in fams:
            sel = [r for r in rows if r["model"] == m and _family(r["method"]) == fam]
            if not sel:
                continue
            vals[fam] = [at_speed(sel, s) for s in speeds]
            out.append(f"| {m} | {fam} | " + " | ".join(f(v) for v in vals[fam]) + " |")
        for i, s in enumerate(speeds):
            uni = vals.get("uniform", [None] * len(speeds))[i]
            seeds = [(vals[k][i], k) for k in SEED_METHODS if k in vals and vals[k][i] is not None]
            best = max(seeds) if seeds else (None, "")
            peers_ = [(vals[k][i], k) for k in vals if k in PEERS and vals[k][i] is not None]
            bp = max(peers_) if peers_ else (None, "")
            d = vals.get("default-target", [None] * len(speeds))[i]
            summary.append(f"| {m} | {s:g}x | {f(uni)} | {best[1]} {f(best[0])} | "
                           f"{'' if None in (best[0], uni) else f'{best[0] - uni:+.1f}'} | {f(d)} | {bp[1]} {f(bp[0])} | "
                           f"{'' if None in (d, bp[0]) else f'{d - bp[0]:+.1f}'} |")
    default = ["", "The default (`OmniCache()`, no option) at its own measured speed, against the uniform schedule and "
               "the best peer interpolated to that speed.", "",
               "| model | default speed | default dB | uniform dB | best peer | Δ vs uniform | Δ vs best peer |",
               "|---|---:|---:|---:|---|---:|---:|"]
    for m in models:
        d = [r for r in rows if r["model"] == m and r["method"] == "default" and r.get("speedup") is not None]
        if not d:
            continue
        sp, db = d[0]["speedup"], min(float(d[0]["psnr"]), PSNR_CAP)
        uni = at_speed([r for r in rows if r["model"] == m and r["method"] == "uniform"], sp)
        pe = [(v, k) for k in dict.fromkeys(_family(r["method"]) for r in rows if r.get("peer"))
              if (v := at_speed([r for r in rows if r["model"] == m and _family(r["method"]) == k], sp)) is not None]
        bp = max(pe) if pe else (None, "")
        default.append(f"| {m} | {sp:.2f}x | {db:.1f} | {f(uni)} | {bp[1]} {f(bp[0])} | "
                       f"{'' if uni is None else f'{db - uni:+.1f}'} | {'' if bp[0] is None else f'{db - bp[0]:+.1f}'} |")
    return "\n".join(out + summary + default)


def table(rows: list[dict]) -> str:
    out = ["| model | method | target | predicted | measured | PSNR dB | SSIM | reused / calls | notes |",
           "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r.get("speedup") is None:
            out.append(f"| {r['model']} | {r['method']} | - | - | - | - | - | - | {'; '.join(r['notes'])} |")
            continue
        tgt = "-" if r["target"] is None else f"{r['target']:g}x"
        pred = "-" if r["predicted"] is None else (f"{r['predicted']:.2f}x"
                                                    + ("" if r.get("predicted_by", "flops") == "calls" else " (FLOPs)"))
        ru = "-" if r["reused"] is None else f"{r['reused']} / {r['calls']}"
        out.append(f"| {r['model']} | {r['method']} | {tgt} | {pred} | {r['speedup']:.2f}x | "
                   f"{r['psnr']:.1f} | {r['ssim']:.3f} | {ru} | {', '.join(r['notes']) or '-'} |")
    worst: dict = {}
    for r in rows:
        if r["target"] is None:
            continue
        k = (r["method"], r["target"])
        w = worst.setdefault(k, {"psnr": float("inf"), "ratio": float("inf"), "model": float("inf"), "models": 0})
        w["psnr"] = min(w["psnr"], r["psnr"])
        w["ratio"] = min(w["ratio"], r["speedup"] / r["target"])
        if r.get("predicted"):
            w["model"] = min(w["model"], r["speedup"] / r["predicted"])
        w["models"] += 1
    out += ["", "Worst case over the models (per method and target): lowest PSNR, lowest measured / target, lowest "
            "measured / predicted (the cost model's own error; a target it reports unreachable is predicted below "
            "the target).", "",
            "| method | target | models | worst PSNR dB | worst measured / target | worst measured / predicted |",
            "|---|---:|---:|---:|---:|---:|"]
    for (m, t), w in sorted(worst.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        out.append(f"| {m} | {t:g}x | {w['models']} | {w['psnr']:.1f} | {w['ratio']:.2f} | "
                   f"{w['model']:.2f} |")
    return "\n".join(out) + "\n\nFrontier (PSNR dB at equal measured speed).\n\n" + frontier(rows)


def write_results(md: Path, text: str, tag: str = "suite") -> None:
    """Replace the block between ``<!-- {tag}:begin -->`` and ``<!-- {tag}:end -->`` (appended
    under a new heading when missing)."""
    begin, end = f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"
    body = md.read_text() if md.exists() else ""
    block = f"{begin}\n{text}\n{end}"
    if begin in body and end in body:
        body = body[:body.index(begin)] + block + body[body.index(end) + len(end):]
    else:
        body = body.rstrip() + f"\n\n## Validation suite (`bench/suite.py`, issue 16): {tag}\n\n" + block + "\n"
    md.write_text(body)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="digits,video,scenes")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--targets", default="1.5,2,2.5,3")
    p.add_argument("--inner", choices=("eager", "inductor"), default="eager")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--prepare", type=int, default=2, help="untimed generations per method (calibration, compile)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-seed", type=int, default=1,
                   help=f"noise seed of the measured generations (calibration runs on seed {CALIBRATION_SEED})")
    p.add_argument("--peers", action="store_true", help="add the peers (diffusers FirstBlockCache, cache-dit DBCache)")
    p.add_argument("--peer-thresholds", default=None, metavar="FAMILY=T,T;...",
                   help="the peers' thresholds (default: " + "; ".join(f"{k}={','.join(map(str, v))}" for k, v in PEERS.items())
                   + "); families left out are not run")
    p.add_argument("--json", default=str(OUT_DIR / "suite.json"))
    p.add_argument("--results-md", default=None, help="write the table into this markdown file (bench/RESULTS.md)")
    p.add_argument("--results-tag", default="suite",
                   help="the generated block's marker name in --results-md (e.g. heldout: a block of its own)")
    p.add_argument("--render", metavar="JSON", default=None,
                   help="rebuild the tables (and --results-md) from a saved --json, without running anything")
    args = p.parse_args(argv)
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        text = table(saved["rows"])
        head = saved.get("head", f"(rendered from {args.render})")
        print(head + "\n\n" + text)
        if args.results_md:
            write_results(Path(args.results_md), head + "\n\n" + text, args.results_tag)
        return 0
    torch.set_num_threads(args.threads)
    targets = [float(t) for t in args.targets.split(",") if t.strip()]
    methods = [m for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}: {', '.join(METHODS)}")
    peers = PEERS
    if args.peer_thresholds:
        peers = {}
        for part in filter(None, (x.strip() for x in args.peer_thresholds.split(";"))):
            fam, _, ths = part.partition("=")
            if fam not in PEERS or not ths:
                raise SystemExit(f"--peer-thresholds: {part!r} is not FAMILY=T,T with FAMILY in {', '.join(PEERS)}")
            try:
                peers[fam] = tuple(float(t) for t in ths.split(","))
            except ValueError:
                raise SystemExit(f"--peer-thresholds: {ths!r} is not a list of numbers") from None
    rows = []
    start = time.perf_counter()
    for name in [m for m in args.models.split(",") if m.strip()]:
        suite = Suite(name, args.steps, args.eval_seed)
        base_fn = _baseline(suite, args.inner)
        for _ in range(4):      # warm the baseline (allocator, oneDNN primitives) before the first row
            suite.run(base_fn)
        base_imgs, _ = suite.run(base_fn)
        for method in methods:
            for t in ([None] if method == "default" else targets):
                r = measure(suite, args.inner, method, t, base_fn, base_imgs, args.prepare, args.repeats)
                rows.append(r)
                print(json.dumps(r), flush=True)
        if args.peers:
            for fam, thresholds in peers.items():
                for th in thresholds:
                    r = measure_peer(suite, fam, th, suite.transformer, base_imgs, args.prepare, args.repeats)
                    rows.append(r)
                    print(json.dumps(r), flush=True)
    text = table(rows)
    head = (f"`python bench/suite.py {' '.join(argv if argv is not None else sys.argv[1:])}`: inner backend "
            f"{args.inner}, {args.steps} steps, {args.repeats} timed generations per method interleaved with the "
            f"uncached baseline, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}; "
            f"runtime {(time.perf_counter() - start) / 60:.1f} min.")
    print(head + "\n\n" + text)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"rows": rows, "args": vars(args), "head": head}, indent=1))
    if args.results_md:
        write_results(Path(args.results_md), head + "\n\n" + text, args.results_tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
