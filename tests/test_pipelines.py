"""Real diffusers pipelines (tiny random components, precomputed embeddings) compiled with
``omnicompile.compile_pipeline``, run the way users run them: CFG on and off, a guidance change,
several prompts and images per prompt, a resolution change, changing step counts, schedulers,
interrupts, two denoisers (Wan 2.2), two pipelines in turn, bf16, ``torch.enable_grad()``.

Every call of every compiled graph is replayed by the plain-PyTorch reference of
``reference_executor.py`` with the decisions the report says were taken (the cache of the same
model, generation and CFG slot): outputs must be equal.  The report must say which step count
each generation ran with.
"""
import pytest
import torch

import omnicompile
from pipelines import FAMILIES, SCHEDULERS_THAT_WORK, build_pipeline, interrupt_after, with_scheduler
from reference_executor import Recorder, replay_all


pytestmark = pytest.mark.usefixtures("one_thread")


def make(family, **kw):
    """The family's tiny pipeline; SD3 with 3 blocks (its last block differs, so 2 give no two
    alike: nothing to cache)."""
    if family == "sd3":
        kw.setdefault("num_layers", 3)
    return build_pipeline(family, **kw)


def compile_recorded(tp, **options):
    """``compile_pipeline`` with every denoiser's OmniCache behind a :class:`Recorder`."""
    options.setdefault("inner_backend", "eager")
    options.setdefault("report_generations", 1000)     # the replay needs every call in detail
    cache = omnicompile.compile_pipeline(tp.pipe, dynamic=False, **options)
    recorders = {}
    for name, oc in cache.backends.items():
        recorders[name] = Recorder(oc)
        setattr(tp.pipe, name, torch.compile(cache.originals[name], backend=recorders[name], dynamic=False))
    return cache, recorders


def check(cache, recorders, reused=True):
    """Replay every call; at least one reuse when ``reused``; the totals."""
    total = {"calls": 0, "reused": 0}
    for rec in recorders.values():
        got = replay_all(rec)
        total["calls"] += got["calls"]
        total["reused"] += got["reused"]
    assert total["calls"] > 0
    if reused:
        assert total["reused"] > 0, cache.report()
    return total


def step_counts(cache, name="transformer"):
    """The step count of each generation of ``name``'s graphs, in order."""
    out = []
    for g in cache.backends[name].report().graphs:
        out += [(r.context, r.num_steps) for r in g.generation_log]
    return [n for _, n in sorted(out)]


STATIC = dict(policy="static", interval=2, warmup=1, cooldown=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_scenarios_equal_the_reference(family):
    tp = make(family)
    cache, recorders = compile_recorded(tp, **STATIC)
    with torch.no_grad():
        tp(num_inference_steps=8)                                   # CFG on
        tp(num_inference_steps=8, cfg=False)                        # CFG off
        kw = {"true_cfg_scale": 2.0} if family == "flux" else {"guidance_scale": 2.5}
        tp(num_inference_steps=8, **kw)                             # another guidance scale
        for n in (6, 3, 9, 6):                                      # step counts change
            tp(num_inference_steps=n)
        tp(num_inference_steps=8, callback_on_step_end=interrupt_after(3)) if family != "pixart" else None
        tp(num_inference_steps=5)                                   # after the interrupt
        tp(num_inference_steps=5, batch=2)                          # two prompts
        tp(num_inference_steps=5, num_images_per_prompt=2)          # two images per prompt
        size = {"height": 96, "width": 64} if family != "latte" else {"height": 64, "width": 96}
        tp(num_inference_steps=5, **size)                           # another resolution
    check(cache, recorders)
    counts = step_counts(cache)
    want = [8, 8, 8, 6, 3, 9, 6] + ([8] if family != "pixart" else []) + [5, 5, 5, 5]
    if family == "wan22":        # the second expert serves only the low-noise steps: fewer generations
        assert set(counts) <= set(want)
    else:
        assert counts == want
    assert cache.calls == len(want) and cache.interrupted == (1 if family != "pixart" else 0)
    rep = cache.report()
    assert all(not r.uncertain for g in rep.graphs for r in g.steps)
    assert "static" in str(rep)


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_schedulers(family):
    """Heun and KDPM2 evaluate the model twice per step (2N - 1 entries): each evaluation is a
    step of the scheduler's timesteps, placed exactly; multistep solvers pass int64 timesteps."""
    tp = make(family)
    cache, recorders = compile_recorded(tp, **STATIC)
    entries = []
    with torch.no_grad():
        for name in SCHEDULERS_THAT_WORK[family]:
            with_scheduler(tp, name)
            tp(num_inference_steps=4)
            entries.append(len(tp.pipe.scheduler.timesteps))
    check(cache, recorders)
    counts = step_counts(cache)
    if family != "wan22":
        assert counts == entries
    if "heun" in SCHEDULERS_THAT_WORK[family]:
        assert 7 in entries            # 2 * 4 - 1


def test_wan22_two_transformers_keep_their_own_state():
    tp = build_pipeline("wan22")
    cache, recorders = compile_recorded(tp, **STATIC)
    with torch.no_grad():
        for n in (8, 6, 8):
            tp(num_inference_steps=n)
    check(cache, recorders)
    high, low = (cache.backends[n].report().graphs[0] for n in ("transformer", "transformer_2"))
    # each expert's first call in a generation computes: no residual crosses experts
    for g in (high, low):
        firsts = {}
        for r in g.steps:
            firsts.setdefault((r.generation, r.slot), r)
        assert all(set(r.decisions.values()) == {"computed"} for r in firsts.values())
    # the experts split the steps of each generation between them
    for gen in range(3):
        hs = {r.step for r in high.steps if r.generation == gen}
        ls = {r.step for r in low.steps if r.generation == gen}
        assert hs and ls and hs.isdisjoint(ls) and max(hs) < min(ls)


def test_two_models_of_one_class_behind_one_backend_keep_separate_caches():
    """``backend="omnicache"`` hands both Wan experts one graph (same class): the runtime tells
    them apart by their parameters; each equals the reference of its own decisions."""
    tp = build_pipeline("wan22")
    oc = omnicompile.OmniCache(inner_backend="eager", **STATIC)
    rec = Recorder(oc)
    for name in tp.denoisers:
        setattr(tp.pipe, name, torch.compile(getattr(tp.pipe, name), backend=rec, dynamic=False))
    with torch.no_grad(), omnicompile.generation(scheduler=tp.pipe.scheduler):
        tp(num_inference_steps=8)
    (g,) = oc.report().graphs                       # one graph for both experts
    assert g.models == 2 and {r.model for r in g.steps} == {0, 1}
    assert replay_all(rec)["reused"] > 0


def test_interrupted_generation_then_a_lower_start_never_reuses_the_old_one():
    """Flux with custom sigmas: an interrupted run, then one starting lower in the schedule
    (as img2img would): the second run's first step of each slot computes."""
    tp = build_pipeline("flux")
    cache, recorders = compile_recorded(tp, **STATIC)
    with torch.no_grad():
        tp(num_inference_steps=8, callback_on_step_end=interrupt_after(2))
        tp(num_inference_steps=4, sigmas=[0.6, 0.45, 0.3, 0.15])
    check(cache, recorders)
    g = cache.report().graphs[0]
    last = max(r.generation for r in g.steps)
    first = [r for r in g.steps if r.generation == last and r.step == 0]
    assert first and all(set(r.decisions.values()) == {"computed"} for r in first)


def test_two_pipelines_in_turn():
    a, b = build_pipeline("flux", seed=0), build_pipeline("flux", seed=1)
    ca, ra = compile_recorded(a, **STATIC)
    cb, rb = compile_recorded(b, **STATIC)
    with torch.no_grad():
        for _ in range(2):
            a(num_inference_steps=6)
            b(num_inference_steps=6)
    check(ca, ra)
    check(cb, rb)


def test_bf16_and_enable_grad():
    tp = build_pipeline("flux")
    tp.pipe.transformer.to(torch.bfloat16)
    cache, recorders = compile_recorded(tp, **STATIC)
    kw = {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
          for k, v in tp.call_kwargs(num_inference_steps=6).items()}
    with torch.enable_grad():          # the pipeline's own no_grad decides
        out = tp.pipe(**kw, return_dict=False)[0]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    check(cache, recorders)


@pytest.mark.parametrize("policy", ["static", "probe", "trajectory", "layered"])
def test_step_counts_20_8_28_20(policy):
    """Pipelines change ``num_inference_steps`` all the time: every generation runs with its own
    step count, known before step 0 — the last steps a policy protects are the last of *this*
    generation, and calibrations are per step count (20 calibrates, 8 is too short to cache,
    28 calibrates, the second 20 runs the first one's schedule)."""
    tp = make("flux")
    opts = {"static": dict(policy="static", interval=2, warmup=1, cooldown=2),
            "probe": dict(policy="probe", threshold=10.0),
            "trajectory": dict(policy="trajectory", budget=0.4),
            "layered": dict(policy="layered", target_speedup=1.5)}[policy]
    cache, recorders = compile_recorded(tp, **opts)
    counts = (20, 8, 28, 20)
    with torch.no_grad():
        for n in counts:
            tp(num_inference_steps=n)
    (g,) = cache.report().graphs
    log = g.generation_log
    assert [r.num_steps for r in log] == list(counts)
    reused = {}
    for r in g.steps:
        if "reused" in r.decisions.values():
            reused.setdefault(r.generation, set()).add(r.step)
    protect = {"static": 2, "probe": 1, "trajectory": 1, "layered": 0}[policy]
    for gen, n in enumerate(counts):
        assert all(s < n - protect for s in reused.get(gen, ())), (gen, n, reused.get(gen))
    if policy == "static":
        assert all(reused.get(gen) for gen in range(4))
        check(cache, recorders)
    if policy in ("trajectory", "layered"):
        plans = [r.plan for r in log]
        assert plans[0].startswith("calibration generation") and plans[2].startswith("calibration generation")
        assert not plans[3].startswith("calibration generation") and reused.get(3)
        assert not reused.get(0) and not reused.get(2)          # calibration generations compute
        if policy == "trajectory":
            assert not reused.get(1)                           # 8 steps: too few to cache
        if policy == "layered":
            check(cache, recorders)


def test_inductor_pipeline_equals_the_reference():
    """The same through Inductor (the default inner backend): a generation, an interrupted one,
    another step count."""
    tp = make("flux")
    cache, recorders = compile_recorded(tp, inner_backend="inductor", **STATIC)
    with torch.no_grad():
        tp(num_inference_steps=6)
        tp(num_inference_steps=6, callback_on_step_end=interrupt_after(2))
        tp(num_inference_steps=4)
    total = 0
    for rec in recorders.values():
        total += replay_all(rec, atol=1e-4, rtol=1e-4)["reused"]
    assert total > 0 and step_counts(cache) == [6, 6, 4]
