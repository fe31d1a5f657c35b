"""Report exports: JSON round trip, Markdown, per-step timeline, signal statistics.

Pure tests build ``GraphReport`` objects by hand; one test reads the report of a real
backend run (a toy DiT, eager inner backend, CFG as two calls per step)."""
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import omnicompile
from omnicompile import OmniCache
from omnicompile.passes.common import Reason
from omnicompile.report import GraphReport, Report, SpanReport, StepRecord, percentile


def _graph(**kw) -> GraphReport:
    g = GraphReport(graph_id=3, nodes=120, cached=True, policy={"policy": "static", "interval": 2},
                    guard="variants", inner_backend="eager", timestep_input="l_timestep_",
                    block_lists=[{"name": "blocks", "count": 2, "method": "module_path", "nodes_per_block": [9, 9]}],
                    spans=[SpanReport("blocks[0:2]", 2, ["x"], ["temb"], 800)],
                    refused=[Reason("partial_list", "members differ", "extra")], flops_per_call=1000,
                    cache_bytes=2048, generations=1)
    for k, v in kw.items():
        setattr(g, k, v)
    return g


def _rec(step, slot, t, decision, forced=(), signals=None, gen=0):
    saved = 800 if decision == "reused" else 0
    return StepRecord(gen, step, slot, t, {"blocks[0:2]": decision}, saved, list(forced), dict(signals or {}))


def test_timeline_groups_slots_per_step():
    g = _graph(steps=[_rec(0, 0, 1.0, "computed"), _rec(0, 1, 1.0, "computed"),
                      _rec(1, 0, 0.9, "reused"), _rec(1, 1, 0.9, "computed", forced=["blocks[0:2]"]),
                      _rec(2, 0, 0.8, "reused"), _rec(2, 1, 0.8, "reused")])
    rows = g.timeline()
    assert [(r["step"], r["calls"], r["decisions"]["blocks[0:2]"]) for r in rows] == \
        [(0, 2, "CC"), (1, 2, "RF"), (2, 2, "RR")]
    assert [r["flops_saved"] for r in rows] == [0, 800, 1600]
    assert rows[2]["flops_saved_fraction"] == pytest.approx(1600 / 2000)
    assert (rows[1]["reused"], rows[1]["computed"]) == (1, 1)
    assert g.hit_rate == pytest.approx(3 / 6)


def test_timeline_selects_a_generation():
    g = _graph(steps=[_rec(0, 0, 1.0, "computed"), _rec(1, 0, 0.5, "reused"),
                      _rec(0, 0, 1.0, "computed", gen=1)], generations=2)
    assert [r["generation"] for r in g.timeline()] == [0, 0, 1]
    assert [r["step"] for r in g.timeline(generation=1)] == [0]


def test_percentile_matches_numpy():
    vals = [0.3, 0.1, 0.9, 0.5, 0.7, 0.2, 0.25]
    for p in (0, 10, 50, 90, 99, 100):
        assert percentile(vals, p) == pytest.approx(float(np.percentile(vals, p)))
    assert percentile([4.0], 90) == 4.0
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_signal_stats():
    errs = [0.05, 0.2, 0.1, float("nan"), 0.4]
    g = _graph(steps=[_rec(i, 0, 1.0 - i / 10, "reused", signals={"error": e, "gamma": 1.0})
                      for i, e in enumerate(errs)] + [_rec(5, 0, 0.4, "computed")])
    st = g.signal_stats()
    finite = [e for e in errs if math.isfinite(e)]
    assert st["error"]["count"] == 4
    assert st["error"]["mean"] == pytest.approx(sum(finite) / 4)
    assert st["error"]["p50"] == pytest.approx(float(np.percentile(finite, 50)))
    assert st["error"]["p90"] == pytest.approx(float(np.percentile(finite, 90)))
    assert (st["error"]["min"], st["error"]["max"]) == (0.05, 0.4)
    assert st["gamma"]["p99"] == 1.0
    assert _graph().signal_stats() == {}


def test_json_round_trip_and_strictness():
    fb = _graph(graph_id=4, cached=False, fallback=Reason("no_timestep", "no timestep input"), spans=[])
    rep = Report([_graph(steps=[_rec(0, 0, float("nan"), "computed"),
                                _rec(1, 0, 0.5, "reused", signals={"error": 0.1})]), fb])
    text = rep.to_json()
    d = json.loads(text)                       # strict JSON: NaN became a string
    assert d["graphs"][0]["steps"][0]["timestep"] == "nan"
    assert d["summary"]["graphs"] == 2 and d["summary"]["cached_graphs"] == 1
    assert d["graphs"][0]["summary"]["hit_rate"] == pytest.approx(0.5)
    assert d["graphs"][0]["timeline"][1]["decisions"] == {"blocks[0:2]": "R"}
    assert d["graphs"][0]["signal_stats"]["error"]["count"] == 1
    assert d["graphs"][1]["fallback"] == {"code": "no_timestep", "message": "no timestep input", "subject": ""}
    back = Report.from_json(text)
    assert back.to_json() == text
    assert isinstance(back.graphs[1].fallback, Reason) and back.graphs[1].fallback.code == "no_timestep"
    assert isinstance(back.graphs[0].steps[1], StepRecord) and back.graphs[0].steps[1].signals == {"error": 0.1}
    assert math.isnan(back.graphs[0].steps[0].timestep)
    assert back.graphs[0].hit_rate == rep.graphs[0].hit_rate
    assert json.loads(rep.to_json(indent=None)) == d


def _report_dict():
    return json.loads(Report([_graph(steps=[_rec(0, 0, 1.0, "computed"), _rec(1, 0, 0.5, "reused")])]).to_json())


def _edit(path, value):
    """A copy of the report's dict with the field at ``path`` (keys and indices) replaced, or
    deleted when ``value`` is KeyError."""
    d = _report_dict()
    node = d
    for k in path[:-1]:
        node = node[k]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return json.dumps(d)


@pytest.mark.parametrize("text, words", [
    ("[]", "expected a JSON object with 'graphs', got a list"),
    ('{"graphs": 5}', "field 'graphs': got a number (5); expected a list"),
    ("{}", "field 'graphs' is missing"),
    ('{"graphs": [{}]}', "field 'graphs[0].graph_id' is missing"),
    ('{"graphs": [[]]}', "field 'graphs[0]': got a list; expected an object (GraphReport)"),
    ('{"graphs": [], "summary": []}', "field 'summary'"),
    ('{"graphs": [], "summary": {"warnings": "w"}}', "field 'summary.warnings'"),
    ("{not json", "report JSON is not valid JSON"),
    (b'{"graphs": ["\xff"]}', "not UTF-8 text: byte 0xff"),
    ("[" * 1000 + "]" * 1000, "deeper than 64 levels"),
    (_edit(["graphs", 0, "nodes"], "120"), "field 'graphs[0].nodes': got '120'; expected an integer >= 0"),
    (_edit(["graphs", 0, "cached"], 1), "field 'graphs[0].cached': got a number (1); expected true or false"),
    (_edit(["graphs", 0, "steps", 1, "slot"], -1), "field 'graphs[0].steps[1].slot'"),
    (_edit(["graphs", 0, "steps", 1, "timestep"], "soon"), "field 'graphs[0].steps[1].timestep'"),
    (_edit(["graphs", 0, "steps", 1, "decisions"], ["R"]), "field 'graphs[0].steps[1].decisions'"),
    (_edit(["graphs", 0, "steps", 0, "step"], KeyError), "field 'graphs[0].steps[0].step' is missing"),
    (_edit(["graphs", 0, "spans", 0, "streams"], "x"), "field 'graphs[0].spans[0].streams'"),
    (_edit(["graphs", 0, "refused", 0], {"code": "x"}), "field 'graphs[0].refused[0].message' is missing"),
    (_edit(["graphs", 0, "policy"], None), "field 'graphs[0].policy'"),
])
def test_from_json_names_what_is_wrong(text, words):
    with pytest.raises(omnicompile.ReportError) as e:
        Report.from_json(text)
    assert words in str(e.value)
    assert isinstance(e.value, ValueError)
    assert Report.from_json(json.dumps(_report_dict())).graphs[0].steps[1].decisions == {"blocks[0:2]": "reused"}


def test_markdown():
    g = _graph(steps=[_rec(0, 0, 1.0, "computed"), _rec(1, 0, 0.9, "reused", signals={"error": 0.2})])
    fb = _graph(graph_id=4, cached=False, fallback=Reason("no_blocks", "no repeated | blocks"), spans=[], steps=[])
    md = Report([g, fb]).to_markdown()
    assert md.startswith("# omnicache report")
    assert "| 3 | 120 | cached (variants) | `static interval=2` | 2 | 50.0% | 40.0% | 2.0 KiB |" in md
    assert "unchanged: `no_blocks`" in md and "no repeated \\| blocks" in md    # pipes escaped
    assert "| `blocks` | 2 | module_path | 9 |" in md
    assert "| `blocks[0:2]` | 2 | x | temb | 0.001 |" in md
    assert "- `partial_list` extra: members differ" in md
    assert "| 1 | 1 | 0.9000 | 1 | R | 80% |" in md          # generations read from 1 in text
    assert "| `error` | 1 |" in md
    assert "## graph 4" in md
    assert Report([]).to_markdown().endswith("no graph compiled yet\n")


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.mod, self.fc1, self.fc2 = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x, temb):
        return x + self.fc2(torch.relu(self.fc1(x * (1 + self.mod(temb).unsqueeze(1)))))


class _Toy(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.d = d
        self.blocks = nn.ModuleList([_Block(d) for _ in range(3)])

    def forward(self, hidden_states, timestep):
        f = torch.exp(-torch.arange(self.d // 2, dtype=torch.float32))
        a = timestep[:, None] * f[None]
        temb = torch.cat([torch.sin(a), torch.cos(a)], -1)
        x = hidden_states
        for b in self.blocks:
            x = b(x, temb)
        return x


def test_report_of_a_real_run_with_cfg_slots():
    torch.manual_seed(0)
    model = _Toy().eval()
    oc = OmniCache(inner_backend="eager", interval=2, warmup=1)
    fn = torch.compile(model, backend=oc, fullgraph=True)
    x = torch.randn(1, 4, 8)
    with torch.no_grad(), omnicompile.generation(timesteps=[1.0, 0.8, 0.6, 0.4]):
        for t in (1.0, 0.8, 0.6, 0.4):
            for _ in range(2):                 # cond and uncond as two calls: two cache slots
                fn(x, torch.tensor([t]))
    rep = oc.report()
    (g,) = rep.graphs
    assert g.cached and g.calls == 8
    rows = g.timeline()
    assert [r["decisions"]["blocks[0:3]"] for r in rows] == ["CC", "RR", "CC", "RR"]
    assert [r["calls"] for r in rows] == [2, 2, 2, 2]
    assert g.hit_rate == pytest.approx(0.5) and rep.hit_rate == g.hit_rate
    assert rep.flops_saved == g.flops_saved == 4 * g.spans[0].flops
    assert rep.cache_bytes == g.cache_bytes == 2 * 4 * 8 * 4   # one residual [1, 4, 8] fp32 per slot
    d = json.loads(rep.to_json())
    assert d["summary"]["calls"] == 8 and d["graphs"][0]["summary"]["cache_bytes"] == g.cache_bytes
    assert Report.from_json(rep.to_json()).to_json() == rep.to_json()
    md = rep.to_markdown()
    frac = g.spans[0].flops / g.flops_per_call
    assert f"| 1 | 1 | 0.8000 | 2 | RR | {frac:.0%} |" in md
    assert "generation 1 of 1:" in str(rep)      # the first of one generation, not "0 of 1"
