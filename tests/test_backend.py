"""The backend end to end on tiny diffusers models: parity, reuse semantics, runtime state."""
import pytest
import torch

import omnicompile
from omnicompile import OmniCache
from omnicompile.testing import TINY_MODELS, with_timestep

FLUX_TS = [1.0, 0.9, 0.8, 0.7, 0.6]
INT_TS = [999.0, 900.0, 800.0, 700.0, 600.0]


def run(model, kw, ts, backend=None, **compile_kw):
    fn = torch.compile(model, backend=backend, fullgraph=True, **compile_kw) if backend is not None else model
    outs = []
    with torch.no_grad():
        for t in ts:
            outs.append(fn(**with_timestep(kw, t))[0])
    return outs


def timesteps(name):
    return FLUX_TS if name == "flux" else INT_TS


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
@pytest.mark.parametrize("options", [{"policy": "none"}, {"policy": "static", "interval": 1}],
                         ids=["none", "static-no-reuse"])
def test_cache_off_equals_eager_fullgraph(name, options):
    model, kw = TINY_MODELS[name]()
    ts = timesteps(name)[:3]
    ref = run(model, kw, ts)
    oc = OmniCache(inner_backend="eager", **options)
    got = run(model, kw, ts, backend=oc)   # fullgraph=True: a graph break would raise
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    rep = oc.report()
    assert len(rep.graphs) == 1
    g = rep.graphs[0]
    if options["policy"] == "none":
        assert not g.cached and g.fallback.code == "policy_none"
    else:
        assert g.cached and g.hit_rate == 0.0


def _manual_reference(model, kw, ts, reuse_steps, spans_res):
    """What the cache must produce: compute the model normally on computed steps; on a
    reuse step the output differs from eager, so we only check computed steps here."""


@pytest.mark.parametrize("guard", ["variants", "cond"])
def test_static_reuse_matches_stream_residual_semantics(guard):
    """Reuse steps return in + cached residual: replaying the same input at a reuse step
    gives exactly the eager output of the step whose residual is cached."""
    model, kw = TINY_MODELS["flux"]()
    oc = OmniCache(policy="static", reuse_steps=[2, 4], inner_backend="eager", guard=guard)
    fn = torch.compile(model, backend=oc, fullgraph=True)
    ts = [1.0, 0.9, 0.8, 0.7, 0.6]
    with torch.no_grad():
        eager = [model(**with_timestep(kw, t))[0] for t in ts]
        got = [fn(**with_timestep(kw, t))[0] for t in ts]
    for i in (0, 1, 3):
        torch.testing.assert_close(got[i], eager[i], rtol=1e-5, atol=1e-5)
    for i in (2, 4):
        assert not torch.allclose(got[i], eager[i], atol=1e-4)
    steps = oc.report().graphs[0].steps
    assert [set(s.decisions.values()) for s in steps] == [{"computed"}, {"computed"}, {"reused"},
                                                          {"computed"}, {"reused"}]


def test_cond_and_variants_agree():
    model, kw = TINY_MODELS["flux"]()
    outs = {}
    for guard in ("variants", "cond"):
        torch._dynamo.reset()
        oc = OmniCache(policy="static", interval=2, warmup=1, inner_backend="eager", guard=guard)
        outs[guard] = run(model, kw, FLUX_TS, backend=oc)
        assert oc.report().graphs[0].guard == guard
    for a, b in zip(outs["variants"], outs["cond"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_generation_reset_and_manual_reset():
    model, kw = TINY_MODELS["flux"]()
    oc = OmniCache(policy="static", interval=2, warmup=1, inner_backend="eager")
    fn = torch.compile(model, backend=oc, fullgraph=True)
    with torch.no_grad():
        first = [fn(**with_timestep(kw, t))[0] for t in FLUX_TS]
        second = [fn(**with_timestep(kw, t))[0] for t in FLUX_TS]   # rising timestep: new generation
        oc.reset()
        third = [fn(**with_timestep(kw, t))[0] for t in FLUX_TS[:2]]
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(third[0], first[0])
    g = oc.report().graphs[0]
    assert [s.generation for s in g.steps] == [0] * 5 + [1] * 5 + [2] * 2
    assert g.generations == 3
    assert [s.step for s in g.steps[5:10]] == [0, 1, 2, 3, 4]


def test_repeated_timestep_value_starts_new_generation():
    model, kw = TINY_MODELS["flux"]()
    oc = OmniCache(policy="static", interval=2, warmup=1, inner_backend="eager")
    fn = torch.compile(model, backend=oc, fullgraph=True)
    with torch.no_grad():
        for t in [1.0, 0.9, 0.8, 1.0, 0.9]:   # back to 1.0: a new generation
            fn(**with_timestep(kw, t))
    g = oc.report().graphs[0]
    assert [(s.generation, s.step) for s in g.steps] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]


def test_without_a_context_two_calls_at_step_0_make_step_1_uncertain():
    """Two calls at the first timestep may be CFG's two slots or an abandoned generation
    restarting at the same timestep: without a context step 1 computes, and says why."""
    model, kw = TINY_MODELS["flux"]()
    oc = OmniCache(policy="static", reuse_steps=[1, 3], inner_backend="eager")
    fn = torch.compile(model, backend=oc, fullgraph=True)
    with torch.no_grad():
        for t in (1.0, 1.0, 0.9, 0.9, 0.8, 0.8, 0.7, 0.7):
            fn(**with_timestep(kw, t))
    g = oc.report().graphs[0]
    step1 = [r for r in g.steps if r.step == 1]
    assert all(r.uncertain and set(r.decisions.values()) == {"computed"} for r in step1)
    assert "CFG slots or a generation restarted" in step1[0].uncertain
    step3 = [r for r in g.steps if r.step == 3]      # two calls per step confirmed by step 1
    assert all(not r.uncertain and set(r.decisions.values()) == {"reused"} for r in step3)
    assert g.uncertain_calls == 2


def test_cfg_split_calls_get_separate_slots():
    model, kw = TINY_MODELS["flux"]()
    uncond = dict(kw, encoder_hidden_states=torch.zeros_like(kw["encoder_hidden_states"]),
                  pooled_projections=torch.zeros_like(kw["pooled_projections"]))
    oc = OmniCache(policy="static", reuse_steps=[1], inner_backend="eager")
    fn = torch.compile(model, backend=oc, fullgraph=True)
    with torch.no_grad(), omnicompile.generation(timesteps=[1.0, 0.9]):
        c0 = fn(**with_timestep(kw, 1.0))[0]
        u0 = fn(**with_timestep(uncond, 1.0))[0]
        # step 1 is reused: each slot returns its own input + its own residual; with the
        # inputs of step 0 that reproduces step 0's outputs exactly, per slot
        c1 = fn(**with_timestep(kw, 0.9))[0]
        u1 = fn(**with_timestep(uncond, 0.9))[0]
    g = oc.report().graphs[0]
    assert [(s.step, s.slot) for s in g.steps] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(v == "reused" for s in g.steps[2:] for v in s.decisions.values())
    # the reused step still depends on the slot's own cache: the cond/uncond outputs differ
    assert not torch.allclose(c1, u1)
    with torch.no_grad():
        # reference: blocks skipped, residuals of step 0 added to step-1 stream inputs
        ref_c1 = _flux_reuse_reference(model, with_timestep(kw, 1.0), with_timestep(kw, 0.9))
        ref_u1 = _flux_reuse_reference(model, with_timestep(uncond, 1.0), with_timestep(uncond, 0.9))
    torch.testing.assert_close(c1, ref_c1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(u1, ref_u1, rtol=1e-5, atol=1e-5)


def _flux_reuse_reference(model, kw_cached, kw_now):
    from reference_cache import FluxResidualCache

    ref = FluxResidualCache(model)
    with ref:
        ref.begin(step=0, slot=0, reuse=False)
        model(**kw_cached)
        ref.begin(step=1, slot=0, reuse=True)
        return model(**kw_now)[0]


def test_shape_change_starts_new_generation():
    model, kw = TINY_MODELS["flux"]()
    kw2 = dict(kw, hidden_states=torch.randn(2, 16, 4), encoder_hidden_states=torch.randn(2, 5, 32),
               pooled_projections=torch.randn(2, 32))
    oc = OmniCache(policy="static", interval=2, warmup=1, inner_backend="eager")
    fn = torch.compile(model, backend=oc, fullgraph=True, dynamic=False)
    with torch.no_grad():
        fn(**with_timestep(kw, 1.0))
        fn(**with_timestep(kw, 0.9))
        ref = model(**with_timestep(kw2, 0.8))[0]
        out = fn(**with_timestep(kw2, 0.8))[0]   # a new shape: recompiled, new generation
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    graphs = oc.report().graphs
    assert len(graphs) == 2 and graphs[1].steps[0].step == 0


def test_runtime_shape_change_within_one_graph_resets():
    from omnicompile.runtime.tracker import StepTracker

    tr = StepTracker()
    assert tr.advance(1.0, ("a",)) == (0, 0, 0, True)
    assert tr.advance(0.9, ("a",)) == (0, 1, 0, False)
    assert tr.advance(0.9, ("a",)) == (0, 1, 1, False)
    assert tr.advance(0.8, ("b",)) == (1, 0, 0, True)
    assert tr.advance(0.7, ("b",)) == (1, 1, 0, False)
    assert tr.advance(0.8, ("b",)) == (2, 0, 0, True)   # reversed direction


def test_fallback_without_blocks_is_unchanged_and_says_why():
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
    x = torch.randn(3, 4)
    oc = OmniCache(inner_backend="eager")
    with torch.no_grad():
        out = torch.compile(mlp, backend=oc, fullgraph=True)(x)
        torch.testing.assert_close(out, mlp(x))
    g = oc.report().graphs[0]
    assert not g.cached and g.fallback.code == "no_blocks"
    assert "no_blocks" in str(oc.report())


def test_fallback_for_training_graphs():
    model, kw = TINY_MODELS["dit"]()
    model.train(False)
    oc = OmniCache(inner_backend="eager")
    out = torch.compile(model, backend=oc)(**kw)[0]   # grad enabled, params require grad
    torch.testing.assert_close(out, model(**kw)[0])
    assert oc.report().graphs[0].fallback.code == "training_graph"


def test_cooldown_uses_num_steps():
    model, kw = TINY_MODELS["flux"]()
    oc = OmniCache(policy="static", interval=2, warmup=1, cooldown=2, num_steps=5, inner_backend="eager")
    run(model, kw, FLUX_TS, backend=oc)
    dec = [next(iter(s.decisions.values())) for s in oc.report().graphs[0].steps]
    assert dec == ["computed", "reused", "computed", "computed", "computed"]


def test_report_counts_flops_and_bytes():
    model, kw = TINY_MODELS["flux"]()
    oc = OmniCache(policy="static", interval=2, warmup=1, inner_backend="eager")
    run(model, kw, FLUX_TS, backend=oc)
    g = oc.report().graphs[0]
    assert g.cache_bytes == 4 * (16 * 32 + 5 * 32 + 21 * 32) or g.cache_bytes > 0
    assert 0 < g.flops_saved_fraction < 1
    text = str(oc.report())
    assert "reused" in text and "hit rate" in text


def test_string_backend_and_last_report():
    model, kw = TINY_MODELS["wan"]()
    ref = run(model, kw, INT_TS[:2])
    got = run(model, kw, INT_TS[:2], backend="omnicache", options={"inner_backend": "eager", "interval": 1})
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b)
    assert omnicompile.last_report().graphs[-1].cached


def test_dump_dir_writes_graphs(tmp_path):
    model, kw = TINY_MODELS["dit"]()
    oc = OmniCache(inner_backend="eager", dump_dir=str(tmp_path))
    run(model, kw, INT_TS[:1], backend=oc)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert any(n.endswith("before.py") for n in names) and any("after_variant" in n for n in names)


@pytest.mark.parametrize("guard", ["variants", "cond"])
def test_inductor_parity_and_reuse(guard):
    """Inductor as inner backend: computed steps match eager, reused steps match the
    eager-inner rewrite (same algorithm, different compiler)."""
    model, kw = TINY_MODELS["flux"]()
    ts = FLUX_TS[:4]
    eager_cached = run(model, kw, ts, backend=OmniCache(policy="static", interval=2, warmup=1,
                                                        inner_backend="eager", guard=guard))
    torch._dynamo.reset()
    oc = OmniCache(policy="static", interval=2, warmup=1, guard=guard)
    ind = run(model, kw, ts, backend=oc)
    assert oc.report().graphs[0].cached
    for a, b in zip(eager_cached, ind):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_policy_none_with_inductor_equals_plain_inductor():
    model, kw = TINY_MODELS["sd3"]()
    ts = INT_TS[:2]
    plain = run(model, kw, ts, backend="inductor")
    torch._dynamo.reset()
    none = run(model, kw, ts, backend=OmniCache(policy="none"))
    for a, b in zip(plain, none):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_strict_mode_raises_a_bug_and_lenient_mode_reports_it(monkeypatch):
    """A refusal is always deliberate: an exception inside the backend (here a bug planted in the
    span analysis) propagates in strict mode; without it the graph runs unchanged, reported as
    ``internal_error`` — never disguised as an ordinary refusal."""
    import omnicompile.backend as B

    def broken(gm, blocks):
        raise AttributeError("planted bug")

    monkeypatch.setattr(B, "find_spans", broken)
    model, kw = TINY_MODELS["flux"]()
    with torch.no_grad():
        oc = OmniCache(inner_backend="eager", strict=True)
        with pytest.raises(Exception, match="planted bug"):
            torch.compile(model, backend=oc, fullgraph=True)(**kw)
        torch._dynamo.reset()
        monkeypatch.setenv("OMNICACHE_STRICT", "0")
        oc = OmniCache(inner_backend="eager")
        assert oc.config.strict is False
        out = torch.compile(model, backend=oc, fullgraph=True)(**kw)
    torch.testing.assert_close(out[0], model(**kw)[0])
    g = oc.report().graphs[0]
    assert not g.cached and g.fallback.code == "internal_error" and "planted bug" in g.fallback.message


def test_strict_from_the_environment(monkeypatch):
    monkeypatch.setenv("OMNICACHE_STRICT", "1")
    assert OmniCache().config.strict is True
    assert OmniCache(strict=False).config.strict is False       # an explicit option wins
    monkeypatch.delenv("OMNICACHE_STRICT")
    assert OmniCache().config.strict is False


def test_graph_ids_count_per_backend_object():
    model, kw = TINY_MODELS["flux"]()
    a, b = OmniCache(inner_backend="eager"), OmniCache(inner_backend="eager")
    with torch.no_grad():
        torch.compile(model, backend=a, fullgraph=True)(**kw)
        torch._dynamo.reset()
        torch.compile(model, backend=b, fullgraph=True)(**kw)
    assert [g.graph_id for g in a.report().graphs] == [0] == [g.graph_id for g in b.report().graphs]


def test_the_decisive_reason_comes_first():
    """A graph with block lists whose spans are all refused names the span refusal, not a
    note about how the lists were found."""
    from omnicompile.backend import decisive_reason
    from omnicompile.passes.common import Reason
    from omnicompile.passes.spans import SpanAnalysis

    note = Reason("partial_list", "members differ", "blocks")
    dyn = Reason("dynamic_shape", "symbolic stream shapes", "blocks[0:2]")
    other = Reason("non_stream_output", "exposes x", "blocks[0:2]")
    analysis = SpanAnalysis(groups=[object()], spans=[], refused=[other, dyn], timestep=None, user_inputs=[])

    class Blocks:
        reasons = [note]
    assert decisive_reason(Blocks, analysis) == dyn
    analysis.refused = [other]
    assert decisive_reason(Blocks, analysis) == other
    analysis.groups, analysis.refused = [], [Reason("no_timestep", "none")]
    Blocks.reasons = [Reason("no_module_metadata", "none"), Reason("no_blocks", "no list")]
    assert decisive_reason(Blocks, analysis).code == "no_blocks"


class _Permuted(torch.nn.Module):
    """Blocks whose output comes back in another stride order (a transposed view): the residual
    ``out - in`` is not contiguous."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(),
                                                              torch.nn.Linear(16, 8)) for _ in range(3))

    def forward(self, x, timestep):
        h = x * (1 + torch.sin(timestep).reshape(-1, 1, 1))
        for b in self.blocks:
            h = (h + b(h)).transpose(1, 2).contiguous().transpose(1, 2)
        return h


def _stride_checking_compiler(monkeypatch):
    """An inner compiler that, like Inductor's compiled graphs, refuses inputs whose strides differ
    from its example inputs'."""
    import omnicompile.backend as B

    def compiler(name):
        def compile_fn(gm, example_inputs):
            strides = [x.stride() if isinstance(x, torch.Tensor) else None for x in example_inputs]

            def run(*args):
                for i, (a, s) in enumerate(zip(args, strides)):
                    if isinstance(a, torch.Tensor) and s is not None and a.dim() > 1 and a.stride() != s:
                        raise AssertionError(f"input {i}: stride {a.stride()} != {s}")
                return gm.forward(*args)
            return run
        return compile_fn
    monkeypatch.setattr(B, "inner_compiler", compiler)


@pytest.mark.parametrize("policy", [dict(policy="static", interval=2, warmup=1, guard="variants"),
                                    dict(policy="static", interval=2, warmup=1, guard="cond"),
                                    dict(policy="probe", threshold=10.0)], ids=["variants", "cond", "probe"])
def test_state_is_fed_back_in_the_layout_it_was_compiled_for(monkeypatch, policy):
    _stride_checking_compiler(monkeypatch)
    torch.manual_seed(0)
    model = _Permuted().eval()
    x = torch.randn(2, 6, 8).transpose(1, 2).contiguous().transpose(1, 2)     # a permuted input too
    oc = OmniCache(inner_backend="eager", **policy)
    fn = torch.compile(model, backend=oc, fullgraph=True)
    ts = [1.0, 0.8, 0.6, 0.4, 0.2]
    with torch.no_grad(), omnicompile.generation(timesteps=ts):
        for t in ts:
            fn(x, torch.tensor([t]))
    assert oc.report().hit_rate > 0


class _Bare(torch.nn.Module):
    """Blocks whose last output is itself the graph output (no norm or projection after them)."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(),
                                                              torch.nn.Linear(16, 8)) for _ in range(3))

    def forward(self, x, timestep):
        h = x * (1 + torch.sin(timestep).reshape(-1, 1, 1))
        for b in self.blocks:
            h = h + b(h)
        return h


@pytest.mark.parametrize("policy", [dict(policy="static", interval=2, warmup=1, guard="variants"),
                                    dict(policy="static", interval=2, warmup=1, guard="cond"),
                                    dict(policy="probe", threshold=10.0, align=False)],
                         ids=["variants", "cond", "probe"])
def test_a_stream_output_that_is_the_graph_output_is_reused(policy):
    """The rewrite used to re-read the graph's outputs from before it replaced the span's
    stream output, so a 'reused' step whose stream output is the model's output ran every block
    (and returned the uncached value) — the reference replay shows the difference."""
    from reference_executor import Recorder, replay_all
    torch.manual_seed(0)
    model = _Bare().eval()
    x = torch.randn(2, 6, 8)
    oc = OmniCache(inner_backend="eager", **policy)
    rec = Recorder(oc)
    fn = torch.compile(model, backend=rec, fullgraph=True)
    ts = [1.0, 0.8, 0.6, 0.4, 0.2]
    with torch.no_grad(), omnicompile.generation(timesteps=ts):
        for t in ts:
            x = x - 0.1 * fn(x, torch.tensor([t]))
    assert replay_all(rec)["reused"] > 0
