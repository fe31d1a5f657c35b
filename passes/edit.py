"""Building blocks of every rewrite: copy Dynamo's graph, add inputs, read and set outputs.

Passes never mutate Dynamo's GraphModule: its OutputGraph still reads the placeholders, so
every rewrite starts from :func:`copy_graph_module` and edits the copy with the helpers
here.  A placeholder a rewrite adds needs ``_dynamo_source`` (compile_fx's AOT path asserts
it exists; None works), which :func:`add_placeholder` sets.
"""
from __future__ import annotations

import torch.fx as fx

__all__ = ["copy_graph_module", "placeholders", "add_placeholder", "output_values", "set_outputs", "safe_name"]


def copy_graph_module(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[fx.Node, fx.Node]]:
    """A new GraphModule with a copy of ``gm``'s graph; Dynamo's own stays untouched.

    Carries over ``gm.meta``, ``_param_name_to_source`` and each placeholder's
    ``_dynamo_source`` (compile_fx's AOT path reads them).  Returns the old->new node map.
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out_val = graph.graph_copy(gm.graph, env)
    graph.output(out_val)
    new = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    new.meta.update(getattr(gm, "meta", {}))
    if hasattr(gm, "_param_name_to_source"):
        new._param_name_to_source = gm._param_name_to_source
    for old, nn in env.items():
        if old.op == "placeholder" and hasattr(old, "_dynamo_source"):
            nn._dynamo_source = old._dynamo_source
    return new, env


def placeholders(g: fx.Graph) -> list[fx.Node]:
    return [n for n in g.nodes if n.op == "placeholder"]


def add_placeholder(g: fx.Graph, name: str, like=None) -> fx.Node:
    """A new input after the last one; ``like`` becomes its ``example_value``."""
    last = placeholders(g)[-1]
    with g.inserting_after(last):
        ph = g.placeholder(name)
    ph._dynamo_source = None  # compile_fx's AOT path requires the attribute
    if like is not None:
        ph.meta["example_value"] = like
    return ph


def output_values(g: fx.Graph) -> tuple[fx.Node, list]:
    """The output node and its values as a list (a single output becomes a one-item list)."""
    out = next(n for n in g.nodes if n.op == "output")
    val = out.args[0]
    if isinstance(val, (tuple, list)):
        return out, list(val)
    return out, [val]


def set_outputs(out: fx.Node, values: list) -> None:
    out.args = (tuple(values),)


def safe_name(name: str) -> str:
    """``name`` with every character that cannot be in a Python identifier replaced by ``_``."""
    return "".join(c if c.isalnum() else "_" for c in name)
