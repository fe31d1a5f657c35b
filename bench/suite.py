"""The validation suite (issue 16): every step policy at the same targets on every trained model.

Models (each trained here, each its own architecture and data):

* ``digits`` — Flux-class on scikit-learn digits (``bench/reference``), 10 images, batched CFG;
* ``video`` — Latte-class on moving digits (``bench/reference_video``), 4 videos;
* ``scenes`` — SD3-class on procedural colour scenes (``bench/reference_scenes``,
  ``bench/train_scenes.py``), 12 images.

Methods, each at every ``--targets`` speedup (``target_speedup``, the cost model of
``omnicompile/targets.py``): ``uniform`` (policy ``static`` with a target: the uniform schedule),
``trajectory`` (calibrated on the first generation), ``probe`` (reuse budget) and ``layered``
(calibrated on the first generation); for the diagnosis ``trajectory-plain`` (its schedule without
the noise correction) and ``trajectory-error`` (steps scored by the measured error of a reuse on the
calibration generation, ``curvature="error"``).  Per method: a fresh Dynamo cache, ``--prepare`` untimed
generations (compilation, calibration), then ``--repeats`` timed generations interleaved with the
uncached baseline (B M B M ... B); the speedup is the ratio of the medians.  Quality: PSNR / SSIM
of the last generation against the uncached one (same noise, labels, steps).  The table gives the
cost model's prediction next to the measured speedup, and per method and target the worst case
over the models.

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
from bench.metrics import psnr, ssim

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "bench" / "out"
METHODS = {"uniform": dict(policy="static"), "trajectory": dict(policy="trajectory", calibrate="first"),
           "probe": dict(policy="probe"), "layered": dict(policy="layered", calibrate="first"),
           # the diagnosis: the trajectory schedule without its correction, and scored by the measured
           # error of a reuse on the calibration generation instead of curvature
           "trajectory-plain": dict(policy="trajectory", calibrate="first", correction=False),
           "trajectory-error": dict(policy="trajectory", calibrate="first", curvature="error")}
BEGIN, END = "<!-- suite:begin -->", "<!-- suite:end -->"


class Suite:
    """One model of the suite: its transformer and a sampler ``run(transformer) -> images``."""

    def __init__(self, name: str, steps: int):
        self.name, self.steps = name, steps
        if name == "digits":
            from bench.models import load_reference
            ref = load_reference()
            self.labels = torch.arange(10)
            self._sample = lambda fn: ref.sample(self.labels, steps=steps, transformer=fn)
        elif name == "video":
            from bench.video import load_video_reference
            ref = load_video_reference()
            self.labels = torch.arange(4)
            self._sample = lambda fn: ref.sample(self.labels, steps=steps, transformer=fn).flatten(0, 1)
        elif name == "scenes":
            from bench.scenes import load_scenes
            ref = load_scenes()
            self.labels = torch.arange(0, 18, 3)
            self._sample = lambda fn: ref.sample(self.labels, steps=steps, transformer=fn)
        else:
            raise SystemExit(f"unknown suite model {name!r}: digits, video, scenes")
        self.ref = ref
        self.transformer = ref.transformer

    def run(self, fn) -> tuple[torch.Tensor, float]:
        with torch.no_grad(), omnicompile.generation(num_steps=self.steps):
            t = time.perf_counter()
            out = self._sample(fn)
            return out, time.perf_counter() - t


def _baseline(suite: Suite, inner: str):
    torch._dynamo.reset()
    if inner == "eager":
        return suite.transformer
    return torch.compile(copy.deepcopy(suite.transformer), fullgraph=True)


def measure(suite: Suite, inner: str, method: str, target: float, base_fn, base_imgs, prepare: int,
            repeats: int) -> dict:
    torch._dynamo.reset()
    oc = omnicompile.OmniCache(inner_backend=inner, target_speedup=target, **METHODS[method])
    fn = torch.compile(copy.deepcopy(suite.transformer), backend=oc, fullgraph=True)
    t0 = time.perf_counter()
    for _ in range(prepare):
        suite.run(fn)
    prep = time.perf_counter() - t0
    mine, base = [], []
    imgs = None
    for _ in range(repeats):
        base.append(suite.run(base_fn)[1])
        imgs, dt = suite.run(fn)
        mine.append(dt)
    base.append(suite.run(base_fn)[1])
    rep = oc.report()
    g = rep.graphs[0] if rep.graphs else None
    last = [r for r in g.steps if r.generation == g.steps[-1].generation] if g is not None and g.steps else []
    saved = sum(r.flops_saved for r in last) / max(1, g.flops_per_call * len(last)) if last else 0.0
    return {"model": suite.name, "method": method, "target": target,
            "predicted": round(1.0 / max(1e-9, 1.0 - saved), 3),
            "speedup": round(statistics.median(base) / statistics.median(mine), 3),
            "psnr": round(float(psnr(imgs, base_imgs)), 2), "ssim": round(float(ssim(imgs, base_imgs)), 4),
            "reused": sum(1 for r in last if "reused" in r.decisions.values()), "calls": len(last),
            "notes": sorted({r.code for r in g.refused}) if g is not None else ["uncompiled"],
            "cached": bool(g is not None and g.cached), "prepare_s": round(prep, 1)}


def table(rows: list[dict]) -> str:
    out = ["| model | method | target | predicted | measured | PSNR dB | SSIM | reused / calls | notes |",
           "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['method']} | {r['target']:g}x | {r['predicted']:.2f}x | {r['speedup']:.2f}x | "
                   f"{r['psnr']:.1f} | {r['ssim']:.3f} | {r['reused']} / {r['calls']} | {', '.join(r['notes']) or '-'} |")
    worst: dict = {}
    for r in rows:
        k = (r["method"], r["target"])
        w = worst.setdefault(k, {"psnr": float("inf"), "ratio": float("inf"), "models": 0})
        w["psnr"] = min(w["psnr"], r["psnr"])
        w["ratio"] = min(w["ratio"], r["speedup"] / r["target"])
        w["models"] += 1
    out += ["", "Worst case over the models (per method and target): lowest PSNR, lowest measured / target.", "",
            "| method | target | models | worst PSNR dB | worst measured / target |", "|---|---:|---:|---:|---:|"]
    for (m, t), w in sorted(worst.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        out.append(f"| {m} | {t:g}x | {w['models']} | {w['psnr']:.1f} | {w['ratio']:.2f} |")
    return "\n".join(out)


def write_results(md: Path, text: str) -> None:
    body = md.read_text() if md.exists() else ""
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in body and END in body:
        body = body[:body.index(BEGIN)] + block + body[body.index(END) + len(END):]
    else:
        body = body.rstrip() + "\n\n## Validation suite (`bench/suite.py`, issue 16)\n\n" + block + "\n"
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
    p.add_argument("--json", default=str(OUT_DIR / "suite.json"))
    p.add_argument("--results-md", default=None, help="write the table into this markdown file (bench/RESULTS.md)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    targets = [float(t) for t in args.targets.split(",") if t.strip()]
    methods = [m for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}: {', '.join(METHODS)}")
    rows = []
    start = time.perf_counter()
    for name in [m for m in args.models.split(",") if m.strip()]:
        suite = Suite(name, args.steps)
        base_fn = _baseline(suite, args.inner)
        suite.run(base_fn)
        base_imgs, _ = suite.run(base_fn)
        for method in methods:
            for t in targets:
                r = measure(suite, args.inner, method, t, base_fn, base_imgs, args.prepare, args.repeats)
                rows.append(r)
                print(json.dumps(r), flush=True)
    text = table(rows)
    head = (f"`python bench/suite.py {' '.join(argv if argv is not None else sys.argv[1:])}`: inner backend "
            f"{args.inner}, {args.steps} steps, {args.repeats} timed generations per method interleaved with the "
            f"uncached baseline, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}; "
            f"runtime {(time.perf_counter() - start) / 60:.1f} min.")
    print(head + "\n\n" + text)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=1))
    if args.results_md:
        write_results(Path(args.results_md), head + "\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
