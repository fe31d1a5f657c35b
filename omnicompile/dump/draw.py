"""Drawing the dump: the unit dependency graph as Graphviz text (:func:`to_dot`), rendered
to SVG by ``dot`` when it is on ``PATH`` or drawn as a PNG with matplotlib
(:func:`render_unit_graph`), and the preview as a step x unit heatmap (:func:`draw_plan`).

Units are shaded by the fraction of the previewed steps that reuse them (a
:class:`~omnicompile.preview.Preview`); each span is a cluster; stream edges are bold,
side edges dashed.  matplotlib is the ``viz`` extra: without it the drawings raise
:class:`~omnicompile.dump.errors.VizUnavailable` (a deliberate skip for the dump).
"""
from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path
from typing import Optional, Sequence

from omnicompile.dump.errors import DumpError, VizUnavailable
from omnicompile.dump.info import GraphInfo, policy_text
from omnicompile.dump.tables import Edge, Region
from omnicompile.preview import Preview

log = logging.getLogger("omnicompile")

__all__ = ["RENDERERS", "require_matplotlib", "dot_available", "to_dot", "render_unit_graph", "draw_plan"]

RENDERERS = ("auto", "dot", "matplotlib", "none")


def require_matplotlib():
    """Import matplotlib lazily; raise :class:`VizUnavailable` with the fix when missing."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError as e:
        raise VizUnavailable(f"drawing the dump's images needs matplotlib ({e}); "
                             "install it with: pip install 'omnicompile[viz]'") from None
    return matplotlib


def dot_available() -> bool:
    return shutil.which("dot") is not None


# ============================================================================ unit graph


def _dot_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _mix(frac: float, lo=(0xf7, 0xfb, 0xff), hi=(0x31, 0xa3, 0x54)) -> str:
    c = [round(a + (b - a) * max(0.0, min(1.0, frac))) for a, b in zip(lo, hi)]
    return "#%02x%02x%02x" % tuple(c)


_KIND_FILL = {"input": "#eeeeee", "glue": "#fff7dc", "output": "#eeeeee"}


def _region_label(r: Region, preview: Optional[Preview]) -> str:
    if r.kind == "input":
        return f"{r.label}\n{r.detail}"
    if r.kind == "output":
        return "output"
    text = f"{r.label}\n{r.nodes} nodes, {r.flops / 1e6:.3g} MFLOP"
    if r.kind == "unit":
        if r.span is None:
            text += "\nnot in a cached span"
        elif preview is not None and preview.decisions:
            text += f"\nreused {'up to ' if preview.bound else ''}{preview.reuse_fraction(r.span):.0%} of steps"
    return text


def _region_fill(r: Region, preview: Optional[Preview]) -> str:
    if r.kind != "unit":
        return _KIND_FILL.get(r.kind, "#ffffff")
    if r.span is None:
        return "#d9d9d9"
    return _mix(preview.reuse_fraction(r.span) if preview is not None else 0.0)


def _edge_label(e: Edge) -> str:
    names = ", ".join(e.values[:2]) + (f" +{len(e.values) - 2}" if len(e.values) > 2 else "")
    return f"{names}\n{e.shape}" if e.shape else names


def to_dot(info: GraphInfo, regions: Sequence[Region], edges: Sequence[Edge], preview: Optional[Preview] = None,
           policy: Optional[dict] = None) -> str:
    """Graphviz text of the unit dependency graph (``policy``: the report's description)."""
    title = f"graph {info.graph_id}: {len(info.spans)} cached span(s)"
    if policy:
        title += f", policy {policy_text(policy)}"
    if preview is not None:
        title += (f", ideal speedup {'at most ' if preview.bound else ''}{preview.ideal_speedup:.2f}x "
                  f"over {preview.steps} steps")
    out = [f"digraph {_dot_str(f'graph{info.graph_id}')} {{",
           f"  label={_dot_str(title)}; labelloc=t; rankdir=TB; newrank=true;",
           '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];',
           '  edge [fontname="Helvetica", fontsize=8, color="#555555"];']

    def node_line(r: Region, indent: str = "  ") -> str:
        shape = ', shape=ellipse' if r.kind in ("input", "output") else ""
        return (f"{indent}{_dot_str(r.key)} [label={_dot_str(_region_label(r, preview))}, "
                f"fillcolor={_dot_str(_region_fill(r, preview))}{shape}];")

    in_cluster = {k: [r for r in regions if r.kind == "unit" and r.span == k] for k in range(len(info.spans))}
    for r in regions:
        if not (r.kind == "unit" and r.span is not None):
            out.append(node_line(r))
    for k, members in in_cluster.items():
        if not members:
            continue
        sp = info.spans[k]
        lab = f"span {sp.name}"
        if preview is not None and preview.decisions:
            lab += (f": reused {'up to ' if preview.bound else ''}{preview.reuse_fraction(k):.0%} "
                    f"of {preview.steps} steps")
        out.append(f"  subgraph {_dot_str(f'cluster_span{k}')} {{")
        out.append(f'    label={_dot_str(lab)}; style="rounded,dashed"; color="#31a354"; fontname="Helvetica";')
        out.extend(node_line(r, "    ") for r in members)
        out.append("  }")
    for e in edges:
        attrs = [f"label={_dot_str(_edge_label(e))}"]
        if e.kind == "stream":
            attrs.append('penwidth=2.2, color="#08519c"')
        elif e.kind == "side":
            attrs.append('style=dashed, color="#969696"')
        out.append(f"  {_dot_str(e.src)} -> {_dot_str(e.dst)} [{', '.join(attrs)}];")
    out.append("}")
    return "\n".join(out) + "\n"


def _layout(regions: Sequence[Region], edges: Sequence[Edge]) -> dict[str, tuple[float, int]]:
    """A layered layout: rank = longest path from the inputs (regions come in topological
    order), positions within a rank by the mean position of their predecessors."""
    preds: dict[str, list[str]] = {r.key: [] for r in regions}
    for e in edges:
        preds[e.dst].append(e.src)
    rank: dict[str, int] = {}
    for r in regions:
        ps = [rank[p] for p in preds[r.key] if p in rank]
        rank[r.key] = (max(ps) + 1) if ps else 0
    by_rank: dict[int, list[str]] = {}
    for r in regions:
        by_rank.setdefault(rank[r.key], []).append(r.key)
    pos: dict[str, tuple[float, int]] = {}
    for k in sorted(by_rank):
        keys = by_rank[k]

        def bary(key):
            ps = [pos[p][0] for p in preds[key] if p in pos]
            return sum(ps) / len(ps) if ps else 0.0
        if k > 0:
            keys.sort(key=bary)
        width = len(keys)
        for i, key in enumerate(keys):
            pos[key] = (i - (width - 1) / 2.0, k)
    return pos


def _draw_unit_graph_png(info: GraphInfo, regions: Sequence[Region], edges: Sequence[Edge], path: Path,
                         preview: Optional[Preview]) -> None:
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pos = _layout(regions, edges)
    ranks = max(p[1] for p in pos.values()) + 1
    per_rank = max(sum(1 for p in pos.values() if p[1] == k) for k in range(ranks))
    w = max(6.0, 2.4 * per_rank + 1.5)
    h = min(max(3.0, 1.05 * ranks + 1.0), 160.0)
    fig = Figure(figsize=(w, h), dpi=72 if h > 60 else 90)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.01, 0.01, 0.98, 0.95))
    ax.set_axis_off()
    ax.set_xlim(-per_rank / 2.0 - 0.6, per_rank / 2.0 + 0.6)
    ax.set_ylim(-(ranks - 0.4), 0.6)
    xy = {k: (x * 1.0, -float(r)) for k, (x, r) in pos.items()}
    for e in edges:
        (x0, y0), (x1, y1) = xy[e.src], xy[e.dst]
        if e.kind == "stream":
            style = dict(arrowstyle="-|>", color="#08519c", lw=2.0)
        elif e.kind == "side":
            style = dict(arrowstyle="-|>", color="#969696", lw=0.7, linestyle="--",
                         connectionstyle="arc3,rad=0.25" if abs(y1 - y0) > 1.5 else "arc3")
        else:
            style = dict(arrowstyle="-|>", color="#555555", lw=1.0)
        ax.annotate("", xy=(x1, y1 + 0.22), xytext=(x0, y0 - 0.22), arrowprops=dict(shrinkA=0, shrinkB=0, **style))
        if e.kind == "stream":
            ax.text((x0 + x1) / 2 + 0.05, (y0 + y1) / 2, ", ".join(e.values[:2]), fontsize=6, color="#08519c",
                    ha="left", va="center")
    for r in regions:
        x, y = xy[r.key]
        box = "round,pad=0.3" if r.kind not in ("input", "output") else "round4,pad=0.3"
        ax.text(x, y, _region_label(r, preview), ha="center", va="center", fontsize=7,
                bbox=dict(boxstyle=box, fc=_region_fill(r, preview), ec="#31a354" if r.span is not None else "#444444",
                          lw=1.4 if r.span is not None else 0.8))
    title = f"graph {info.graph_id}: units and their dependencies"
    if preview is not None:
        title += f" (shade: fraction of {preview.steps} steps reused)"
    ax.set_title(title, fontsize=9)
    fig.savefig(str(path), format="png")


def render_unit_graph(info: GraphInfo, dot_text: str, regions: Sequence[Region], edges: Sequence[Edge],
                      stem: Path, renderer: str = "auto", preview: Optional[Preview] = None) -> Optional[Path]:
    """Render the unit graph next to ``stem``: ``stem.svg`` through Graphviz ``dot``
    (``renderer="dot"``, or ``"auto"`` when ``dot`` is installed), else ``stem.png``
    drawn with matplotlib.  ``"none"`` renders nothing."""
    if renderer not in RENDERERS:
        raise DumpError(f"renderer {renderer!r}: allowed {', '.join(RENDERERS)}")
    if renderer == "none":
        return None
    if renderer == "dot" or (renderer == "auto" and dot_available()):
        exe = shutil.which("dot")
        if exe is None:
            raise DumpError("renderer 'dot' needs Graphviz's dot on PATH (e.g. apt-get install graphviz); "
                            "use renderer 'matplotlib' or 'auto'")
        out = stem.with_suffix(".svg")
        try:
            subprocess.run([exe, "-Tsvg", "-o", str(out)], input=dot_text.encode(), check=True,
                           capture_output=True, timeout=120)
            return out
        except (subprocess.SubprocessError, OSError) as e:
            if renderer == "dot":
                raise DumpError(f"dot failed: {e}") from None
            log.warning("omnicache dump: dot failed (%s); drawing with matplotlib", e)
    out = stem.with_suffix(".png")
    _draw_unit_graph_png(info, regions, edges, out, preview)
    return out


# ============================================================================ plan heatmap

_PLAN_COLORS = {"computed": "#9ecae1", "reused": "#31a354", "forced": "#fd8d3c", "dynamic": "#fee391",
                "uncached": "#d9d9d9"}
_PLAN_LABELS = {"forced": "forced compute (no cache yet)", "dynamic": "decided at run time",
                "uncached": "not in a cached span"}


def draw_plan(info: GraphInfo, preview: Preview, path: Path, policy: Optional[dict] = None) -> Path:
    """The preview as a step x unit heatmap (PNG).  Units come from the analysis's groups;
    a unit inside one of ``info.spans`` (the preview's spans, in order) takes that span's
    state, the others are 'not in a cached span'."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    units = [(g.name, u.index) for g in info.analysis.groups for u in g.units]
    states = list(_PLAN_COLORS)
    code = {s: i for i, s in enumerate(states)}
    grid = []
    for row in preview.decisions:
        line = []
        for gname, idx in units:
            k = info.span_of_unit(gname, idx)
            line.append(code["uncached"] if k is None else code[row[k]])
        grid.append(line)
    n_units = max(len(units), 1)
    w = min(max(6.0, 0.22 * n_units + 3.0), 60.0)
    h = min(max(3.5, 0.2 * preview.steps + 2.2), 40.0)
    fig = Figure(figsize=(w, h), dpi=90)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    cmap = ListedColormap([_PLAN_COLORS[s] for s in states])
    if units:
        ax.imshow(grid, aspect="auto", cmap=cmap, vmin=-0.5, vmax=len(states) - 0.5, interpolation="nearest")
        every = max(1, len(units) // 60)
        ax.set_xticks(range(0, len(units), every))
        ax.set_xticklabels([f"{g}#{i}" for g, i in units][::every], rotation=90, fontsize=6)
        prev = None
        for x, (g, _) in enumerate(units):
            if prev is not None and g != prev:
                ax.axvline(x - 0.5, color="black", lw=0.8)
            prev = g
    else:
        ax.text(0.5, 0.5, "no cache units in this graph", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
    every = max(1, preview.steps // 30)
    ax.set_yticks(range(0, preview.steps, every))
    ax.tick_params(axis="y", labelsize=7)
    ax.set_ylabel("denoising step")
    ax.set_xlabel("cache unit")
    ax.set_title(f"graph {info.graph_id}: plan of policy {policy_text(policy)}\n"
                 f"ideal speedup {'at most ' if preview.bound else ''}{preview.ideal_speedup:.2f}x "
                 f"over {preview.steps} steps", fontsize=9)
    ax.legend(handles=[Patch(color=_PLAN_COLORS[s], label=_PLAN_LABELS.get(s, s)) for s in states],
              loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    fig.savefig(str(path), format="png", bbox_inches="tight")
    return path
