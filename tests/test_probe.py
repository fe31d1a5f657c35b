"""Policy `probe` (DiCache) decided inside the graph, against a plain-PyTorch reference."""
import contextlib

import pytest
import torch

import omnicompile
from omnicompile import ConfigError, OmniCache
from omnicompile.testing import tiny_flux, with_timestep
from reference_cache import FluxProbeCache
from test_sampling import sample

STEPS = 12


def _uncond(kw):
    return dict(kw, encoder_hidden_states=torch.zeros_like(kw["encoder_hidden_states"]),
                pooled_projections=torch.zeros_like(kw["pooled_projections"]))


def _force(step, ret_ratio=0.2, n=STEPS):
    return step <= int(ret_ratio * n) or step == n - 1


@pytest.mark.parametrize("opts", [
    dict(probe_depth=1, threshold=0.6, error="delta_y", align=True),
    dict(probe_depth=2, threshold=0.3, error="delta_minus", align=True),
    dict(probe_depth=1, threshold=0.6, error="delta_y", align=False),
], ids=["depth1-align", "depth2-minus", "fbcache"])
def test_probe_matches_reference_sampler(opts):
    model, kw = tiny_flux(num_layers=3, num_single_layers=2)
    uncond = _uncond(kw)
    ref = FluxProbeCache(model, probe_depth=opts["probe_depth"], threshold=opts["threshold"],
                         error=opts["error"], align=opts["align"])
    with ref:
        want = sample(model, kw, uncond, steps=STEPS, on_call=lambda i, slot: ref.begin(i, slot, _force(i)))
    oc = OmniCache(policy="probe", ret_ratio=0.2, num_steps=STEPS, inner_backend="eager", **opts)
    got = sample(torch.compile(model, backend=oc, fullgraph=True), kw, uncond, steps=STEPS)
    g = oc.report().graphs[0]
    ours = [(s.step, s.slot, set(s.decisions.values()) == {"reused"}) for s in g.steps]
    assert ours == ref.decisions
    assert any(r for _, _, r in ours) and not all(r for _, _, r in ours)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the probe signal is recorded on the steps the probe decided
    assert any("error" in s.signals for s in g.steps)


def test_probe_with_inductor_equals_eager_rewrite():
    model, kw = tiny_flux(num_layers=3, num_single_layers=2)
    uncond = _uncond(kw)
    opts = dict(policy="probe", threshold=0.6, num_steps=STEPS)
    a = sample(torch.compile(model, backend=OmniCache(inner_backend="eager", **opts), fullgraph=True),
               kw, uncond, steps=STEPS)
    torch._dynamo.reset()
    oc = OmniCache(**opts)
    b = sample(torch.compile(model, backend=oc, fullgraph=True), kw, uncond, steps=STEPS)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert oc.report().graphs[0].hit_rate > 0


def test_probe_state_resets_between_generations():
    model, kw = tiny_flux()
    uncond = _uncond(kw)
    oc = OmniCache(policy="probe", threshold=0.6, num_steps=STEPS, inner_backend="eager")
    fn = torch.compile(model, backend=oc, fullgraph=True)
    a = sample(fn, kw, uncond, steps=STEPS)
    b = sample(fn, kw, uncond, steps=STEPS)
    torch.testing.assert_close(a, b)
    g = oc.report().graphs[0]
    first = [s.decisions for s in g.steps if s.generation == 0]
    second = [s.decisions for s in g.steps if s.generation == 1]
    assert first == second and g.generations == 2


def test_probe_threshold_zero_like_never_reuses():
    model, kw = tiny_flux()
    oc = OmniCache(policy="probe", threshold=1e-9, num_steps=8, inner_backend="eager")
    fn = torch.compile(model, backend=oc, fullgraph=True)
    with torch.no_grad():
        for i in range(8):
            k = with_timestep(kw, 1.0 - i / 8)
            torch.testing.assert_close(fn(**k)[0], model(**k)[0], rtol=1e-5, atol=1e-5)
    assert oc.report().graphs[0].hit_rate == 0


def test_probe_refuses_when_nothing_is_left_to_skip():
    model, kw = tiny_flux(num_layers=2, num_single_layers=0)
    oc = OmniCache(policy="probe", probe_depth=2, inner_backend="eager")
    with torch.no_grad():
        out = torch.compile(model, backend=oc, fullgraph=True)(**kw)[0]
    torch.testing.assert_close(out, model(**kw)[0])
    assert oc.report().graphs[0].fallback.code == "nothing_after_probe"


@pytest.mark.parametrize("fields, field", [
    ({"threshold": 0}, "threshold"), ({"threshold": "a"}, "threshold"),
    ({"probe_depth": 0}, "probe_depth"), ({"ret_ratio": 1.0}, "ret_ratio"),
    ({"error": "l2"}, "error"), ({"align": 1}, "align"), ({"align_clip": (2, 1)}, "align_clip"),
    ({"guard": "variants"}, "guard"),
])
def test_probe_config_errors(fields, field):
    with pytest.raises(ConfigError) as e:
        OmniCache(policy="probe", **fields)
    assert e.value.field == field


@pytest.mark.parametrize("how", ["num_steps", "context", "learned", "unknown"])
def test_probe_reuses_with_rising_timesteps_like_falling(how):
    """Samplers whose timestep rises (t from 0 to 1) reuse the same steps as falling ones: the
    forced-compute rule is by step index, with the step count from ``num_steps``, a generation
    context, or (``learned``) the bare loop's previous generation; a first bare generation
    (``unknown``) does not know its last step and reuses nothing, either way.  The rule used
    to measure the start of sampling on the timestep when the count was unknown, ``1 - t / t0``
    with ``t0`` the generation's first timestep — 0 when rising from 0: every step forced, a
    hit rate of 0 where 1 -> 0 reused 0.75."""
    model, kw = tiny_flux()
    n = 8
    reused = {}
    for direction, ts in (("falling", [1.0 - i / n for i in range(n)]), ("rising", [i / n for i in range(n)])):
        torch._dynamo.reset()
        opts = dict(policy="probe", threshold=100.0, ret_ratio=0.2, inner_backend="eager")   # the probe always agrees
        if how == "num_steps":
            opts["num_steps"] = n
        oc = OmniCache(**opts)
        fn = torch.compile(model, backend=oc, fullgraph=True)
        for _ in range(2 if how == "learned" else 1):     # learned: the first bare generation has no count
            ctx = omnicompile.generation(timesteps=ts) if how == "context" else contextlib.nullcontext()
            with torch.no_grad(), ctx:
                for t in ts:
                    fn(**with_timestep(kw, t))
        last = [s for s in oc.report().graphs[0].steps if s.generation == (1 if how == "learned" else 0)]
        assert [s.step for s in last] == list(range(n))
        reused[direction] = [s.step for s in last if set(s.decisions.values()) == {"reused"}]
    want = [] if how == "unknown" else [s for s in range(n) if not _force(s, n=n)]
    assert reused["rising"] == reused["falling"] == want
