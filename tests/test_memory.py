"""Memory: what the backend keeps after compiling and serving a model (issue 15, item 10).

* A deleted model's parameters are freed once Dynamo forgets its code
  (``torch._dynamo.reset()``), whichever policy compiled it, through an ``OmniCache`` object
  the caller still holds or ``backend="omnicache"`` (whose backend objects live in a module
  global); the caches its sessions held go with it.

The models are toys (a few tiny linear blocks): each test takes seconds.
"""
import gc
import weakref

import pytest
import torch
from torch import nn

import omnicompile
from omnicompile import OmniCache


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.mod, self.fc1, self.fc2 = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x, temb):
        return x + self.fc2(torch.relu(self.fc1(x * (1 + self.mod(temb).unsqueeze(1)))))


class _Toy(nn.Module):
    """A DiT-like toy: timestep embedding, four repeated blocks."""

    def __init__(self, d=8, blocks=4):
        super().__init__()
        self.d = d
        self.blocks = nn.ModuleList([_Block(d) for _ in range(blocks)])

    def forward(self, hidden_states, timestep):
        f = torch.exp(-torch.arange(self.d // 2, dtype=torch.float32))
        a = timestep[:, None] * f[None]
        temb = torch.cat([torch.sin(a), torch.cos(a)], -1)
        x = hidden_states
        for b in self.blocks:
            x = b(x, temb)
        return (x,)


class _TokenBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, h):
        b, n, c = h.shape
        q = self.q(h).view(b, n, 2, 4).transpose(1, 2)
        a = nn.functional.scaled_dot_product_attention(q, q, q).transpose(1, 2).reshape(b, n, c)
        return h + self.k(a)


class _TokenToy(nn.Module):
    """Packed tokens the token cache can wrap (its middle block)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_TokenBlock() for _ in range(3)])

    def forward(self, hidden_states, timestep):
        h = hidden_states * timestep.sin()[:, None, None]
        for b in self.blocks:
            h = b(h)
        return (h,)


TS = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]

CASES = {
    "none": ({"policy": "none"}, _Toy),
    "static": ({"policy": "static", "interval": 2, "warmup": 1}, _Toy),
    "probe": ({"policy": "probe", "ret_ratio": 0.1, "threshold": 10.0}, _Toy),
    "trajectory": ({"policy": "trajectory", "budget": 0.3, "min_gap": 1}, _Toy),
    "layered": ({"policy": "layered", "target_speedup": 1.3, "cache_interval": 2}, _Toy),
    "tokens": ({"policy": "none", "token_ratio": 0.5, "merge_ffn": True}, _TokenToy),
}


def _serve(make, backend, options, models=2, generations=2):
    """Compile ``models`` instances of one class (Dynamo shares their graph), run each for
    ``generations`` generations; returns weak references to one parameter of each model."""
    refs = []
    for i in range(models):
        torch.manual_seed(i)
        model = make().eval()
        refs.append(weakref.ref(next(model.parameters())))
        if backend == "object":
            fn = torch.compile(model, backend=options, fullgraph=True)
        else:
            fn = torch.compile(model, backend="omnicache", options=options, fullgraph=True)
        x = torch.randn(1, 16, 8)
        with torch.no_grad():
            for _ in range(generations):
                with omnicompile.generation(timesteps=TS):
                    for t in TS:
                        fn(x, torch.tensor([t]))
        del model, fn
    return refs


def _freed(refs) -> list[bool]:
    torch._dynamo.reset()
    gc.collect()
    return [r() is None for r in refs]


@pytest.mark.parametrize("case", list(CASES))
def test_deleted_models_are_freed_through_an_omnicache_object(case):
    options, make = CASES[case]
    oc = OmniCache(inner_backend="eager", **options)
    refs = _serve(make, "object", oc)
    rep = oc.report()
    assert rep.calls == (2 * 2 * len(TS) if rep.graphs[0].cached else 0)
    if case != "none":
        assert rep.graphs[0].cached, rep.graphs[0].fallback
    assert _freed(refs) == [True, True]
    # the caller still holds the backend object: its report is intact, its caches are gone
    assert oc.report().calls == rep.calls
    assert all(rt.held_bytes() == 0 for rt in oc.runtimes)


@pytest.mark.parametrize("case", ["static", "probe", "trajectory"])
def test_deleted_models_are_freed_through_the_string_backend(case):
    options, make = CASES[case]
    options = {**options, "inner_backend": "eager"}
    refs = _serve(make, "string", options)
    assert omnicompile.last_report().graphs[-1].cached
    assert _freed(refs) == [True, True]


def test_a_live_model_keeps_its_cache_a_deleted_one_drops_it():
    """Two models share one graph: deleting one drops its sessions only."""
    oc = OmniCache(inner_backend="eager", policy="static", interval=2, warmup=1)
    torch.manual_seed(0)
    a, b = _Toy().eval(), _Toy().eval()
    fa, fb = torch.compile(a, backend=oc, fullgraph=True), torch.compile(b, backend=oc, fullgraph=True)
    x = torch.randn(1, 16, 8)
    with torch.no_grad():
        for f in (fa, fb):                                 # no context: one session per model
            f(x, torch.tensor([TS[0]]))
    rt = oc.runtimes[0]
    both = rt.held_bytes()
    assert both > 0 and len(rt.sessions.all()) == 2
    ref = weakref.ref(next(b.parameters()))
    del b, fb, f                       # (no torch._dynamo.reset(): it resets every backend's caches)
    gc.collect()
    assert ref() is None
    assert len(rt.sessions.all()) == 1 and rt.held_bytes() == both // 2
