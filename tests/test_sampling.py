"""A static schedule over a real sampling loop equals a plain-PyTorch reference sampler
that reuses the same residuals at the same steps (diffusers FlowMatchEulerDiscreteScheduler)."""
import contextlib

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import omnicompile

from omnicompile import OmniCache
from omnicompile.policies.static import StaticPolicy
from omnicompile.config import OmniCacheConfig
from omnicompile.testing import tiny_flux
from reference_cache import FluxResidualCache

STEPS = 12


def sample(model_fn, kw, uncond, steps=STEPS, guidance=3.0, on_call=None, cfg="split", context=True):
    """A diffusers scheduler loop, inside a generation context driven by the scheduler (as
    ``compile_pipeline`` runs a pipeline) unless ``context=False`` (a bare loop)."""
    sched = FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(steps)
    x = torch.randn(kw["hidden_states"].shape, generator=torch.Generator().manual_seed(1))
    gen = omnicompile.generation(scheduler=sched) if context else contextlib.nullcontext()
    with torch.no_grad(), gen:
        for i, t in enumerate(sched.timesteps):
            ts = torch.full((x.shape[0],), float(t) / 1000.0)
            if cfg == "split":
                if on_call:
                    on_call(i, 0)
                c = model_fn(**dict(kw, hidden_states=x, timestep=ts))[0]
                if on_call:
                    on_call(i, 1)
                u = model_fn(**dict(uncond, hidden_states=x, timestep=ts))[0]
            else:
                both = {k: (torch.cat([uncond[k], kw[k]]) if k in ("encoder_hidden_states", "pooled_projections")
                            else v) for k, v in kw.items()}
                both.update(hidden_states=torch.cat([x, x]), timestep=torch.cat([ts, ts]))
                u, c = model_fn(**both)[0].chunk(2)
            v = u + guidance * (c - u)
            x = sched.step(v, t, x).prev_sample
    return x


@pytest.mark.parametrize("options", [
    {"interval": 2, "warmup": 2},
    {"interval": 3, "warmup": 3, "cooldown": 2, "num_steps": STEPS},
    {"reuse_steps": [3, 5, 6, 9]},
], ids=["interval2", "interval3-cooldown", "explicit"])
def test_static_sampler_matches_reference(options):
    model, kw = tiny_flux(num_layers=2, num_single_layers=2)
    uncond = dict(kw, encoder_hidden_states=torch.zeros_like(kw["encoder_hidden_states"]),
                  pooled_projections=torch.zeros_like(kw["pooled_projections"]))
    policy = StaticPolicy(OmniCacheConfig(policy="static", **options))
    reuse = [policy.is_reuse_step(i, STEPS) for i in range(STEPS)]
    assert any(reuse) and not all(reuse)

    ref_cache = FluxResidualCache(model)
    with ref_cache:
        ref = sample(model, kw, uncond, on_call=lambda i, slot: ref_cache.begin(i, slot, reuse[i]))
    plain = sample(model, kw, uncond)

    oc = OmniCache(policy="static", inner_backend="eager", **options)
    got = sample(torch.compile(model, backend=oc, fullgraph=True), kw, uncond)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-4)  # the cache did change the result
    g = oc.report().graphs[0]
    assert len(g.steps) == 2 * STEPS
    for rec in g.steps:
        want = "reused" if reuse[rec.step] else "computed"
        assert set(rec.decisions.values()) == {want}


def test_batched_cfg_matches_split_cfg_without_reuse():
    model, kw = tiny_flux()
    uncond = dict(kw, encoder_hidden_states=torch.zeros_like(kw["encoder_hidden_states"]),
                  pooled_projections=torch.zeros_like(kw["pooled_projections"]))
    oc = OmniCache(policy="static", interval=1, inner_backend="eager")
    fn = torch.compile(model, backend=oc, fullgraph=True)
    a = sample(fn, kw, uncond, steps=10, cfg="batched")
    b = sample(model, kw, uncond, steps=10, cfg="split")
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
