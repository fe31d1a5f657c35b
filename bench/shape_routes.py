"""Two routes for a second shape: one symbolic graph, or one static graph per shape.

With ``torch.compile``'s default (``dynamic=None``: automatic dynamic shapes) the second batch
size makes Dynamo recompile with symbolic sizes; omnicache rewrites that graph once and every
later shape reuses it.  With ``dynamic=False`` each shape is a static graph (Dynamo compiles one
per shape, up to its recompile limit) — the same as specialising per shape inside the backend.
This benchmark measures both on the demo's setting (the shipped digits model in a real
``FluxPipeline``, true CFG), for plain Inductor and omnicache ``static``: each route in a fresh
process with an empty Inductor cache directory, generations at batch A, then B (a new shape:
compiled), then A, B, A, B (steady state).  Reported: the first generation at each shape minus
that shape's steady time (≈ compile time) and the steady seconds per generation.

    python bench/shape_routes.py [--steps 12] [--batches 10,20] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROUTES = {"inductor, dynamic=None": ("inductor", None), "inductor, dynamic=False": ("inductor", False),
          "omnicache static, dynamic=None": ("static", None), "omnicache static, dynamic=False": ("static", False)}


def worker(name: str, args) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch

    import omnicompile
    from bench.demo import pipeline_size, reference_pipeline
    from bench.models import NULL_CLASS, load_reference

    torch.set_num_threads(args.threads)
    method, dynamic = ROUTES[name]
    ref = load_reference(classifier=False)
    pipe = reference_pipeline(ref, ref.transformer)
    size = pipeline_size(ref, pipe)
    cache = None
    if method == "inductor":
        pipe.transformer = torch.compile(pipe.transformer, dynamic=dynamic)
    else:
        cache = omnicompile.compile_pipeline(pipe, policy=method, dynamic=dynamic)
    a, b = args.batch_list

    def sample(n):
        lab = torch.arange(n) % 10
        ehs, pooled = ref.conditioning(lab)
        neg_ehs, neg_pooled = ref.conditioning(torch.full_like(lab, NULL_CLASS))
        with torch.no_grad():
            t0 = time.perf_counter()
            pipe(prompt_embeds=ehs, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg_ehs,
                 negative_pooled_prompt_embeds=neg_pooled, true_cfg_scale=ref.default_guidance, height=size,
                 width=size, num_inference_steps=args.steps, latents=ref.initial_noise(n), output_type="latent")
            return time.perf_counter() - t0

    order = [a, b, a, b, a, b]
    walls = [(n, sample(n)) for n in order]
    out = {"walls": walls}
    if cache is not None:
        rep = cache.report()
        out["graphs"] = [{"cached": g.cached, "hit_rate": g.hit_rate, "compile_seconds": g.compile_seconds,
                          "specialised": g.specialised} for g in rep.graphs]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batches", default="10,20")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--routes", default=";".join(ROUTES), help="semicolon-separated route names")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.batch_list = [int(x) for x in args.batches.split(",")]
    if len(args.batch_list) != 2:
        p.error("--batches takes two batch sizes, e.g. 10,20")
    if args.worker:
        with open(args.worker_out, "w") as f:
            json.dump(worker(args.worker, args), f)
        return
    rows = {}
    for name in [r.strip() for r in args.routes.split(";") if r.strip()]:
        if name not in ROUTES:
            p.error(f"unknown route {name!r}; choose from {', '.join(ROUTES)}")
        cache_dir = tempfile.mkdtemp(prefix="omnicompile-routes-")
        fd, res = tempfile.mkstemp(suffix=".json")
        os.close(fd)
        try:
            subprocess.run([sys.executable, __file__, "--worker", name, "--worker-out", res, "--steps",
                            str(args.steps), "--batches", args.batches, "--threads", str(args.threads)],
                           env=dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir), check=True)
            with open(res) as f:
                rows[name] = json.load(f)
        finally:
            shutil.rmtree(cache_dir, ignore_errors=True)
            os.unlink(res)
        print(f"[shape_routes] {name}: {rows[name]['walls']}", file=sys.stderr, flush=True)
    a, b = args.batch_list
    print(f"\n{args.steps} steps, true CFG, batches {a} then {b}, {args.threads} torch thread(s)\n")
    print(f"| route | 1st gen at {a} − steady s | 1st gen at {b} − steady s | steady s at {a} | steady s at {b} |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        w = r["walls"]
        sa = statistics.median([t for n, t in w[2:] if n == a])
        sb = statistics.median([t for n, t in w[2:] if n == b])
        print(f"| {name} | {w[0][1] - sa:.1f} | {w[1][1] - sb:.1f} | {sa:.2f} | {sb:.2f} |")


if __name__ == "__main__":
    main()
