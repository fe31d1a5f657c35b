"""The static policy's extrapolation (``extrapolate``, on by default): a reused span adds its last
residual extrapolated along the last two, with a coefficient fitted online on every computed step.

The runtime is checked against ``reference_executor.replay``, whose window and least-squares fit
are written in plain PyTorch (float64) independently of the rewrite; the in-graph fit against the
formula on chosen residuals.
"""
import pytest
import torch

import omnicompile
from omnicompile import testing
from omnicompile.errors import ConfigError
from omnicompile.passes.blocks import find_blocks
from omnicompile.passes.rewrite import ALPHA_MAX, build_variant
from omnicompile.passes.spans import find_spans

from conftest import trace
from pipelines import build_pipeline
from reference_executor import Recorder, replay


def _run(family, extrapolate, steps=12, **opts):
    tp = build_pipeline(family, num_layers=3)
    oc = omnicompile.OmniCache(inner_backend="eager", strict=True, extrapolate=extrapolate, **opts)
    rec = Recorder(oc)
    orig = tp.pipe.transformer
    tp.pipe.transformer = torch.compile(orig, backend=rec, fullgraph=True)
    try:
        with omnicompile.generation(num_steps=steps):
            tp(num_inference_steps=steps)
    finally:
        tp.pipe.transformer = orig
    return rec


@pytest.mark.parametrize("family", ["sd3", "flux", "latte"])
def test_extrapolated_reuse_matches_the_reference_through_a_pipeline(family):
    """Every call equals the reference's; the extrapolation is not a no-op (some reused step
    differs from plain reuse: a fitted coefficient above 0 was applied)."""
    rec = _run(family, True)
    got = replay(rec.graphs[0])
    assert got["reused"] > 0
    torch._dynamo.reset()
    plain = _run(family, False)
    assert replay(plain.graphs[0])["reused"] == got["reused"]
    diffs = [float((a[0] - b[0]).abs().max()) for (_, a), (_, b) in zip(rec.graphs[0].calls, plain.graphs[0].calls)]
    assert max(diffs) > 0, "the coefficient stayed 0 on every reuse"
    assert rec.graphs[0].report.policy["extrapolate"] is True


def test_extrapolation_with_a_target_and_a_second_generation():
    """A preset (target schedule) over two generations of other step counts: the window starts
    empty in each generation (the reference's cache is per generation too)."""
    tp = build_pipeline("sd3", num_layers=3)
    rec = Recorder(omnicompile.OmniCache(policy="fast", inner_backend="eager", strict=True, target_cost="flops"))
    orig = tp.pipe.transformer
    tp.pipe.transformer = torch.compile(orig, backend=rec, fullgraph=True)
    try:
        for n in (10, 7):
            with omnicompile.generation(num_steps=n):
                tp(num_inference_steps=n)
    finally:
        tp.pipe.transformer = orig
    assert replay(rec.graphs[0])["reused"] > 4


def test_fitted_coefficient_is_the_clipped_least_squares_ratio():
    """alpha' = clip(<e, u> / <u, u>, 0, ALPHA_MAX), e = new - r_last, u = k (r_last - r_prev);
    0 when <u, u> = 0 or the ratio is not finite."""
    model, kw = testing.tiny_sd3(num_layers=3)
    gm, ex = trace(model, kw)
    spans = find_spans(gm, find_blocks(gm)).spans
    g = build_variant(gm, spans, [False] * len(spans), finite=True, extrapolate=True)
    n_out = len(next(n for n in gm.graph.nodes if n.op == "output").args[0])
    streams = [s for sp in spans for s in sp.live_streams]
    assert len(spans) == 1
    shapes = [tuple(s.input.meta["example_value"].shape) for s in streams]
    # the span's residual this call, from the graph itself with any window
    zeros = [torch.zeros(sh) for sh in shapes]
    with torch.no_grad():
        outs = g(*ex, *zeros, *zeros, torch.tensor(0.0))
    new = outs[n_out:n_out + len(streams)]
    assert float(outs[-1]) == 0.0                    # k = 0: <u, u> = 0
    torch.manual_seed(0)
    for want in (0.25, 0.8, 3.0, -2.0):
        r_prev = [torch.randn(sh) for sh in shapes]
        k = 2.0
        # new - r_last = want * k * (r_last - r_prev): choose r_last to make the fit exact
        # r_last = (new + want k r_prev) / (1 + want k)
        r_last = [(n + want * k * p) / (1 + want * k) for n, p in zip(new, r_prev)]
        with torch.no_grad():
            alpha = float(g(*ex, *r_last, *r_prev, torch.tensor(k))[-1])
        assert alpha == pytest.approx(min(ALPHA_MAX, max(0.0, want)), abs=1e-4), want
    bad = [torch.full(sh, float("nan")) for sh in shapes]
    with torch.no_grad():
        assert float(g(*ex, *zeros, *bad, torch.tensor(1.0))[-1]) == 0.0


def test_cond_guard_reports_plain_reuse_and_options_are_checked():
    m, kw = testing.tiny_sd3(num_layers=3)
    oc = omnicompile.OmniCache(guard="cond", inner_backend="eager", strict=True)
    cm = torch.compile(m, backend=oc, fullgraph=True)
    with torch.no_grad(), omnicompile.generation(num_steps=4):
        for t in (1000.0, 750.0, 500.0, 250.0):
            cm(**testing.with_timestep(kw, t))
    assert "extrapolate_cond" in {r.code for r in oc.report().graphs[0].refused}
    with pytest.raises(ConfigError, match="extrapolate"):
        omnicompile.OmniCache(extrapolate="yes")
    with pytest.raises(ConfigError, match="extrapolate"):
        omnicompile.OmniCache(policy="trajectory", extrapolate=False)
