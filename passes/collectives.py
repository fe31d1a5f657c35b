"""Graphs with collectives (context parallelism): finding the group, dropping dead collectives.

Under diffusers' context parallelism (``ContextParallelConfig``: Ulysses all-to-all, ring
attention) Dynamo's graph holds functional collectives (``torch.ops._c10d_functional.*``: the
attention's ``all_to_all_single``, the output's ``all_gather_into_tensor``), each followed by a
``wait_tensor``.  Two things follow for the rewrites:

* **Dead collectives are dead code.**  FX keeps ``wait_tensor`` (Dynamo marks it side-effectful),
  so a reused span's attention and every collective feeding it would survive
  ``eliminate_dead_code``.  :func:`eliminate_dead_code` treats a functional collective and its
  wait like any pure op: dropped when nothing reads its result.  That is safe only when every
  rank drops the same ones — every rank runs the same variant (host decisions from
  rank-independent data) or the same ``torch.cond`` branch (in-graph decisions reduced over the
  group first); otherwise one rank's collective would wait forever for
  a partner that skipped it.
* **Measurements are per shard.**  Each rank holds a shard of the tokens, so anything the graph
  measures on its activations (the probe's relative change, the alignment coefficient) must be
  reduced over the context-parallel group before it decides: :func:`cp_group` finds the group in
  the graph (the one the model output is gathered over); the probe sums its measurements over it
  with the functional all-reduce (:mod:`.probe`; ``fullgraph=True`` still holds).  Host-side
  calibration statistics measured on shards are summed over the group with :func:`host_sum`,
  and calibration files are written by the group's rank 0 only (:func:`group_rank`).
"""
from __future__ import annotations

from typing import Optional

import torch.fx as fx

__all__ = ["is_collective", "collectives", "cp_group", "eliminate_dead_code", "group_rank", "host_sum"]


def is_collective(node: fx.Node) -> bool:
    """A functional collective or its ``wait_tensor`` (``torch.ops._c10d_functional.*``)."""
    if node.op != "call_function":
        return False
    t = node.target
    ns = getattr(t, "namespace", None) or getattr(getattr(t, "_overloadpacket", None), "namespace", None)
    if ns == "_c10d_functional":
        return True
    return "_c10d_functional" in str(t)


def collectives(g: fx.Graph) -> list[fx.Node]:
    """Every collective and wait node of ``g``."""
    return [n for n in g.nodes if is_collective(n)]


def _group_of(node: fx.Node) -> Optional[str]:
    """The group name argument of a functional collective (its last string argument)."""
    strs = [a for a in node.args if isinstance(a, str)]
    return strs[-1] if strs else None


def cp_group(g: fx.Graph) -> Optional[str]:
    """The context-parallel group of a graph: the group its output is gathered over (the
    ``all_gather_into_tensor`` of diffusers' output unsharding; else the group of its all-to-alls),
    or None for a graph without collectives."""
    gathers = [n for n in g.nodes if is_collective(n) and "all_gather" in str(n.target)]
    others = [n for n in g.nodes if is_collective(n) and "wait_tensor" not in str(n.target)]
    for n in gathers + others:
        name = _group_of(n)
        if name is not None:
            return name
    return None


def eliminate_dead_code(g: fx.Graph) -> bool:
    """``g.eliminate_dead_code()`` with functional collectives and their waits pure: a collective
    chain whose result nobody reads is removed (see the module docstring for when that is safe)."""
    return g.eliminate_dead_code(is_impure_node=lambda n: False if is_collective(n) else n.is_impure())



def _process_group(group: str):
    from torch.distributed.distributed_c10d import _resolve_process_group
    return _resolve_process_group(group)


def group_rank(group: Optional[str]) -> int:
    """This process's rank in ``group`` (0 without a group or outside a distributed run)."""
    import torch.distributed as dist
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 0
    return dist.get_rank(_process_group(group))


def host_sum(values: list, group: Optional[str]) -> list:
    """``values`` (floats) summed over ``group`` on the host — for host-side calibration
    statistics measured on a shard (every rank must call it at the same point); unchanged without
    a group."""
    import torch
    import torch.distributed as dist
    if group is None or not dist.is_available() or not dist.is_initialized():
        return list(values)
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(t, group=_process_group(group))
    return t.tolist()
