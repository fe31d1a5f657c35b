"""The ``omnicache`` command (console script; also ``python -m omnicompile``).

A compiler that rewrites someone's model must show its work.  Subcommands::

    omnicache explain SPEC [--options JSON] [--steps N] [--json]
    omnicache dump SPEC --out DIR [--options JSON] [--steps N] [--render auto|dot|matplotlib|none]
    omnicache calibrate SPEC --options '{"policy": NAME}' [--out FILE] [--steps N] [--sampler M:F]
    omnicache profile SPEC --out FILE [--method final|residual] [--options JSON] [--steps N] [--sampler M:F]
    omnicache plan PROFILE [--target-speedup S] [--cache-interval N] [--out FILE]
    omnicache bench [--report-format markdown|text|json] [--report-out FILE] [bench/speed.py options]

``SPEC`` is ``module:callable`` (or ``path/to/file.py:callable``) naming a function that
returns ``(model, example_kwargs)``: ``omnicompile.testing:tiny_flux`` and the other tiny
configurations, or ``bench.models:reference_spec`` from a source checkout (the current
directory is importable, as with ``python -m``).  ``--spec-kwargs JSON`` passes keyword
arguments to it.  ``--options`` takes the option names of
:class:`~omnicompile.config.OmniCacheConfig`, as JSON text or ``@file.json``.

How ``explain`` and ``dump`` work: the model is compiled with ``torch.compile`` (no
``fullgraph``, ``dynamic=False``) through Dynamo's ``ExplainWithBackend``, which counts
graphs and graph breaks, wrapped around a backend that records each graph and hands it to
:class:`~omnicompile.OmniCache` with ``inner_backend="eager"``; the model then runs once on
the example kwargs.  So the reports (cached or not, and the structured reason) are the
backend's own; only Inductor is skipped — the rewrite does not depend on it.  The analysis
tables, the plan and the ideal speedup come from :mod:`omnicompile.dump`, which reruns the
pure analysis passes on a copy of each graph.  The graph ids are the backend's own
(a process-wide counter), as in a ``dump_dir`` dump.

``calibrate`` is the entry point for policies that learn from a first run.  A policy class
opts in with ``calibratable = True`` (``trajectory`` and its presets do); the command
compiles the model with :class:`~omnicompile.OmniCache` (the given options, Inductor
unless ``inner_backend`` says otherwise) and runs one generation as
``OmniCache.calibrate(fn, path=--out)``.  The generation is :func:`euler_sampler` (the
timestep counted down linearly from the example's, Euler flow-matching updates of
``hidden_states``) or ``--sampler module:callable`` called as ``f(model, example_kwargs,
steps)``.  A policy without calibration, or none registered, is a usage error (exit 2).
Where the runtime exposes its derived schedule (``runtime.schedule``), it is printed.

``profile`` and ``plan`` serve the ``layered`` policy (:mod:`omnicompile.layered`):
``profile`` compiles SPEC with ``policy="layered"`` and measures, for every (block, step),
the quality cost of reusing it (``--method final``: one generation per pair, the deviation
of the final sample; ``residual``: the one-generation proxy), writes the profile JSON and
prints the plan the options' ``target_speedup`` / ``cache_interval`` give; ``plan`` plans a
schedule from a profile without the model (``--out`` writes it as schedule JSON).  Either
file is then used as ``{"policy": "layered", "calibrate": FILE}``.

``bench`` runs ``bench/speed.py``'s ``main(argv)`` from the source checkout (found next to
the installed package, in the current directory, or in ``$OMNICACHE_BENCH_DIR`` /
``--bench-dir``), passing it every option it does not know itself, then prints the
reports of the OmniCache backends the benchmark created (collected by substituting a
recording subclass for ``omnicompile.OmniCache`` while it runs, plus the graphs compiled
through ``backend="omnicache"``) as Markdown, text or JSON.

Exit codes: 0 success; 2 a usage error — bad SPEC, a module that cannot be imported, a
callable that returns the wrong thing, bad options, nothing to calibrate — reported as one
line on stderr, no traceback; 1 anything else (``--traceback`` shows it).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

__all__ = ["main", "load_spec", "UsageError", "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

log = logging.getLogger("omnicompile")


class UsageError(Exception):
    """A mistake of the caller's: printed as one line, exit code 2.  ``original`` is the
    exception behind it (shown with ``--traceback``)."""

    def __init__(self, message: str, original: Optional[BaseException] = None):
        super().__init__(message)
        self.original = original


class _Failure(Exception):
    """A run that failed for a reason worth one line (exit code 1)."""


# ============================================================================ small helpers


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


class _Progress:
    """Progress lines on stderr, shown when stderr is a terminal (or ``--progress``)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(f"[omnicache {time.perf_counter() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    def iterate(self, items: list, desc: str):
        if self.enabled and len(items) > 1:
            try:
                from tqdm import tqdm
                return tqdm(items, desc=desc, file=sys.stderr, leave=False)
            except ImportError:
                pass
        return items

    def bar(self, done: int, total: int, message: str = "") -> None:
        """A callback ``progress(done, total, message)`` for long loops (calibration)."""
        if self.enabled:
            width = 30
            fill = int(width * done / total) if total else width
            print(f"\r[{'#' * fill}{'.' * (width - fill)}] {done}/{total} {message}", end="",
                  file=sys.stderr, flush=True)
            if done >= total:
                print(file=sys.stderr, flush=True)


def _parse_json_arg(text: Optional[str], what: str) -> dict:
    if text is None:
        return {}
    src = text
    if text.startswith("@"):
        path = Path(text[1:])
        try:
            src = path.read_text()
        except OSError as e:
            raise UsageError(f"{what}: cannot read {path}: {e.strerror or e}") from None
    try:
        value = json.loads(src)
    except json.JSONDecodeError as e:
        raise UsageError(f"{what} is not valid JSON ({e.msg} at position {e.pos}): {src!r}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{what} must be a JSON object like '{{\"policy\": \"static\"}}', got {src!r}")
    return value


def _config(args):
    from omnicompile.config import OmniCacheConfig
    from omnicompile.errors import ConfigError

    options = _parse_json_arg(args.options, "--options")
    try:
        return OmniCacheConfig.from_options(options)
    except ConfigError as e:
        raise UsageError(str(e)) from None


@contextlib.contextmanager
def _no_env_dump_dir():
    """The CLI writes its own dumps: keep OMNICACHE_DUMP_DIR from reaching the backend."""
    old = os.environ.pop("OMNICACHE_DUMP_DIR", None)
    try:
        yield
    finally:
        if old is not None:
            os.environ["OMNICACHE_DUMP_DIR"] = old


# ============================================================================ SPEC


def _resolve(spec: str, what: str = "SPEC") -> Any:
    """The object named by ``module:attr`` or ``file.py:attr`` (UsageError otherwise)."""
    if ":" not in spec:
        raise UsageError(f"{what} {spec!r} must look like module:callable (e.g. omnicompile.testing:tiny_flux)")
    mod_name, _, attr = spec.rpartition(":")
    if not mod_name or not attr:
        raise UsageError(f"{what} {spec!r} must look like module:callable (e.g. omnicompile.testing:tiny_flux)")
    if mod_name.endswith(".py") or os.sep in mod_name or "/" in mod_name:
        path = Path(mod_name)
        if not path.is_file():
            raise UsageError(f"{what} {spec!r}: no such file {mod_name}")
        name = "omnicache_spec_" + "".join(c if c.isalnum() else "_" for c in path.stem)
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise UsageError(f"{what} {spec!r}: {mod_name} is not a Python file")
        module = importlib.util.module_from_spec(module_spec)
        sys.path.insert(0, str(path.resolve().parent))   # its sibling modules import
        try:
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
        except Exception as e:
            raise UsageError(f"{what} {spec!r}: importing {mod_name} failed: {_first_line(e)}", e) from None
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())   # like python -m: the current directory is importable
        try:
            module = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name and (mod_name == e.name or mod_name.startswith(e.name + ".")):
                raise UsageError(f"{what} {spec!r}: no module named {e.name!r} (run from the directory that "
                                 "contains it, or give a path: file.py:callable)") from None
            raise UsageError(f"{what} {spec!r}: importing {mod_name} failed: {_first_line(e)}", e) from None
        except Exception as e:
            raise UsageError(f"{what} {spec!r}: importing {mod_name} failed: {_first_line(e)}", e) from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"{what} {spec!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"{what} {spec!r}: {attr} is a {type(obj).__name__}, not a callable")
    return obj


def load_spec(spec: str, kwargs: Optional[dict] = None):
    """Resolve ``module:callable`` (or ``file.py:callable``), call it, check the result.

    Returns ``(model, example_kwargs)``; raises :class:`UsageError` with one line saying
    what is wrong."""
    import torch

    obj = _resolve(spec, "SPEC")
    attr = spec.rpartition(":")[2]
    try:
        result = obj(**(kwargs or {}))
    except Exception as e:
        raise UsageError(f"SPEC {spec!r}: calling {attr}() raised {_first_line(e)}", e) from None
    expect = "must return (model, example_kwargs): a torch.nn.Module and a dict of its forward's keyword arguments"
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        got = type(result).__name__ + (f" of length {len(result)}" if isinstance(result, (tuple, list)) else "")
        raise UsageError(f"SPEC {spec!r}: {attr}() {expect}; got {got}")
    model, ex = result
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"SPEC {spec!r}: {attr}() {expect}; its model is a {type(model).__name__}")
    if not isinstance(ex, dict) or not all(isinstance(k, str) for k in ex):
        raise UsageError(f"SPEC {spec!r}: {attr}() {expect}; its example_kwargs is a {type(ex).__name__}")
    return model, ex


# ============================================================================ tracing


@dataclasses.dataclass
class _Traced:
    oc: Any                                    # the OmniCache that compiled every graph
    graphs: list                               # [(gm, example_inputs, GraphReport, GraphRuntime | None)]
    break_reasons: list[dict]                  # {"summary", "where", "reason"}
    seconds: float


def _trace(model, example_kwargs: dict, config, progress: _Progress) -> _Traced:
    import torch
    from torch._dynamo.backends.debugging import ExplainWithBackend

    from omnicompile import OmniCache

    torch._dynamo.reset()
    with _no_env_dump_dir():
        oc = OmniCache(config.replace(inner_backend="eager", dump_dir=None))
    captured: list = []

    def capture(gm, example_inputs):
        captured.append((gm, list(example_inputs)))
        return oc(gm, example_inputs)

    explainer = ExplainWithBackend(capture)
    progress(f"tracing {type(model).__name__} with Dynamo")
    t0 = time.perf_counter()
    quiet = log.getEffectiveLevel() > logging.INFO
    old_level = log.level
    if quiet:
        log.setLevel(logging.ERROR)   # fallbacks are reported below, with their reason
    try:
        with _no_env_dump_dir(), torch.no_grad():
            torch.compile(model, backend=explainer, dynamic=False)(**example_kwargs)
    except Exception as e:
        raise _Failure(f"running the model on its example kwargs under torch.compile failed: {_first_line(e)}") from e
    finally:
        log.setLevel(old_level)
        torch._dynamo.reset()
    seconds = time.perf_counter() - t0
    reports = oc.report().graphs
    runtimes = {id(rt.report): rt for rt in oc.runtimes}
    graphs = [(gm, ex, rep, runtimes.get(id(rep))) for (gm, ex), rep in zip(captured, reports)]
    reasons = []
    for r in explainer.break_reasons:
        stack = getattr(r, "user_stack", None) or []
        where = f"{stack[-1].filename}:{stack[-1].lineno}" if stack else ""
        text = str(getattr(r, "reason", r)).strip()
        reasons.append({"summary": text.splitlines()[0] if text else "", "where": where, "reason": text})
    progress(f"traced {len(graphs)} graph(s) in {seconds:.1f}s")
    return _Traced(oc, graphs, reasons, seconds)


# ============================================================================ explain


def _shape(m: dict) -> str:
    shape = m.get("shape")
    text = "[" + ", ".join(map(str, shape)) + "]" if shape is not None else "(not a tensor)"
    dtype = str(m["dtype"]).replace("torch.", "") if m.get("dtype") else ""
    return f"{text} {dtype}" if dtype else text


def _strip_suffix(name: str) -> str:
    import re

    return re.sub(r"_\d+$", "", name)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def _mflop(f: float) -> str:
    return f"{f / 1e6:.3g} MFLOP"


def _explain_data(spec: str, model, config, traced: _Traced, steps: int) -> dict:
    from omnicompile.dump import analyze_graph, block_map, merged_reasons, plan_for, unit_costs

    graphs = []
    total = saved = 0
    for gm, _ex, rep, rt in traced.graphs:
        info = analyze_graph(gm, config, rep.graph_id, policy=getattr(rt, "policy", None),
                             spans=getattr(rt, "spans", None))
        plan = plan_for(info, steps, cacheable=rep.cached, runtime=rt)
        d = block_map(info)
        d["cached"] = rep.cached
        d["refused"] = [r.to_dict() for r in merged_reasons(info, rep)]
        d["fallback"] = rep.fallback.to_dict() if rep.fallback else None
        d["variants"] = list(rt.dumps) if rt is not None else []
        pd = plan.to_dict()
        del pd["decisions"]
        d["plan"] = pd
        d["unit_costs"] = unit_costs(info)
        graphs.append(d)
        total += plan.flops_per_call * plan.steps
        saved += plan.flops_saved
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


def _explain_text(d: dict) -> str:
    out = [f"omnicache explain {d['spec']}",
           f"model {d['model']}, {d['parameters']:,} parameters; options {json.dumps(_nondefault(d['options']))}"]
    dy = d["dynamo"]
    out.append(f"Dynamo: {dy['graphs']} graph(s), {dy['graph_breaks']} graph break(s) ({dy['seconds']:.1f}s)")
    out += [f"  break: {r['summary']}" + (f" at {r['where']}" if r["where"] else "") for r in dy["break_reasons"]]
    for g in d["graphs"]:
        out.append("")
        head = f"graph {g['graph_id']}: {g['nodes']} nodes, {_mflop(g['flops_per_call'])} per call (estimated)"
        if g["cached"]:
            head += f" -> cached, guard {g['guard']}, compiled variants: {', '.join(g['variants']) or '-'}"
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
        out.append(f"  plan over {p['steps']} steps of policy {_policy_text(g['policy'])} ({legend}):")
        if p["marks"]:
            w = max(len(s) for s in p["marks"])
            out += [f"    {s:<{w}}  {m}" for s, m in p["marks"].items()]
        else:
            out.append("    (no span to cache: every step computes the whole graph)")
        if p.get("error"):
            out.append(f"    note: {p['error']}")
        bound = "at most " if p.get("ideal_speedup_is_bound") else ""
        out.append(f"  ideal speedup {bound}{p['ideal_speedup']:.2f}x "
                   f"({p['flops_saved_fraction']:.1%} of the estimated FLOPs skipped)")
    out.append("")
    bound = "at most " if any(g["plan"].get("ideal_speedup_is_bound") for g in d["graphs"]) else ""
    out.append(f"ideal speedup of the whole model over {d['steps']} steps: {bound}{d['ideal_speedup']:.2f}x "
               "(matmul FLOPs only; elementwise work, residual adds and overheads not counted)")
    if d["options"].get("inner_backend") != "eager":
        out.append("note: explain runs the rewrite with inner_backend=eager; Inductor compiles the same graphs")
    return "\n".join(out)


def _nondefault(options: dict) -> dict:
    from omnicompile.config import OmniCacheConfig

    default = OmniCacheConfig().to_dict()
    return {k: v for k, v in options.items() if default.get(k, object()) != v}


def _policy_text(policy: dict) -> str:
    rest = " ".join(f"{k}={v}" for k, v in policy.items() if k != "policy")
    return f"{policy.get('policy', '?')}{' ' + rest if rest else ''}"


def cmd_explain(args, extra, progress: _Progress) -> int:
    config = _config(args)
    steps = _steps(args, config)
    spec_kwargs = _parse_json_arg(args.spec_kwargs, "--spec-kwargs")
    progress(f"loading {args.spec}")
    model, ex = load_spec(args.spec, spec_kwargs)
    traced = _trace(model, ex, config, progress)
    data = _explain_data(args.spec, model, config, traced, steps)
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        print(_explain_text(data))
    return EXIT_OK


def _steps(args, config) -> int:
    from omnicompile.dump import DEFAULT_STEPS

    steps = args.steps if args.steps is not None else (config.num_steps or DEFAULT_STEPS)
    if steps < 1:
        raise UsageError(f"--steps must be a positive integer, got {steps}")
    return steps


# ============================================================================ dump


def cmd_dump(args, extra, progress: _Progress) -> int:
    from omnicompile.dump import VizUnavailable, dot_available, require_matplotlib, write_graph_dump

    config = _config(args)
    steps = _steps(args, config)
    spec_kwargs = _parse_json_arg(args.spec_kwargs, "--spec-kwargs")
    images = args.render != "none"
    if args.render == "dot" and not dot_available():
        raise UsageError("--render dot needs Graphviz's dot on PATH (apt-get install graphviz); "
                         "--render auto falls back to a matplotlib drawing")
    if images:
        try:
            require_matplotlib()
        except VizUnavailable as e:
            raise UsageError(f"{e} (or pass --render none to skip the images)") from None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    progress(f"loading {args.spec}")
    model, ex = load_spec(args.spec, spec_kwargs)
    traced = _trace(model, ex, config, progress)
    with _no_env_dump_dir():
        used = config.replace(inner_backend="eager", dump_dir=None)
    errors = 0
    manifests = []
    for gm, _ex, rep, rt in progress.iterate(traced.graphs, "dumping graphs"):
        progress(f"dumping graph {rep.graph_id}")
        m = write_graph_dump(out, rep.graph_id, gm, rep, rt, config=used, steps=steps,
                             renderer=args.render if images else "none", images=images)
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


# ============================================================================ calibrate


def calibratable_policies() -> list[str]:
    from omnicompile.policies import POLICIES

    return sorted(name for name, cls in POLICIES.items() if getattr(cls, "calibratable", False))


def euler_sampler(model: Callable, example_kwargs: dict, steps: int,
                  progress: Optional[Callable[[int, int, str], None]] = None):
    """The default generation of ``omnicache calibrate``: ``steps`` calls with the timestep
    going linearly from the example's value towards 0, and an Euler flow-matching update
    ``x += (sigma_next - sigma) * output`` of ``hidden_states`` (or the first float input
    of rank >= 2) when the output has its shape — the sampler of Flux, SD3 and Wan.  For
    other samplers pass ``--sampler module:callable`` (called ``f(model, example_kwargs,
    steps)``)."""
    import torch

    ts = example_kwargs.get("timestep")
    if not isinstance(ts, torch.Tensor):
        raise UsageError("the example kwargs have no tensor 'timestep': pass --sampler module:callable")
    t0 = float(ts.reshape(-1)[0])
    if not t0 > 0:
        raise UsageError(f"the example timestep is {t0}; the default sampler counts down from a positive "
                         "timestep: pass --sampler module:callable")
    values = [t0 * (steps - i) / steps for i in range(steps)]
    if not ts.dtype.is_floating_point:
        values = [float(round(v)) for v in values]
        if len(set(values)) < steps:
            raise UsageError(f"integer timestep {t0:g} is too small for {steps} distinct steps: lower --steps")
    key = "hidden_states" if isinstance(example_kwargs.get("hidden_states"), torch.Tensor) else next(
        (k for k, v in example_kwargs.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
         and v.dim() >= 2), None)
    x = example_kwargs[key].clone() if key is not None else None
    with torch.no_grad():
        for i, t in enumerate(values):
            kw = dict(example_kwargs)
            kw["timestep"] = torch.full_like(ts, t)
            if key is not None:
                kw[key] = x
            out = model(**kw)
            v = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
            if key is not None and isinstance(v, torch.Tensor) and v.shape == x.shape:
                x = x + (values[i + 1] / t0 - t / t0 if i + 1 < steps else -t / t0) * v
            if progress is not None:
                progress(i + 1, steps, f"t={t:g}")
    return x


def _generation(args, config, progress: _Progress, bar=None):
    """SPEC compiled with an :class:`~omnicompile.OmniCache` of ``config`` and one generation of
    it (``--sampler`` or :func:`euler_sampler`, returning the final sample): ``(oc, fn, steps)``."""
    import torch

    from omnicompile import OmniCache

    steps = _steps(args, config)
    spec_kwargs = _parse_json_arg(args.spec_kwargs, "--spec-kwargs")
    sampler = _resolve(args.sampler, "--sampler") if args.sampler else None
    progress(f"loading {args.spec}")
    model, ex = load_spec(args.spec, spec_kwargs)
    with _no_env_dump_dir():
        oc = OmniCache(config)
    compiled = torch.compile(model, backend=oc, dynamic=False)

    def generation():
        return sampler(compiled, ex, steps) if sampler is not None else euler_sampler(compiled, ex, steps, bar)

    return oc, generation, steps


def cmd_calibrate(args, extra, progress: _Progress) -> int:
    import torch

    from omnicompile.errors import OmniCacheError
    from omnicompile.policies import POLICIES

    config = _config(args)
    names = calibratable_policies()
    if not names:
        raise UsageError(f"no policy with calibration is registered yet (registered policies: "
                         f"{', '.join(sorted(POLICIES))}); a policy opts in with calibratable = True")
    if config.policy not in names:
        raise UsageError(f"policy {config.policy!r} has no calibration; choose one of {', '.join(names)} "
                         f"with --options '{{\"policy\": \"{names[0]}\"}}'")
    out = Path(args.out or f"omnicache-calibration-{config.policy}.json")
    oc, generation, steps = _generation(args, config, progress, progress.bar)
    progress(f"calibrating policy {config.policy} over {steps} steps (inner backend {config.inner_backend})")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        cals = oc.calibrate(generation, path=str(out))
    except UsageError:
        raise
    except OmniCacheError as e:
        raise _Failure(f"calibration of policy {config.policy!r} failed: {e}") from e
    except Exception as e:
        raise _Failure(f"calibration of policy {config.policy!r} failed: {_first_line(e)}") from e
    finally:
        torch._dynamo.reset()
    paths = [str(out)] if len(cals) == 1 else [f"{out.with_suffix('')}.{i}{out.suffix}" for i in range(len(cals))]
    print(f"wrote {len(cals)} calibration(s) of policy {config.policy!r}: {', '.join(paths)}")
    for rt in oc.runtimes:
        schedule = getattr(rt, "schedule", None)
        if getattr(rt, "calibration", None) is not None and schedule is not None:
            print(f"  graph {rt.report.graph_id}: reuse steps {list(schedule)} of {steps}")
    print(f"use it with --options '{{\"policy\": \"{config.policy}\", \"calibrate\": \"{paths[0]}\"}}'")
    return EXIT_OK


# ============================================================================ layered: profile / plan


def cmd_profile(args, extra, progress: _Progress) -> int:
    import torch

    from omnicompile.errors import OmniCacheError
    from omnicompile.layered import dag_from_json, plan_profile, plan_text, profile

    opts = _parse_json_arg(args.options, "--options")
    if opts.get("policy", "layered") != "layered":
        raise UsageError(f"profile is for policy 'layered'; --options names policy {opts['policy']!r}")
    opts.update(policy="layered", calibrate=None)
    opts.setdefault("inner_backend", "eager")
    try:
        from omnicompile.config import OmniCacheConfig
        config = OmniCacheConfig(**opts)
    except (TypeError, ValueError) as e:
        raise UsageError(f"--options: {e}", e) from e
    oc, generation, steps = _generation(args, config, progress)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    progress(f"profiling ({args.method}) over {steps} steps (inner backend {config.inner_backend})")
    t0 = time.perf_counter()
    try:
        profs = profile(oc, generation, str(out), method=args.method, progress=progress.enabled)
    except OmniCacheError as e:
        raise _Failure(f"profiling failed: {e}") from e
    finally:
        torch._dynamo.reset()
    for prof in profs:
        dag = dag_from_json(prof.dag)
        extra_text = "".join(f", {m} proxy rank correlation {v:.2f}" for m, v in prof.correlation.items()
                             if v is not None)
        print(f"profile ({prof.method}) of {len(prof.units)} units x {prof.num_steps} steps in "
              f"{time.perf_counter() - t0:.0f}s{extra_text}")
        print(plan_text(plan_profile(prof, config.target_speedup, config.cache_interval, dag), dag))
    print(f"wrote {out}; use it with --options '{{\"policy\": \"layered\", \"calibrate\": \"{out}\"}}'")
    return EXIT_OK


def cmd_plan(args, extra, progress: _Progress) -> int:
    from omnicompile.errors import CalibrationError
    from omnicompile.graphs.plan import PlanError
    from omnicompile.layered import Profile, Schedule, dag_from_json, load_file, plan_profile, plan_text

    if args.target_speedup < 1.0:
        raise UsageError(f"--target-speedup {args.target_speedup}: must be >= 1.0")
    if args.cache_interval < 1:
        raise UsageError(f"--cache-interval {args.cache_interval}: must be an integer >= 1")
    try:
        prof = load_file(args.profile)
        if not isinstance(prof, Profile):
            raise UsageError(f"{args.profile} is a schedule, not a profile (plan needs a profile written by "
                             f"`omnicache profile`)")
        dag = dag_from_json(prof.dag)
        plan = plan_profile(prof, args.target_speedup, args.cache_interval, dag)
    except (CalibrationError, PlanError) as e:
        raise UsageError(str(e), e) from e
    print(plan_text(plan, dag))
    if args.out:
        Schedule.from_plan(plan, dag, prof.fingerprint, args.cache_interval, args.profile).save(args.out)
        print(f"wrote {args.out}; use it with --options '{{\"policy\": \"layered\", \"calibrate\": \"{args.out}\"}}'")
    return EXIT_OK


# ============================================================================ bench


def find_bench_dir(explicit: Optional[str] = None) -> Path:
    """The folder holding ``speed.py``: ``explicit``, ``$OMNICACHE_BENCH_DIR``, the
    ``bench/`` of the source checkout the package runs from, or ``./bench``."""
    import omnicompile

    tried = []
    cands = []
    if explicit:
        cands.append(Path(explicit))
    elif os.environ.get("OMNICACHE_BENCH_DIR"):
        cands.append(Path(os.environ["OMNICACHE_BENCH_DIR"]))
    else:
        cands.append(Path(omnicompile.__file__).resolve().parent.parent / "bench")
        cands.append(Path.cwd() / "bench")
    for c in cands:
        tried.append(str(c))
        if (c / "speed.py").is_file():
            return c
    raise UsageError(f"bench/speed.py not found (looked in {', '.join(tried)}); the benchmarks ship with the "
                     "source checkout, not the package: run from the repository or set --bench-dir / "
                     "OMNICACHE_BENCH_DIR")


@contextlib.contextmanager
def _recording_backends():
    """Collect the OmniCache objects created while the block runs (the benchmark creates
    its own), and the graphs compiled through ``backend="omnicache"``."""
    import omnicompile

    created: list = []
    original = omnicompile.OmniCache

    class Recording(original):  # type: ignore[misc, valid-type]
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            created.append(self)

    before = {id(g) for g in omnicompile.last_report().graphs}
    omnicompile.OmniCache = Recording
    try:
        yield created, before
    finally:
        omnicompile.OmniCache = original


def cmd_bench(args, extra, progress: _Progress) -> int:
    import omnicompile
    from omnicompile.report import Report

    bench_dir = find_bench_dir(args.bench_dir)
    path = bench_dir / "speed.py"
    if extra and extra[0] == "--":
        extra = extra[1:]
    name = "omnicache_bench_speed"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(bench_dir))
    try:
        spec.loader.exec_module(module)
    except ImportError as e:
        raise UsageError(f"{path} needs {getattr(e, 'name', None) or e}: install the benchmark extra "
                         "(pip install -e '.[bench]')") from None
    except Exception as e:
        raise _Failure(f"importing {path} failed: {_first_line(e)}") from e
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(bench_dir))
    if not callable(getattr(module, "main", None)):
        raise UsageError(f"{path} has no main(argv) function")
    progress(f"running {path} {' '.join(extra)}")
    with _recording_backends() as (created, before):
        module.main(list(extra))
    graphs = [g for oc in created for g in oc.report().graphs]
    seen = {id(g) for g in graphs}
    graphs += [g for g in omnicompile.last_report().graphs if id(g) not in before and id(g) not in seen]
    report = Report(graphs)
    text = {"markdown": report.to_markdown, "text": lambda: str(report), "json": report.to_json}[args.report_format]()
    print()
    print(text)
    if args.report_out:
        Path(args.report_out).write_text(report.to_json() + "\n")
        print(f"wrote the report as JSON to {args.report_out}")
    return EXIT_OK


# ============================================================================ main


def _parser() -> argparse.ArgumentParser:
    def common(parser, default):
        parser.add_argument("-v", "--verbose", action="store_true", default=default(False),
                            help="log the backend's messages (INFO)")
        parser.add_argument("--traceback", action="store_true", default=default(False),
                            help="show the traceback of a failure")
        parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=default(None),
                            help="progress lines on stderr (default: when stderr is a terminal)")

    p = argparse.ArgumentParser(prog="omnicache", description="Inspect, dump, calibrate and benchmark the "
                                "omnicache torch.compile backend.", epilog="docs: omnicompile/cli.py")
    common(p, lambda v: v)
    # the same options after the subcommand; SUPPRESS keeps a subparser from resetting them
    shared = argparse.ArgumentParser(add_help=False)
    common(shared, lambda v: argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def spec_args(sp, opts_help="omnicache options as JSON (or @file.json)"):
        sp.add_argument("spec", metavar="SPEC", help="module:callable returning (model, example_kwargs), "
                        "e.g. omnicompile.testing:tiny_flux")
        sp.add_argument("--options", metavar="JSON", help=opts_help)
        sp.add_argument("--spec-kwargs", metavar="JSON", help="keyword arguments for the SPEC callable")
        sp.add_argument("--steps", type=int, default=None,
                        help="denoising steps of one generation (default: num_steps or 28)")

    sp = sub.add_parser("explain", parents=[shared], help="what the backend finds and plans in a model",
                        description="Trace SPEC and print its graphs, graph breaks, block lists, streams, side "
                        "inputs, timestep input, cached spans and the reasons for the others, FLOPs per block "
                        "and the ideal speedup of the configured policy.")
    spec_args(sp)
    sp.add_argument("--json", action="store_true", help="print JSON instead of text")
    sp.set_defaults(func=cmd_explain)

    sp = sub.add_parser("dump", parents=[shared],
                        help="write graphs, maps, plans and images of a model to a folder",
                        description="Trace SPEC and write, per graph, the FX graph before and after the rewrite, "
                        "the block/stream map, the unit dependency graph (DOT + image), the plan heatmap, per-unit "
                        "costs and an index.html linking them.")
    spec_args(sp)
    sp.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    sp.add_argument("--render", choices=("auto", "dot", "matplotlib", "none"), default="auto",
                    help="unit graph image: Graphviz dot (SVG), matplotlib (PNG), auto (dot when installed), "
                    "none (no images at all)")
    sp.set_defaults(func=cmd_dump)

    sp = sub.add_parser("calibrate", parents=[shared], help="calibrate a policy that learns from a first run",
                        description="Run one generation of SPEC through the backend as the calibration of a "
                        "calibratable policy (OmniCache.calibrate) and write it as JSON.")
    spec_args(sp, "omnicache options as JSON (or @file.json); 'policy' names the policy to calibrate")
    sp.add_argument("--out", metavar="FILE", help="where to write the calibration "
                    "(default omnicache-calibration-POLICY.json)")
    sp.add_argument("--sampler", metavar="MODULE:CALLABLE", help="runs one generation: f(model, example_kwargs, "
                    "steps); default: timestep counted down linearly from the example's, Euler flow-matching "
                    "updates of hidden_states")
    sp.set_defaults(func=cmd_calibrate)

    sp = sub.add_parser("profile", parents=[shared], help="profile the (block, step) reuse costs for policy layered",
                        description="Compile SPEC with policy layered and measure, for every (block, step), the "
                        "quality cost of reusing that block at that step; write the profile JSON and print the plan.")
    spec_args(sp, "omnicache options as JSON (or @file.json); policy is layered, target_speedup / cache_interval "
              "shape the printed plan")
    sp.add_argument("--out", required=True, metavar="FILE", help="where to write the profile JSON")
    sp.add_argument("--method", choices=("final", "residual"), default="final",
                    help="final: one generation per (block, step), deviation of the final sample (default); "
                    "residual: one generation, the change of each block's residual (cheap proxy)")
    sp.add_argument("--sampler", metavar="MODULE:CALLABLE", help="runs one generation and returns the final "
                    "sample: f(model, example_kwargs, steps); default: the Euler flow sampler of calibrate")
    sp.set_defaults(func=cmd_profile)

    sp = sub.add_parser("plan", parents=[shared], help="plan a layered schedule from a profile (no model needed)",
                        description="Run Algorithms 1-3 (proposal, refinement, coalescing) on a layered profile.")
    sp.add_argument("profile", metavar="PROFILE", help="a profile JSON written by `omnicache profile`")
    sp.add_argument("--target-speedup", type=float, default=2.0, help="target speedup s_r (default 2.0)")
    sp.add_argument("--cache-interval", type=int, default=5, help="caching interval N (default 5)")
    sp.add_argument("--out", metavar="FILE", help="write the schedule JSON here")
    sp.set_defaults(func=cmd_plan)

    sp = sub.add_parser("bench", parents=[shared], allow_abbrev=False,
                        help="run bench/speed.py and print the omnicache reports",
                        description="Run bench/speed.py from the source checkout; every option not listed here "
                        "goes to it (see python bench/speed.py --help). Prints the reports afterwards.")
    sp.add_argument("--report-format", choices=("markdown", "text", "json"), default="markdown")
    sp.add_argument("--report-out", metavar="FILE", help="also write the reports as JSON here")
    sp.add_argument("--bench-dir", metavar="DIR", help="folder with speed.py (default: the checkout's bench/)")
    sp.set_defaults(func=cmd_bench)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("omnicache: %(levelname)s: %(message)s"))
    if not log.handlers:
        log.addHandler(handler)
    old_level = log.level
    if args.verbose:
        log.setLevel(logging.INFO)
    progress = _Progress(sys.stderr.isatty() if args.progress is None else args.progress)
    func: Callable = args.func
    try:
        return func(args, extra, progress)
    except UsageError as e:
        if args.traceback and e.original is not None:
            import traceback
            traceback.print_exception(e.original)
        print(f"omnicache {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except _Failure as e:
        if args.traceback:
            raise
        print(f"omnicache {args.command}: {e} (--traceback shows where)", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"omnicache {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:   # e.g. `omnicache explain ... | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE
    finally:
        log.setLevel(old_level)
        if handler in log.handlers:
            log.removeHandler(handler)
