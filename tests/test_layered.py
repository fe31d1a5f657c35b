"""Policy ``layered``: a refined per-(unit, step) plan over a real sampling loop equals a
plain-PyTorch reference sampler that reuses each block's residual at the same (block, step)
pairs; profiling, schedules as validated JSON, the dump's plan heatmap."""
import json

import pytest
import torch

from conftest import trace
from omnicompile import OmniCache
from omnicompile.errors import CalibrationError, ConfigError, ScheduleError
from omnicompile.graphs.plan import check_plan, refine
from omnicompile.policies.layered import (
    LayeredRuntime, Profile, Schedule, analyze_units, dag_from_json, load_file, plan_profile, profile,
)
from omnicompile.passes.blocks import find_blocks
from omnicompile.passes.spans import find_spans
from omnicompile.testing import tiny_flux
from test_sampling import STEPS, sample

LISTS = ("transformer_blocks", "single_transformer_blocks")


class _Block(torch.nn.Module):
    """One Flux block (dual or single: same call and return) that, per CFG slot, stores
    ``out - in`` of both streams when computed and returns ``in + stored`` when told to reuse."""

    def __init__(self, owner, unit, block):
        super().__init__()
        self.owner, self.unit, self.block = owner, unit, block

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
        o = self.owner
        store = o.cache.setdefault(o.slot, {})
        if o.table[self.unit][o.step] and self.unit in store:
            r_enc, r_hs = store[self.unit]
            return encoder_hidden_states + r_enc, hidden_states + r_hs
        enc, hs = self.block(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, temb=temb,
                             image_rotary_emb=image_rotary_emb, joint_attention_kwargs=joint_attention_kwargs)
        store[self.unit] = (enc - encoder_hidden_states, hs - hidden_states)
        return enc, hs


class LayeredReference:
    """Plain-PyTorch per-(block, step) residual reuse; ``table[unit][step]`` True = reuse,
    units named ``list#index`` like the compiler's."""

    def __init__(self, model, table):
        self.model, self.table, self.cache = model, table, {}
        self.step = self.slot = 0

    def begin(self, step, slot):
        self.step, self.slot = step, slot

    def __enter__(self):
        self._saved = {name: list(getattr(self.model, name)) for name in LISTS}
        for name, blocks in self._saved.items():
            setattr(self.model, name, torch.nn.ModuleList(
                _Block(self, f"{name}#{i}", b) for i, b in enumerate(blocks)))
        return self

    def __exit__(self, *exc):
        for name, blocks in self._saved.items():
            setattr(self.model, name, torch.nn.ModuleList(blocks))
        return False


def setup_flux():
    model, kw = tiny_flux(num_layers=2, num_single_layers=2)
    uncond = dict(kw, encoder_hidden_states=torch.zeros_like(kw["encoder_hidden_states"]),
                  pooled_projections=torch.zeros_like(kw["pooled_projections"]))
    return model, kw, uncond


def unit_graph(model, kw):
    gm, _ = trace(model, kw)
    ug = analyze_units(gm, find_spans(gm, find_blocks(gm)))
    torch._dynamo.reset()
    return ug


def marks_table(ug, marks):
    return [[c == "R" for c in marks[u]] for u in ug.units]


def reference_run(model, kw, uncond, table):
    ref = LayeredReference(model, table)
    with ref:
        return sample(model, kw, uncond, on_call=lambda i, slot: ref.begin(i, slot))


HAND = {  # refined already: founded, runs <= 4, every refresh aligned with its parent's
    "transformer_blocks#0":        "CCRCCRCRCCRC",
    "transformer_blocks#1":        "CCRCRRCRCCRC",
    "single_transformer_blocks#0": "CRRCRRCRRCRR",
    "single_transformer_blocks#1": "CRRCRRCRRCRR",
}


def test_plan_matches_the_reference_sampler(tmp_path):
    model, kw, uncond = setup_flux()
    ug = unit_graph(model, kw)
    assert ug.units == list(HAND) and all(ug.unit_spans[u] is not None for u in ug.units)
    plan = refine(ug.dag, marks_table(ug, HAND), 5)
    assert plan.marks() == HAND and check_plan(ug.dag, plan, 5) == []
    assert [r.units for r in plan.regions] == [("transformer_blocks#0",), ("transformer_blocks#1",),
                                               ("single_transformer_blocks#0", "single_transformer_blocks#1")]
    path = tmp_path / "schedule.json"
    Schedule.from_plan(plan, ug.dag, ug.fingerprint, 5, "test").save(str(path))

    ref = reference_run(model, kw, uncond, {u: [c == "R" for c in m] for u, m in HAND.items()})
    plain = sample(model, kw, uncond)
    oc = OmniCache(policy="layered", calibrate=str(path), inner_backend="eager", cache_interval=5)
    got = sample(torch.compile(model, backend=oc, fullgraph=True), kw, uncond)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-4)

    (rt,) = oc.runtimes
    assert isinstance(rt, LayeredRuntime)
    names = [s.name for s in rt.spans]
    assert names == ["transformer_blocks[0:1]", "transformer_blocks[1:2]", "single_transformer_blocks[0:2]"]
    assert set(rt.compiled) == {"variant_" + "".join("R" if d else "C" for d in row) for row in plan.rows()}
    g = oc.report().graphs[0]
    assert len(g.steps) == 2 * STEPS and not any(r.forced for r in g.steps)
    for rec in g.steps:
        for name, region in zip(names, plan.regions):
            assert rec.decisions[name] == ("reused" if region.row[rec.step] else "computed")
    saved = sum(r.flops_saved for r in g.steps) / (2 * STEPS * g.flops_per_call)
    assert saved == pytest.approx(plan.saved_fraction, rel=0.05)    # report and plan count the same FLOPs


def test_first_generation_profiles_then_the_plan_runs():
    model, kw, uncond = setup_flux()
    oc = OmniCache(policy="layered", inner_backend="eager", target_speedup=1.6, cache_interval=4)
    fn = torch.compile(model, backend=oc, fullgraph=True)
    plain = sample(model, kw, uncond)
    first = sample(fn, kw, uncond)
    torch.testing.assert_close(first, plain, rtol=1e-4, atol=1e-4)   # profiled: every step computed
    (rt,) = oc.runtimes
    assert rt.calibrator.active and rt.plan is None      # the profile ends when the next generation starts
    second = sample(fn, kw, uncond)
    plan = rt.plan
    assert rt.calibrator.result is not None and rt.calibrator.result.method == "residual"
    assert plan is not None and plan.reached and plan.ideal_speedup >= 1.6
    assert check_plan(rt.ug.dag, plan, 4) == []
    table = {u: row for u, row in zip(plan.units, plan.reuse)}
    torch.testing.assert_close(second, reference_run(model, kw, uncond, table), rtol=1e-4, atol=1e-4)
    g = oc.report().graphs[0]
    assert {d for r in g.steps[:2 * STEPS] for d in r.decisions.values()} == {"computed"}
    assert any(d == "reused" for r in g.steps[2 * STEPS:] for d in r.decisions.values())


def test_profile_measures_every_pair_and_plans(tmp_path):
    model, kw = tiny_flux(num_layers=1, num_single_layers=2)
    oc = OmniCache(policy="layered", inner_backend="eager", calibrate=None, target_speedup=1.5)
    fn = torch.compile(model, backend=oc, fullgraph=True)
    x0 = torch.randn(kw["hidden_states"].shape, generator=torch.Generator().manual_seed(3))

    def generate(steps=6):
        x = x0.clone()
        with torch.no_grad():
            for i in range(steps):
                t = 1.0 - i / steps
                v = fn(**dict(kw, hidden_states=x, timestep=torch.full((1,), t)))[0]
                x = x - v / steps
        return x

    path = tmp_path / "profile.json"
    (prof,) = profile(oc, generate, str(path), progress=False)
    assert prof.method == "final" and prof.num_steps == 6
    assert prof.units == ["single_transformer_blocks#0", "single_transformer_blocks#1"]   # one dual block: no group
    for row in prof.delta:
        assert row[0] is None and all(d is not None and d > 0 for d in row[1:])
    assert set(prof.proxies) == {"residual"} and -1 <= prof.correlation["residual"] <= 1
    again = load_file(str(path))
    assert isinstance(again, Profile) and again.to_json() == prof.to_json()
    (rt,) = oc.runtimes
    assert rt.plan is not None and rt.mode == "plan"
    assert rt.plan.marks() == plan_profile(again, 1.5, 5).marks()
    oc2 = OmniCache(policy="layered", inner_backend="eager", calibrate=str(path), target_speedup=1.5)
    fn = torch.compile(model, backend=oc2, fullgraph=True)
    generate()
    (rt2,) = oc2.runtimes
    assert rt2.plan.marks() == rt.plan.marks()
    assert oc2.report().graphs[0].steps[-1].decisions


def test_oc_calibrate_writes_a_residual_profile(tmp_path):
    model, kw, uncond = setup_flux()
    oc = OmniCache(policy="layered", inner_backend="eager", calibrate=None)
    fn = torch.compile(model, backend=oc, fullgraph=True)
    (prof,) = oc.calibrate(lambda: sample(fn, kw, uncond), path=str(tmp_path / "p.json"))
    assert prof.method == "residual" and prof.num_steps == STEPS
    assert isinstance(load_file(str(tmp_path / "p.json")), Profile)
    assert oc.runtimes[0].plan is not None


# ----------------------------------------------------------------------------- files


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    model, kw, _ = setup_flux()
    ug = unit_graph(model, kw)
    steps = 8
    delta = [[None] + [0.01 * (1 + (i + t) % 3) for t in range(1, steps)] for i in range(len(ug.units))]
    from omnicompile.policies.layered import dag_to_json
    prof = Profile(ug.fingerprint, steps, list(ug.units), "final", delta, dag_to_json(ug.dag))
    d = tmp_path_factory.mktemp("layered")
    prof.save(str(d / "profile.json"))
    plan = plan_profile(prof, 2.0, 4)
    Schedule.from_plan(plan, ug.dag, ug.fingerprint, 4).save(str(d / "schedule.json"))
    return d, ug


def edited(path, tmp_path, **changes):
    d = json.loads(path.read_text())
    for k, v in changes.items():
        if v is KeyError:
            d.pop(k)
        else:
            d[k] = v
    out = tmp_path / "edited.json"
    out.write_text(json.dumps(d))
    return str(out)


@pytest.mark.parametrize("which,changes,words", [
    ("profile", {"format": "nope"}, "field 'format'"),
    ("profile", {"version": 9}, "field 'version'"),
    ("profile", {"delta": KeyError}, "field 'delta' is missing"),
    ("profile", {"delta": [[0.1]]}, "field 'delta'"),
    ("profile", {"num_steps": 0}, "field 'num_steps'"),
    ("profile", {"method": "guess"}, "field 'method'"),
    ("profile", {"units": ["a"]}, "field 'delta'"),
    ("profile", {"dag": {"units": []}}, "field 'dag.units'"),
    ("schedule", {"marks": {"x": "CC"}}, "field 'marks'"),
    ("schedule", {"cache_interval": 0}, "field 'cache_interval'"),
    ("schedule", {"reached": "yes"}, "field 'reached'"),
])
def test_bad_files_name_the_field(files, tmp_path, which, changes, words):
    d, _ = files
    with pytest.raises(ScheduleError, match=words):
        load_file(edited(d / f"{which}.json", tmp_path, **changes))


def test_schedule_that_breaks_the_invariants_is_refused(files, tmp_path):
    d, ug = files
    sched = load_file(str(d / "schedule.json"))
    marks = dict(sched.marks)
    marks["transformer_blocks#0"] = "R" + marks["transformer_blocks#0"][1:]     # reuse at step 0
    bad = load_file(edited(d / "schedule.json", tmp_path, marks=marks))
    with pytest.raises(ScheduleError, match="invariants.*founded"):
        bad.plan(ug.dag)
    assert sched.plan(ug.dag).marks() == sched.marks


def test_unreadable_files(tmp_path):
    with pytest.raises(ScheduleError, match="does not exist"):
        load_file(str(tmp_path / "missing.json"))
    (tmp_path / "x.json").write_text("{")
    with pytest.raises(ScheduleError, match="not valid JSON"):
        load_file(str(tmp_path / "x.json"))
    assert issubclass(ScheduleError, CalibrationError)


def test_a_file_for_another_model_is_an_error(files):
    d, _ = files
    model, kw = tiny_flux(num_layers=2, num_single_layers=3)
    oc = OmniCache(policy="layered", calibrate=str(d / "profile.json"), inner_backend="eager")
    with pytest.raises(Exception, match="fingerprint"), torch.no_grad():
        torch.compile(model, backend=oc, fullgraph=True)(**kw)


def test_options_are_validated():
    with pytest.raises(ConfigError, match="target_speedup"):
        OmniCache(policy="layered", target_speedup=0.5)
    with pytest.raises(ConfigError, match="cache_interval"):
        OmniCache(policy="layered", cache_interval=0)
    with pytest.raises(ConfigError, match="cache_interval"):
        OmniCache(policy="layered", cache_interval=True)


def test_plan_command(files, tmp_path, capsys):
    from omnicompile.cli import main
    d, ug = files
    out = tmp_path / "s.json"
    assert main(["plan", str(d / "profile.json"), "--target-speedup", "1.8", "--cache-interval", "4",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "ideal speedup" in text and "transformer_blocks#0" in text
    sched = load_file(str(out))
    assert isinstance(sched, Schedule) and sched.target_speedup == 1.8
    assert sched.plan(dag_from_json(sched.dag)).ideal_speedup >= 1.8
    assert main(["plan", str(d / "schedule.json")]) == 2
    assert "is a schedule, not a profile" in capsys.readouterr().err
    assert main(["plan", str(d / "profile.json"), "--target-speedup", "0.5"]) == 2
    assert "--target-speedup" in capsys.readouterr().err


def test_profile_command(tmp_path, capsys):
    from omnicompile.cli import main
    out = tmp_path / "p.json"
    assert main(["profile", "omnicompile.testing:tiny_flux", "--method", "residual", "--steps", "6",
                 "--out", str(out), "--options", '{"target_speedup": 1.5}']) == 0
    text = capsys.readouterr().out
    assert "profile (residual)" in text and "ideal speedup" in text
    prof = load_file(str(out))
    assert isinstance(prof, Profile) and prof.num_steps == 6
    assert main(["profile", "omnicompile.testing:tiny_flux", "--out", str(out),
                 "--options", '{"policy": "static"}']) == 2
    assert "policy 'layered'" in capsys.readouterr().err


def test_dump_draws_the_plan(files, tmp_path):
    pytest.importorskip("matplotlib")
    d, _ = files
    model, kw, _ = setup_flux()
    oc = OmniCache(policy="layered", calibrate=str(d / "schedule.json"), inner_backend="eager",
                   dump_dir=str(tmp_path / "dump"), num_steps=8)
    with torch.no_grad():
        torch.compile(model, backend=oc, fullgraph=True)(**kw)
    (plan_file,) = (tmp_path / "dump").glob("graph*_plan.json")
    plan_json = json.loads(plan_file.read_text())
    policy_plan = oc.runtimes[0].plan
    marks = plan_json["marks"]
    for span, region in zip(oc.runtimes[0].spans, [r for r in policy_plan.regions if any(r.row)]):
        assert marks[span.name] == "".join("R" if x else "C" for x in region.row)
    assert plan_json["ideal_speedup"] > 1.0
    assert plan_file.with_suffix(".png").stat().st_size > 0
