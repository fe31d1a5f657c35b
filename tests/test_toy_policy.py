"""The plugin policy of ``toy_policy.py`` runs end to end through the public protocol alone:
a sampling loop equals the plain-PyTorch reference executing the same decisions, and
``report()``, ``omnicache explain`` and ``omnicache dump`` work for it."""
import json

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import toy_policy  # noqa: F401  (registers "toy-tail")
from omnicompile import OmniCache
from omnicompile.cli import main
from omnicompile.config import OmniCacheConfig
from omnicompile.testing import tiny_flux
from reference_cache import FluxResidualCache

STEPS = 9


def sample(model_fn, kw, on_call=None):
    sched = FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(STEPS)
    x = torch.randn(kw["hidden_states"].shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            if on_call:
                on_call(i)
            v = model_fn(**dict(kw, hidden_states=x, timestep=torch.full((1,), float(t) / 1000.0)))[0]
            x = sched.step(v, t, x).prev_sample
    return x


@pytest.mark.parametrize("guard", ["variants", "cond"])
def test_toy_policy_matches_its_reference(guard):
    model, kw = tiny_flux(num_layers=2, num_single_layers=2)
    policy = toy_policy.TailPolicy(OmniCacheConfig(policy="toy-tail", warmup=2))
    tail = [policy.reuse_tail(i, None) for i in range(STEPS)]
    assert any(tail) and not all(tail)

    ref_cache = FluxResidualCache(model)
    with ref_cache:
        ref = sample(model, kw, on_call=lambda i: ref_cache.begin(i, 0, {"single_transformer_blocks": tail[i]}))
    plain = sample(model, kw)

    oc = OmniCache(policy="toy-tail", warmup=2, inner_backend="eager", guard=guard)
    got = sample(torch.compile(model, backend=oc, fullgraph=True), kw)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-4)

    g = oc.report().graphs[0]
    assert g.cached and g.guard == guard and g.policy == {"policy": "toy-tail", "warmup": 2}
    first, last = [s.name for s in g.spans]
    for rec in g.steps:
        assert rec.decisions[first] == "computed"
        assert rec.decisions[last] == ("reused" if tail[rec.step] else "computed")
    assert "toy-tail" in str(oc.report()) and "toy-tail" in oc.report().to_markdown()
    # the preview comes from the same rules as the run
    preview = oc.runtimes[0].preview(STEPS)
    assert preview.marks(1) == "".join("R" if policy.reuse_tail(i, STEPS) else "C" for i in range(STEPS))
    assert set(preview.marks(0)) == {"C"}


def test_toy_policy_explain_and_dump(tmp_path, capsys):
    opts = json.dumps({"policy": "toy-tail", "inner_backend": "eager"})
    assert main(["explain", "omnicompile.testing:tiny_flux", "--options", opts, "--steps", "10", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    (graph,) = d["graphs"]
    marks = list(graph["plan"]["marks"].values())
    assert marks[0] == "C" * 10 and marks[1] == "CCRCRCRCRC"
    assert main(["dump", "omnicompile.testing:tiny_flux", "--options", opts, "--out", str(tmp_path),
                 "--render", "none"]) == 0
    plan = json.loads((tmp_path / "graph0_plan.json").read_text())
    assert list(plan["marks"].values())[1].startswith("CCRCRC")
    assert (tmp_path / "graph0_after_variant_CR.py").exists() and (tmp_path / "index.html").exists()
