"""Caching survives dynamic shapes: with ``torch.compile``'s default (automatic dynamic shapes) the
second batch size or resolution recompiles with symbolic sizes; its spans are cached too (the
cache tensors take the symbolic sizes of the streams), every shape reuses, and every call equals
the reference executing the reported decisions."""
import pytest
import torch

import omnicompile
from pipelines import build_pipeline
from reference_executor import Recorder, replay_all

STATIC = dict(policy="static", interval=2, warmup=1, inner_backend="eager")


pytestmark = pytest.mark.usefixtures("one_thread")


def compile_dynamic(tp, **options):
    """compile_pipeline with torch.compile's default dynamic behaviour, behind recorders."""
    cache = omnicompile.compile_pipeline(tp.pipe, **options)
    recorders = {}
    for name, oc in cache.backends.items():
        recorders[name] = Recorder(oc)
        setattr(tp.pipe, name, torch.compile(cache.originals[name], backend=recorders[name]))
    return cache, recorders


def symbolic_graphs(cache):
    return [g for oc in cache.backends.values() for g in oc.report().graphs
            if any(s for s in g.spans) and g.nodes and g.cached]


@pytest.mark.parametrize("family", ["flux", "sd3", "wan22"])
def test_batch_and_resolution_changes_stay_cached(family):
    tp = build_pipeline(family, **({"num_layers": 3} if family == "sd3" else {}))
    cache, recorders = compile_dynamic(tp, **STATIC)
    runs = [dict(batch=1), dict(batch=2), dict(batch=4)]
    sizes = [(64, 64), (96, 64), (64, 128)]
    runs += [dict(height=h, width=w) for h, w in sizes[1:]]
    with torch.no_grad():
        for kw in runs:
            tp(num_inference_steps=6, **kw)
    reports = [g for oc in cache.backends.values() for g in oc.report().graphs]
    assert len(reports) >= 2                     # the static first compile, then symbolic ones
    assert all(g.cached for g in reports), [g.fallback for g in reports]
    # every generation (each shape) reused something
    per_context = {}
    for g in reports:
        for r in g.steps:
            key = r.generation, g.graph_id
            per_context.setdefault(key, False)
            per_context[key] |= "reused" in r.decisions.values()
    assert all(per_context.values())
    total = sum(replay_all(rec)["reused"] for rec in recorders.values())
    assert total > 0


@pytest.mark.parametrize("policy", ["probe", "layered"])
def test_symbolic_graphs_for_in_graph_and_layered_policies(policy):
    from omnicompile.testing import tiny_flux, with_timestep

    model, kw = tiny_flux()
    opts = {"probe": dict(policy="probe", threshold=10.0), "layered": dict(policy="layered", target_speedup=1.5)}
    oc = omnicompile.OmniCache(inner_backend="eager", **opts[policy])
    rec = Recorder(oc)
    fn = torch.compile(model, backend=rec)
    ts = [1.0 - i / 10 for i in range(10)]
    for b in (1, 2, 3):
        k = {n: (v.repeat(b, *[1] * (v.dim() - 1)) if n not in ("txt_ids", "img_ids") and isinstance(v, torch.Tensor)
                 and v.dim() >= 1 else v) for n, v in kw.items()}
        for _ in range(2):
            with torch.no_grad(), omnicompile.generation(timesteps=ts):
                x = k["hidden_states"]
                for t in ts:
                    x = x - 0.1 * fn(**dict(with_timestep(k, t), hidden_states=x))[0]
    graphs = oc.report().graphs
    assert len(graphs) == 2 and all(g.cached for g in graphs)
    assert all(g.hit_rate > 0 for g in graphs)
    if policy == "layered":
        replay_all(rec)


def test_calls_past_dynamos_recompile_limit_are_reported():
    """After ``recompile_limit`` shapes Dynamo stops compiling and runs the model eagerly: those
    calls never reach omnicache; the pipeline's report counts them and says what to change."""
    tp = build_pipeline("flux")
    cache = omnicompile.compile_pipeline(tp.pipe, dynamic=False, **STATIC)
    with torch._dynamo.config.patch(recompile_limit=2), torch.no_grad():
        for b in (1, 2, 3, 4):                 # four shapes, two compiles
            out = tp(num_inference_steps=3, batch=b)
            assert torch.isfinite(out).all()
    rep = cache.report()
    assert rep.bypassed_calls == 2 * 3 * 2        # shapes 3 and 4: 3 steps, CFG as two calls
    assert cache.model_calls["transformer"] == 4 * 3 * 2
    assert any("recompile_limit" in w for w in rep.warnings)
    assert "reached no omnicache graph" in str(rep)


def test_token_caches_specialise_per_shape_under_automatic_dynamic():
    """The token / frame / block caches prove their regions at concrete row counts: a graph
    Dynamo traced with symbolic sizes is specialised per concrete shape (one graph each, reported
    as such); every shape merges, and each equals the static compile of that shape (which
    test_tokens checks against the plain-PyTorch token-cache reference)."""
    from omnicompile import testing

    model, kw = testing.tiny_latte(num_layers=3, frames=4)
    opts = dict(policy="none", inner_backend="eager", frame_ratio=0.5, block_ratio=0.5, merge_ffn=True)
    steps = (1000.0, 500.0)

    def shaped(b, h, w):
        g = torch.Generator().manual_seed(b * 100 + h + w)
        return dict(kw, hidden_states=torch.randn(b, 4, 4, h, w, generator=g), timestep=torch.full((b,), 1000.0),
                    encoder_hidden_states=torch.randn(b, 6, 16, generator=g))

    def run(cm, k):
        with torch.no_grad(), omnicompile.generation(timesteps=list(steps)):
            return [cm(**testing.with_timestep(k, t))[0] for t in steps]

    shapes = [(1, 8, 8), (2, 8, 8), (1, 12, 8)]
    oc = omnicompile.OmniCache(**opts)
    cm = torch.compile(model, backend=oc)
    outs = {s: run(cm, shaped(*s)) for s in shapes}
    graphs = oc.report().graphs
    assert [g.specialised for g in graphs] == [False, True, True]
    assert all(g.cached and g.token_cache["merged_calls"] >= 1 for g in graphs)
    for s, g in zip(shapes, graphs):
        torch._dynamo.reset()
        static = omnicompile.OmniCache(**opts)
        want = run(torch.compile(model, backend=static, dynamic=False), shaped(*s))
        for a, b in zip(outs[s], want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert g.token_cache["merged_calls"] == static.report().graphs[0].token_cache["merged_calls"]


def test_specialised_shapes_are_bounded():
    """Past MAX_SHAPES the oldest specialisation is evicted (it compiles again when it comes
    back); the report warns once."""
    from omnicompile import testing
    from omnicompile.runtime import shapes

    model, kw = testing.tiny_dit(num_layers=3)
    oc = omnicompile.OmniCache(policy="none", inner_backend="eager", token_ratio=0.5)
    cm = torch.compile(model, backend=oc)
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(shapes, "MAX_SHAPES", 2)
        for b in (1, 2, 3, 4, 2):
            k = dict(kw, hidden_states=kw["hidden_states"].repeat(b, 1, 1, 1), timestep=kw["timestep"].repeat(b),
                     class_labels=kw["class_labels"].repeat(b))
            torch.testing.assert_close(cm(**k)[0], model(**k)[0])
    rep = oc.report()
    # batch 1 static; 2 and 3 specialised; 4 evicts 2; 2 evicts 3 and compiles again
    assert sum(g.specialised for g in rep.graphs) == 4
    assert sum("evict" in w for w in rep.warnings) == 1
