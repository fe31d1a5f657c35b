"""Cache units, streams, side inputs and spans.

Vocabulary (``passes/README.md`` has the invariants):

* A **group** is one block list, or several lists whose blocks interleave in the graph
  (Latte: spatial block i, temporal block i, ...).  Its *units* are contiguous node ranges:
  unit i starts at the first node of the i-th block of the group's leading list and ends
  right before unit i+1; the last unit ends at the group's last block node plus the glue
  that follows it where the previous unit had the same glue (a reshape back, say).
* **Streams** are the values that flow unit to unit.  They are found by aligning the op
  sequences of consecutive units (the same code runs in each): where unit i+1 reads a
  value produced in unit i at the same argument slot where unit i read an outside value,
  that outside value and the produced one are the same stream, entering and leaving unit i.
* **Side inputs** are the other outside values the units read (temb, rotary tables,
  masks); parameters are neither.
* **Side additions** are values added into a stream *between* blocks: ``stream + side``
  after a block, where ``side`` does not depend on the group's streams but changes from
  call to call (it depends on a graph input: ControlNet residuals passed in, VACE hints
  computed from the control input).  They are found at the end of each unit (the glue
  after its block: the value the next unit reads is ``block output + side [+ side ...]``).
  A side value mixed into a stream between blocks in any other way (a product, a
  concatenation, an addition in the middle of a unit) is refused:
  ``side_input_not_additive``; values computed from parameters only are constants and stay
  part of the unit.
* A **span** is a run of consecutive units of a group.  Its *stream inputs* enter its
  first unit, its *stream outputs* leave its last unit.  A span is cacheable when every
  value it exposes to the rest of the graph is a stream output with the shape and dtype of
  its input, or a side computation that does not depend on any stream (kept in the main
  graph by the rewrite), and when it writes into no value defined outside it.  Its residual
  is ``out - base`` with ``base = in + side additions of its units`` (``Stream.adds``, in
  graph order; ``base = in`` without them): a reuse returns ``base + residual`` with the
  side values of *this* call, which the rewrite keeps computing (they are ``keep`` nodes or
  lie outside the span) — a side input that changes per step is never replayed stale.

Facts written: ``node.meta["omni.unit"] = (group, index)``, ``node.meta["omni.stream"]``
on stream inputs/outputs of spans.
"""
from __future__ import annotations

import dataclasses
import difflib
import operator
import re
from typing import Optional

import torch
import torch.fx as fx

from ..graphs.cost import node_flops
from .blocks import BlockAnalysis, BlockList
from .common import (
    Reason, example_value, is_param_placeholder, mutated_args, node_signature, tensor_meta,
)

__all__ = ["Unit", "Group", "Stream", "Span", "SpanAnalysis", "find_units", "make_span",
           "find_spans", "find_timestep"]


@dataclasses.dataclass
class Unit:
    group: str
    index: int
    nodes: list[fx.Node]

    @property
    def node_set(self) -> set:
        return set(self.nodes)


@dataclasses.dataclass
class Group:
    name: str
    lists: list[str]
    units: list[Unit]
    # links[i]: list of (input of unit i, output of unit i that unit i+1 reads), per stream
    links: list[list[tuple[fx.Node, fx.Node]]]
    # last_outs: stream outputs of the last unit, aligned with links[-1] (None where dead)
    last_outs: list[Optional[fx.Node]]
    # adds[i]: {stream input of unit i: side values added into that stream at the end of
    # unit i, graph order}; empty lists are left out
    adds: list[dict] = dataclasses.field(default_factory=list)
    # nodes of the graph that may change from call to call (computed from a tensor input)
    varying: set = dataclasses.field(default_factory=set, repr=False)


@dataclasses.dataclass
class Stream:
    name: str
    input: fx.Node
    output: Optional[fx.Node]   # None: the stream is not read after the span
    shape: tuple
    dtype: torch.dtype
    # side values added into the stream between the span's blocks (graph order): the
    # residual is ``output - (input + sum(adds))`` and a reuse adds this call's values
    adds: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Span:
    name: str
    group: str
    first_unit: int
    last_unit: int
    nodes: list[fx.Node]          # every node in the span's range, graph order
    streams: list[Stream]
    side_inputs: list[fx.Node]
    keep: list[fx.Node]           # stream-independent nodes read after the span or added into
                                  # its streams (Stream.adds): stay outside
    flops: int

    @property
    def live_streams(self) -> list[Stream]:
        return [s for s in self.streams if s.output is not None]

    def describe(self) -> dict:
        return {
            "name": self.name, "units": [self.first_unit, self.last_unit],
            "nodes": len(self.nodes), "flops": self.flops,
            "streams": [{"name": s.name, "input": s.input.name,
                         "output": s.output.name if s.output is not None else None,
                         "shape": list(s.shape), "dtype": str(s.dtype),
                         "adds": [a.name for a in s.adds]} for s in self.streams],
            "side_inputs": [n.name for n in self.side_inputs],
        }


@dataclasses.dataclass
class SpanAnalysis:
    groups: list[Group]
    spans: list[Span]
    refused: list[Reason]
    timestep: Optional[fx.Node]
    user_inputs: list[fx.Node]


# ----------------------------------------------------------------------------- units


def _align(a: list[fx.Node], b: list[fx.Node]) -> dict[fx.Node, fx.Node]:
    sm = difflib.SequenceMatcher(None, [node_signature(n, constants=True) for n in a],
                                 [node_signature(n, constants=True) for n in b], autojunk=False)
    out = {}
    for tag, i1, i2, j1, j2 in sm.get_opcodes():
        if tag == "equal":
            for k in range(i2 - i1):
                out[a[i1 + k]] = b[j1 + k]
    return out


def _externals(nodes: list[fx.Node], inside: set) -> list[fx.Node]:
    seen: dict[fx.Node, None] = {}
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside:
                seen.setdefault(a, None)
    return list(seen)


def _groups_of(lists: list[BlockList], order: dict) -> list[list[BlockList]]:
    rng = [(order[bl.blocks[0].first], order[bl.blocks[-1].last], bl) for bl in lists]
    rng.sort(key=lambda r: r[0])
    groups: list[list] = []
    for lo, hi, bl in rng:
        if groups and lo <= groups[-1][1]:
            groups[-1][1] = max(groups[-1][1], hi)
            groups[-1][2].append(bl)
        else:
            groups.append([lo, hi, [bl]])
    return [g[2] for g in groups]


def find_units(gm: fx.GraphModule, blocks: BlockAnalysis) -> tuple[list[Group], list[Reason]]:
    """Split every group of block lists into units and link their streams."""
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    groups: list[Group] = []
    reasons: list[Reason] = []
    varying = _varying(gm)
    for lists in _groups_of(blocks.lists, order):
        lead = lists[0]
        name = "+".join(bl.name for bl in lists)
        if len(lists) > 1 and len({len(bl) for bl in lists}) != 1:
            reasons.append(Reason("interleave_mismatch",
                                  "interleaved block lists have different lengths", name))
            continue
        starts = [order[b.first] for b in lead.blocks]
        end = max(order[b.last] for bl in lists for b in bl.blocks)
        ranges = [(starts[i], starts[i + 1]) for i in range(len(starts) - 1)]
        last_lo = starts[-1]
        # glue after the previous unit's last block node, repeated after the last unit's
        if len(ranges) >= 1:
            plo, phi = ranges[-1]
            last_block_node = max(i for i in range(plo, phi) if "omni.block" in nodes[i].meta)
            glue = [node_signature(n) for n in nodes[last_block_node + 1: phi]]
            k = 0
            while (k < len(glue) and end + 1 + k < len(nodes)
                   and nodes[end + 1 + k].op != "output"
                   and node_signature(nodes[end + 1 + k]) == glue[k]):
                k += 1
            end += k
        ranges.append((last_lo, end + 1))
        units = [Unit(name, i, [n for n in nodes[lo:hi] if n.op not in ("placeholder", "get_attr")])
                 for i, (lo, hi) in enumerate(ranges)]
        for u in units:
            for n in u.nodes:
                n.meta["omni.unit"] = (name, u.index)
        links: list[list[tuple[fx.Node, fx.Node]]] = []
        ok = True
        for i in range(len(units) - 1):
            a, b = units[i], units[i + 1]
            amap = _align(a.nodes, b.nodes)
            aset = a.node_set
            pairs: dict[fx.Node, fx.Node] = {}
            for na, nb in amap.items():
                for xa, xb in zip(na.all_input_nodes, nb.all_input_nodes):
                    if xa not in aset and xb in aset and not is_param_placeholder(xa):
                        if pairs.get(xa, xb) is not xb:
                            ok = False
                        pairs[xa] = xb
            if not pairs:
                reasons.append(Reason("no_streams", f"nothing flows from unit {i} to unit {i + 1}", name))
                ok = False
                break
            links.append(list(pairs.items()))
        if not ok or not links:
            if ok:
                reasons.append(Reason("single_unit", "a group needs two or more units", name))
            elif not any(r.subject == name for r in reasons):
                reasons.append(Reason("ambiguous_streams", "stream slots are not consistent between units", name))
            continue
        # side additions at the end of each unit; the stream outputs of the last unit are the
        # counterparts of the previous unit's block outputs, followed past its own additions
        adds: list[dict] = []
        cores: list[Optional[fx.Node]] = []
        for i in range(len(units) - 1):
            dep = _dependents(units[i].nodes, {a for a, _ in links[i]})
            found = {}
            for k, (a, out) in enumerate(links[i]):
                core, pairs = _peel_additions(out, dep, varying)
                if pairs:
                    found[a] = pairs
                if i == len(units) - 2:
                    cores.append(core)
            adds.append(found)
        amap = _align(units[-2].nodes, units[-1].nodes)
        last_in = [b for _, b in links[-1]]
        last_set = units[-1].node_set
        dep = _dependents(units[-1].nodes, set(last_in))
        last_outs: list[Optional[fx.Node]] = []
        found = {}
        for b, core in zip(last_in, cores):
            out, pairs = _extend_additions(amap.get(core), last_set, dep, varying)
            last_outs.append(out)
            if pairs:
                found[b] = pairs
        adds.append(found)
        groups.append(Group(name, [bl.name for bl in lists], units, links, last_outs, adds, varying))
    return groups, reasons


def _varying(gm: fx.GraphModule) -> set:
    """Nodes whose value may change from call to call: everything computed from a tensor
    input that is not a parameter (sizes alone do not count; parameters are constants)."""
    out: set = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            if not is_param_placeholder(n) and isinstance(example_value(n), torch.Tensor):
                out.add(n)
        elif any(a in out for a in n.all_input_nodes):
            out.add(n)
    return out


def _dependents(nodes: list[fx.Node], sources: set) -> set:
    """``sources`` and the nodes of ``nodes`` (graph order) computed from them."""
    dep = set(sources)
    for n in nodes:
        if any(a in dep for a in n.all_input_nodes):
            dep.add(n)
    return dep


def _side_addition(n: fx.Node, dep: set, varying: set) -> Optional[tuple[fx.Node, fx.Node]]:
    """``(stream operand, side operand)`` when ``n`` is glue (outside every block) computing
    ``stream + side`` — a plain out-of-place addition of a value that depends on no stream
    but changes per call, giving the stream's shape and dtype — else None."""
    if n.op not in ("call_function", "call_method") or "omni.block" in n.meta or n.kwargs:
        return None
    if not ((n.op == "call_function" and n.target in (operator.add, torch.add))
            or (n.op == "call_method" and n.target == "add")) or len(n.args) != 2:
        return None
    a, b = n.args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or (a in dep) == (b in dep):
        return None
    stream, side = (a, b) if a in dep else (b, a)
    tm, ts, th = tensor_meta(n), tensor_meta(stream), tensor_meta(side)
    if side not in varying or tm is None or ts is None or th is None or tm[:2] != ts[:2]:
        return None
    return stream, side


def _peel_additions(out: fx.Node, dep: set, varying: set) -> tuple[fx.Node, list]:
    """``out = core + s1 + s2 ...`` (side additions): the core and ``[(add node, side)]`` in
    graph order."""
    pairs = []
    while True:
        got = _side_addition(out, dep, varying)
        if got is None:
            return out, pairs[::-1]
        pairs.append((out, got[1]))
        out = got[0]


def _extend_additions(core: Optional[fx.Node], inside: set, dep: set, varying: set) -> tuple[Optional[fx.Node], list]:
    """Follow ``core`` forward through the side additions that read it inside the unit."""
    pairs = []
    cur = core
    while cur is not None:
        nxt = [u for u in cur.users if u in inside and _side_addition(u, dep, varying) is not None
               and _side_addition(u, dep, varying)[0] is cur]
        if len(nxt) != 1:
            break
        pairs.append((nxt[0], _side_addition(nxt[0], dep, varying)[1]))
        cur = nxt[0]
    return cur, pairs


# ----------------------------------------------------------------------------- spans


def _stream_name(node: fx.Node) -> str:
    return re.sub(r"_\d+$", "", node.name)


def stream_inputs(group: Group, unit: int) -> list[fx.Node]:
    """The stream values entering unit ``unit`` of ``group``."""
    if unit < len(group.units) - 1:
        return [a for a, _ in group.links[unit]]
    return [b for _, b in group.links[unit - 1]]


def follow_stream(group: Group, x: fx.Node, first: int, last: int) -> Optional[fx.Node]:
    """The value stream ``x`` (entering unit ``first``) has after unit ``last``, or None
    where it is not computed (a dead stream)."""
    return _follow(group, x, first, last)[0]


def _follow(group: Group, x: fx.Node, first: int, last: int) -> tuple[Optional[fx.Node], list]:
    """:func:`follow_stream` and the ``(add node, side value)`` pairs added into the stream
    on the way (graph order)."""
    n_units = len(group.units)
    cur: Optional[fx.Node] = x
    pairs: list = []
    for i in range(first, last + 1):
        if cur is None:
            return None, pairs
        if i < len(group.adds):
            pairs += group.adds[i].get(cur, [])
        if i < n_units - 1:
            cur = dict(group.links[i]).get(cur)
        else:
            prev = [b for _, b in group.links[i - 1]]
            cur = group.last_outs[prev.index(cur)] if cur in prev else None
    return cur, pairs


def make_span(gm: fx.GraphModule, group: Group, first: int, last: int) -> tuple[Optional[Span], Optional[Reason]]:
    """The span of units ``first..last`` (inclusive) of ``group``, or why it cannot be cached."""
    label = f"{group.name}[{first}:{last + 1}]"
    n_units = len(group.units)
    if not (0 <= first <= last < n_units):
        return None, Reason("bad_span", f"units {first}..{last} outside 0..{n_units - 1}", label)
    ins = stream_inputs(group, first)
    followed = [_follow(group, x, first, last) for x in ins]
    outs = [o for o, _ in followed]
    nodes = [n for u in group.units[first:last + 1] for n in u.nodes]
    inside = set(nodes)
    # which span nodes depend on a stream
    dep: set = set()
    in_set = set(ins)
    for n in nodes:
        if any(a in in_set or a in dep for a in n.all_input_nodes):
            dep.add(n)
    # side values enter the streams between blocks only as additions kept fresh on reuse
    add_nodes = {a for o, pairs in followed if o is not None for a, _ in pairs}
    sides = [h for o, pairs in followed if o is not None for _, h in pairs]
    for h in sides:
        if h in dep:
            return None, Reason("side_input_in_span", f"side value {h.name} added into a stream between blocks "
                                "is computed from the span's own streams", label)
    for n in nodes:
        if "omni.block" in n.meta or n not in dep or n in add_nodes:
            continue
        for a in n.all_input_nodes:
            if (a not in dep and a not in in_set and a in group.varying
                    and isinstance(example_value(a), torch.Tensor)):
                what = getattr(n.target, "__name__", str(n.target))
                return None, Reason(
                    "side_input_not_additive",
                    f"node {n.name} ({what}) mixes the per-call value {a.name} into a stream between blocks; "
                    "only an addition `stream + side` after a block can be kept fresh when the span is "
                    "reused", label)
    # what the span exposes
    exposed = [n for n in nodes if any(u not in inside for u in n.users)]
    live_out = {o for o in outs if o is not None}
    keep: list[fx.Node] = [h for h in sides if h in inside]
    for n in exposed:
        if n in live_out:
            continue
        if n in dep:
            return None, Reason("non_stream_output",
                                f"node {n.name} is read after the span but is not a stream output", label)
        keep.append(n)
    # ancestors of kept nodes inside the span also stay in the main graph
    stack = list(keep)
    keep_set = set(keep)
    while stack:
        n = stack.pop()
        for a in n.all_input_nodes:
            if a in inside and a not in keep_set:
                keep_set.add(a)
                stack.append(a)
    keep = [n for n in nodes if n in keep_set]
    # writes into values defined outside
    for n in nodes:
        for m in mutated_args(n):
            if m not in inside:
                return None, Reason("mutates_input", f"node {n.name} writes into {m.name}, defined outside", label)
        if n.op in ("call_module",):
            return None, Reason("call_module", f"node {n.name} calls a module; expected a flattened graph", label)
    streams = []
    for x, (o, pairs) in zip(ins, followed):
        tm_in = tensor_meta(x)
        if tm_in is None:
            return None, Reason("non_tensor_stream", f"stream input {x.name} is not a tensor", label)
        if o is not None:
            tm_out = tensor_meta(o)
            if tm_out is None or tm_out[:2] != tm_in[:2]:
                return None, Reason("stream_shape_mismatch",
                                    f"stream {x.name} -> {o.name}: {tm_in[:2]} vs {tm_out and tm_out[:2]}", label)
        streams.append(Stream(_stream_name(o if o is not None else x), x, o, tm_in[0], tm_in[1],
                              [h for _, h in pairs] if o is not None else []))
    if not any(s.output is not None for s in streams):
        return None, Reason("no_live_stream", "no stream of the span is read after it", label)
    externals = _externals([n for n in nodes if n not in keep_set], inside - keep_set)
    side = [n for n in externals if n not in in_set and not is_param_placeholder(n) and n not in keep_set]
    flops = sum(node_flops(n) for n in nodes if n not in keep_set)
    for s in streams:
        s.input.meta.setdefault("omni.stream", []).append((label, s.name, "in"))
        if s.output is not None:
            s.output.meta.setdefault("omni.stream", []).append((label, s.name, "out"))
    return Span(label, group.name, first, last, nodes, streams, side, keep, flops), None


def find_timestep(gm: fx.GraphModule) -> tuple[Optional[fx.Node], Optional[Reason]]:
    """The placeholder carrying the diffusion timestep.

    By name first (``timestep``, ``timesteps``, ``t``, ``sigma`` in Dynamo's source), then
    by structure: a small float input (at most one value per batch row) that reaches a
    sinusoidal embedding (``sin``/``cos``/``exp``) within a few ops.
    """
    cands = [n for n in gm.graph.nodes if n.op == "placeholder" and not is_param_placeholder(n)]
    def small_float(n):  # float or integer (DiT takes long timesteps), one value per sample
        ev = example_value(n)
        return isinstance(ev, torch.Tensor) and ev.dtype != torch.bool and not ev.is_complex() and ev.dim() <= 1
    for n in cands:
        src = getattr(n, "_dynamo_source", None)
        text = src.name() if src is not None and callable(getattr(src, "name", None)) else n.name
        leaf = re.findall(r"\['([^']*)'\]|\.(\w+)$|^L_(\w+)_$", text)
        keys = {k for tup in leaf for k in tup if k} | {n.name}
        if keys & {"timestep", "timesteps", "t", "sigma", "sigmas", "L_timestep_", "L_t_"} and small_float(n):
            return n, None
    for n in cands:
        if not small_float(n):
            continue
        frontier, seen = [n], {n}
        for _ in range(8):
            nxt = []
            for f in frontier:
                for u in f.users:
                    name = getattr(u.target, "__name__", str(u.target))
                    if name in ("sin", "cos", "exp"):
                        return n, None
                    if u not in seen:
                        seen.add(u)
                        nxt.append(u)
            frontier = nxt
    return None, Reason("no_timestep", "no graph input looks like a diffusion timestep "
                        "(name timestep/t/sigma, or a per-sample float feeding sin/cos/exp)")


def find_spans(gm: fx.GraphModule, blocks: BlockAnalysis) -> SpanAnalysis:
    """One span per group, covering all its units (the static policies reuse whole groups).

    A list with an odd trailing member (``BlockList.tail``: SD3's last block, whose context
    output is dead) is first tried with that member as its last unit; when every such group
    still makes a span, that analysis is taken (the member's dead stream outputs are ``None``
    in ``Group.last_outs``, the ``partial_list`` note becomes ``odd_tail``), else the plain
    one, with the trial's node facts cleared."""
    tailed = [bl for bl in blocks.lists if bl.tail is not None]
    if tailed:
        ext = BlockAnalysis([BlockList(bl.name, bl.blocks + [bl.tail], bl.method) if bl.tail is not None else bl
                             for bl in blocks.lists], [])
        for bl in tailed:
            for n in bl.tail.nodes:
                n.meta["omni.block"] = (bl.name, bl.tail.index)
        trial = _find_spans(gm, ext)
        made = {sp.group for sp in trial.spans}
        cached_lists = {name for g in trial.groups if g.name in made for name in g.lists}
        if all(bl.name in cached_lists for bl in tailed):
            for bl in tailed:
                blocks.reasons[:] = [r for r in blocks.reasons if not (r.code == "partial_list" and r.subject == bl.name)]
                blocks.reasons.append(Reason("odd_tail", f"member {bl.tail.name} differs from the others; cached "
                                             "with the list (its dead stream outputs dropped)", bl.name))
            return trial
        for n in gm.graph.nodes:
            n.meta.pop("omni.unit", None)
            n.meta.pop("omni.stream", None)
        for bl in tailed:
            for n in bl.tail.nodes:
                n.meta.pop("omni.block", None)
    return _find_spans(gm, blocks)


def _find_spans(gm: fx.GraphModule, blocks: BlockAnalysis) -> SpanAnalysis:
    groups, refused = find_units(gm, blocks)
    spans = []
    for g in groups:
        span, why = make_span(gm, g, 0, len(g.units) - 1)
        if span is None:
            refused.append(why)
        else:
            spans.append(span)
    ts, why = find_timestep(gm)
    if why is not None:
        refused.append(why)
    user_inputs = [n for n in gm.graph.nodes if n.op == "placeholder" and not is_param_placeholder(n)]
    return SpanAnalysis(groups, spans, refused, ts, user_inputs)
