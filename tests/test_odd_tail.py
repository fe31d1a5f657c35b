"""A block list whose last member differs (issue 16: SD3's last block has no context output).

Before, such a member stayed outside the list (``partial_list``) and was computed on every
reused step: on a 6-block SD3-class model a sixth of the work, which capped the speedup at
2.3x.  Now it is cached with the list when the streams still line up (its dead context stream
dropped, note ``odd_tail``), replayed against the reference executor; when they do not, the
list falls back to its matching members and the note stays ``partial_list``.
"""
import pytest
import torch
import torch.nn as nn

from omnicompile.passes.blocks import find_blocks
from omnicompile.passes.spans import find_spans
from omnicompile.testing import tiny_sd3
from reference_executor import replay_all
from test_side_inputs import cached

pytestmark = pytest.mark.usefixtures("one_thread")

TS = [1000.0 - 100.0 * i for i in range(9)]


def _trace(model, kw):
    graphs = []

    def grab(gm, ex):
        graphs.append(gm)
        return gm.forward
    with torch.no_grad():
        torch.compile(model, backend=grab, fullgraph=True)(**kw)
    torch._dynamo.reset()
    return graphs[0]


@pytest.mark.parametrize("options", [dict(policy="static", interval=2, warmup=1),
                                     dict(policy="static", target_speedup=3.0)], ids=["interval", "target"])
def test_sd3_last_block_is_cached_with_the_list_and_equals_the_reference(options):
    model, kw = tiny_sd3()
    n = len(model.transformer_blocks)
    g, rec = cached(model, kw, TS, **options)
    assert g.cached, g.fallback
    assert [(s.name, s.units) for s in g.spans] == [(f"transformer_blocks[0:{n}]", n)]
    codes = {r.code for r in g.refused}
    assert "odd_tail" in codes and "partial_list" not in codes
    counts = replay_all(rec)
    assert counts["reused"] >= 3
    # a reused step skips every block, the last one included
    reused = [r for r in g.steps if "reused" in r.decisions.values()]
    assert reused and all(r.flops_saved == g.spans[0].flops for r in reused)


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x, c):
        return x + self.b(torch.relu(self.a(x + c)))


class _OddBlock(nn.Module):
    """Does real work but changes the stream's width: nothing lines up with the other blocks."""

    def __init__(self, d):
        super().__init__()
        self.a, self.b = nn.Linear(d, 2 * d), nn.Linear(2 * d, 2 * d)

    def forward(self, x, c):
        return self.b(torch.relu(self.a(x + c)))


class _Model(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.t = nn.Linear(1, d)
        self.blocks = nn.ModuleList([_Block(d), _Block(d), _Block(d), _OddBlock(d)])

    def forward(self, hidden_states, timestep):
        c = self.t(torch.sin(timestep[:, None, None]))
        for blk in self.blocks:
            hidden_states = blk(hidden_states, c)
        return (hidden_states,)


def test_an_odd_last_member_that_breaks_the_streams_stays_outside():
    torch.manual_seed(0)
    model = _Model().eval()
    kw = dict(hidden_states=torch.randn(1, 4, 8), timestep=torch.tensor([500.0]))
    gm = _trace(model, kw)
    blocks = find_blocks(gm)
    assert [(bl.name, len(bl), bl.tail.name if bl.tail else None) for bl in blocks.lists] == [("blocks", 3, "blocks.3")]
    analysis = find_spans(gm, blocks)
    assert [s.name for s in analysis.spans] == ["blocks[0:3]"]
    assert {r.code for r in blocks.reasons} == {"partial_list"}
    # the trial's node facts are gone: no unit of the fallback analysis covers the odd member
    assert not any("omni.block" in n.meta for n in blocks.lists[0].tail.nodes)
