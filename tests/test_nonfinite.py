"""A cached state that is not finite is never replayed (issue 15, item 8).

One step whose input holds a NaN makes that step's output NaN in eager mode, and nothing
else.  Its residual ``out - in`` is NaN too: a cache that replays it spreads the NaN over the
reuses that follow (and the trajectory's correction ``q`` or the probe's window across a
computed step).  With every policy and guard the set of non-finite output steps must equal
eager's, the other outputs must equal the reference executor's replay of the decisions the
report gives, and the report must count the recomputes.
"""
import torch

import omnicompile
from omnicompile import OmniCache
from omnicompile.testing import tiny_flux
from reference_executor import Recorder, replay

STEPS = 14
TIMESTEPS = [1.0 - i / STEPS for i in range(STEPS)]


def _inputs(kw, nan_step=None, value=float("nan")):
    g = torch.Generator().manual_seed(1)
    xs = [kw["hidden_states"] + 0.05 * i * torch.randn(kw["hidden_states"].shape, generator=g) for i in range(STEPS)]
    if nan_step is not None:
        xs[nan_step] = xs[nan_step].clone()
        xs[nan_step][0, 0, 0] = value
    return xs


def _generation(fn, kw, xs):
    outs = []
    with torch.no_grad(), omnicompile.generation(timesteps=TIMESTEPS):
        for x, t in zip(xs, TIMESTEPS):
            outs.append(fn(**dict(kw, hidden_states=x, timestep=torch.tensor([t])))[0].clone())
    return outs


def _bad(outs):
    return [i for i, o in enumerate(outs) if not torch.isfinite(o).all()]


def _reused(steps):
    return {s.step: {k for k, v in s.decisions.items() if v == "reused"} for s in steps}


def _nan_step(clean_steps, wanted_next=True):
    """A step some span computes at, whose cache the next step reuses (from a clean generation)."""
    reused = _reused(clean_steps)
    for s in range(1, STEPS - 1):
        nxt = reused.get(s + 1, set())
        if nxt and not (nxt & reused.get(s, set())):
            return s
    raise AssertionError(f"no computed step followed by a reuse: {reused}")


class _Switch:
    """One Dynamo trace per test, many backends: the compiled frame calls whichever
    OmniCache (wrapped in a Recorder) ``use`` installed last (tracing is the slow part)."""

    def __init__(self):
        self.gm = self.ex = self.fn = self.make = None
        self.__name__ = "switch"

    def __call__(self, gm, ex):
        self.gm, self.ex = gm, ex
        self.fn = self.make(gm, ex)
        return lambda *args: self.fn(*args)

    def use(self, opts):
        oc = OmniCache(inner_backend="eager", **opts)
        rec = self.make = Recorder(oc)
        if self.gm is not None:
            with torch.no_grad():           # as when Dynamo compiles it
                self.fn = rec(self.gm, self.ex)
        return oc, rec


def _model():
    model, kw = tiny_flux()
    sw = _Switch()
    return model, kw, sw, torch.compile(model, backend=sw, fullgraph=True)


def _run(setup, opts, pick=None, value=float("nan"), clean=1):
    """``clean`` clean generations (the calibration, where the policy has one), then one with a
    NaN in the input of a step ``pick`` chooses from the last clean one (default: a computed
    step followed by a reuse).  Returns (eager outputs, ours, report of the graph, recorder,
    nan step)."""
    model, kw, sw, compiled = setup
    oc, rec = sw.use(opts)
    for _ in range(clean):
        _generation(compiled, kw, _inputs(kw))
    g = oc.report().graphs[0]
    s = (pick or _nan_step)([r for r in g.steps if r.generation == g.steps[-1].generation])
    xs = _inputs(kw, s, value)
    with torch.no_grad():
        eager = _generation(model, kw, xs)
    got = _generation(compiled, kw, xs)
    g = oc.report().graphs[0]
    return eager, got, g, rec, s


def _check(eager, got, g, rec, s, replayed=True):
    assert _bad(eager) == [s]
    assert _bad(got) == _bad(eager), (s, _bad(got), [(r.step, r.decisions) for r in g.steps[-STEPS:]])
    last = g.steps[-STEPS:]
    assert g.nonfinite_recomputes >= 1
    assert [r.step for r in last if r.nonfinite] == [s + 1]   # the first reuse after the NaN step
    assert g.summary()["nonfinite_recomputes"] == g.nonfinite_recomputes
    assert "not finite" in g.to_markdown() and "not finite" in str(rec.oc.report())
    if replayed:
        replay(rec.graphs[-1], equal_nan=True, atol=1e-4, rtol=1e-4)
    # the generation still reuses after the recompute
    assert any(v == "reused" for r in last if r.step > s + 1 for v in r.decisions.values())


def test_static_never_replays_a_nonfinite_residual():
    setup = _model()
    for guard in ("variants", "cond"):
        _check(*_run(setup, dict(policy="static", warmup=2, interval=2, guard=guard)))
        eager, got, g, rec, s = _run(setup, dict(policy="static", reuse_steps=[4, 5, 6, 9, 10], guard=guard))
        _check(eager, got, g, rec, s)
        # a whole run of reuses after the NaN step: only its first step recomputes
        assert s == 3 and {r.step for r in g.steps[-STEPS:] if "reused" in r.decisions.values()} == {5, 6, 9, 10}
    for value in (float("inf"), -float("inf")):
        _check(*_run(setup, dict(policy="static", warmup=2, interval=2), value=value))


def test_layered_never_replays_a_nonfinite_residual():
    setup = _model()
    for guard in ("variants", "cond"):     # a calibration generation, then the plan
        _check(*_run(setup, dict(policy="layered", guard=guard, target_speedup=2.0), clean=2))


def _before_measure(clean_steps):
    """The step two before a reuse whose previous step is computed: the NaN's residual then
    reaches the reuse only through the correction q measured at the computed step between."""
    reused = {k for k, v in _reused(clean_steps).items() if v}
    for r in sorted(reused):
        if r >= 3 and r - 1 not in reused and r - 2 not in reused:
            return r - 2
    raise AssertionError(f"no reuse after two computed steps: {sorted(reused)}")


def test_trajectory_never_replays_a_nonfinite_residual_or_correction():
    setup = _model()
    for correction in (True, False):
        opts = dict(policy="trajectory", correction=correction, budget=0.4)
        eager, got, g, rec, s = _run(setup, opts, clean=2)
        _check(eager, got, g, rec, s, replayed=not correction)
        # NaN two steps before a reuse: s + 1 is computed (measuring q against the NaN residual
        # when correcting), s + 2 reuses; with the correction, q is not finite and s + 2 recomputes
        eager, got, g, rec, s = _run(setup, opts, _before_measure, clean=2)
        assert _bad(got) == _bad(eager) == [s]
        assert [r.step for r in g.steps[-STEPS:] if r.nonfinite] == ([s + 2] if correction else [])
        if not correction:
            replay(rec.graphs[-1], equal_nan=True, atol=1e-4, rtol=1e-4)


def test_probe_never_replays_a_nonfinite_state():
    setup = _model()

    def pick(steps):           # a step the probe computes after ret_ratio, followed by a reuse
        reused = {r.step for r in steps if "reused" in r.decisions.values()}
        return next(s for s in range(3, STEPS - 2) if s not in reused and s + 1 in reused)

    for align in (True, False):
        eager, got, g, rec, s = _run(setup, dict(policy="probe", num_steps=STEPS, threshold=0.8, align=align), pick)
        assert _bad(got) == _bad(eager) == [s]
        last = g.steps[-STEPS:]
        assert [r.step for r in last if r.nonfinite] == [s + 1]
        assert g.nonfinite_recomputes == 1 and "not finite" in g.to_markdown()
        assert any("reused" in r.decisions.values() for r in last if r.step > s + 1)
        if not align:          # First-Block-Cache reuses in + r_last: the textbook residual cache
            replay(rec.graphs[-1], equal_nan=True, atol=1e-4, rtol=1e-4)


def test_token_and_frame_caches_never_replay_a_nonfinite_row():
    """The merge layer's state (each wrapped region's last output or residual) holds the rows a
    merged call skips: a NaN step must not leave NaN there.  The slot's next call runs the full
    graph instead (equal to the uncached model) and the report counts it."""
    from omnicompile import testing
    flux = dict(num_layers=3, num_single_layers=3)
    cases = [(tiny_flux, flux, dict(token_ratio=0.5, merge_ffn=True, merge_fill="output")),
             (tiny_flux, flux, dict(token_ratio=0.25, merge_ffn=True, merge_fill="residual")),
             (testing.tiny_latte, dict(num_layers=3, frames=4),
              dict(frame_ratio=0.5, block_ratio=0.5, merge_ffn=True, merge_fill="output"))]
    for make, size, opts in cases:
        model, kw = make(**size)
        oc = OmniCache(inner_backend="eager", policy="none", strict=True, **opts)
        compiled = torch.compile(model, backend=oc, fullgraph=True)
        s = 3
        xs = _inputs(kw, s)
        with torch.no_grad():
            eager = _generation(model, kw, xs)
        got = _generation(compiled, kw, xs)
        assert _bad(eager) == [s] and _bad(got) == [s], (opts, _bad(got))
        tc = oc.report().graphs[0].token_cache
        assert tc["nonfinite_refreshes"] == 1 and tc["merged_calls"] == STEPS - 2, (opts, tc)
        # the call after the NaN step ran the full graph: exactly the uncached model's output
        torch.testing.assert_close(got[s + 1], eager[s + 1], atol=1e-5, rtol=1e-5)
        assert "not finite" in oc.report().graphs[0].to_markdown()
        # and a clean generation never refreshes for that reason
        _generation(compiled, kw, _inputs(kw))
        assert oc.report().graphs[0].token_cache["nonfinite_refreshes"] == 1
