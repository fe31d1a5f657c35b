"""Find the repeated transformer blocks of a Dynamo graph.

A *block list* is a module path prefix ``P`` with children ``P.0``, ``P.1``, ... that each
own a run of graph nodes (read from ``nn_module_stack``: the outermost numbered entry of a
node decides its block, so ``ff.net.0`` inside a block never forms a list of its own).  A
list counts when it has at least two blocks, every block does real work (two or more
matmul-like nodes) and the blocks have the same op sequence up to small differences
(Dynamo drops dead nodes, e.g. the unused encoder output of the last Flux single block).
A member right after the list that differs more (SD3's last block, without a context output)
is kept as the list's ``tail``: the span analysis caches it with the list when the streams
still line up, else it stays outside (``partial_list``).

When no node carries ``nn_module_stack`` (graphs built by hand, other tracers) a structural
fallback looks for the longest runs of a repeating op-signature period and confirms the
repeats with networkx's Weisfeiler-Lehman hash (``omnicompile.graphs.structure``).

Facts written: ``node.meta["omni.block"] = (list_name, index)`` on every block node.
"""
from __future__ import annotations

import dataclasses
import difflib
import re

import torch.fx as fx

from ..graphs.structure import find_repeats, subgraph_hash
from .common import Reason, is_heavy, module_paths, node_signature

__all__ = ["Block", "BlockList", "BlockAnalysis", "find_blocks", "MIN_SIMILARITY"]

#: blocks of one list must agree on at least this fraction of their op sequence
MIN_SIMILARITY = 0.9
_NUMBERED = re.compile(r"^(.*)\.(\d+)$")


@dataclasses.dataclass
class Block:
    name: str                 # e.g. "transformer_blocks.3"
    index: int
    nodes: list[fx.Node]      # in graph order

    @property
    def first(self) -> fx.Node:
        return self.nodes[0]

    @property
    def last(self) -> fx.Node:
        return self.nodes[-1]


@dataclasses.dataclass
class BlockList:
    name: str                 # e.g. "transformer_blocks"
    blocks: list[Block]
    method: str               # "module_path" or "structural"
    #: the member right after the list that differs from the others but does real work (SD3's
    #: last block, which has no context output); :func:`~omnicompile.passes.spans.find_spans`
    #: caches it with the list when the streams still line up, else leaves it computed
    tail: "Block | None" = None

    def __len__(self) -> int:
        return len(self.blocks)


@dataclasses.dataclass
class BlockAnalysis:
    lists: list[BlockList]
    reasons: list[Reason]

    def summary(self) -> list[dict]:
        return [
            {"name": bl.name, "count": len(bl.blocks), "method": bl.method,
             "nodes_per_block": [len(b.nodes) for b in bl.blocks]}
            for bl in self.lists
        ]


def _similarity(a: Block, b: Block) -> float:
    sa = [node_signature(n) for n in a.nodes]
    sb = [node_signature(n) for n in b.nodes]
    return difflib.SequenceMatcher(None, sa, sb, autojunk=False).ratio()


def _by_module_path(gm: fx.GraphModule) -> tuple[list[BlockList], list[Reason], bool]:
    members: dict[str, dict[int, list[fx.Node]]] = {}
    any_meta = False
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        paths = module_paths(node)
        if paths:
            any_meta = True
        for p in paths:
            m = _NUMBERED.match(p)
            if m:
                members.setdefault(m.group(1), {}).setdefault(int(m.group(2)), []).append(node)
                break
    lists: list[BlockList] = []
    reasons: list[Reason] = []
    for prefix, by_index in members.items():
        idx = sorted(by_index)
        blocks = [Block(f"{prefix}.{i}", i, by_index[i]) for i in idx]
        if len(blocks) < 2:
            continue
        heavy = [sum(1 for n in b.nodes if is_heavy(n)) for b in blocks]
        if min(heavy) < 2:
            # Sequential containers of single layers (time embedders, ...) are not blocks.
            if max(heavy) >= 2:
                reasons.append(Reason("light_blocks", "some members do no matmul work; not a block list", prefix))
            continue
        # the longest run of consecutive members that match each other; members that
        # differ (SD3's last block has no context output) stay outside the list
        runs: list[list[Block]] = [[blocks[0]]]
        for b in blocks[1:]:
            if b.index == runs[-1][-1].index + 1 and _similarity(runs[-1][0], b) >= MIN_SIMILARITY:
                runs[-1].append(b)
            else:
                runs.append([b])
        best = max(runs, key=len)
        if len(best) < 2:
            reasons.append(Reason(
                "dissimilar_blocks",
                f"no two consecutive members share their op sequence (similarity < {MIN_SIMILARITY})", prefix))
            continue
        tail = None
        after = [b for b in blocks if b.index == best[-1].index + 1]
        if after and heavy[blocks.index(after[0])] >= 2:
            tail = after[0]
        if len(best) < len(blocks):
            left = [b.name for b in blocks if b not in best]
            reasons.append(Reason("partial_list", f"members {', '.join(left)} differ from the others "
                                  "and are computed every step", prefix))
        blocks = best
        # graph order must follow the numbering and blocks must not overlap
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        spans = [(order[b.first], order[b.last]) for b in blocks]
        if any(spans[i][1] >= spans[i + 1][0] for i in range(len(spans) - 1)):
            reasons.append(Reason("overlapping_blocks", "blocks are not executed one after another", prefix))
            continue
        if tail is not None and order[tail.first] <= spans[-1][1]:
            tail = None
        lists.append(BlockList(prefix, blocks, "module_path", tail))
    return lists, reasons, any_meta


def _structural(gm: fx.GraphModule) -> tuple[list[BlockList], list[Reason]]:
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    sigs = [node_signature(n) for n in nodes]
    heavy = [is_heavy(n) for n in nodes]
    lists: list[BlockList] = []
    reasons: list[Reason] = []
    for k, (start, period, count) in enumerate(find_repeats(sigs, heavy, min_heavy=2)):
        blocks = [Block(f"repeat{k}.{i}", i, nodes[start + i * period: start + (i + 1) * period])
                  for i in range(count)]
        hashes = {subgraph_hash(b.nodes, node_signature) for b in blocks}
        if len(hashes) != 1:
            reasons.append(Reason("structural_mismatch",
                                  "repeated op sequence but the blocks' dataflow differs (WL hash)", f"repeat{k}"))
            continue
        lists.append(BlockList(f"repeat{k}", blocks, "structural"))
    return lists, reasons


def find_blocks(gm: fx.GraphModule) -> BlockAnalysis:
    """Find the repeated block lists of ``gm`` (see module docstring).  Pure: only writes
    ``node.meta["omni.block"]``."""
    lists, reasons, any_meta = _by_module_path(gm)
    if not any_meta:
        reasons.append(Reason("no_module_metadata",
                              "no node carries nn_module_stack; used the structural fallback"))
        lists, more = _structural(gm)
        reasons.extend(more)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    lists.sort(key=lambda bl: order[bl.blocks[0].first])
    for bl in lists:
        for b in bl.blocks:
            for n in b.nodes:
                n.meta["omni.block"] = (bl.name, b.index)
    if not lists:
        reasons.append(Reason("no_blocks", "no repeated transformer blocks found in this graph"))
    return BlockAnalysis(lists, reasons)
