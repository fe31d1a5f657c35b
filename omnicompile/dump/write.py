"""Writing the dump of one graph: :func:`write_graph_dump`, its manifest and the folder's index.

Order: Dynamo's graph first (so that a failure later still leaves it on disk), then the
analysis, the runtime's preview, the tables, the rewritten graphs *as the runtime compiled
them* (``runtime.graphs``, with ``runtime.signatures``: nothing is rebuilt), the drawings,
the report, the page, the manifest and ``index.html``.  Each step that fails is logged and
listed under ``errors`` in the manifest and on the page, and the others still run — unless
``strict`` (the backend passes its config's ``strict``; ``OMNICACHE_STRICT=1``): then the
exception propagates.  A missing matplotlib
(:class:`~omnicompile.dump.errors.VizUnavailable`) is a deliberate skip in both modes.
"""
from __future__ import annotations

import csv
import datetime
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch.fx as fx

from omnicompile.config import OmniCacheConfig
from omnicompile.dump.code import code_header, write_code
from omnicompile.dump.draw import draw_plan, render_unit_graph, to_dot
from omnicompile.dump.errors import DumpError, VizUnavailable
from omnicompile.dump.html import graph_page, write_index
from omnicompile.dump.info import analyze_graph, graph_preview, merged_reasons, policy_text, preview_steps
from omnicompile.dump.tables import block_map, unit_costs, unit_graph
from omnicompile.passes.blocks import BlockAnalysis
from omnicompile.passes.spans import SpanAnalysis
from omnicompile.report import GraphReport, Report
from omnicompile.runtime.base import Runtime

log = logging.getLogger("omnicompile")

__all__ = ["write_graph_dump"]


def write_graph_dump(dump_dir: str | os.PathLike, graph_id: int, gm: fx.GraphModule,
                     report: Optional[GraphReport] = None, runtime: Optional[Runtime] = None, *,
                     config: Optional[OmniCacheConfig] = None, blocks: Optional[BlockAnalysis] = None,
                     analysis: Optional[SpanAnalysis] = None, steps: Optional[int] = None,
                     renderer: str = "auto", images: bool = True, strict: bool = False) -> dict:
    """Write the full dump of one graph into ``dump_dir`` and refresh ``index.html``.

    ``gm`` is Dynamo's graph as the backend received it; ``report`` its
    :class:`~omnicompile.report.GraphReport` (default: the runtime's); ``runtime`` the
    :class:`~omnicompile.runtime.base.Runtime` when the graph was rewritten — its
    ``graphs`` are the rewritten graphs written, its ``preview(steps)`` the plan; without
    one there are no rewritten graphs and every step is previewed computed.
    ``blocks``/``analysis`` are the backend's analysis results (recomputed on a copy when
    missing).  ``steps`` sets the preview's length (default ``num_steps`` of the config —
    ``config``, else the runtime's — or :data:`~omnicompile.dump.info.DEFAULT_STEPS`).

    Returns the manifest (also written as ``graph{id}_manifest.json``); errors are logged
    and listed in it, or raised with ``strict`` (see the module docstring)."""
    folder = Path(dump_dir)
    p = f"graph{graph_id}_"
    manifest: dict[str, Any] = {"graph_id": graph_id, "files": {}, "code": {}, "errors": [],
                                "written": datetime.datetime.now().isoformat(timespec="seconds")}
    errors: list[str] = manifest["errors"]

    def attempt(what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except VizUnavailable as e:
            errors.append(f"{what}: {e}")
            log.warning("omnicache dump: %s skipped: %s", what, e)
        except Exception as e:
            if strict:
                raise
            errors.append(f"{what}: {type(e).__name__}: {e}")
            log.warning("omnicache dump: graph %s: %s failed: %s: %s", graph_id, what, type(e).__name__, e)
        return None

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if strict:
            raise DumpError(f"cannot create the dump folder {folder}: {e}") from e
        log.warning("omnicache dump: cannot create %s: %s", folder, e)
        errors.append(f"cannot create {folder}: {e}")
        return manifest
    if report is None and runtime is not None:
        report = runtime.report
    if config is None and runtime is not None:
        config = runtime.config
    policy = report.policy if report is not None else None
    guard = (report.guard or None) if report is not None else None
    # before: always first, so that a crash later still leaves Dynamo's graph on disk
    manifest["code"]["before"] = attempt("before graph", lambda: write_code(
        folder, p + "before", gm, code_header(graph_id, "before the rewrite (Dynamo's graph)",
                                              "(*inputs) -> outputs, as Dynamo calls the graph")))
    if runtime is not None:
        for name, g in runtime.graphs.items():
            header = code_header(graph_id, f"after the rewrite ({name})", runtime.signatures.get(name, ""),
                                 policy, guard)
            manifest["code"][f"after_{name}"] = attempt(
                f"rewritten graph {name}", lambda name=name, g=g, header=header:
                write_code(folder, f"{p}after_{name}", g, header))
    info = attempt("analysis", lambda: analyze_graph(gm, graph_id, blocks=blocks, analysis=analysis,
                                                     spans=runtime.spans if runtime is not None else None))
    if info is not None:
        n_steps = preview_steps(steps, config)
        preview = attempt("plan", lambda: graph_preview(info, runtime, n_steps, report))

        def tables():
            bm = block_map(info, report)
            if report is not None:
                bm["cached"] = bool(report.cached)
                bm["fallback"] = report.fallback.to_dict() if report.fallback else None
            _write_json(folder / f"{p}blocks.json", bm)
            manifest["files"]["blocks"] = f"{p}blocks.json"
            manifest["block_map"] = {k: bm[k] for k in ("nodes", "flops_per_call", "timestep_input")}
            manifest["spans"] = [s["name"] for s in bm["spans"]]

        def costs():
            rows = unit_costs(info)
            _write_csv(folder / f"{p}costs.csv", rows)
            manifest["files"]["costs"] = f"{p}costs.csv"
            manifest["costs"] = rows

        def plan():
            _write_json(folder / f"{p}plan.json", preview.to_dict())
            manifest["files"]["plan"] = f"{p}plan.json"
            manifest["plan"] = {"steps": preview.steps, "ideal_speedup": preview.ideal_speedup,
                                "bound": preview.bound,
                                "marks": {s: preview.marks(k) for k, s in enumerate(preview.spans)},
                                "note": preview.note}

        def units():
            regions, edges = unit_graph(info)
            dot_text = to_dot(info, regions, edges, preview, policy)
            (folder / f"{p}units.dot").write_text(dot_text)
            manifest["files"]["units_dot"] = f"{p}units.dot"
            return dot_text, regions, edges

        attempt("block map", tables)
        attempt("unit costs", costs)
        if preview is not None:
            attempt("plan file", plan)
        ug = attempt("unit graph", units)
        if ug is not None and images:
            dot_text, regions, edges = ug
            out = attempt("unit graph rendering",
                          lambda: render_unit_graph(info, dot_text, regions, edges, folder / f"{p}units",
                                                    renderer, preview))
            if out is not None:
                manifest["files"]["units_image"] = out.name
        if images and preview is not None:
            out = attempt("plan heatmap", lambda: draw_plan(info, preview, folder / f"{p}plan.png", policy))
            if out is not None:
                manifest["files"]["plan_image"] = out.name
    if report is not None:
        def reports():
            (folder / f"{p}report.md").write_text(Report([report]).to_markdown())
            (folder / f"{p}report.json").write_text(Report([report]).to_json())
            return True
        if attempt("report", reports):
            manifest["files"]["report_md"] = f"{p}report.md"
            manifest["files"]["report_json"] = f"{p}report.json"
        manifest["cached"] = bool(report.cached)
        manifest["fallback"] = report.fallback.to_dict() if report.fallback else None
    manifest["refused"] = [r.to_dict() for r in merged_reasons(info, report)]
    manifest["policy"] = policy_text(policy) if policy is not None else None
    manifest["guard"] = guard
    manifest["files"]["page"] = f"{p}index.html"
    manifest["files"]["manifest"] = f"{p}manifest.json"
    attempt("graph page", lambda: (folder / f"{p}index.html").write_text(graph_page(manifest, info)))
    attempt("manifest", lambda: _write_json(folder / f"{p}manifest.json", manifest))
    attempt("index", lambda: write_index(folder))
    return manifest


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def _write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    path.write_text(buf.getvalue())
