"""Structural views of graph regions, for when module metadata is missing.

``find_repeats`` finds runs of a repeating period in a sequence of op signatures (the
blocks of a transformer execute the same code one after another); ``subgraph_hash`` is
networkx's Weisfeiler-Lehman hash of a region's dataflow, which confirms that two runs are
the same computation and not just the same op list.
"""
from __future__ import annotations

import warnings

import networkx as nx
import numpy as np

__all__ = ["find_repeats", "subgraph_hash"]


def find_repeats(sigs: list[str], heavy: list[bool], min_heavy: int = 2,
                 min_count: int = 2) -> list[tuple[int, int, int]]:
    """Disjoint repeated runs ``(start, period, count)`` in ``sigs``, best coverage first.

    A run is ``count >= min_count`` consecutive copies of ``sigs[start:start+period]``;
    each copy must contain at least ``min_heavy`` heavy ops.  Greedy: take the run that
    covers the most positions (smallest period on ties), mask it, repeat.
    """
    ids: dict[str, int] = {}
    arr = np.array([ids.setdefault(s, len(ids)) for s in sigs], dtype=np.int64)
    hv = np.cumsum(np.concatenate([[0], np.array(heavy, dtype=np.int64)]))
    n = len(arr)
    taken = np.zeros(n, dtype=bool)
    found: list[tuple[int, int, int]] = []
    while True:
        best = None  # (coverage, -period, start, period, count)
        for period in range(2, n // 2 + 1):
            eq = (arr[:-period] == arr[period:]) & ~taken[:-period] & ~taken[period:]
            if not eq.any():
                continue
            # runs of True in eq
            padded = np.concatenate([[False], eq, [False]])
            diff = np.diff(padded.astype(np.int8))
            starts = np.flatnonzero(diff == 1)
            ends = np.flatnonzero(diff == -1)
            lengths = ends - starts
            ok = lengths >= period
            for s, length in zip(starts[ok], lengths[ok]):
                count = (length + period) // period
                if count < min_count:
                    continue
                if hv[s + period] - hv[s] < min_heavy:
                    continue
                cov = count * period
                key = (cov, -period)
                if best is None or key > best[:2]:
                    best = (cov, -period, int(s), period, int(count))
        if best is None:
            break
        _, _, s, period, count = best
        found.append((s, period, count))
        taken[s: s + period * count] = True
    found.sort()
    return found


def subgraph_hash(nodes, label) -> str:
    """WL hash of the dataflow among FX ``nodes``; ``label(node)`` names what a node does,
    edges are labelled by argument slot, reads from outside the region by a shared label."""
    inside = set(nodes)
    g = nx.DiGraph()
    for n in nodes:
        g.add_node(n.name, label=label(n))
    for n in nodes:
        for i, a in enumerate(n.all_input_nodes):
            if a in inside:
                g.add_edge(a.name, n.name, slot=str(i))
            else:
                ext = f"ext:{n.name}:{i}"
                g.add_node(ext, label="external")
                g.add_edge(ext, n.name, slot=str(i))
    with warnings.catch_warnings():  # networkx 3.5 warns that directed hashes changed
        warnings.simplefilter("ignore", UserWarning)
        return nx.weisfeiler_lehman_graph_hash(g, node_attr="label", edge_attr="slot", iterations=3)
