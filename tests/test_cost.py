"""The cost model against torch.utils.flop_counter.FlopCounterMode on the diffusers test models,
and its symbolic form (sympy) at the traced sizes and at other sizes."""
import pytest
import sympy
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import trace
from omnicompile.graphs.cost import Cost, node_bytes, node_flops, region_cost, size_symbols
from omnicompile.passes.blocks import find_blocks
from omnicompile.passes.common import is_param_placeholder
from omnicompile.passes.spans import find_spans
from omnicompile.testing import tiny_dit, tiny_flux, tiny_latte, tiny_sd3, tiny_wan

MODELS = {"flux": tiny_flux, "sd3": tiny_sd3, "wan": tiny_wan, "latte": tiny_latte, "dit": tiny_dit}
_TRACES: dict = {}


def traced(name, **kw):
    """Dynamo's graph of a test model (traced once per module: tracing dominates the time)."""
    key = (name, tuple(sorted(kw.items())))
    if key not in _TRACES:
        _TRACES[key] = trace(*MODELS[name](**kw))
    return _TRACES[key]


def counted(gm, example_inputs) -> int:
    """FLOPs FlopCounterMode sees when the graph runs (attention on the math backend: the CPU
    flash kernel has no FLOP formula registered)."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        gm(*example_inputs)
    return fc.get_total_flops()


def symbols_of(gm):
    ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = [(n.name, tuple(n.meta["example_value"].shape), n.meta["example_value"].dtype.is_floating_point)
              for n in ph if not is_param_placeholder(n) and isinstance(n.meta.get("example_value"), torch.Tensor)]
    dims = {int(d) for n in ph if is_param_placeholder(n) for d in n.meta["example_value"].shape}
    return size_symbols(inputs, dims)


def model_cost(gm):
    sizes = symbols_of(gm)
    return region_cost(gm.graph.nodes, sizes, is_param_placeholder), sizes


@pytest.mark.parametrize("name", list(MODELS))
def test_flops_agree_with_flop_counter(name):
    gm, ex = traced(name)
    ref = counted(gm, ex)
    ours = sum(node_flops(n) for n in gm.graph.nodes)
    assert ref > 0
    assert abs(ours - ref) <= 0.05 * ref, (ours, ref)
    cost, sizes = model_cost(gm)
    flops, nbytes = cost.evaluate(sizes.values)
    assert flops == ours                       # symbolic == concrete at the traced sizes
    assert nbytes == sum(node_bytes(n) for n in gm.graph.nodes) > 0


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_unit_costs_sum_to_the_graph(name):
    gm, ex = traced(name)
    analysis = find_spans(gm, find_blocks(gm))
    sizes = symbols_of(gm)
    in_units = set()
    total = sympy.Integer(0)
    for g in analysis.groups:
        for u in g.units:
            c = region_cost(u.nodes, sizes, is_param_placeholder)
            assert c.evaluate(sizes.values)[0] == sum(node_flops(n) for n in u.nodes) > 0
            total += c.flops
            in_units |= set(u.nodes)
    rest = region_cost([n for n in gm.graph.nodes if n not in in_units], sizes, is_param_placeholder)
    assert int((total + rest.flops).subs(sizes.values)) == pytest.approx(counted(gm, ex), rel=0.05)


def test_size_symbols_are_named_after_the_inputs():
    names = {k: {s.name for s in symbols_of(traced(k)[0]).values} for k in ("flux", "sd3", "wan")}
    assert names["flux"] == {"batch", "tokens", "text_tokens"}
    assert names["sd3"] == {"batch", "height", "width", "text_tokens"}
    assert names["wan"] == {"batch", "frames", "height", "width", "text_tokens"}


@pytest.mark.parametrize("name,small,large", [
    ("flux", dict(tokens=16), dict(tokens=64, batch=2, text_tokens=7)),
    ("wan", dict(), dict(batch=2)),
    ("dit", dict(), dict(batch=3)),
    ("latte", dict(), dict(batch=2, frames=5)),
])
def test_symbolic_cost_extrapolates_to_other_sizes(name, small, large):
    """Traced at one size, evaluated at another: within 5% of FlopCounterMode there."""
    gm, _ = traced(name, **small)
    cost, _ = model_cost(gm)
    torch._dynamo.reset()
    gm2, ex2 = traced(name, **large)
    _, sizes2 = model_cost(gm2)
    predicted = cost.evaluate({s.name: v for s, v in sizes2.values.items()})[0]
    assert predicted == pytest.approx(counted(gm2, ex2), rel=0.05)
    assert {s.name for s in cost.flops.free_symbols} >= {"batch"}


def test_sd3_cost_scales_with_resolution():
    model, kw = tiny_sd3()
    gm, _ = traced("sd3")
    cost, _ = model_cost(gm)
    torch._dynamo.reset()
    kw2 = dict(kw, hidden_states=torch.randn(1, 4, 16, 16))
    gm2, ex2 = trace(model, kw2)
    assert cost.evaluate({"batch": 1, "height": 16, "width": 16, "text_tokens": 6})[0] == pytest.approx(
        counted(gm2, ex2), rel=0.05)


def test_attention_given_as_keywords_is_counted():
    gm, _ = traced("wan")               # Wan calls scaled_dot_product_attention(query=..., key=...)
    sdpa = [n for n in gm.graph.nodes if getattr(n.target, "__name__", "") == "scaled_dot_product_attention"]
    assert sdpa and all(not n.args and node_flops(n) > 0 for n in sdpa)


def test_cost_json_and_errors():
    b, t = sympy.symbols("batch tokens", positive=True, integer=True)
    c = Cost(2 * b * t ** 2 + 5, 4 * b * t)
    assert Cost.from_json(c.to_json()) == c
    assert c.evaluate({"batch": 2, "tokens": 3}) == (41, 24)
    assert (c + c).evaluate({"batch": 1, "tokens": 1}) == (14, 8)
    with pytest.raises(ValueError, match="tokens"):
        c.evaluate({"batch": 2})
