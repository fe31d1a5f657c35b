"""Policy `trajectory`: calibration, schedule, noise correction against a plain-PyTorch
reference sampler, and every calibration-file rejection."""
import json
import math
from unittest import mock

import pytest
import torch

import omnicompile
from omnicompile import CalibrationError, ConfigError, OmniCache, StepCountError
from omnicompile.testing import tiny_flux
from omnicompile.policies.trajectory import Calibration
from reference_cache import FluxResidualCache
from test_sampling import sample

STEPS = 16


def _setup():
    model, kw = tiny_flux(num_layers=2, num_single_layers=2)
    uncond = dict(kw, encoder_hidden_states=torch.zeros_like(kw["encoder_hidden_states"]),
                  pooled_projections=torch.zeros_like(kw["pooled_projections"]))
    return model, kw, uncond


def ref_band(q, lo, hi):
    """Band-limit q (B, N, C) on its square token grid with a full complex FFT (the runtime
    uses a real FFT): keep frequencies with max(|fy|, |fx|) / 0.5 in [lo, hi]."""
    b, n, c = q.shape
    side = math.isqrt(n)
    grid = q.reshape(b, side, side, c)
    f = torch.fft.fftfreq(side).abs()
    r = torch.maximum(f[:, None], f[None, :]) / 0.5
    mask = ((r >= lo) & (r <= hi + 1e-9)).to(torch.complex64)[None, :, :, None]
    return torch.fft.ifft2(torch.fft.fft2(grid, dim=(1, 2)) * mask, dim=(1, 2)).real.reshape(b, n, c)


def reference_sampler(model, kw, uncond, schedule, gammas, correction, band=None, mode="scaled"):
    """Reuse the cached residuals at `schedule`; on a computed step followed by a reuse,
    also run the reuse path (old residuals, d steps stale) to measure q = out_reuse - out
    (band-limited with `band`); at the k-th reuse step of a run starting at s subtract
    g_s * k / d * q ("scaled") or (g_s + g_s g_{s+1} + ... + g_s...g_{s+k-1}) * q ("chain")."""
    cache = FluxResidualCache(model)
    q = {}
    run = {}
    stale = {}
    last = {}
    where = {}

    def on_call(i, slot):
        where.update(i=i, slot=slot)

    def fn(**k):
        i, slot = where["i"], where["slot"]
        has_res = slot in cache.cache and cache.cache[slot]
        if i in schedule and has_res:
            cache.begin(i, slot, True)
            out = model(**k)[0]
            if correction and slot in q:
                prod, coef, k = run.get(slot, (1.0, 0.0, 0))
                k += 1
                if mode == "scaled":
                    coef = gammas[i - k + 1] * k / stale[slot]
                else:
                    prod *= gammas[i]
                    coef += prod
                run[slot] = (prod, coef, k)
                out = out - coef * q[slot]
            return (out,)
        run.pop(slot, None)
        measure = correction and has_res and (i + 1) in schedule
        if measure:
            cache.begin(i, slot, True)
            alt = model(**k)[0]
        cache.begin(i, slot, False)
        out = model(**k)[0]
        if measure:
            q[slot] = alt - out if band is None else ref_band(alt - out, *band)
            stale[slot] = i - last[slot]
        else:
            q.pop(slot, None)
        last[slot] = i
        return (out,)

    with cache:
        return sample(fn, kw, uncond, steps=STEPS, on_call=on_call)


@pytest.mark.parametrize("correction", [True, False])
def test_trajectory_matches_reference_sampler(correction):
    model, kw, uncond = _setup()
    oc = OmniCache(policy="trajectory", budget=0.4, correction=correction, inner_backend="eager")
    fn = torch.compile(model, backend=oc, fullgraph=True)
    plain = sample(model, kw, uncond, steps=STEPS)
    calib = sample(fn, kw, uncond, steps=STEPS)          # generation 0 calibrates, all computed
    torch.testing.assert_close(calib, plain, rtol=1e-5, atol=1e-5)
    rt = oc.runtimes[0]
    rt.calibrator.finish()                               # (else the next generation's start does it)
    # random weights give uncorrelated cache noise (fitted gammas ~0): pin gamma so the
    # correction term is exercised
    rt.gammas = [0.7] * STEPS
    got = sample(fn, kw, uncond, steps=STEPS)
    assert len(rt.schedule) == int(0.4 * STEPS)
    assert rt.calibrator.result.slots == 2 and rt.calibrator.result.num_steps == STEPS
    want = reference_sampler(model, kw, uncond, set(rt.schedule), rt.gammas, correction)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    steps = [s for s in oc.report().graphs[0].steps if s.generation == 1]
    reused = sorted({s.step for s in steps if "reused" in s.decisions.values()})
    assert reused == rt.schedule


@pytest.mark.parametrize("max_run, band, mode", [(2, None, "scaled"), (2, None, "chain"),
                                                 (3, (0.0, 0.5), "scaled"), (None, (0.5, 1.0), "chain")])
def test_runs_and_band_match_reference_sampler(max_run, band, mode):
    """Runs of consecutive reuses scale (or chain) the correction; the band filter keeps part of q."""
    model, kw, uncond = _setup()          # 16 image tokens: a 4x4 grid
    oc = OmniCache(policy="trajectory", budget=0.6, max_run=max_run, min_gap=2, correction_band=band,
                   run_correction=mode, calibrate=None, inner_backend="eager")
    fn = torch.compile(model, backend=oc, fullgraph=True)
    oc.calibrate(lambda: sample(fn, kw, uncond, steps=STEPS))
    rt = oc.runtimes[0]
    rt.gammas = [0.9 - 0.02 * s for s in range(STEPS)]
    got = sample(fn, kw, uncond, steps=STEPS)
    runs = [1]
    for a, b in zip(rt.schedule, rt.schedule[1:]):
        runs[-1:] = [runs[-1] + 1] if b == a + 1 else [runs[-1], 1]
    assert len(rt.schedule) == int(0.6 * STEPS) and max(runs) > 1
    assert max_run is None or max(runs) <= max_run
    want = reference_sampler(model, kw, uncond, set(rt.schedule), rt.gammas, True, band, mode)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    coefs = [r.signals["gamma"] for r in oc.report().graphs[0].steps if r.generation == 1 and r.signals]
    if mode == "chain":
        assert max(coefs) > max(rt.gammas)   # a chained coefficient exceeds every single gamma
    else:
        assert min(coefs) < min(rt.gammas)   # q measured 2+ steps stale is scaled down


def test_explicit_reuse_steps_are_corrected():
    model, kw, uncond = _setup()
    oc = OmniCache(policy="trajectory", reuse_steps=[9, 11, 12, 13], calibrate=None, inner_backend="eager")
    fn = torch.compile(model, backend=oc, fullgraph=True)
    oc.calibrate(lambda: sample(fn, kw, uncond, steps=STEPS))
    rt = oc.runtimes[0]
    rt.gammas = [0.7] * STEPS
    got = sample(fn, kw, uncond, steps=STEPS)
    assert rt.schedule == [9, 11, 12, 13]
    want = reference_sampler(model, kw, uncond, {9, 11, 12, 13}, rt.gammas, True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_band_without_a_grid_is_reported():
    model, kw = tiny_flux()
    kw = dict(kw, hidden_states=kw["hidden_states"][:, :12], img_ids=kw["img_ids"][:12])   # 12 tokens: no square grid
    oc = OmniCache(policy="trajectory", correction_band=(0, 0.5), inner_backend="eager")
    fn = torch.compile(model, backend=oc, fullgraph=True)
    with torch.no_grad():
        fn(**kw)
    g = oc.report().graphs[0]
    assert g.cached and g.fallback is None       # only the band is dropped, the graph is cached
    assert "band_unknown" in {r.code for r in g.refused}


def test_correction_changes_the_reused_output(tmp_path):
    model, kw, uncond = _setup()
    path = tmp_path / "cal.json"
    oc = OmniCache(policy="trajectory", calibrate=None, inner_backend="eager")
    fn = torch.compile(model, backend=oc, fullgraph=True)
    oc.calibrate(lambda: sample(fn, kw, uncond, steps=STEPS), path=str(path))
    d = json.loads(path.read_text())
    d["gamma"] = [None] + [0.7] * (STEPS - 1)
    path.write_text(json.dumps(d))
    outs = {}
    for corr in (True, False):
        torch._dynamo.reset()
        oc = OmniCache(policy="trajectory", calibrate=str(path), correction=corr, inner_backend="eager")
        outs[corr] = sample(torch.compile(model, backend=oc, fullgraph=True), kw, uncond, steps=STEPS)
        assert oc.report().graphs[0].hit_rate > 0
    assert not torch.allclose(outs[True], outs[False])


def test_calibrate_call_save_and_load(tmp_path):
    model, kw, uncond = _setup()
    path = tmp_path / "cal.json"
    oc = OmniCache(policy="trajectory", calibrate=None, inner_backend="eager")
    fn = torch.compile(model, backend=oc, fullgraph=True)
    sample(fn, kw, uncond, steps=STEPS)                 # not calibrated: nothing reused
    assert oc.report().graphs[0].hit_rate == 0
    assert "not_calibrated" in {r.code for r in oc.report().graphs[0].refused}
    cals = oc.calibrate(lambda: sample(fn, kw, uncond, steps=STEPS), path=str(path))
    assert path.exists() and len(cals) == 1
    d = json.loads(path.read_text())
    assert d["num_steps"] == STEPS and d["slots"] == 2 and len(d["angle"]) == STEPS
    schedule = oc.runtimes[0].schedule
    assert schedule
    # a fresh compile that loads the file reuses at the same steps from its first generation
    torch._dynamo.reset()
    oc2 = OmniCache(policy="trajectory", calibrate=str(path), inner_backend="eager")
    sample(torch.compile(model, backend=oc2, fullgraph=True), kw, uncond, steps=STEPS)
    assert oc2.runtimes[0].schedule == schedule
    reused = sorted({s.step for s in oc2.report().graphs[0].steps if "reused" in s.decisions.values()})
    assert reused == schedule


def test_few_steps_disable_reuse():
    model, kw, uncond = _setup()
    oc = OmniCache(policy="trajectory", inner_backend="eager")
    fn = torch.compile(model, backend=oc, fullgraph=True)
    sample(fn, kw, uncond, steps=8)
    sample(fn, kw, uncond, steps=8)
    g = oc.report().graphs[0]
    assert g.hit_rate == 0 and "few_steps" in {r.code for r in g.refused}


def test_presets_and_policy_errors():
    assert OmniCache(policy="trajectory-fast").config.policy == "trajectory-fast"
    from omnicompile.registry import make_policy
    assert make_policy(OmniCache(policy="trajectory-slow").config).budget == 0.5
    assert make_policy(OmniCache(policy="trajectory-fast").config).budget == 0.7
    assert make_policy(OmniCache(policy="trajectory-fast", budget=0.3).config).budget == 0.3
    assert make_policy(OmniCache(policy="trajectory-fast").config).max_run == 3
    assert make_policy(OmniCache(policy="trajectory-slow").config).max_run == 2
    assert make_policy(OmniCache(policy="trajectory").config).max_run == 1
    for fields, field in [({"budget": 1.0}, "budget"), ({"budget": -0.1}, "budget"), ({"calibrate": 3}, "calibrate"),
                          ({"correction": "yes"}, "correction"), ({"curvature": "x"}, "curvature"),
                          ({"min_gap": 0}, "min_gap"), ({"guard": "cond"}, "guard"), ({"max_run": 0}, "max_run"),
                          ({"max_run": 1.5}, "max_run"), ({"correction_band": (0.5, 0.2)}, "correction_band"),
                          ({"correction_band": (0, 2)}, "correction_band"),
                          ({"correction_band": "low"}, "correction_band"),
                          ({"run_correction": "sum"}, "run_correction")]:
        with pytest.raises(ConfigError) as e:
            OmniCache(policy="trajectory", **fields)
        assert e.value.field == field
    with pytest.raises(CalibrationError, match="nothing to calibrate"):
        OmniCache(policy="static").calibrate(lambda: None)


GOOD = {"format": "omnicompile-trajectory-calibration", "version": 1, "fingerprint": "abc", "num_steps": 3,
        "shape": [1, 16, 4], "slots": 1, "angle": [None, None, 0.5], "output": [None, 0.1, 0.2],
        "gamma": [None, 0.5, 0.7], "q_norm": [0.0, 1.0, 2.0]}


@pytest.mark.parametrize("change, words", [
    ({"format": "x"}, "'format'"), ({"version": 2}, "'version'"), ({"fingerprint": ""}, "'fingerprint'"),
    ({"num_steps": 0}, "'num_steps'"), ({"num_steps": "3"}, "'num_steps'"), ({"shape": [1, "a"]}, "'shape'"),
    ({"slots": 0}, "'slots'"), ({"angle": [None, 0.5]}, "'angle'"), ({"gamma": [None, "a", 1.0]}, "'gamma'"),
    ({"q_norm": [0.0, 1.0, True]}, "'q_norm'"), ({"output": [None, None, math.inf]}, "'output'"),
    # ranges: what the recording can produce (gamma: fit_gamma's clip [0, 1.5]; angle: acos)
    ({"gamma": [None, 1e308, 0.7]}, r"'gamma'.*\[0\.0, 1\.5\]"), ({"gamma": [None, -1e6, 0.7]}, "'gamma'"),
    ({"gamma": [None, 1.6, 0.7]}, "'gamma'"), ({"angle": [None, None, 4.0]}, r"'angle'.*\[0, pi\]"),
    ({"q_norm": [0.0, -1.0, 2.0]}, "'q_norm'"), ({"output": [None, -0.1, 0.2]}, "'output'"),
    ({"shape": [1, 0, 4]}, "'shape'"), ({"shape": []}, "'shape'"), ({"slots": 1000}, "'slots'"),
    ({"slot": 2}, "'slot' is not a field"),
])
def test_calibration_rejections(change, words):
    assert Calibration.from_json(dict(GOOD)).num_steps == 3
    with pytest.raises(CalibrationError, match=words):
        Calibration.from_json({**GOOD, **change})
    bad = dict(GOOD)
    del bad["angle"]
    with pytest.raises(CalibrationError, match="missing"):
        Calibration.from_json(bad)


def test_calibration_file_errors(tmp_path):
    with pytest.raises(CalibrationError, match="does not exist"):
        Calibration.load(str(tmp_path / "nope.json"))
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(CalibrationError, match="not valid JSON"):
        Calibration.load(str(p))
    p.write_text("[1, 2]")
    with pytest.raises(CalibrationError, match="JSON object"):
        Calibration.load(str(p))
    cal = Calibration.from_json(GOOD)
    cal.save(str(p))
    assert Calibration.load(str(p)) == cal
    with pytest.raises(CalibrationError, match="fingerprint"):
        cal.check_matches("other", [1, 16, 4], 1)
    with pytest.raises(CalibrationError, match="'shape'"):
        cal.check_matches("abc", [2, 16, 4], 1)
    with pytest.raises(CalibrationError, match="'slots'"):
        cal.check_matches("abc", [1, 16, 4], 2)


def test_loading_a_mismatched_file_is_an_error(tmp_path):
    model, kw, uncond = _setup()
    p = tmp_path / "other.json"
    Calibration.from_json(GOOD).save(str(p))
    oc = OmniCache(policy="trajectory", calibrate=str(p), inner_backend="eager")
    with pytest.raises(Exception, match="fingerprint"):
        sample(torch.compile(model, backend=oc, fullgraph=True), kw, uncond, steps=10)


def _doubled(kw):
    """``kw`` with a batch of two (every batched input repeated)."""
    return {k: torch.cat([v, v]) if k in ("hidden_states", "encoder_hidden_states", "pooled_projections") else v
            for k, v in kw.items()}


def test_calls_per_step_of_the_calibration_are_checked(tmp_path):
    """A calibration keeps its calls per step (``slots``): one made with CFG split into two
    calls is refused on a run that batches CFG into one call of the same latent shape (and
    the reverse) — every step computed, ``calibration_slots`` reported — while the run it
    was made for reuses."""
    model, kw, uncond = _setup()
    kw2, uncond2 = _doubled(kw), _doubled(uncond)            # split CFG at batch 2: latent [2, N, C]
    files = {}
    for cfg in ("split", "batched"):
        torch._dynamo.reset()
        oc = OmniCache(policy="trajectory", calibrate=None, inner_backend="eager")
        fn = torch.compile(model, backend=oc, fullgraph=True)
        files[cfg] = tmp_path / f"{cfg}.json"
        if cfg == "split":
            oc.calibrate(lambda: sample(fn, kw2, uncond2, steps=STEPS, cfg="split"), path=str(files[cfg]))
        else:                                                 # batched CFG of batch 1: latent [2, N, C]
            oc.calibrate(lambda: sample(fn, kw, uncond, steps=STEPS, cfg="batched"), path=str(files[cfg]))
    assert json.loads(files["split"].read_text())["slots"] == 2
    assert json.loads(files["batched"].read_text())["slots"] == 1
    runs = {"split": lambda fn: sample(fn, kw2, uncond2, steps=STEPS, cfg="split"),
            "batched": lambda fn: sample(fn, kw, uncond, steps=STEPS, cfg="batched")}
    for made, run in (("split", "split"), ("split", "batched"), ("batched", "split")):
        torch._dynamo.reset()
        oc = OmniCache(policy="trajectory", calibrate=str(files[made]), inner_backend="eager")
        runs[run](torch.compile(model, backend=oc, fullgraph=True))
        g = oc.report().graphs[0]
        refused = [r for r in g.refused if r.code == "calibration_slots"]
        if made == run:
            assert g.hit_rate > 0 and not refused
        else:
            assert g.hit_rate == 0, (made, run)
            assert refused and f"calibrated with {json.loads(files[made].read_text())['slots']} call(s)" \
                in refused[0].message
            assert "refused at step" in g.generation_log[-1].plan


# ----------------------------------------------------------------------------- step-count bound


def test_step_counts_past_the_schedule_limit_are_refused():
    """A schedule took 8-27 s at 4,000 steps and over 9 minutes at 16,000 before the first
    step ran; now a trajectory generation has at most MAX_STEPS steps: refused when configured,
    at the first call of a generation known to be longer, at the step past the limit of one of
    unknown length, and in a calibration file."""
    from omnicompile.graphs.schedule import MAX_STEPS
    from omnicompile.policies.trajectory import calibration as cal_mod

    with pytest.raises(ConfigError) as e:
        OmniCache(policy="trajectory-fast", num_steps=MAX_STEPS + 1)
    assert e.value.field == "num_steps" and f"at most {MAX_STEPS} steps" in str(e.value)
    assert OmniCache(policy="static", num_steps=MAX_STEPS + 1).config.num_steps == MAX_STEPS + 1
    OmniCache(policy="trajectory", num_steps=MAX_STEPS)

    model, kw, _ = _setup()
    oc = OmniCache(policy="trajectory", inner_backend="eager")
    fn = torch.compile(model, backend=oc, fullgraph=True)
    with pytest.raises(StepCountError, match=f"at most {MAX_STEPS} steps .*this generation has {MAX_STEPS + 1}"):
        with torch.no_grad(), omnicompile.generation(num_steps=MAX_STEPS + 1):
            fn(**kw)
    # without a step count: at the step past the limit (the limit lowered to keep this short)
    oc.reset()
    with mock.patch.object(cal_mod, "MAX_STEPS", 5), torch.no_grad():
        for i in range(5):
            fn(**dict(kw, timestep=torch.tensor([1.0 - i / 8])))
        with pytest.raises(StepCountError, match=r"at most 5 steps .*\(step 5 reached\) has 6"):
            fn(**dict(kw, timestep=torch.tensor([1.0 - 5 / 8])))

    n = MAX_STEPS + 1
    d = Calibration("f", n, [1, 2], 1, [None] * n, [None] * n, [None] * n, [None] * n).to_json()
    with pytest.raises(CalibrationError, match=f"'num_steps'.*at most {MAX_STEPS}"):
        Calibration.from_json(d)


def test_error_scores_are_the_measured_reuse_noise():
    """``curvature="error"``: a step's score is the noise a one-step-stale reuse made there on
    the calibration generation (``q_norm``); the first recorded step has none (never reused
    first); the schedule takes the lowest under the budget."""
    from omnicompile.graphs.schedule import select_reuse_steps
    n = 12
    q = [None, 0.0] + [5.0, 1.0, 4.0, 0.5, 3.0, 0.2, 6.0, 0.3, 7.0, 9.0]
    cal = Calibration("f", n, [1, 2], 1, [0.1] * n, [0.1] * n, [1.0] * n, q)
    scores = cal.scores("error")
    assert scores[:2] == [math.inf, math.inf] and scores[2:] == q[2:]
    steps = select_reuse_steps(scores, 4 / n, min_gap=2, warmup=2, cooldown=1, max_run=1)
    assert steps == [3, 5, 7, 9]
    assert OmniCache(policy="trajectory", curvature="error").config.curvature == "error"


def test_uniform_curvature_spreads_the_budget_evenly_and_keeps_the_correction():
    """``curvature="uniform"`` (the suite's ablation: is the gain the schedule's or the
    correction's?): the budget's reuses spread evenly after warm-up, the same steps as the static
    policy's uniform schedule, still corrected."""
    from omnicompile import targets
    from omnicompile.registry import make_policy
    n = 28
    cal = Calibration("f", n, [1, 2], 1, [0.1] * n, [0.1] * n, [1.0] * n, [None] + [1.0] * (n - 1))
    for target, want in ((2.0, 14), (2.5, 17), (3.0, 19)):     # 3x: 18.7 asked, up to 20 fit
        pol = make_policy(OmniCache(policy="trajectory", curvature="uniform", target_speedup=target).config)
        pol.costs = targets.CallCosts.of(1.0)
        steps, why = pol.schedule(cal)
        assert why is None and len(steps) == want
        assert steps == [s for s in range(n) if targets.uniform_reuse(s, n, want, 2, 1)]
        assert steps[0] == 2 and max(steps) < n - 1
        assert all(b - a <= targets.MAX_REUSE_RUN + 1 for a, b in zip([1] + steps, steps))
        assert pol.config.correction is True
    # an explicit budget: its share of the steps
    pol = make_policy(OmniCache(policy="trajectory", curvature="uniform", budget=0.25).config)
    assert len(pol.schedule(cal)[0]) == 7
