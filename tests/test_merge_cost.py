"""The cost gate of the token / frame / block caches (``*_ratio="auto"``, omnicompile/merge_cost.py).

The measurements are replaced by a deterministic timer (``merge_cost.TIMER``) wherever a test
decides on them; one test runs the real measurement (the added ops extracted and timed) in strict
mode, so a failure to extract them is a failure, not a refusal.
"""
import pytest
import torch

import omnicompile
from omnicompile import merge_cost, testing
from omnicompile.errors import ConfigError
from omnicompile.graphs.cost import node_bytes, node_flops
from omnicompile.passes import merge as M

STEPS = (1000.0, 750.0, 500.0, 250.0)
S_PER_FLOP = 1e-9          # the fake machine: 1 GFLOP/s ...
S_PER_BYTE = 1e-10         # ... 10 GB/s


def fake_timer(merge_seconds, latency=0.0):
    """A machine with fixed rates (launch latency ``latency`` per op); the added ops of a region
    cost ``merge_seconds``; a region's time is the model's."""
    def timer(kind, nodes, device, given):
        if kind in ("flops", "region"):
            return sum(S_PER_FLOP * node_flops(n) + S_PER_BYTE * node_bytes(n) * (kind == "region")
                       for n in nodes) + latency * len(nodes)
        if kind == "bytes":
            return S_PER_BYTE, latency
        assert kind == "merge" and nodes and all(n.meta.get("omni.merge_op") for n in nodes)
        return merge_seconds
    return timer


def run(model, kw, timer=None, steps=STEPS, monkeypatch=None, **opts):
    if timer is not None:
        monkeypatch.setattr(merge_cost, "TIMER", timer)
    oc = omnicompile.OmniCache(inner_backend="eager", policy="none", merge_exclude=0, **opts)
    cm = torch.compile(model, backend=oc, fullgraph=True)
    with torch.no_grad():
        outs = [cm(**testing.with_timestep(kw, t))[0] for t in steps]
    return outs, oc.report().graphs[0]


def latte():
    return testing.tiny_latte(num_layers=2, frames=4)


def test_auto_is_accepted_and_means_the_papers_ratios():
    opts = M.MergeOptions(token_ratio="auto", frame_ratio=0.5)
    assert opts.enabled and opts.auto("token") and not opts.auto("frame")
    assert opts.ratio("token") == M.AUTO_RATIOS["token"] and opts.ratio("frame") == 0.5
    assert omnicompile.OmniCache(block_ratio="auto").config.merge.ratio("block") == M.AUTO_RATIOS["block"]
    for bad in ("Auto", "fast", None):
        with pytest.raises(ConfigError) as e:
            omnicompile.OmniCache(frame_ratio=bad)
        assert "frame_ratio" in str(e.value) and "'auto'" in str(e.value)


@pytest.mark.parametrize("latency", [0.0, 1e-5])
def test_prediction_is_the_model_at_the_measured_rates(monkeypatch, latency):
    """T_kept = L + (T_full - L) (a F_kept + b B_kept) / (a F_full + b B_full), the saving
    T_full - T_kept - T_merge, per wrapped region (recomputed here from the report's numbers);
    the frame cache of a spatial block keeps kept/rows of its FLOPs (every op runs per frame)."""
    model, kw = latte()
    _, g = run(model, kw, fake_timer(1e-7, latency), monkeypatch=monkeypatch, frame_ratio="auto")
    wrapped = g.token_cache["wrapped"]
    assert g.cached and wrapped and {w["axis"] for w in wrapped} == {"frame"}
    for w in wrapped:
        p = w["predicted"]
        assert w["flops_kept"] == w["flops_full"] * (w["rows"] - w["skipped"]) // w["rows"]
        assert p["s_per_gflop"] == pytest.approx(1.0) and p["s_per_gb"] == pytest.approx(0.1)
        model_full = S_PER_FLOP * w["flops_full"] + S_PER_BYTE * w["bytes_full"]
        model_kept = S_PER_FLOP * w["flops_kept"] + S_PER_BYTE * w["bytes_kept"]
        t_full, fixed = p["full_ms"] / 1e3, p["fixed_ms"] / 1e3
        assert (fixed > 0) == (latency > 0) and fixed <= t_full
        kept = fixed + (t_full - fixed) * model_kept / model_full
        assert p["kept_ms"] == pytest.approx(kept * 1e3) and p["kept_ms"] < p["full_ms"]
        assert p["merge_ms"] == pytest.approx(1e-4)
        assert p["saving_ms"] == pytest.approx(p["full_ms"] - p["kept_ms"] - 1e-4)


def test_auto_refuses_regions_that_cost_more_than_they_save(monkeypatch):
    """Expensive merging: every 'auto' region refused with its numbers, the graph compiled
    unchanged, the output equal to the eager model's; a fixed ratio on another axis stays."""
    model, kw = latte()
    outs, g = run(model, kw, fake_timer(1.0), monkeypatch=monkeypatch, token_ratio="auto", block_ratio="auto")
    assert not g.cached and g.fallback.code == "merge_unprofitable"
    why = [r for r in g.refused if r.code == "merge_unprofitable"]
    assert {r.subject.split(":")[1] for r in why} == {"token", "block"}
    assert all("predicted -" in r.message and "1000.000 ms scoring" in r.message for r in why)
    with torch.no_grad():
        assert torch.equal(outs[0], model(**testing.with_timestep(kw, STEPS[0]))[0])
    outs, g = run(model, kw, fake_timer(1.0), monkeypatch=monkeypatch, token_ratio="auto", block_ratio=0.4)
    axes = {w["axis"] for w in g.token_cache["wrapped"]}
    assert g.cached and axes == {"block"}
    assert all(w["predicted"]["saving_ms"] < 0 for w in g.token_cache["wrapped"])   # predicted, kept: user's ratio
    assert g.token_cache["merged_calls"] > 0


def test_auto_keeps_profitable_regions_and_equals_the_fixed_ratio(monkeypatch):
    """Free merging: 'auto' wraps what the paper's ratio wraps and computes the same outputs."""
    model, kw = latte()
    auto, g_auto = run(model, kw, fake_timer(0.0), monkeypatch=monkeypatch, token_ratio="auto", frame_ratio="auto")
    torch._dynamo.reset()
    fixed, g_fixed = run(model, kw, fake_timer(0.0), monkeypatch=monkeypatch, token_ratio=M.AUTO_RATIOS["token"],
                         frame_ratio=M.AUTO_RATIOS["frame"])
    assert [(w["block"], w["axis"]) for w in g_auto.token_cache["wrapped"]] == \
        [(w["block"], w["axis"]) for w in g_fixed.token_cache["wrapped"]]
    assert g_auto.token_cache["merged_calls"] == g_fixed.token_cache["merged_calls"] > 0
    for a, b in zip(auto, fixed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_real_measurement_times_the_added_ops():
    """No fake timer: the region's matmuls, an add and the rewrite's ops are extracted and timed
    on this machine (strict mode: an extraction bug raises)."""
    model, kw = testing.tiny_latte(num_layers=2, frames=4)
    _, g = run(model, kw, frame_ratio=0.3, block_ratio=0.4, token_ratio=0.2, steps=STEPS[:2])
    preds = [w["predicted"] for w in g.token_cache["wrapped"]]
    assert preds and len(preds) == len(g.token_cache["wrapped"])
    for p in preds:
        assert p["merge_ms"] > 0 and p["full_ms"] > p["kept_ms"] > 0 and 0 < p["fixed_ms"] <= p["full_ms"]
        assert p["s_per_gflop"] >= 0 and p["s_per_gb"] >= 0   # slopes: noise may clamp them to 0 at tiny sizes
    assert "predicted saving ms" in g.to_markdown()


def test_extracted_graph_runs_the_nodes_alone():
    """time_nodes' extraction: a node set with outside inputs runs as its own graph."""
    import torch.fx as fx

    class Two(torch.nn.Module):
        def forward(self, x, y):
            a = x @ y
            return torch.relu(a) + 1

    gm = fx.symbolic_trace(Two())
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            n.meta["example_value"] = torch.empty(8, 8)
    inner = [n for n in gm.graph.nodes if n.op == "call_function"][1:]     # relu, add: input is `a`
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is not torch.relu and n not in inner:
            n.meta["example_value"] = torch.empty(8, 8)
    sub, inputs = merge_cost._extract(inner)
    assert [a.name for a in inputs] == ["matmul"]
    x = torch.randn(8, 8)
    assert torch.equal(sub(x)[0], torch.relu(x) + 1)
    assert merge_cost.time_nodes(inner, "cpu", repeats=1) > 0


def test_every_axis_auto_picks_per_block_the_axis_that_pays(monkeypatch):
    """With every ratio at 'auto' each axis is planned and gated alone: a block the frame cache
    would lose on gets the token cache when that one is predicted to pay (frame wins a block
    only by a larger saving)."""
    from omnicompile.passes.common import Reason

    saving = {"frame": -1.0, "token": 0.5, "block": 2.0}

    def fake_gate(gm, plan, timer=None, strict=False):
        kept, why = [], []
        for w in plan.wraps:
            w.predicted = {"saving_ms": saving[w.axis]}
            if saving[w.axis] > 0:
                kept.append(w)
            else:
                why.append(Reason("merge_unprofitable", "fake", f"{w.block}:{w.axis}"))
        return kept, why

    monkeypatch.setattr(merge_cost, "gate", fake_gate)
    model, kw = latte()
    _, g = run(model, kw, token_ratio="auto", frame_ratio="auto", block_ratio="auto")
    got = {(w["block"].split(".")[0], w["axis"]) for w in g.token_cache["wrapped"]}
    assert got == {("transformer_blocks", "token"), ("temporal_transformer_blocks", "block")}
    assert any(r.code == "merge_unprofitable" and r.subject.endswith(":frame") for r in g.refused)
    saving["frame"] = 1.0                       # now the frame cache saves more than the token cache
    torch._dynamo.reset()
    _, g = run(model, kw, token_ratio="auto", frame_ratio="auto", block_ratio="auto")
    assert {w["axis"] for w in g.token_cache["wrapped"] if w["block"].startswith("transformer_blocks")} == {"frame"}


def test_a_saving_inside_the_margin_is_refused(monkeypatch):
    """'auto' wants the predicted saving above MARGIN of the region's time: a region predicted to
    save half of that is refused, one predicted to save twice that is kept."""
    model, kw = latte()
    _, g = run(model, kw, fake_timer(0.0), monkeypatch=monkeypatch, frame_ratio="auto")
    p = g.token_cache["wrapped"][0]["predicted"]
    for share, kept in ((0.5, False), (2.0, True)):
        merge_s = (p["full_ms"] - p["kept_ms"] - share * merge_cost.MARGIN * p["full_ms"]) / 1e3
        torch._dynamo.reset()
        _, g = run(model, kw, fake_timer(merge_s), monkeypatch=monkeypatch, frame_ratio="auto")
        assert g.cached == kept, (share, g.refused)
