"""Memory: what the backend keeps after compiling and serving a model (issue 15, items 10-11).

* A deleted model's parameters are freed once Dynamo forgets its code
  (``torch._dynamo.reset()``), whichever policy compiled it, through an ``OmniCache`` object
  the caller still holds or ``backend="omnicache"`` (whose backend objects live in a module
  global); the caches its sessions held go with it.
* Per-call bookkeeping is bounded: thousands of calls keep the report's detail to the last
  ``report_generations`` generations and the probe's unread device records to one generation,
  while the totals stay exact.

The models are toys (a few tiny linear blocks) so that thousands of calls take seconds.
"""
import gc
import weakref

import pytest
import torch
from torch import nn

import omnicompile
from omnicompile import OmniCache
from omnicompile.errors import ConfigError
from omnicompile.report import Report


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


# ----------------------------------------------------------------------------- item 11: bounded bookkeeping


STEPS10 = [1.0 - 0.09 * i for i in range(10)]


def _generations(fn, n, steps=STEPS10, watch=None):
    x = torch.randn(1, 16, 8)
    peak = 0
    with torch.no_grad():
        for _ in range(n):
            with omnicompile.generation(timesteps=steps):
                for t in steps:
                    fn(x, torch.tensor([t]))
                    if watch is not None:
                        peak = max(peak, watch())
    return peak


def test_static_report_detail_is_bounded_and_totals_exact():
    """2,000 calls (200 generations of 10 steps): the report keeps 8 generations in detail, the
    totals count every call; the text and JSON say detail was dropped."""
    torch.manual_seed(0)
    oc = OmniCache(inner_backend="eager", policy="static", interval=2, warmup=2)
    fn = torch.compile(_Toy().eval(), backend=oc, fullgraph=True)
    _generations(fn, 200)
    rep = oc.report()
    g = rep.graphs[0]
    n_spans = len(g.spans)
    reused_steps = [s for s in range(10) if s >= 2 and (s - 2) % 2 != 1]     # 2, 4, 6, 8
    assert g.calls == 2000 and g.generations == 200
    assert len(g.steps) == 8 * 10 and {r.generation for r in g.steps} == set(range(192, 200))
    assert g.dropped_calls == 1920 and g.dropped["generations"] == 192
    assert g.span_decisions == (200 * (10 - len(reused_steps)) * n_spans, 200 * len(reused_steps) * n_spans)
    assert g.flops_saved == 200 * len(reused_steps) * sum(s.flops for s in g.spans)
    assert g.hit_rate == pytest.approx(len(reused_steps) / 10)
    assert "1920 earlier call(s) (192 generation(s)) are counted in the totals only" in str(rep)
    assert "1920 earlier call(s)" in rep.to_markdown()
    back = Report.from_json(rep.to_json())
    assert back.to_json() == rep.to_json()
    assert back.graphs[0].calls == 2000 and back.graphs[0].flops_saved == g.flops_saved
    assert [r["generation"] for r in g.timeline()][::10] == list(range(192, 200))
    # the generation log (256 generations) keeps each generation's exact totals
    assert [r.calls for r in g.generation_log] == [10] * 200
    assert sum(r.flops_saved for r in g.generation_log) == g.flops_saved


def test_report_generations_option():
    torch.manual_seed(0)
    oc = OmniCache(inner_backend="eager", policy="static", report_generations=2)
    fn = torch.compile(_Toy().eval(), backend=oc, fullgraph=True)
    _generations(fn, 5)
    g = oc.report().graphs[0]
    assert g.calls == 50 and len(g.steps) == 20 and g.dropped_calls == 30
    for bad in (0, -1, 2.5, True, None):
        with pytest.raises(ConfigError, match="report_generations"):
            OmniCache(report_generations=bad)


def test_probe_pending_records_are_read_per_generation():
    """The probe's device records wait at most one generation (read at the next one's start),
    the report keeps 8 generations; totals and signal counts are exact."""
    torch.manual_seed(0)
    oc = OmniCache(inner_backend="eager", policy="probe", ret_ratio=0.1, threshold=10.0)
    fn = torch.compile(_Toy().eval(), backend=oc, fullgraph=True)
    def pending():
        return len(oc.runtimes[0].pending)
    peak = _generations(fn, 30, watch=pending)
    rt = oc.runtimes[0]
    assert peak <= 10
    g = oc.report().graphs[0]
    assert not rt.pending
    assert g.calls == 300 and len(g.steps) == 80 and g.dropped_calls == 220
    # steps 0, 1 (ret_ratio) and 9 (the last) are forced; the probe decides the 7 others: with
    # threshold 10 it reuses every one of them
    c, r = g.span_decisions
    assert r == 30 * 7 * len(g.spans) and c == 30 * 3 * len(g.spans)
    assert g.signal_stats()["error"]["count"] == 30 * 7


def test_probe_pending_is_bounded_within_one_generation(monkeypatch):
    """A generation longer than MAX_PENDING calls reads its records every MAX_PENDING calls."""
    import omnicompile.policies.probe as P
    monkeypatch.setattr(P, "MAX_PENDING", 4)
    torch.manual_seed(0)
    oc = OmniCache(inner_backend="eager", policy="probe", ret_ratio=0.1)
    fn = torch.compile(_Toy().eval(), backend=oc, fullgraph=True)
    steps = [1.0 - 0.03 * i for i in range(30)]
    peak = _generations(fn, 1, steps=steps, watch=lambda: len(oc.runtimes[0].pending))
    assert peak < 4
    assert oc.report().graphs[0].calls == 30


def test_report_folds_old_detail_exactly():
    """Pure: what leaves the detail is folded into the totals exactly, within one endless
    generation too (DETAIL_CALLS_PER_GENERATION), signals included."""
    from omnicompile.report import DETAIL_CALLS_PER_GENERATION, GraphReport, StepRecord
    g = GraphReport(0, 10, True, {"policy": "static"}, flops_per_call=100, report_generations=1)
    n = DETAIL_CALLS_PER_GENERATION + 44
    for s in range(n):
        reuse = s % 3 == 2
        g.add_step(StepRecord(0, s, 0, 1.0 - s / n, {"a": "reused" if reuse else "computed"}, 60 if reuse else 0,
                              signals={"error": float(s)}, uncertain="late" if s == 1 else ""))
    assert len(g.steps) == DETAIL_CALLS_PER_GENERATION and g.steps[0].step == 44
    assert g.calls == n and g.dropped_calls == 44 and g.dropped["generations"] == 0
    reused = sum(s % 3 == 2 for s in range(n))
    assert g.span_decisions == (n - reused, reused) and g.flops_saved == 60 * reused
    assert g.uncertain_calls == 1 and g.first_uncertain == "late"
    st = g.signal_stats()["error"]
    assert (st["count"], st["min"], st["max"]) == (n, 0.0, n - 1.0)
    assert st["mean"] == pytest.approx((n - 1) / 2)
    g.add_step(StepRecord(1, 0, 0, 1.0, {"a": "computed"}, 0))          # a new generation: the old one folds
    assert [r.generation for r in g.steps] == [1] and g.calls == n + 1 and g.dropped["generations"] == 1
