"""The dump's HTML pages: one per graph (``graph{id}_index.html``: summary, preview, images,
tables, links to every file) and the folder's ``index.html`` (every graph of the folder,
rebuilt from the ``graph*_manifest.json`` files each time a graph is dumped).  The pages read
the manifest (and, for the block and span tables, the analysis): they link only files the
manifest lists.
"""
from __future__ import annotations

import json
import os
from html import escape
from pathlib import Path
from typing import Any, Optional

from omnicompile.dump.info import GraphInfo

__all__ = ["graph_page", "write_index"]

_CSS = """body{font-family:system-ui,Helvetica,Arial,sans-serif;margin:1.5em 2em;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;
text-align:left}th{background:#f3f3f3}code{background:#f5f5f5;padding:0 3px}.bad{color:#a50f15}
.ok{color:#006d2c}img{max-width:100%;border:1px solid #ddd;margin:.4em 0}h2{margin-top:1.4em}"""

_FILE_LABELS = {"blocks": "block / stream map (JSON)", "costs": "per-unit costs (CSV)", "plan": "plan (JSON)",
                "plan_image": "plan heatmap", "units_dot": "unit graph (Graphviz)", "units_image": "unit graph image",
                "report_md": "report (Markdown)", "report_json": "report (JSON)", "manifest": "manifest (JSON)"}


def _e(x: Any) -> str:
    return escape(str(x))


def _link(name: Optional[str], text: Optional[str] = None) -> str:
    return f'<a href="{_e(name)}">{_e(text or name)}</a>' if name else "-"


def _analysis_tables(info: GraphInfo) -> list[str]:
    out = []
    if info.blocks.lists:
        out.append("<h2>block lists</h2><table><tr><th>name</th><th>blocks</th><th>found by</th>"
                   "<th>nodes per block</th></tr>")
        for bl in info.blocks.lists:
            npb = sorted({len(b.nodes) for b in bl.blocks})
            out.append(f"<tr><td><code>{_e(bl.name)}</code></td><td>{len(bl.blocks)}</td><td>{_e(bl.method)}"
                       f"</td><td>{_e(', '.join(map(str, npb)))}</td></tr>")
        out.append("</table>")
    if info.spans:
        out.append("<h2>cached spans</h2><table><tr><th>span</th><th>units</th><th>streams</th>"
                   "<th>side inputs</th><th>MFLOP</th></tr>")
        for sp in info.spans:
            streams = ", ".join(f"{s.name} {list(s.shape)}" for s in sp.live_streams)
            out.append(f"<tr><td><code>{_e(sp.name)}</code></td><td>{sp.last_unit - sp.first_unit + 1}</td>"
                       f"<td>{_e(streams)}</td><td>{_e(', '.join(n.name for n in sp.side_inputs) or '-')}</td>"
                       f"<td>{sp.flops / 1e6:.3f}</td></tr>")
        out.append("</table>")
    return out


def graph_page(m: dict, info: Optional[GraphInfo]) -> str:
    """The page of one graph, from its manifest ``m``."""
    gid = m["graph_id"]
    files = m["files"]
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>omnicache graph {gid}</title>",
           f"<style>{_CSS}</style></head><body>", '<p><a href="index.html">&larr; all graphs</a></p>',
           f"<h1>graph {gid}</h1>"]
    if "cached" in m:
        if m["cached"]:
            out.append(f"<p class='ok'>cached (guard <code>{_e(m.get('guard'))}</code>)</p>")
        else:
            fb = m.get("fallback") or {}
            out.append(f"<p class='bad'>compiled unchanged: <code>{_e(fb.get('code'))}</code> "
                       f"{_e(fb.get('subject', ''))} {_e(fb.get('message', ''))}</p>")
    if m.get("policy"):
        out.append(f"<p>policy <code>{_e(m['policy'])}</code></p>")
    bm = m.get("block_map")
    if bm:
        out.append(f"<p>{bm['nodes']} nodes, {bm['flops_per_call'] / 1e6:.3f} MFLOP per call (estimated), "
                   f"timestep input <code>{_e(bm['timestep_input'])}</code></p>")
    plan = m.get("plan")
    if plan:
        bound = "at most " if plan.get("bound") else ""
        out.append(f"<p>plan over {plan['steps']} steps: ideal speedup {bound}<b>{plan['ideal_speedup']:.2f}x</b> "
                   "(estimated FLOPs of the generation / FLOPs left)</p>")
        if plan.get("note"):
            out.append(f"<p>{_e(plan['note'])}</p>")
        out.append("<table><tr><th>span</th><th>plan (C computed, R reused, F forced compute, "
                   "? decided at run time)</th></tr>")
        out += [f"<tr><td><code>{_e(s)}</code></td><td><code>{_e(mk)}</code></td></tr>"
                for s, mk in plan["marks"].items()]
        out.append("</table>")
    if m["errors"]:
        out.append("<h2>not written</h2><ul>" + "".join(f"<li class='bad'>{_e(e)}</li>" for e in m["errors"])
                   + "</ul>")
    if files.get("plan_image"):
        out.append(f"<h2>plan: step &times; unit</h2><img src='{_e(files['plan_image'])}' alt='plan heatmap'>")
    if files.get("units_image"):
        out.append(f"<h2>unit dependency graph</h2><p>{_link(files.get('units_dot'), 'Graphviz source')}</p>"
                   f"<img src='{_e(files['units_image'])}' alt='unit graph'>")
    if info is not None:
        out += _analysis_tables(info)
    if m.get("refused"):
        out.append("<h2>not cached, and why</h2><ul>" + "".join(
            f"<li><code>{_e(r['code'])}</code> {_e(r.get('subject', ''))}: {_e(r['message'])}</li>"
            for r in m["refused"]) + "</ul>")
    costs = m.get("costs") or []
    if costs:
        out.append("<h2>per-unit costs</h2><p>" + _link(files.get("costs"), "CSV") + "</p><table><tr>" +
                   "".join(f"<th>{_e(k)}</th>" for k in costs[0]) + "</tr>")
        for row in costs[:500]:
            out.append("<tr>" + "".join(f"<td>{_e(f'{v:.3f}' if isinstance(v, float) else v)}</td>"
                                        for v in row.values()) + "</tr>")
        out.append("</table>")
    out.append("<h2>files</h2><table><tr><th>what</th><th>file</th></tr>")
    for key, entry in m["code"].items():
        if not entry:
            continue
        note = "" if entry.get("reloadable") else f" (text only: {entry.get('reload_error')})"
        out.append(f"<tr><td>graph {_e(key)}{_e(note)}</td><td>{_link(entry['py'])} &middot; "
                   f"{_link(entry.get('txt'), 'readable, with shapes')}</td></tr>")
    for key, label in _FILE_LABELS.items():
        if files.get(key):
            out.append(f"<tr><td>{_e(label)}</td><td>{_link(files[key])}</td></tr>")
    out.append("</table></body></html>")
    return "\n".join(out) + "\n"


def write_index(dump_dir: str | os.PathLike) -> Path:
    """(Re)write ``index.html`` listing every ``graph*_manifest.json`` of the folder."""
    folder = Path(dump_dir)
    manifests = []
    for f in folder.glob("graph*_manifest.json"):
        try:
            manifests.append(json.loads(f.read_text()))
        except (OSError, ValueError):
            continue
    manifests.sort(key=lambda m: m.get("graph_id", 0))
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>omnicache dump</title>",
           f"<style>{_CSS}</style></head><body><h1>omnicache dump</h1>",
           f"<p>{len(manifests)} graph(s) in <code>{_e(folder.resolve())}</code></p>",
           "<table><tr><th>graph</th><th>status</th><th>nodes</th><th>spans</th><th>policy</th>"
           "<th>ideal speedup</th><th>plan</th><th>unit graph</th><th>code</th><th>errors</th></tr>"]
    for m in manifests:
        files = m.get("files", {})
        if "cached" not in m:
            status = "-"
        elif m["cached"]:
            status = "<span class='ok'>cached</span>"
        else:
            status = f"<span class='bad'>unchanged: {_e((m.get('fallback') or {}).get('code'))}</span>"
        plan = m.get("plan") or {}
        code = " ".join(_link(e["py"], k) for k, e in (m.get("code") or {}).items() if e)
        out.append(
            f"<tr><td>{_link(files.get('page'), str(m.get('graph_id')))}</td><td>{status}</td>"
            f"<td>{(m.get('block_map') or {}).get('nodes', '-')}</td>"
            f"<td>{_e(', '.join(m.get('spans', [])) or '-')}</td><td><code>{_e(m.get('policy') or '-')}</code></td>"
            f"<td>{'&le; ' if plan.get('bound') else ''}{plan.get('ideal_speedup', 1.0):.2f}x</td>"
            f"<td>{_link(files.get('plan_image'), 'heatmap')}</td>"
            f"<td>{_link(files.get('units_image'), 'image')} {_link(files.get('units_dot'), 'dot')}</td>"
            f"<td>{code}</td><td>{len(m.get('errors', []))}</td></tr>")
    out.append("</table></body></html>")
    path = folder / "index.html"
    path.write_text("\n".join(out) + "\n")
    return path
