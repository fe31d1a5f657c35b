"""Analysis passes on real diffusers architectures (tiny configs, random weights)."""
import pytest
import torch

from omnicompile.passes.blocks import find_blocks
from omnicompile.passes.common import normalize_module_path
from omnicompile.passes.spans import find_spans, make_span
from omnicompile.testing import TINY_MODELS

from conftest import trace


@pytest.mark.parametrize("raw, want", [
    ("L['self'].__dict__['_modules']['transformer_blocks'].0", "transformer_blocks.0"),
    ("L['self'].transformer_blocks.3.attn", "transformer_blocks.3.attn"),
    ("L['self']._modules['blocks']._modules['1']", "blocks.1"),
    ("L['model'].blocks.2", "model.blocks.2"),
])
def test_normalize_module_path(raw, want):
    assert normalize_module_path(raw) == want


EXPECTED = {
    # model: [(list name, blocks found)], [(span, live streams)], refused codes
    "flux": ([("transformer_blocks", 2), ("single_transformer_blocks", 2)],
             [("transformer_blocks[0:2]", 2), ("single_transformer_blocks[0:2]", 1)], set()),
    # the last block (no context output) is cached with the list: its dead context stream dropped
    "sd3": ([("transformer_blocks", 2)], [("transformer_blocks[0:3]", 1)], {"odd_tail"}),
    "wan": ([("blocks", 2)], [("blocks[0:2]", 1)], set()),
    # the control branch computes hints (not streams: nothing flows from VACE block 0's input
    # projection to block 1); the hints added after blocks 0 and 2 are side additions
    "wan_vace": ([("vace_blocks", 2), ("blocks", 4)], [("blocks[0:4]", 1)], {"no_streams"}),
    "latte": ([("transformer_blocks", 2), ("temporal_transformer_blocks", 2)],
              [("transformer_blocks+temporal_transformer_blocks[0:2]", 1)], set()),
    "dit": ([("transformer_blocks", 2)], [("transformer_blocks[0:2]", 1)], set()),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_blocks_streams_spans(name):
    model, kw = TINY_MODELS[name]()
    gm, _ = trace(model, kw)
    blocks = find_blocks(gm)
    assert [(bl.name, len(bl)) for bl in blocks.lists] == EXPECTED[name][0]
    analysis = find_spans(gm, blocks)
    assert [(s.name, len(s.live_streams)) for s in analysis.spans] == EXPECTED[name][1]
    assert {r.code for r in blocks.reasons + analysis.refused} == EXPECTED[name][2]
    assert analysis.timestep is not None and "timestep" in analysis.timestep.name
    for s in analysis.spans:
        for st in s.live_streams:
            assert st.input.meta["example_value"].shape == st.output.meta["example_value"].shape
        assert s.flops > 0
    # facts are in node.meta
    assert any("omni.block" in n.meta for n in gm.graph.nodes)
    assert any("omni.stream" in n.meta for n in gm.graph.nodes)


def test_flux_streams_and_side_inputs():
    model, kw = TINY_MODELS["flux"]()
    gm, _ = trace(model, kw)
    a = find_spans(gm, find_blocks(gm))
    dual = a.spans[0]
    assert {s.name for s in dual.live_streams} == {"hidden_states", "encoder_hidden_states"}
    side = {n.name for n in dual.side_inputs}
    assert "conditioning" in side  # temb is shared by every block
    assert any("freqs_cos" in s for s in side)  # so is the rotary table


def test_sub_spans_of_a_group():
    model, kw = TINY_MODELS["flux"](num_layers=4, num_single_layers=2)
    gm, _ = trace(model, kw)
    a = find_spans(gm, find_blocks(gm))
    g = a.groups[0]
    assert len(g.units) == 4
    for first, last in [(0, 0), (1, 3), (3, 3), (1, 2)]:
        span, why = make_span(gm, g, first, last)
        assert why is None, why
        assert len(span.live_streams) == 2
    span, why = make_span(gm, g, 2, 7)
    assert span is None and why.code == "bad_span"


def test_structural_fallback_without_module_metadata():
    model, kw = TINY_MODELS["flux"](num_layers=3, num_single_layers=3)
    gm, _ = trace(model, kw)
    for n in gm.graph.nodes:
        n.meta.pop("nn_module_stack", None)
    blocks = find_blocks(gm)
    assert "no_module_metadata" in {r.code for r in blocks.reasons}
    assert all(bl.method == "structural" for bl in blocks.lists)
    counts = sorted(len(bl) for bl in blocks.lists)
    assert counts and counts[-1] >= 2
    # the structural lists still yield cacheable spans (the rewrite checks streams itself)
    a = find_spans(gm, blocks)
    assert a.spans


def test_no_blocks_reason():
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
    gm, _ = trace(mlp, {"input": torch.randn(2, 4)})
    blocks = find_blocks(gm)
    assert blocks.lists == [] and "no_blocks" in {r.code for r in blocks.reasons}
