"""Policy `trajectory`: calibration, schedule, noise correction against a plain-PyTorch
reference sampler, and every calibration-file rejection."""
import json
import math

import pytest
import torch

from omnicompile import CalibrationError, ConfigError, OmniCache
from omnicompile.testing import tiny_flux
from omnicompile.trajectory import Calibration
from reference_cache import FluxResidualCache
from test_sampling import sample

STEPS = 16


def _setup():
    model, kw = tiny_flux(num_layers=2, num_single_layers=2)
    uncond = dict(kw, encoder_hidden_states=torch.zeros_like(kw["encoder_hidden_states"]),
                  pooled_projections=torch.zeros_like(kw["pooled_projections"]))
    return model, kw, uncond


def reference_sampler(model, kw, uncond, schedule, gammas, correction):
    """Reuse the cached residuals at `schedule`; on a computed step followed by a reuse,
    also run the reuse path (old residuals) to measure q = out_reuse - out; at the reuse
    step subtract gamma_s * q."""
    cache = FluxResidualCache(model)
    q = {}
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
                out = out - gammas[i] * q[slot]
            return (out,)
        measure = correction and has_res and (i + 1) in schedule
        if measure:
            cache.begin(i, slot, True)
            alt = model(**k)[0]
        cache.begin(i, slot, False)
        out = model(**k)[0]
        if measure:
            q[slot] = alt - out
        else:
            q.pop(slot, None)
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
    # random weights give uncorrelated cache noise (fitted gammas ~0): pin gamma so the
    # correction term is exercised
    rt._gammas = [0.7] * STEPS
    got = sample(fn, kw, uncond, steps=STEPS)
    assert len(rt.schedule) == int(0.4 * STEPS)
    assert rt.calibration.slots == 2 and rt.calibration.num_steps == STEPS
    want = reference_sampler(model, kw, uncond, set(rt.schedule), rt._gammas, correction)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    steps = [s for s in oc.report().graphs[0].steps if s.generation == 1]
    reused = sorted({s.step for s in steps if "reused" in s.decisions.values()})
    assert reused == rt.schedule


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
    from omnicompile.policies import make_policy
    assert make_policy(OmniCache(policy="trajectory-slow").config).budget == 0.5
    assert make_policy(OmniCache(policy="trajectory-fast").config).budget == 0.6
    assert make_policy(OmniCache(policy="trajectory-fast", budget=0.3).config).budget == 0.3
    for fields, field in [({"budget": 1.0}, "budget"), ({"budget": -0.1}, "budget"), ({"calibrate": 3}, "calibrate"),
                          ({"correction": "yes"}, "correction"), ({"curvature": "x"}, "curvature"),
                          ({"min_gap": 0}, "min_gap"), ({"guard": "cond"}, "guard")]:
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
