"""The planner: which regions the token / frame / block caches wrap, and their records.

:func:`plan_merge` walks the block lists (:func:`~omnicompile.passes.blocks.find_blocks`),
analyses and proves one region per block and axis
(:func:`~omnicompile.passes.merge.analyze.analyze_block`; the first block of a list is traced,
the next ones are aligned onto it) and returns a :class:`MergePlan`: a :class:`Wrap` per wrapped
region — what the rewrite needs, by node name — and a
:class:`~omnicompile.passes.common.Reason` per refusal.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import torch
import torch.fx as fx

from ...graphs.cost import node_bytes, node_flops
from ..common import Reason, example_value
from .analyze import analyze_block, externals, region_outputs
from .geometry import Geometry, find_geometry, geo_tokens, split_for
from .layout import Layout, Ref, Refuse, map_args
from .options import LAYERS, MergeOptions
from .prove import Aligned, align_blocks
from .rewrite import apply_merge

__all__ = ["TaggedInput", "TaggedOutput", "Wrap", "MergePlan", "plan_merge"]


@dataclasses.dataclass
class TaggedInput:
    """A region input whose rows are gathered with the kept rows (the main stream, side inputs)."""

    name: str
    site: tuple                # (region node name, index in its all_input_nodes)
    dim: int
    layout: Layout
    shape: tuple
    pre: int                   # rows are viewed [pre, N, post] (single segment) ...
    post: int
    segs: Optional[tuple] = None   # ... or [before, c0 + N + c1, after] (text rows kept whole)


@dataclasses.dataclass
class TaggedOutput:
    """A region output with merged rows: unmerged into the state (or filled by interpolation)."""

    name: str
    dim: int
    layout: Layout
    shape: tuple
    dtype: torch.dtype
    pre: int
    post: int


@dataclasses.dataclass
class Wrap:
    """One wrapped region (see the package docstring)."""

    block: str
    axis: str
    region: list[str]
    rows: int                  # N
    kept: int                  # N - r
    sel: int                   # P: independent selections (e.g. one per frame)
    main: str
    inputs: list[TaggedInput]
    outputs: list[TaggedOutput]
    split: tuple               # (src, dst, src_group, dst_group) as lists (None where absent)
    splits: list               # one split per rotation phase (merge_rotate), splits[0] == split
    split_text: str
    templates: dict            # region node name -> (args, kwargs) with Ref / Size
    reduced: dict              # region node name -> fake value at the reduced size
    sites: dict                # external name -> (region node name, input index)
    device: Any = None
    fill: str = "output"       # "output": skipped rows keep last step's output; "residual":
    #                            skipped rows get this step's input + last step's (output - input);
    #                            "interpolate": skipped rows copy this step's output of their
    #                            matched (most similar) dst row (no state)
    groups: int = 1            # G: consecutive selections sharing one choice of rows (swapped
    #                            placement: the frames, or positions, of a sample; scored together)
    placement: str = "paper"
    flops_full: int = 0
    flops_merged: int = 0      # the region's copy on the kept rows and the ops the rewrite adds
    bytes_full: int = 0        # bytes moved (cost model, no fusion) by the region in full ...
    bytes_kept: int = 0        # ... and by its copy on the kept rows
    flops_kept: int = 0        # FLOPs of the copy on the kept rows alone
    predicted: Optional[dict] = None   # the cost gate's prediction (omnicompile.merge_cost), when made

    @property
    def r(self) -> int:
        return self.rows - self.kept

    def describe(self) -> dict:
        return {"block": self.block, "axis": self.axis, "fill": self.fill, "placement": self.placement,
                "rows": self.rows, "skipped": self.r, "selections": self.sel // self.groups,
                "split": self.split_text, "phases": len(self.splits), "region_nodes": len(self.region),
                "inputs": [f"{t.name}[{t.dim}]={t.layout}" for t in self.inputs],
                "outputs": [f"{o.name}[{o.dim}]" for o in self.outputs],
                "flops_full": self.flops_full, "flops_merged": self.flops_merged, "flops_kept": self.flops_kept,
                "bytes_full": self.bytes_full, "bytes_kept": self.bytes_kept,
                **({"predicted": dict(self.predicted)} if self.predicted is not None else {})}


@dataclasses.dataclass
class MergePlan:
    """What :func:`plan_merge` decided: the wrapped regions (in graph order), the refusals, the
    latent's geometry and the options it was made with."""

    wraps: list[Wrap]
    refused: list[Reason]
    geometry: Optional[Geometry]
    options: MergeOptions
    #: ``(graph, phase-0 split indices)``: the graph with every wrap merged, as the FLOP
    #: measurement built it (the cost gate times its added ops); None when not built
    merged: Optional[tuple] = None

    @property
    def refresh(self) -> Optional[int]:
        """``merge_refresh``: every N-th call of a slot in a generation runs the full graph (the
        runtime's choice, carried here; None = only the first call)."""
        return self.options.merge_refresh

    def describe(self) -> dict:
        return {"geometry": self.geometry.describe() if self.geometry else None,
                "wrapped": [w.describe() for w in self.wraps], "refresh": self.refresh}


def _to_refs(obj):
    return map_args(obj, lambda a: Ref(a.name) if isinstance(a, fx.Node) else a)


def _pre_post(shape, dim: int, lay: Layout, axis: str) -> Optional[tuple[int, int]]:
    if lay.composite:
        return None
    seg = lay.segs[0]
    k = seg.index(axis)
    outer = math.prod(f for f in seg[:k])
    inner = math.prod(f for f in seg[k + 1:])
    return math.prod(shape[:dim]) * outer, inner * math.prod(shape[dim + 1:])


def plan_merge(gm: fx.GraphModule, blocks, options: MergeOptions) -> MergePlan:
    """Decide and prove which regions the token / frame / block caches wrap (package docstring).

    ``blocks`` is :func:`~omnicompile.passes.blocks.find_blocks`' analysis.  Pure: reads
    ``gm``, writes nothing on it.  One region per block: where two axes fit a block, the first
    of frame, block, token wins.  ``options.merge_placement`` and ``options.merge_fill``: see
    "Ablations" in the package docstring; ``options.merge_rotate``: one split per rotation
    phase, see "Staleness" there.
    """
    if not isinstance(options, MergeOptions):
        raise TypeError(f"options must be a MergeOptions, got {type(options).__name__}")
    patch, merge_ffn, exclude = options.patch, options.merge_ffn, options.merge_exclude
    fill, placement, rotate = options.merge_fill, options.merge_placement, options.merge_rotate
    ratios = {a: options.ratio(a) for a in ("frame", "block", "token")}
    active = [a for a in ("frame", "block", "token") if ratios[a] > 0]
    refused: list[Reason] = []
    wraps: list[Wrap] = []
    if placement == "swapped" and "token" in active:
        active.remove("token")
        refused.append(Reason("merge_placement", "token cache: merge_placement='swapped' is the paper's S2S/T2T "
                              "ablation (Fig. 9), which swaps the frame and block caches; the token cache has no "
                              "swapped placement (its rows are the tokens of a frame, which a temporal layer does "
                              "not hold as rows: the paper leaves it out, r_t = 0)", "token"))
    if not active:
        return MergePlan([], refused, None, options)
    symbolic = [n.name for n in gm.graph.nodes if n.op == "placeholder"
                and isinstance(example_value(n), torch.Tensor)
                and any(not isinstance(d, int) for d in example_value(n).shape)]
    if symbolic:   # the re-specialisation proves concrete row counts; a dynamic graph has none
        return MergePlan([], refused + [Reason("merge_dynamic_shape", "inputs with symbolic sizes ("
                                               + ", ".join(symbolic[:3]) + "): compile with dynamic=False",
                                               "graph")], None, options)
    geo, why = find_geometry(gm)
    if geo is None:
        return MergePlan([], refused + [why], None, options)
    for axis in active:
        if axis in ("frame", "block") and geo.kind != "video":
            what = ("frames are part of the token rows of a joint spatio-temporal attention (use token_ratio)"
                    if geo.kind == "joint" else "not a video model")
            refused.append(Reason("merge_placement", f"{axis} cache: {what}; the {axis} cache wraps "
                                  f"{LAYERS[placement][axis]} layers of a video model"
                                  + (" (merge_placement='swapped')" if placement == "swapped" else ""), axis))
    taken: dict[str, str] = {}
    opts = dict(geo=geo, patch=patch, merge_ffn=merge_ffn, fill=fill, placement=placement, rotate=rotate)
    for bl in blocks.lists:
        n_blocks = len(bl.blocks)
        excl = [b.name for i, b in enumerate(bl.blocks) if i < exclude or i >= n_blocks - exclude]
        if excl:
            refused.append(Reason("merge_excluded", f"first/last {exclude} block(s) never merged: {', '.join(excl)}",
                                  bl.name))
        for axis in active:
            if axis in ("frame", "block") and geo.kind != "video":
                continue
            proto = None
            for b in bl.blocks:
                if b.name in excl:
                    continue
                if fill == "auto":   # residual where the block's output is a residual stream, else output
                    w, r, proto_r = _plan_block(gm, b, axis, ratios[axis], proto, **dict(opts, fill="residual"))
                    if w is None and r.code == "merge_fill":
                        w, r, proto_r = _plan_block(gm, b, axis, ratios[axis], proto, **dict(opts, fill="output"))
                    proto = proto_r
                else:
                    w, r, proto = _plan_block(gm, b, axis, ratios[axis], proto, **opts)
                if w is None:
                    refused.append(r)
                    if r.code == "merge_placement":   # the same for every block of the list
                        break
                elif b.name in taken:
                    refused.append(Reason("merge_combined", f"already merged along {taken[b.name]}; one merged "
                                          "axis per block (hierarchical token-in-frame merging is not implemented)",
                                          f"{b.name}:{axis}"))
                else:
                    wraps.append(w)
                    taken[b.name] = axis
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    wraps.sort(key=lambda w: order[w.region[0]])
    merged = _measure(gm, wraps, options) if wraps else None
    return MergePlan(wraps, refused, geo, options, merged)


@dataclasses.dataclass
class _Proto:
    """What the first traced block of a list hands to the next ones."""
    block: Any
    tr: Any
    main: fx.Node
    dim: int
    lay: Layout
    region: list
    tagged: dict


def _plan_block(gm, b, axis: str, ratio: float, proto: Optional[_Proto], *, geo: Geometry, patch, merge_ffn: bool,
                fill: str = "output", placement: str = "paper", rotate: bool = False):
    """Wrap block ``b`` along ``axis``: (wrap, None, proto) or (None, reason, proto)."""
    subject = f"{b.name}:{axis}"

    def no(code, msg):
        return None, Reason(code, msg, subject), proto

    groups = 1
    if axis == "token":
        n_rows, per = geo_tokens(geo), 1
    elif placement == "swapped":   # the axis is the layer's sequence; one choice per sample
        n_rows, per = (geo.frames, 1) if axis == "frame" else (geo.h * geo.w, 1)
        groups = geo.h * geo.w if axis == "frame" else geo.frames
    elif axis == "frame":
        n_rows, per = geo.frames, geo.batch
    else:
        n_rows, per = geo.h * geo.w, geo.batch
    try:
        sp, text = split_for(axis, geo, n_rows, patch, rotate)
    except ValueError as e:
        return no("merge_patch", str(e))
    r = min(int(ratio * n_rows), len(sp[0][0]))
    if r < 1:
        return no("merge_ratio", f"ratio {ratio} of {n_rows} rows skips none")
    kept = n_rows - r
    if kept < 2:
        return no("merge_ratio", f"ratio {ratio} leaves {kept} of {n_rows} rows (at least 2 must be kept)")
    axes = {axis: (n_rows, kept)}
    nodes = list(b.nodes)
    amap = align_blocks(proto.block.nodes, nodes, proto.region) if proto is not None else None
    if amap is not None and proto.tr is None:   # the same block structure failed the same way
        return None, Reason(proto.tagged.code, proto.tagged.message, subject), proto
    if amap is not None:
        tr = Aligned(proto.tr, amap)
        main, d, lay, region = amap[proto.main], proto.dim, proto.lay, [amap[n] for n in proto.region]
        new_proto = proto
    else:
        got = analyze_block(gm, b, axis, axes, n_rows, per, merge_ffn, placement, groups, geo)
        if isinstance(got, Reason):
            return None, got, _Proto(b, None, None, 0, None, list(b.nodes), got)
        main, d, lay, tr, tagged, region = got
        new_proto = _Proto(b, tr, main, d, lay, region, tagged)
    try:
        reduced = tr.prove()
    except Refuse as e:
        return None, Reason(e.code, e.message, subject), new_proto
    w, why = _make_wrap(gm, b, axis, tr, main, d, lay, region, reduced, n_rows, kept, sp, text, fill, groups,
                        placement)
    if w is None:
        return None, Reason(why[0], why[1], subject), new_proto
    return w, None, new_proto


def _make_wrap(gm, b, axis, tr, main, d, lay, region, reduced, n_rows, kept, sp, text, fill, groups=1,
               placement="paper"):
    """The Wrap record of a proved region, or (None, (code, message))."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    anchor = max([order[region[0]] - 1] + [order[t] for t in externals(region)])
    rset = set(region)
    if any(order[u] <= anchor for o in region_outputs(region) for u in o.users if u not in rset):
        return None, ("merge_region", "a value the block reads is computed after a use of its output")
    sel = _pre_post(example_value(main).shape, d, lay, axis)[0]
    if sel % groups:
        return None, ("merge_batch_layout", f"{sel} row groups are not {groups} per sample")
    ext_r = externals(region)
    sites = {}
    for t in ext_r:
        for rn in region:
            if t in rn.all_input_nodes:
                sites[t.name] = (rn.name, rn.all_input_nodes.index(t))
                break
    inputs = []
    for t, tags in tr.tagged.items():
        if t not in set(ext_r):
            continue
        (td, tl), = tags.items()
        shape = tuple(example_value(t).shape)
        p = _pre_post(shape, td, tl, axis)
        segs = None
        if p is None:
            vals = [int(v) for v in tl.seg_values({axis: n_rows})]
            ax = [k for k, s in enumerate(tl.segs) if axis in s]
            if sel != 1 or len(ax) != 1 or tl.segs[ax[0]] != (axis,):
                return None, ("merge_input_layout", f"{t.name}: rows {tl} with {sel} selections")
            k = ax[0]
            segs = (math.prod(shape[:td]), sum(vals[:k]), sum(vals[k + 1:]), math.prod(shape[td + 1:]))
            p = (0, 0)
        elif p[0] != sel and sel != 1:
            return None, ("merge_input_layout", f"{t.name}: {p[0]} row groups for {sel} selections")
        inputs.append(TaggedInput(t.name, sites[t.name], td, tl, shape, p[0], p[1], segs))
    mev = example_value(main)
    outputs = []
    for o in region_outputs(region):
        lays = tr.out_layouts(o)
        ev = example_value(o)
        if not any(lays):
            continue
        if not isinstance(ev, torch.Tensor) or len(lays[0]) != 1:
            return None, ("merge_output", f"{o.name}: an output with merged rows that is not one tensor with one "
                          "merged dim")
        (od, ol), = lays[0].items()
        p = _pre_post(tuple(ev.shape), od, ol, axis)
        if p is None or p[0] != sel:
            return None, ("merge_output", f"{o.name}: output rows {ol} do not line up with the {sel} selections")
        if fill == "residual" and (tuple(ev.shape) != tuple(mev.shape) or ev.dtype != mev.dtype
                                   or od != d or ol != lay):
            return None, ("merge_fill", f"{o.name} is not a residual stream of {main.name} "
                          "(fill='residual' needs output - input per row)")
        outputs.append(TaggedOutput(o.name, od, ol, tuple(ev.shape), ev.dtype, p[0], p[1]))
    if not outputs:
        return None, ("merge_output", "no output of the block carries the merged rows")
    w = Wrap(block=b.name, axis=axis, region=[n.name for n in region], rows=n_rows, kept=kept, sel=sel,
             main=main.name, inputs=inputs, outputs=outputs, split=sp[0], splits=sp, split_text=text,
             templates={n.name: _to_refs(tr.templates[n]) for n in region},
             reduced={n.name: reduced[n] for n in region}, sites=sites, device=mev.device, fill=fill,
             groups=groups, placement=placement)
    return w, None


def _measure(gm: fx.GraphModule, wraps: list[Wrap], options: MergeOptions) -> tuple:
    """FLOPs of each region, computed and merged (the cost model on both graphs)."""
    by = {n.name: n for n in gm.graph.nodes}
    for w in wraps:
        w.flops_full = sum(node_flops(by[r]) for r in w.region)
        w.bytes_full = sum(node_bytes(by[r]) for r in w.region)
    merged, _, consts = apply_merge(gm, MergePlan(wraps, [], None, options), merged=True)
    per: dict[str, list] = {}
    for n in merged.graph.nodes:
        blk = n.meta.get("omni.merged")
        if blk is not None:
            acc = per.setdefault(blk, [0, 0, 0])
            f = node_flops(n)
            acc[0] += f
            if n.meta.get("omni.merge_op") is None:     # the region's own nodes, on the kept rows
                acc[1] += f
                acc[2] += node_bytes(n)
    for w in wraps:
        w.flops_merged, w.flops_kept, w.bytes_kept = per.get(w.block, (0, 0, 0))
    return merged, consts
