"""Speed and quality of every caching method on the shipped reference model, side by side.

    python bench/quality.py                         # the default grid (under 20 min on 2 CPU cores)
    python bench/quality.py --quick                 # a few minutes: one setting per family, 14 steps
    python bench/quality.py --methods probe,diffusers-fbc --samples-per-class 2 --repeats 6
    python bench/quality.py --list                  # the method groups and families
    python bench/quality.py --suite                 # the validation suite (bench/suite.py --peers):
                                                    # every trained model, policy, target and peer

One run measures everything on the same model, seeds and labels (default: one sample per digit =
10 images, 28 steps, classifier-free guidance at the reference's default scale, **batched CFG**:
the unconditional and conditional halves in one call per step, the only form every peer supports;
``--cfg split`` runs FluxPipeline's two calls per step, where PyramidAttentionBroadcast and
FasterCache are recorded as not applicable).

Methods (``--list`` prints the families):

* baselines: ``eager`` and ``compiled`` (Inductor, ``fullgraph=True``), both uncached.  The compiled
  images are *the* reference: PSNR and SSIM are measured against them.
* omnicompile (``torch.compile(..., backend=OmniCache(...), fullgraph=True)``): ``static`` interval 2
  and 3; ``probe`` (DiCache) over thresholds; ``probe`` with ``align=False, probe_depth=1``
  (First-Block-Cache); ``trajectory`` at five budgets (0.5 and 0.7 are the presets
  ``trajectory-slow`` / ``-fast``: runs of up to two / three reuses) with and without noise correction,
  and with the correction restricted to a low / high frequency band; a *late-only* schedule
  (explicit ``reuse_steps`` packed into the end of sampling, never two in a row) with as many
  reused steps as the trajectory schedule of the same budget, plain (``static``) and corrected
  (``trajectory`` with that explicit schedule);
  ``layered`` (OmniCache's Layered Cache) at target speedups 1.5, 2, 2.5, 3 from the shipped
  profile ``bench/profiles/layered_reference_28.json`` (``bench/profile_layered.py``), caching
  interval 5.
* peers (``bench/peers.py``): diffusers' FirstBlockCache, TaylorSeerCache (default and lite),
  MagCache (with its calibration run), FasterCache, PyramidAttentionBroadcast, and cache-dit's
  DBCache with and without its TaylorSeer calibrator, each over several settings, under
  ``torch.compile`` (Inductor, as their users run them for speed) and, for one setting per family,
  eagerly.

Protocol, per method: a fresh copy of the transformer (``copy.deepcopy``), a fresh Dynamo cache
(``torch._dynamo.reset()``), then the *prepare* runs (compilation, calibration, warm-up: timed and
reported separately), then ``--repeats`` timed generations of the whole batch, each pair of them
separated by one generation of the compiled baseline (M B M B M B M for 4 repeats); the speedup against
the compiled baseline is the ratio of the medians of those interleaved runs.  The compiled baseline
lives in a worker process (so the per-method Dynamo resets of this process never touch it),
compiled once; while one process generates the other waits.  This pairing matters on a shared
machine: load from other jobs changes generation times by ±30% over minutes, far more than the
differences being measured, and bursts last seconds, which is why the default times many short
generations (10 images, 4 repeats) rather than a few long ones.  The eager baseline is timed against the compiled one (E B pairs) at
the start and at the end; speedups against eager are the paired ratio times the eager/compiled
ratio.

Columns: speedup against the compiled and the eager baseline; FLOPs ratio (omnicompile: its
report's cost model over the timed generation; peers and baselines: ``torch.utils.flop_counter``
over one eager generation; both count matmul and attention FLOPs); graphs compiled and Dynamo
graph breaks (a counting wrapper around the backend, ``torch._dynamo.utils.counters``), and
recompilations during the timed runs if any; PSNR and SSIM against the compiled uncached images;
class accuracy and Fréchet distance of the digit classifier (``bench/metrics.py``).

Outputs: ``bench/out/quality.json`` (everything, including omnicompile's schedules and reports),
a markdown table (printed, and written into ``bench/RESULTS.md`` under "## Quality harness
(reference model)" between generated-block markers; text outside the markers is kept), and the
speed–quality Pareto plot ``bench/quality_pareto.png``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")  # its INFO/WARNING lines would bury the bar

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench import peers as peers_mod  # noqa: E402
from bench.models import load_reference  # noqa: E402

OUT_DIR = ROOT / "bench" / "out"
RESULTS_MD = ROOT / "bench" / "RESULTS.md"
PARETO_PNG = ROOT / "bench" / "quality_pareto.png"
SECTION = "## Quality harness (reference model)"
BEGIN = "<!-- quality.py: generated block, begin -->"
END = "<!-- quality.py: generated block, end -->"

# ------------------------------------------------------------------------------------------
# method catalogue
# ------------------------------------------------------------------------------------------

#: omnicompile families: key -> plot/legend name
OMNI_FAMILIES = {
    "static": "omnicompile static (uniform)",
    "probe": "omnicompile probe (DiCache)",
    "probe-fbc": "omnicompile probe, align off, depth 1 (FBC)",
    "trajectory": "omnicompile trajectory",
    "trajectory-nocorr": "omnicompile trajectory, no correction",
    "late-only": "omnicompile late-only schedule",
    "late-only-corr": "omnicompile late-only schedule, corrected",
    "trajectory-band": "omnicompile trajectory, band-limited correction",
    "layered": "omnicompile layered (per block and step)",
    "token": "omnicompile token cache",
    "overhead": "omnicompile probe, never reuse (overhead)",
}

GROUPS = {
    "baselines": ["eager", "compiled"],
    "omnicompile": ["static", "probe", "probe-fbc", "overhead", "trajectory", "trajectory-nocorr", "late-only",
                    "late-only-corr", "trajectory-band", "layered", "token"],
    "peers": ["peers-compiled", "peers-eager"],
}


@dataclass
class MethodSpec:
    name: str                 # unique row label
    family: str               # curve in the plot
    kind: str                 # "baseline" | "omnicompile" | "peer"
    compiled: bool
    setting: dict = field(default_factory=dict)
    peer: Optional[peers_mod.PeerSetting] = None


@dataclass
class Prepared:
    """A method ready to run: the callable given to the sampler and how to drive it."""
    model: Any
    reset: Callable[[], None] = lambda: None
    oc: Any = None
    applied: Optional[peers_mod.Applied] = None
    compile_ctx: Callable[[], Any] = contextlib.nullcontext
    counter: Optional[list] = None           # [graphs compiled]
    calibration_s: float = 0.0
    notes: list = field(default_factory=list)


def pick(values: list, k: Optional[int]) -> list:
    """At most ``k`` evenly spaced entries of ``values`` (``k=1``: the middle one)."""
    if not k or k >= len(values):
        return list(values)
    if k == 1:
        return [values[len(values) // 2]]
    idx = sorted({round(i * (len(values) - 1) / (k - 1)) for i in range(k)})
    return [values[i] for i in idx]


def omni_settings(args) -> list[MethodSpec]:
    s: list[MethodSpec] = []
    fams = args.families
    fam = lambda k: OMNI_FAMILIES[k]
    if "static" in fams:
        for i in args.static_intervals:
            s.append(MethodSpec(f"static i={i}", fam("static"), "omnicompile", True,
                                dict(policy="static", interval=i, warmup=2)))
    if "probe" in fams:
        for t in args.probe_thresholds:
            s.append(MethodSpec(f"probe t={t:g}", fam("probe"), "omnicompile", True,
                                dict(policy="probe", threshold=t, num_steps=args.steps)))
    if "probe-fbc" in fams:
        for t in args.fbc_thresholds:
            s.append(MethodSpec(f"probe-FBC t={t:g}", fam("probe-fbc"), "omnicompile", True,
                                dict(policy="probe", threshold=t, align=False, probe_depth=1, num_steps=args.steps)))
    if "overhead" in fams:
        s.append(MethodSpec("probe t=1e-6 (never reuses)", fam("overhead"), "omnicompile", True,
                            dict(policy="probe", threshold=1e-6, num_steps=args.steps)))
    for b in args.budgets:
        # single reuses cap a 28-step run at 13 reused steps (b ~ 0.46): above, runs of two
        # (the trajectory-slow preset), from 0.65 runs of three (trajectory-fast: 0.7)
        run = 1 if b <= 0.45 else 2 if b < 0.65 else 3
        tag = "" if run == 1 else f" run<={run}"
        if "trajectory" in fams:
            s.append(MethodSpec(f"trajectory b={b:g}{tag}", fam("trajectory"), "omnicompile", True,
                                dict(policy="trajectory", budget=b, max_run=run, correction=True)))
        if "trajectory-nocorr" in fams:
            s.append(MethodSpec(f"trajectory b={b:g}{tag} no-corr", fam("trajectory-nocorr"), "omnicompile", True,
                                dict(policy="trajectory", budget=b, max_run=run, correction=False)))
    if "trajectory-band" in fams:
        for band in args.bands:
            s.append(MethodSpec(f"trajectory b=0.5 run<=2 band {band[0]:g}-{band[1]:g}", fam("trajectory-band"),
                                "omnicompile", True, dict(policy="trajectory", budget=0.5, max_run=2,
                                                          correction_band=tuple(band))))
    for key, policy in (("late-only", "static"), ("late-only-corr", "trajectory")):
        if key in fams:
            for b in args.late_budgets:
                s.append(MethodSpec(f"{key} b={b:g}", fam(key), "omnicompile", True,
                                    dict(policy=policy, late_budget=b)))
    if "layered" in fams:
        prof = Path(args.layered_profile)
        try:
            prof_steps = json.loads(prof.read_text()).get("num_steps")
        except (OSError, ValueError):
            prof_steps = None
        # a profile is for one step count; otherwise the one-generation proxy ("first")
        cal, tag = (str(prof), "") if prof_steps == args.steps else ("first", " (proxy)")
        for sr in args.layered_targets:
            s.append(MethodSpec(f"layered s_r={sr:g}{tag}", fam("layered"), "omnicompile", True,
                                dict(policy="layered", calibrate=cal, target_speedup=sr,
                                     cache_interval=args.layered_interval)))
    if "token" in fams:
        for r in args.token_ratios:
            s.append(MethodSpec(f"token r={r:g}", fam("token"), "omnicompile", True,
                                dict(policy="none", token_ratio=r, merge_ffn=True)))
        s.append(MethodSpec(f"token r={args.token_ratios[0]:g} + static i=2", fam("token"), "omnicompile", True,
                            dict(policy="static", interval=2, warmup=2, token_ratio=args.token_ratios[0],
                                 merge_ffn=True)))
    return s


def peer_specs(args) -> list[MethodSpec]:
    """Peer rows: every setting of the selected families under torch.compile, and (with
    ``peers-eager``) one setting of each family (the middle one of its grid) eagerly."""
    fams = args.families
    named = [f for f in peers_mod.PEER_FAMILIES if f in fams]
    if not named and not ({"peers-compiled", "peers-eager"} & fams):
        return []
    selected = named or list(peers_mod.PEER_FAMILIES)
    by_fam: dict[str, list] = {}
    for st in peers_mod.default_peer_settings():
        if st.family in selected:
            by_fam.setdefault(st.family, []).append(st)
    out = []
    if "peers-eager" in fams:
        for fam, sts in by_fam.items():
            st = sts[len(sts) // 2]
            out.append(MethodSpec(f"{st.name} (eager)", f"{peers_mod.PEER_FAMILIES[fam][0]} (eager)",
                                  "peer", False, peer=st))
    if "peers-compiled" in fams or named:
        for fam, sts in by_fam.items():
            sts = pick(sts, args.max_settings)
            for st in sts:
                out.append(MethodSpec(st.name, peers_mod.PEER_FAMILIES[fam][0], "peer", True, peer=st))
    return out


def method_specs(args) -> list[MethodSpec]:
    specs = [MethodSpec("eager", "baseline", "baseline", False),
             MethodSpec("compiled", "baseline", "baseline", True)]
    return specs + omni_settings(args) + peer_specs(args)


# ------------------------------------------------------------------------------------------
# the harness
# ------------------------------------------------------------------------------------------


def _baseline_worker(conn, opts: dict) -> None:
    """The compiled baseline, in its own process: compile and warm up once, report, then run one
    timed generation per request ("gen") until "stop"."""
    torch.set_num_threads(opts["threads"])
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    from torch._dynamo.utils import counters

    ref = load_reference(classifier=False)
    labels = [c for c in range(10) for _ in range(opts["samples_per_class"])]

    def gen(model):
        return ref.sample(labels, steps=opts["steps"], guidance=opts["guidance"], seed=opts["seed"],
                          transformer=model, cfg=opts["cfg"])

    n = [0]
    if opts["inner_backend"] == "inductor":
        from torch._inductor.compile_fx import compile_fx as inner
    else:
        from torch._dynamo.backends.registry import lookup_backend
        inner = lookup_backend(opts["inner_backend"])

    def counted(gm, example_inputs, **kw):
        n[0] += 1
        return inner(gm, example_inputs, **kw)

    model = torch.compile(copy.deepcopy(ref.transformer), backend=counted, fullgraph=True, dynamic=False)
    t0 = time.perf_counter()
    images = gen(model)
    conn.send({"prepare_s": time.perf_counter() - t0, "graphs": n[0],
               "graph_breaks": sum(counters["graph_break"].values()), "images": images})
    while True:
        msg = conn.recv()
        if msg == "stop":
            break
        t0 = time.perf_counter()
        out = gen(model)
        conn.send({"t": time.perf_counter() - t0, "equal": bool(torch.equal(out, images))})
    conn.close()


class BaselineWorker:
    """Client side of :func:`_baseline_worker`."""

    def __init__(self, args):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        opts = {k: getattr(args, k) for k in ("threads", "samples_per_class", "steps", "guidance", "seed", "cfg",
                                              "inner_backend")}
        self.proc = ctx.Process(target=_baseline_worker, args=(child, opts), daemon=True)
        self.proc.start()
        child.close()
        self.times: list[float] = []
        self.deterministic = True
        self._info: Optional[dict] = None

    @property
    def info(self) -> dict:
        """The worker's first report (waits for its compile and first generation)."""
        if self._info is None:
            self._info = self._recv()
        return self._info

    def _recv(self):
        try:
            return self.conn.recv()
        except EOFError:
            raise RuntimeError(f"the compiled-baseline worker died (exit code {self.proc.exitcode})") from None

    def generate(self) -> float:
        self.info  # noqa: B018  (ready first)
        self.conn.send("gen")
        msg = self._recv()
        self.times.append(msg["t"])
        self.deterministic &= msg["equal"]
        return msg["t"]

    def close(self) -> None:
        if self.proc.is_alive():
            self.conn.send("stop")
            self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.terminate()


class _RecompileLimitWatch(logging.Filter):
    """Records (and keeps off the console) Dynamo's "hit config.recompile_limit" warnings: the
    frame named in it falls back to eager for the rest of the run."""

    LOGGER = "torch._dynamo.convert_frame"

    def __init__(self):
        super().__init__()
        self.hits: list[str] = []
        logging.getLogger(self.LOGGER).addFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "recompile_limit" in msg:
            fn = ""
            for line in msg.splitlines():
                if "function:" in line:
                    fn = line.split("function:", 1)[1].strip().split(" ")[0].strip("'")
            self.hits.append(fn or "?")
            return False
        return True

    def close(self) -> None:
        logging.getLogger(self.LOGGER).removeFilter(self)


class Harness:
    def __init__(self, args):
        self.args = args
        self.ref = load_reference()
        self.labels = [c for c in range(10) for _ in range(args.samples_per_class)]
        self.memo: dict = {}
        self.env = peers_mod.PeerEnv(steps=args.steps, cfg=args.cfg, generate=self.generate,
                                     fresh=self.fresh, memo=self.memo)
        self.bar = None
        self.worker: Optional[BaselineWorker] = None
        self.eager_deterministic = True
        self.images: dict[str, torch.Tensor] = {}

    # -- sampling -------------------------------------------------------------------------
    def fresh(self) -> torch.nn.Module:
        return copy.deepcopy(self.ref.transformer)

    def generate(self, model) -> torch.Tensor:
        self.env.start_generation()
        return self.ref.sample(self.labels, steps=self.args.steps, guidance=self.args.guidance, seed=self.args.seed,
                               transformer=model, cfg=self.args.cfg, callback=self.env.step_done)

    def tick(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text[:60], refresh=False)
            self.bar.update(1)

    # -- compile helpers ------------------------------------------------------------------
    def counting(self, backend):
        """Wrap a backend (callable or name) so the graphs Dynamo hands it are counted."""
        counter = [0]
        if isinstance(backend, str):
            if backend == "inductor":
                from torch._inductor.compile_fx import compile_fx as inner
            else:
                from torch._dynamo.backends.registry import lookup_backend
                inner = lookup_backend(backend)
        else:
            inner = backend

        def counted(gm, example_inputs, **kw):
            counter[0] += 1
            return inner(gm, example_inputs, **kw)
        return counted, counter

    def compile(self, model, backend, fullgraph: bool):
        counted, counter = self.counting(backend)
        return torch.compile(model, backend=counted, fullgraph=fullgraph, dynamic=False), counter

    # -- building methods -----------------------------------------------------------------
    def build(self, spec: MethodSpec) -> Prepared:
        a = self.args
        if spec.kind == "omnicompile":
            import omnicompile
            opts = dict(spec.setting)
            late = opts.pop("late_budget", None)
            if late is not None:
                opts["reuse_steps"] = self.late_only_steps(late)
                spec.setting["reuse_steps"] = list(opts["reuse_steps"])
            oc = omnicompile.OmniCache(inner_backend=a.inner_backend, **opts)
            model, counter = self.compile(self.fresh(), oc, fullgraph=True)
            return Prepared(model, reset=oc.reset, oc=oc, counter=counter)
        # peers
        applied = peers_mod.apply_peer(spec.peer, self.fresh(), self.env)
        prep = Prepared(applied.model, reset=applied.reset, applied=applied, calibration_s=applied.calibration_s,
                        notes=list(applied.notes))
        if spec.compiled:
            # torch.compile is lazy: the peer's compile settings apply around the runs (compile_ctx)
            prep.compile_ctx = applied.compile_config
            prep.model, prep.counter = self.compile(applied.model, a.inner_backend, fullgraph=False)
        return prep

    def late_only_steps(self, budget: float) -> list[int]:
        """As many reuse steps as the trajectory schedule of ``budget`` (else floor(budget * n)),
        packed into the end of sampling: n-2, n-4, ... (the last step computed, never two in a row,
        never in the first two steps)."""
        n = self.args.steps
        count = len(self.memo.get(("trajectory-schedule", budget), [])) or int(math.floor(budget * n + 1e-9))
        steps = [s for s in range(n - 2, 1, -2)][:count]
        return sorted(steps)

    # -- running one method ----------------------------------------------------------------
    def flops_eager(self, spec: MethodSpec, model_factory: Callable[[], Prepared]) -> Optional[int]:
        """FLOPs of one eager generation (torch.utils.flop_counter), memoised per setting."""
        key = ("flops", spec.peer if spec.peer is not None else spec.name)
        if key in self.memo:
            return self.memo[key]
        from torch.utils.flop_counter import FlopCounterMode
        prep = model_factory()
        prep.reset()
        with FlopCounterMode(display=False) as fc:
            self.generate(prep.model)
        self.memo[key] = int(fc.get_total_flops())
        return self.memo[key]

    def run(self, spec: MethodSpec) -> dict:
        from torch._dynamo.utils import counters

        a = self.args
        row: dict = {"name": spec.name, "family": spec.family, "kind": spec.kind, "compiled": spec.compiled,
                     "setting": spec.setting if spec.peer is None else spec.peer.kwargs, "status": "ok", "notes": []}
        torch._dynamo.reset()
        counters.clear()
        gc.collect()
        t_start = time.perf_counter()
        try:
            prep = self.build(spec)
        except peers_mod.NotApplicable as e:
            row.update(status="not_applicable", reason=str(e))
            return row
        row["notes"] += prep.notes
        row["calibration_s"] = prep.calibration_s
        flops = None
        recompile_limit = _RecompileLimitWatch()
        try:
            # FLOPs: one eager generation per setting under FlopCounterMode (peers: before their
            # compiled twin runs); its time is not part of "prepare"
            t_f = time.perf_counter()
            if spec.kind == "peer":
                flops = self.flops_eager(spec, lambda: self._eager_peer(spec))
            row["flops_count_s"] = time.perf_counter() - t_f
            t_start += row["flops_count_s"]
            # prepare: compile / calibrate / warm up
            learns = (spec.setting.get("policy", "").startswith("trajectory")
                      or spec.setting.get("calibrate") == "first")
            warmups = a.warmup + (1 if learns else 0)
            with prep.compile_ctx():
                for _ in range(warmups):
                    prep.reset()
                    self.generate(prep.model)
                    self.tick(f"{spec.name}: prepare")
            row["prepare_s"] = time.perf_counter() - t_start
            graphs_after_warmup = prep.counter[0] if prep.counter else None
            breaks = sum(counters["graph_break"].values()) if spec.compiled else None
            times, images, base = [], [], []
            with prep.compile_ctx():
                for i in range(a.repeats):
                    prep.reset()
                    t0 = time.perf_counter()
                    img = self.generate(prep.model)
                    times.append(time.perf_counter() - t0)
                    images.append(img)
                    self.tick(f"{spec.name}: timed")
                    if i < a.repeats - 1 or a.repeats == 1:   # M B M B M: the compiled baseline in between
                        base.append(self.worker.generate())
                        self.tick(f"{spec.name}: timed (baseline)")
        except Exception as e:  # a peer that crashes on this model is a result, not a harness failure
            if spec.kind != "peer":
                raise
            row.update(status="error", reason=f"{type(e).__name__}: {e}")
            return row
        finally:
            recompile_limit.close()
        if recompile_limit.hits:
            row["recompile_limit_hits"] = recompile_limit.hits
            row["notes"].append(f"Dynamo hit its recompile limit {len(recompile_limit.hits)} time(s) "
                                f"({', '.join(sorted(set(recompile_limit.hits)))}): those frames run eagerly")
        row["times_s"] = times
        row["median_s"] = statistics.median(times)
        row["min_s"] = min(times)
        row["baseline_compiled_times_s"] = base
        row["speedup_vs_compiled"] = statistics.median(base) / row["median_s"]
        row["speedup_vs_compiled_min"] = min(base) / row["min_s"]   # ratio of the fastest runs
        row["t_end"] = time.perf_counter()
        row["deterministic"] = all(bool(torch.equal(images[0], im)) for im in images[1:])
        if spec.compiled:
            row["graphs"] = prep.counter[0] if prep.counter else None
            row["graph_breaks"] = breaks
            row["recompiles_during_timing"] = (prep.counter[0] - graphs_after_warmup) if prep.counter else None
        if spec.kind == "omnicompile":
            self._omni_facts(spec, prep, row)
        elif flops is not None:
            base_flops = self.memo.get(("flops", "uncached"))
            row["flops_ratio"] = flops / base_flops if base_flops else None
            row["flops_source"] = "flop_counter (eager)"
        if prep.applied is not None:
            row["peer_stats"] = prep.applied.stats()
        self.images[spec.name] = images[0]
        del prep
        return row

    def _eager_peer(self, spec: MethodSpec) -> Prepared:
        applied = peers_mod.apply_peer(spec.peer, self.fresh(), self.env)
        return Prepared(applied.model, reset=applied.reset, applied=applied)

    def _omni_facts(self, spec: MethodSpec, prep: Prepared, row: dict) -> None:
        rep = prep.oc.report()
        row["flops_source"] = "omnicompile report (cost model)"
        total = saved = 0
        fallback = []
        for g in rep.graphs:
            if not g.cached and g.fallback is not None and g.fallback.code != "policy_none":
                fallback.append(f"{g.fallback.code}: {g.fallback.message}")
            if not g.steps:
                continue
            last = max(s.generation for s in g.steps)
            rows = g.timeline(generation=last)
            calls = sum(r["calls"] for r in rows)
            total += g.flops_per_call * calls
            saved += sum(r["flops_saved"] for r in rows)
            row.setdefault("reused_steps", [r["step"] for r in rows if r["reused"]])
        row["flops_ratio"] = (1.0 - saved / total) if total else 1.0
        if fallback:
            row["notes"].append("not cached: " + "; ".join(fallback))
        row["omnicompile_graphs"] = len(rep.graphs)
        row["report"] = rep.summary()
        sched = None
        if spec.setting.get("policy", "").startswith("trajectory"):
            for rt in prep.oc.runtimes:      # the reuse steps of its schedule, from the runtime's preview
                sched = [t for t, d in enumerate(rt.preview(self.args.steps).decisions) if "reused" in d]
        if sched is not None:
            row["schedule"] = sched
            self.memo.setdefault(("trajectory-schedule", spec.setting.get("budget")), sched)
        for g in rep.graphs:
            st = g.signal_stats()
            if st:
                row["signal_stats"] = st
                break

    # -- the baselines ------------------------------------------------------------------------
    def run_eager_baseline(self) -> dict:
        """The eager row (its timings come from :meth:`eager_vs_compiled`)."""
        row = {"name": "eager", "family": "baseline", "kind": "baseline", "compiled": False, "setting": {},
               "status": "ok", "notes": [], "flops_ratio": 1.0, "flops_source": "flop_counter (eager)"}
        t0 = time.perf_counter()
        self.flops_eager(MethodSpec("uncached", "", "baseline", False), lambda: Prepared(self.ref.transformer))
        row["flops_count_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(max(1, self.args.warmup)):
            self.images["eager"] = self.generate(self.ref.transformer)
            self.tick("eager: warm-up")
        row["prepare_s"] = time.perf_counter() - t0
        return row

    def eager_vs_compiled(self) -> tuple[list[float], list[float]]:
        """``--repeats`` pairs (eager generation, compiled-baseline generation)."""
        e, b = [], []
        for _ in range(self.args.repeats):
            t0 = time.perf_counter()
            img = self.generate(self.ref.transformer)
            e.append(time.perf_counter() - t0)
            self.eager_deterministic &= bool(torch.equal(img, self.images["eager"]))
            self.tick("eager vs compiled: eager")
            b.append(self.worker.generate())
            self.tick("eager vs compiled: compiled")
        return e, b


# ------------------------------------------------------------------------------------------
# metrics, table, plot, RESULTS.md
# ------------------------------------------------------------------------------------------


def add_quality(rows: list[dict], images: dict, labels, dm) -> None:
    from bench import metrics

    ref_img = images.get("compiled")
    for r in rows:
        img = images.get(r["name"])
        if img is None:
            continue
        if ref_img is not None:
            r["psnr"] = metrics.psnr(img, ref_img)
            r["ssim"] = metrics.ssim(img, ref_img)
        r.update(dm.evaluate(img, labels))


def fmt(v, spec="{:.2f}", none="–"):
    if v is None:
        return none
    if isinstance(v, float) and math.isnan(v):
        return none
    if isinstance(v, float) and math.isinf(v):
        return "∞"
    return spec.format(v)


def table(rows: list[dict]) -> str:
    head = ("| method | speedup vs compiled | vs eager | FLOPs | graphs / breaks | PSNR dB | SSIM | acc | FD "
            "| prepare s |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        if r["status"] != "ok":
            continue
        gb = "–"
        if r.get("compiled"):
            gb = f"{fmt(r.get('graphs'), '{}')} / {fmt(r.get('graph_breaks'), '{}')}"
            if r.get("recompiles_during_timing"):
                gb += f" (+{r['recompiles_during_timing']} while timed)"
        lines.append(
            f"| {r['name']} | {fmt(r.get('speedup_vs_compiled'))}x | {fmt(r.get('speedup_vs_eager'))}x | "
            f"{fmt(r.get('flops_ratio'), '{:.2f}')} | {gb} | {fmt(r.get('psnr'), '{:.1f}')} | "
            f"{fmt(r.get('ssim'), '{:.4f}')} | {fmt(r.get('accuracy'), '{:.2f}')} | "
            f"{fmt(r.get('frechet_distance'), '{:.1f}')} | {fmt(r.get('prepare_s'), '{:.0f}')} |")
    return "\n".join(lines)


def notes(rows: list[dict]) -> str:
    """One bullet per distinct note, naming the rows it applies to (a whole family by its name)."""
    ok = [r for r in rows if r["status"] == "ok"]
    fam_rows: dict[str, list] = {}
    for r in ok:
        fam_rows.setdefault(r["family"], []).append(r["name"])
    by_note: dict[str, list] = {}
    for r in ok:
        for n in r.get("notes", []):
            by_note.setdefault(n, []).append(r)
    out = []
    for n, rs in by_note.items():
        names, done = [], set()
        for r in rs:
            fam = r["family"]
            if fam in done:
                continue
            members = [x["name"] for x in rs if x["family"] == fam]
            if len(fam_rows[fam]) > 1 and len(members) == len(fam_rows[fam]):
                names.append(f"{fam} (all)")
                done.add(fam)
            else:
                names.append(r["name"])
        out.append(f"- {', '.join(names)}: {n}")
    return "\n".join(out)


def not_applicable(rows: list[dict]) -> str:
    out = []
    for r in rows:
        if r["status"] != "ok":
            out.append(f"- **{r['name']}** ({r['status'].replace('_', ' ')}): {r.get('reason', '')}")
    return "\n".join(out)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """x: speedup vs the compiled baseline, y: PSNR vs its images; one line per family.

    omnicompile families: thick lines, circles; peers under torch.compile: thin lines, one marker
    shape per peer; eager peer runs: hollow markers.  Identical images (PSNR = inf) are drawn at
    the top edge."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok" and r["kind"] != "baseline" and r.get("psnr") is not None
          and r.get("speedup_vs_compiled")]
    finite = [r["psnr"] for r in ok if math.isfinite(r["psnr"])]
    cap = (max(finite) + 3.0) if finite else 60.0
    fams: dict[str, list] = {}
    for r in ok:
        fams.setdefault(r["family"], []).append(r)
    omni = sorted(f for f in fams if f.startswith("omnicompile"))
    peer_names = sorted({f.replace(" (eager)", "") for f in fams if not f.startswith("omnicompile")})
    omni_colors = plt.get_cmap("tab10")
    peer_colors = plt.get_cmap("Dark2")
    markers = "sD^v<>pPX*h"
    fig, ax = plt.subplots(figsize=(11.0, 5.6), dpi=90)
    for fam in omni + sorted(f for f in fams if not f.startswith("omnicompile")):
        rs = sorted(fams[fam], key=lambda r: r["speedup_vs_compiled"])
        xs = [r["speedup_vs_compiled"] for r in rs]
        ys = [min(r["psnr"], cap) for r in rs]
        if fam in omni:
            ax.plot(xs, ys, marker="o", ms=6, lw=2.4, color=omni_colors(omni.index(fam) % 10), label=fam, zorder=3)
            continue
        eager = fam.endswith("(eager)")
        k = peer_names.index(fam.replace(" (eager)", ""))
        color = peer_colors(k % 8)
        ax.plot(xs, ys, marker=markers[k % len(markers)], ms=5, lw=0.9, ls=":" if eager else "-",
                color=color, mfc="white" if eager else color, label=fam, alpha=0.85, zorder=2)
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    ax.axhline(cap, color="grey", lw=0.5, ls=":")
    ax.text(ax.get_xlim()[0], cap, "  identical images (PSNR = inf)", fontsize=7, va="bottom", color="grey")
    ax.set_xlabel("wall-time speedup vs Inductor-compiled uncached (same run)")
    ax.set_ylabel("PSNR vs compiled uncached images (dB)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def write_results_md(block: str, path: Path = RESULTS_MD) -> None:
    """Put ``block`` between the generated-block markers of the quality section of RESULTS.md,
    creating the section (at the end) if needed; everything else is kept."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    gen = f"{BEGIN}\n{block.rstrip()}\n{END}"
    if SECTION not in text:
        text = text.rstrip() + f"\n\n{SECTION}\n\n{gen}\n"
    else:
        start = text.index(SECTION)
        nxt = text.find("\n## ", start + len(SECTION))
        end = len(text) if nxt < 0 else nxt + 1
        sec = text[start:end]
        if BEGIN in sec and END in sec:
            b, e = sec.index(BEGIN), sec.index(END) + len(END)
            sec = sec[:b] + gen + sec[e:]
        else:
            sec = sec.rstrip() + f"\n\n{gen}\n\n"
        text = text[:start] + sec + text[end:]
    path.write_text(text)


def versions() -> dict:
    v = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("diffusers", "cache_dit", "omnicompile"):
        try:
            m = __import__(mod)
            v[mod] = getattr(m, "__version__", "?")
        except Exception:
            v[mod] = None
    return v


# ------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


ALL_FAMILIES = (["eager", "compiled"] + list(OMNI_FAMILIES) + ["peers-compiled", "peers-eager"]
                + list(peers_mod.PEER_FAMILIES))
DEFAULT_METHODS = "baselines,omnicompile,peers"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="method groups: " + "; ".join(f"{k} = {','.join(v)}" for k, v in GROUPS.items())
                                + "; families: " + ", ".join(ALL_FAMILIES))
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="comma list of groups / families (the baselines always run); see --list")
    p.add_argument("--list", action="store_true", help="print the methods the other flags select, and exit")
    p.add_argument("--samples-per-class", type=int, default=1)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the reference's)")
    p.add_argument("--cfg", choices=("batched", "split"), default="batched")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=4,
                   help="timed generations per method (median), with repeats-1 compiled-baseline runs in between")
    p.add_argument("--warmup", type=int, default=1, help="untimed generations per method (+1 for trajectory)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine 2 threads oversubscribe "
                        "and every timing becomes noise)")
    p.add_argument("--inner-backend", choices=("inductor", "eager"), default="inductor",
                   help="what compiles the graphs: Inductor, or Dynamo only (eager; for tests)")
    p.add_argument("--probe-thresholds", type=floats, default=[0.07, 0.2, 0.4, 0.8])
    p.add_argument("--fbc-thresholds", type=floats, default=[0.2])
    p.add_argument("--static-intervals", type=ints, default=[2, 3])
    p.add_argument("--budgets", type=floats, default=[0.3, 0.45, 0.5, 0.6, 0.7],
                   help="trajectory budgets (above 0.45: runs of two reuses, max_run=2; from 0.65: three)")
    p.add_argument("--late-budgets", type=floats, default=[0.3, 0.45])
    p.add_argument("--bands", type=lambda t: [tuple(floats(b.replace("-", ","))) for b in t.split(";") if b.strip()],
                   default=[(0.0, 0.5), (0.5, 1.0)],
                   help="correction bands of the trajectory-band rows, 'lo-hi;lo-hi' (fractions of the highest "
                        "spatial frequency of the 8x8 token grid)")
    p.add_argument("--token-ratios", type=floats, default=[0.25, 0.5],
                   help="token cache ratios (policy none, merge_ffn=True: Flux's single blocks run the MLP "
                        "beside the attention)")
    p.add_argument("--layered-targets", type=floats, default=[1.5, 2.0, 2.5, 3.0],
                   help="target speedups s_r of the layered policy")
    p.add_argument("--layered-interval", type=int, default=5, help="the layered policy's caching interval N")
    p.add_argument("--layered-profile", default=str(ROOT / "bench" / "profiles" / "layered_reference_28.json"),
                   help="layered profile JSON (bench/profile_layered.py writes it; its step count must "
                        "equal --steps)")
    p.add_argument("--max-settings", type=int, default=None,
                   help="at most N settings per family (evenly spaced; 1 = the middle one)")
    p.add_argument("--quick", action="store_true",
                   help="a few minutes: 1 sample per class, 14 steps, 2 repeats, one setting per family")
    p.add_argument("--json", default=str(OUT_DIR / "quality.json"))
    p.add_argument("--plot", default=None,
                   help=f"Pareto PNG path ('' to skip; default: {PARETO_PNG.relative_to(ROOT)} for the default "
                        f"grid, else {(OUT_DIR / 'quality_pareto.png').relative_to(ROOT)})")
    p.add_argument("--results-md", default=None,
                   help=f"RESULTS.md to update ('' to skip; default: {RESULTS_MD.relative_to(ROOT)} for the "
                        "default grid only, so a partial run never overwrites the recorded results)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--render", metavar="JSON", default=None,
                   help="do not run: rebuild the table, plot and RESULTS.md block from a saved JSON")
    args = p.parse_args(argv)
    keys = ("methods", "samples_per_class", "steps", "guidance", "cfg", "seed", "repeats", "warmup", "threads",
            "inner_backend", "probe_thresholds", "fbc_thresholds", "static_intervals", "budgets", "late_budgets", "bands", "token_ratios",
            "layered_targets", "layered_interval", "layered_profile", "max_settings", "quick")
    default_grid = all(getattr(args, k) == p.get_default(k) for k in keys)
    if args.plot is None:
        args.plot = str(PARETO_PNG if default_grid else OUT_DIR / "quality_pareto.png")
    if args.results_md is None:
        args.results_md = str(RESULTS_MD) if default_grid else ""
    if args.quick:
        args.samples_per_class, args.steps, args.repeats = 1, 14, 2
        args.probe_thresholds, args.budgets, args.late_budgets = [0.4], [0.45], [0.45]
        args.static_intervals = [2]
        args.max_settings = args.max_settings or 1
    if args.max_settings:
        for name in ("probe_thresholds", "fbc_thresholds", "static_intervals", "budgets", "late_budgets",
                     "layered_targets"):
            setattr(args, name, pick(getattr(args, name), args.max_settings))
    fams: set[str] = {"eager", "compiled"}
    for item in [x.strip() for x in args.methods.split(",") if x.strip()]:
        if item in GROUPS:
            fams.update(GROUPS[item])
        elif item in ALL_FAMILIES:
            fams.add(item)
        else:
            p.error(f"--methods: unknown {item!r}; groups: {', '.join(GROUPS)}; families: {', '.join(ALL_FAMILIES)}")
    args.families = fams
    return args


def _from_json(v):
    if isinstance(v, str) and v in ("inf", "-inf", "nan"):
        return float(v)
    if isinstance(v, dict):
        return {k: _from_json(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_from_json(x) for x in v]
    return v


def emit(result: dict, args) -> None:
    """Print the table and write the plot and the RESULTS.md block of ``result``."""
    rows = result["methods"]
    text, na, nt = table(rows), not_applicable(rows), notes(rows)
    print(text)
    if nt:
        print("\nNotes:\n" + nt)
    if na:
        print("\nNot run:\n" + na)
    c, info = result["config"], result["info"]
    title = (f"reference model, {c['images']} images, {c['steps']} steps, {c['cfg']} CFG "
             f"g={c['guidance']:g}, {info['date']}")
    if args.plot:
        plot(rows, Path(args.plot), title)
    if args.results_md:
        write_results_md(results_block(result, text, na, nt), Path(args.results_md))


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--suite" in argv:      # the validation suite (issue 16): every model, policy, target and peer
        from bench import suite
        argv.remove("--suite")
        return {"suite": suite.main(argv or ["--peers"])}
    args = parse_args(argv)
    if args.render:
        result = _from_json(json.loads(Path(args.render).read_text()))
        emit(result, args)
        return result
    specs = method_specs(args)
    if args.list:
        for s in specs:
            print(f"{s.kind:12s} {'compiled' if s.compiled else 'eager':9s} {s.family:48s} {s.name}")
        return {}
    torch.set_num_threads(args.threads)
    logging.getLogger("omnicompile").setLevel(logging.ERROR)
    for name in ("diffusers", "CACHE_DIT", "cache_dit"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import diffusers.utils.logging as dlog
    dlog.set_verbosity_error()

    t_run = time.perf_counter()
    # the compiled baseline starts compiling in its worker while this process loads and warms up
    # (guidance None: the reference's default, in both processes)
    worker = BaselineWorker(args)
    h = Harness(args)
    h.worker = worker
    if args.guidance is None:
        args.guidance = h.ref.default_guidance
    from bench.metrics import DigitMetrics
    dm = DigitMetrics.from_reference(h.ref)

    n_base = max(1, args.repeats - 1)
    per = lambda s: (args.warmup + (1 if s.setting.get("policy", "").startswith("trajectory") else 0)
                     + args.repeats + n_base)
    methods = [s for s in specs if s.kind != "baseline"]
    total = 1 + max(1, args.warmup) + sum(per(s) for s in methods) + 2 * 2 * args.repeats
    from tqdm import tqdm
    h.bar = tqdm(total=total, desc="quality", unit="gen", disable=args.no_progress, file=sys.stderr,
                 dynamic_ncols=True)

    # baselines: the compiled one in its worker, the eager one here, timed against each other
    eager = h.run_eager_baseline()
    h.bar.set_postfix_str("compiled baseline: compile (worker)", refresh=True)
    h.images["compiled"] = h.worker.info["images"]
    h.tick("compiled baseline: compiled")
    e_times, b_times = h.eager_vs_compiled()

    rows: list[dict] = []
    try:
        for spec in methods:
            try:
                row = h.run(spec)
            except Exception as e:      # one broken row must not lose the whole run
                logging.getLogger("bench").exception("row %s failed", spec.name)
                row = {"name": spec.name, "family": spec.family, "kind": spec.kind, "compiled": spec.compiled,
                       "setting": spec.setting if spec.peer is None else spec.peer.kwargs, "status": "error",
                       "reason": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", "notes": []}
            if row["status"] != "ok":
                h.bar.update(per(spec))
            rows.append(row)
        e2, b2 = h.eager_vs_compiled()
    finally:
        h.worker.close()
    h.bar.close()
    e_times, b_times = e_times + e2, b_times + b2
    eager_over_compiled = statistics.median(e / b for e, b in zip(e_times, b_times))
    eager.update(times_s=e_times, median_s=statistics.median(e_times), min_s=min(e_times),
                 deterministic=h.eager_deterministic,
                 baseline_compiled_times_s=b_times, speedup_vs_compiled=1.0 / eager_over_compiled)
    compiled = {"name": "compiled", "family": "baseline", "kind": "baseline", "compiled": True, "setting": {},
                "status": "ok", "notes": [], "times_s": b_times, "median_s": statistics.median(b_times),
                "min_s": min(b_times), "prepare_s": h.worker.info["prepare_s"], "graphs": h.worker.info["graphs"],
                "graph_breaks": h.worker.info["graph_breaks"], "flops_ratio": 1.0,
                "deterministic": h.worker.deterministic, "speedup_vs_compiled": 1.0,
                "all_baseline_times_s": h.worker.times}
    rows = [eager, compiled] + rows
    for r in rows:
        if r["status"] == "ok":
            r["speedup_vs_eager"] = r["speedup_vs_compiled"] * eager_over_compiled
    add_quality(rows, h.images, h.labels, dm)

    runtime = time.perf_counter() - t_run
    config = {k: v for k, v in vars(args).items() if k not in ("families",)}
    config["families"] = sorted(args.families)
    config["images"] = len(h.labels)
    config["threads"] = torch.get_num_threads()
    info = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU" if not torch.cuda.is_available()
        else torch.cuda.get_device_name(),
        "versions": versions(),
        "runtime_s": runtime,
        "real_split_fd": dm.real_split_fd(),
        "eager_over_compiled": eager_over_compiled,
        "compiled_baseline_times_s": h.worker.times,
    }
    for r in rows:
        if "t_end" in r:
            r["t_rel"] = r.pop("t_end") - t_run
    result = {"config": config, "info": info, "methods": rows}

    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(_json_safe(result), f, indent=1)
    emit(result, args)
    print(f"\nruntime {runtime / 60:.1f} min", file=sys.stderr)
    return result


def results_block(result: dict, text: str, na: str, nt: str = "") -> str:
    c, i = result["config"], result["info"]
    v = i["versions"]
    bt = i.get("compiled_baseline_times_s") or []
    drift_txt = (f"the compiled baseline's {len(bt)} interleaved generations took {min(bt):.2f}–{max(bt):.2f} s "
                 f"(median {statistics.median(bt):.2f} s) — that spread is load from other jobs, which the "
                 f"pairing cancels to first order"
                 if bt else "")
    cmd = "python bench/quality.py" + ("" if c["methods"] == DEFAULT_METHODS else f" --methods {c['methods']}")
    return "\n".join([
        f"Generated by `{cmd}` on {i['date']}: {i['machine']}, {c['threads']} torch thread(s), torch "
        f"{v['torch']}, diffusers {v['diffusers']}, cache-dit {v['cache_dit']}; runtime "
        f"{i['runtime_s'] / 60:.1f} min.",
        "",
        f"{c['images']} images ({c['samples_per_class']} per digit, seed {c['seed']}), {c['steps']} Euler steps, "
        f"{c['cfg']} CFG at guidance {c['guidance']:g}; timed: median of {c['repeats']} generations of the whole "
        f"batch after {c['warmup']} warm-up(s) (+1 calibration for trajectory), interleaved with generations of "
        f"the compiled baseline (speedup = ratio of the medians); {drift_txt}. "
        f"FD: Fréchet distance of the classifier features to all real digits; with {c['images']} samples it "
        f"is biased upwards (compare rows, not absolute values; two halves of the real digits: "
        f"{i['real_split_fd']:.1f}).",
        "",
        text,
        "",
        ("Notes:\n\n" + nt + "\n") if nt else "",
        ("Not run:\n\n" + na + "\n") if na else "",
        "",
        "![speed-quality Pareto](quality_pareto.png)",
    ])


def _json_safe(o):
    if isinstance(o, float):
        return o if math.isfinite(o) else ("inf" if o > 0 else "-inf" if o < 0 else "nan")
    if isinstance(o, dict):
        return {str(k): _json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_safe(v) for v in o]
    if isinstance(o, (int, str, bool)) or o is None:
        return o
    if hasattr(o, "item"):
        return _json_safe(o.item())
    return str(o)


if __name__ == "__main__":
    main()
