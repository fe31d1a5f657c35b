"""``omnicache explain`` and ``omnicache dump``: what the backend does to a model.

Both trace SPEC through an :class:`~omnicompile.OmniCache`
(:func:`~omnicompile.cli.common.trace`) and read each graph's report and runtime from
``oc.graphs``.  The tables come from :mod:`omnicompile.dump` (the analysis passes rerun on a
copy of each graph); the plan over ``--steps N`` is the runtime's own
``runtime.preview(N)`` — every step computed for a graph compiled unchanged — and the policy
and guard are the report's.  ``explain`` prints it (``--json``: the same data as JSON);
``dump`` writes the full dump of every graph (:func:`omnicompile.dump.write_graph_dump`,
strict when the options or ``OMNICACHE_STRICT=1`` say so) and exits 1 when a file could not
be written.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from omnicompile.cli.common import (
    EXIT_FAILURE, EXIT_OK, Progress, Traced, UsageError, config_from_args, load_spec, no_env_dump_dir,
    parse_json_arg, steps_from_args, trace,
)

__all__ = ["cmd_explain", "cmd_dump", "explain_data", "explain_text"]


def _shape(m: dict) -> str:
    shape = m.get("shape")
    text = "[" + ", ".join(map(str, shape)) + "]" if shape is not None else "(not a tensor)"
    dtype = str(m["dtype"]).replace("torch.", "") if m.get("dtype") else ""
    return f"{text} {dtype}" if dtype else text


def _strip_suffix(name: str) -> str:
    return re.sub(r"_\d+$", "", name)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def _mflop(f: float) -> str:
    return f"{f / 1e6:.3g} MFLOP"


def _nondefault(options: dict) -> dict:
    from omnicompile.config import OmniCacheConfig

    default = OmniCacheConfig().to_dict()
    return {k: v for k, v in options.items() if default.get(k, object()) != v}


# ============================================================================ explain


def explain_data(spec: str, model, config, traced: Traced, steps: int) -> dict:
    """Everything ``explain`` prints, JSON-ready (``--json``)."""
    from omnicompile.dump import analyze_graph, block_map, graph_preview, merged_reasons, unit_costs

    graphs = []
    total = saved = 0
    for tg in traced.graphs:
        rep, rt = tg.report, tg.runtime
        info = analyze_graph(tg.gm, rep.graph_id, spans=rt.spans if rt is not None else None)
        preview = graph_preview(info, rt, steps, rep)
        d = block_map(info, rep)
        d["cached"] = rep.cached
        d["refused"] = [r.to_dict() for r in merged_reasons(info, rep)]
        d["fallback"] = rep.fallback.to_dict() if rep.fallback else None
        d["variants"] = list(rt.graphs) if rt is not None else []
        pd = preview.to_dict()
        del pd["decisions"]
        d["plan"] = pd
        d["unit_costs"] = unit_costs(info)
        graphs.append(d)
        total += preview.flops_per_call * preview.steps
        saved += preview.flops_saved
    return {
        "spec": spec, "model": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "options": config.to_dict(), "steps": steps,
        "dynamo": {"graphs": len(traced.graphs), "graph_breaks": len(traced.break_reasons),
                   "break_reasons": traced.break_reasons, "seconds": traced.seconds},
        "graphs": graphs,
        "flops_per_step": total // steps if steps else 0,
        "ideal_speedup": total / (total - saved) if total and total > saved else 1.0,
    }


def _graph_text(g: dict) -> list[str]:
    from omnicompile.dump import policy_text

    out = []
    head = f"graph {g['graph_id']}: {g['nodes']} nodes, {_mflop(g['flops_per_call'])} per call (estimated)"
    if g["cached"]:
        head += f" -> cached, guard {g['guard']}, compiled graphs: {', '.join(g['variants']) or '-'}"
    else:
        fb = g["fallback"] or {"code": "unchanged", "message": "", "subject": ""}
        head += f" -> compiled unchanged [{fb['code']}] {fb['message']}"
    out.append(head)
    ins = ", ".join(f"{i['name']} {_shape(i)}" for i in g["inputs"])
    out.append(f"  inputs: {ins or '-'}; {g['parameters']['count']} parameter inputs "
               f"({_size(g['parameters']['bytes'])})")
    out.append(f"  timestep input: {g['timestep_input'] or 'none found'}")
    if g["block_lists"]:
        out.append("  block lists:")
        w = max(len(bl["name"]) for bl in g["block_lists"])
        for bl in g["block_lists"]:
            npb = sorted({b["nodes"] for b in bl["blocks"]})
            fl = sorted({b["flops"] for b in bl["blocks"]})
            nodes = f"{npb[0]}" if len(npb) == 1 else f"{npb[0]}-{npb[-1]}"
            flops = _mflop(fl[0]) if len(fl) == 1 else f"{fl[0] / 1e6:.3g}-{_mflop(fl[-1])}"
            out.append(f"    {bl['name']:<{w}}  {bl['count']} blocks, {nodes} nodes and {flops} per block"
                       f" (found by {bl['method']})")
    else:
        out.append("  block lists: none")
    formulas: dict = {}
    for uc in g.get("unit_costs", []):
        if uc.get("flops_symbolic"):
            formulas.setdefault(uc["group"], []).append(uc["flops_symbolic"])
    if formulas:
        out.append("  FLOPs per unit, in the data sizes (cost model, sympy):")
        for grp, fs in formulas.items():
            text = fs[0] if len(set(fs)) == 1 else "; ".join(f"#{i}: {f}" for i, f in enumerate(fs))
            out.append(f"    {grp}: {text}")
    if g["groups"]:
        out.append("  streams (unit to unit) and side inputs (read by every unit):")
        by_group = {s["group"]: s for s in g["spans"]}
        for grp in g["groups"]:
            sp = by_group.get(grp["name"])
            if sp is not None:
                streams = ", ".join(f"{st['name']} {_shape(st)}" + ("" if st["output"] else " (dead after the span)")
                                    for st in sp["streams"])
                sides = ", ".join(f"{x['name']} {_shape(x)}" for x in sp["side_inputs"]) or "-"
            else:
                streams = ", ".join(f"{_strip_suffix(ln['output'])} {_shape(ln)}" for ln in grp["links"][0]) \
                    if grp["links"] else "-"
                sides = "? (the group has no cacheable span)"
            out.append(f"    {grp['name']}: {len(grp['units'])} units; streams {streams}; side inputs {sides}")
    if g["spans"]:
        out.append("  spans to cache:" if g["cached"] else
                   "  cacheable spans (unused: the graph is compiled unchanged, see above):")
        for s in g["spans"]:
            live = ", ".join(st["name"] for st in s["streams"] if st["output"] is not None)
            out.append(f"    {s['name']}: units {s['units'][0]}-{s['units'][1]}, {_mflop(s['flops'])} "
                       f"({s['flops_fraction']:.1%} of the graph), cached streams {live}")
    if g["refused"]:
        out.append("  not cached:")
        for r in g["refused"]:
            subj = f"{r['subject']}: " if r.get("subject") else ""
            out.append(f"    [{r['code']}] {subj}{r['message']}")
    p = g["plan"]
    legend = "C computed, R reused, F computed for lack of a cache" + \
        (", ? decided at run time" if p.get("ideal_speedup_is_bound") else "")
    out.append(f"  plan over {p['steps']} steps of policy {policy_text(g['policy'])} ({legend}):")
    if p["marks"]:
        w = max(len(s) for s in p["marks"])
        out += [f"    {s:<{w}}  {m}" for s, m in p["marks"].items()]
    else:
        out.append("    (no span to cache: every step computes the whole graph)")
    if p.get("note"):
        out.append(f"    note: {p['note']}")
    bound = "at most " if p.get("ideal_speedup_is_bound") else ""
    out.append(f"  ideal speedup {bound}{p['ideal_speedup']:.2f}x "
               f"({p['flops_saved_fraction']:.1%} of the estimated FLOPs skipped)")
    return out


def explain_text(d: dict) -> str:
    """``explain``'s text from :func:`explain_data`."""
    out = [f"omnicache explain {d['spec']}",
           f"model {d['model']}, {d['parameters']:,} parameters; options {json.dumps(_nondefault(d['options']))}"]
    dy = d["dynamo"]
    out.append(f"Dynamo: {dy['graphs']} graph(s), {dy['graph_breaks']} graph break(s) ({dy['seconds']:.1f}s)")
    out += [f"  break: {r['summary']}" + (f" at {r['where']}" if r["where"] else "") for r in dy["break_reasons"]]
    for g in d["graphs"]:
        out.append("")
        out += _graph_text(g)
    out.append("")
    bound = "at most " if any(g["plan"].get("ideal_speedup_is_bound") for g in d["graphs"]) else ""
    out.append(f"ideal speedup of the whole model over {d['steps']} steps: {bound}{d['ideal_speedup']:.2f}x "
               "(matmul FLOPs only; elementwise work, residual adds and overheads not counted)")
    if d["options"].get("inner_backend") != "eager":
        out.append("note: explain runs the rewrite with inner_backend=eager; Inductor compiles the same graphs")
    return "\n".join(out)


def cmd_explain(args, extra, progress: Progress) -> int:
    config = config_from_args(args)
    steps = steps_from_args(args, config)
    spec_kwargs = parse_json_arg(args.spec_kwargs, "--spec-kwargs")
    progress(f"loading {args.spec}")
    model, ex = load_spec(args.spec, spec_kwargs)
    traced = trace(model, ex, config, progress)
    data = explain_data(args.spec, model, config, traced, steps)
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        print(explain_text(data))
    return EXIT_OK


# ============================================================================ dump


def _check_render(render: str) -> bool:
    """Whether images are drawn; UsageError when the renderer asked for is missing."""
    from omnicompile.dump import VizUnavailable, dot_available, require_matplotlib

    if render == "none":
        return False
    if render == "dot" and not dot_available():
        raise UsageError("--render dot needs Graphviz's dot on PATH (apt-get install graphviz); "
                         "--render auto falls back to a matplotlib drawing")
    try:
        require_matplotlib()
    except VizUnavailable as e:
        raise UsageError(f"{e} (or pass --render none to skip the images)") from None
    return True


def cmd_dump(args, extra, progress: Progress) -> int:
    from omnicompile.dump import write_graph_dump

    config = config_from_args(args)
    steps = steps_from_args(args, config)
    spec_kwargs = parse_json_arg(args.spec_kwargs, "--spec-kwargs")
    images = _check_render(args.render)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    progress(f"loading {args.spec}")
    model, ex = load_spec(args.spec, spec_kwargs)
    traced = trace(model, ex, config, progress)
    errors = 0
    manifests = []
    with no_env_dump_dir():
        for tg in progress.iterate(traced.graphs, "dumping graphs"):
            progress(f"dumping graph {tg.report.graph_id}")
            m = write_graph_dump(out, tg.report.graph_id, tg.gm, tg.report, tg.runtime, config=traced.config,
                                 steps=steps, renderer=args.render if images else "none", images=images,
                                 strict=traced.config.strict)
            manifests.append(m)
            errors += len(m["errors"])
    print(f"wrote {len(manifests)} graph(s) to {out}; open {out / 'index.html'}")
    for m in manifests:
        files = [e["py"] for e in m["code"].values() if e] + [f for k, f in m["files"].items()]
        status = "cached" if m.get("cached") else f"unchanged [{(m.get('fallback') or {}).get('code')}]"
        print(f"  graph {m['graph_id']} ({status}): {', '.join(files)}")
        for e in m["errors"]:
            print(f"  graph {m['graph_id']}: not written: {e}", file=sys.stderr)
    return EXIT_OK if errors == 0 else EXIT_FAILURE

