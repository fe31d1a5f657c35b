"""The ``omnicache`` torch.compile backend.

``OmniCache.__call__(gm, example_inputs)`` is what Dynamo calls once per graph:

1. analysis passes (``omnicompile.passes``): repeated blocks, units, streams, spans, the
   timestep input;
2. the token / frame / block caches, when their ratios are set, plan their regions and wrap
   the inner compiler (:class:`~omnicompile.merging.MergeLayer`: a layer under any policy);
3. the policy (:mod:`omnicompile.policy`) rewrites the graph and builds its runtime
   (``policy.make_runtime(ctx)``), which compiles the rewritten graphs with the inner backend
   (Inductor, or eager) and is what Dynamo calls from then on.

Where caching cannot be done safely — no repeated blocks, no timestep input, a span whose
outputs are not streams, a training graph — the pass or the policy says so with a
:class:`~omnicompile.passes.common.Reason` (or raises
:class:`~omnicompile.errors.RewriteError`, which carries one): a *deliberate refusal*.  The
original graph then goes to the inner backend unchanged and the graph's report names the
decisive reason.  Any other exception is a bug: with ``strict=True`` (or
``OMNICACHE_STRICT=1``; the test suite runs strict) it propagates; otherwise the graph is
compiled unchanged with the reason ``internal_error`` and the traceback is logged — a bug of
ours must never break the user's model.  Configuration and calibration errors
(:class:`~omnicompile.errors.OmniCacheError`) are the user's to fix and always propagate.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import os
from typing import Callable, Iterator, NamedTuple, Optional

import torch
import torch.fx as fx

from omnicompile.config import OmniCacheConfig
from omnicompile.errors import CalibrationError, OmniCacheError, RewriteError
from omnicompile.generation import current_generation
from omnicompile import timing
from omnicompile.passes.collectives import cp_group, host_sum
from omnicompile.merging import MergeLayer, MergeRuntime
from omnicompile.passes.blocks import find_blocks
from omnicompile.passes.common import Reason
from omnicompile.passes.spans import find_spans
from omnicompile.registry import make_policy, policy_class
from omnicompile.report import GraphReport, Report
from omnicompile.passes.specialise import concrete_args, specialise
from omnicompile.runtime.base import Runtime, RuntimeContext, note_reached, span_reports
from omnicompile.runtime.placement import SharedPlacement
from omnicompile.runtime.shapes import PerShape, needs_specialising

log = logging.getLogger("omnicompile")

__all__ = ["OmniCache", "CompiledGraph", "omnicache_backend", "inner_compiler", "last_report", "recording",
           "decisive_reason"]


def inner_compiler(name: str) -> Callable[[fx.GraphModule, list], Callable]:
    if name == "eager":
        return lambda gm, example_inputs: gm.forward
    from torch._inductor.compile_fx import compile_fx
    return compile_fx


class CompiledGraph(NamedTuple):
    """One graph an :class:`OmniCache` compiled: its report, and its runtime (None when the
    graph was compiled unchanged)."""
    report: GraphReport
    runtime: Optional[Runtime]


#: lists that collect every OmniCache created while a ``recording()`` block runs
_recorders: list[list] = []


@contextlib.contextmanager
def recording() -> Iterator[list]:
    """Collect the :class:`OmniCache` objects created inside the block (including the ones
    ``backend="omnicache"`` creates): ``with recording() as created: ...``."""
    created: list = []
    _recorders.append(created)
    try:
        yield created
    finally:
        _recorders.remove(created)


class OmniCache:
    """The backend object: ``torch.compile(model, backend=OmniCache(policy=..., ...))``.

    Accepts the fields of :class:`~omnicompile.config.OmniCacheConfig` as keywords (or a
    config/dict as the single positional argument).  Keeps one report per compiled graph;
    graph ids count from 0 per object.
    """

    __name__ = "omnicache"  # torch.compile names the compiler after this

    def __init__(self, config: Optional[OmniCacheConfig | dict] = None, **fields):
        self.config = OmniCacheConfig.from_options(config, **fields)
        self._graphs: list[CompiledGraph] = []
        self._ids = itertools.count()
        self._calibrating = False
        self._warnings: list[str] = []
        self._placement = SharedPlacement()    # one step count per model and stream over its graphs
        for created in _recorders:
            created.append(self)

    # ------------------------------------------------------------------ public
    @property
    def graphs(self) -> list[CompiledGraph]:
        """Every graph compiled so far, in order: ``(report, runtime)``."""
        return list(self._graphs)

    @property
    def runtimes(self) -> list[Runtime]:
        return [g.runtime for g in self._graphs if g.runtime is not None]

    def report(self) -> Report:
        for rt in self.runtimes:
            rt.flush()
        return Report([g.report for g in self._graphs],
                      warnings=([RECOMPILE_HINT] if recompile_limit_hit() else []) + self._warnings)

    def reset(self) -> None:
        """Forget every cache and step counter (the next call starts a new generation)."""
        for rt in self.runtimes:
            rt.reset()

    def calibrate(self, fn: Callable[[], object], path: Optional[str] = None) -> list:
        """Run ``fn`` (one full generation) as the calibration of every calibratable graph
        (policies ``trajectory`` and ``layered``): each step is computed and measured; then
        the schedule is derived.  Returns the new calibrations; ``path`` saves them as JSON
        (``path`` itself for one graph, ``path`` with ``.N`` before the suffix for more)."""
        if not policy_class(self.config.policy).calibratable:
            raise CalibrationError(f"policy {self.config.policy!r} has nothing to calibrate; use policy "
                                   "'trajectory' (or its presets) or 'layered'")
        before = {id(rt): rt.calibrator.result for rt in self.runtimes if rt.calibrator is not None}
        for rt in self.runtimes:
            if rt.calibrator is not None:
                rt.calibrator.request()
        self._calibrating = True
        try:
            fn()
        finally:
            self._calibrating = False
        done = []
        for rt in self.runtimes:
            c = rt.calibrator
            if c is None:
                continue
            c.finish()
            if c.result is not None and c.result is not before.get(id(rt)):
                done.append(c)
        if not done:
            raise CalibrationError("the calibration function ran no generation through this backend")
        if path is not None:
            root, ext = os.path.splitext(os.fspath(path))
            for i, c in enumerate(done):
                c.save(os.fspath(path) if len(done) == 1 else f"{root}.{i}{ext}")
        return [c.result for c in done]

    # ------------------------------------------------------------------ backend
    def __call__(self, gm: fx.GraphModule, example_inputs: list, options: Optional[dict] = None,
                 mode: Optional[str] = None):
        cfg = self.config.replace(**options) if options else self.config
        if mode not in (None, "default"):
            log.warning("omnicache ignores torch.compile mode=%r; Inductor options go through "
                        "the inner backend's defaults", mode)
        policy = make_policy(cfg)
        if cfg.merge.enabled and needs_specialising(gm):
            per_shape = self._per_shape(gm, example_inputs, options, mode)
            if per_shape is not None:
                return per_shape
        report = GraphReport(graph_id=next(self._ids), nodes=len(gm.graph.nodes), cached=False,
                             policy=policy.describe(), inner_backend=cfg.inner_backend,
                             report_generations=cfg.report_generations)
        inner = inner_compiler(cfg.inner_backend)
        found: dict = {}                 # the analysis results, for the dump
        try:
            built = self._build(gm, example_inputs, cfg, policy, report, inner, found)
        except RewriteError as e:        # a deliberate refusal from deep inside a rewrite
            built = e.reason
        except OmniCacheError:
            raise                        # the user's configuration or calibration: never ignored
        except Exception as e:
            if cfg.strict:
                raise
            log.exception("omnicache: graph %d: internal error, compiled without caching", report.graph_id)
            built = Reason("internal_error", f"{type(e).__name__}: {e} (a bug in omnicompile: the graph runs "
                           f"uncached; OMNICACHE_STRICT=1 raises it)")
        if isinstance(built, Reason):
            report.fallback = built
            if built.code != "policy_none":
                log.warning("omnicache: graph %d compiled without caching: %s", report.graph_id, built)
            self._graphs.append(CompiledGraph(report, None))
            self._write_dump(cfg, gm, report, None, found)
            return _reaching(inner(gm, example_inputs))
        report.cached = True
        if self._calibrating and built.calibrator is not None:
            built.calibrator.request()
        self._graphs.append(CompiledGraph(report, built))
        self._write_dump(cfg, gm, report, built, found)
        return built

    def _per_shape(self, gm, example_inputs, options, mode) -> Optional[PerShape]:
        """A graph with symbolic sizes for the token/frame/block caches (whose proofs need
        concrete row counts): one specialised graph per concrete shape, each compiled through
        this backend on its first call (omnicompile.runtime.shapes).  None where the graph
        cannot be specialised (data-dependent sizes): it is then compiled symbolically, the
        step caches on and the token caches refused (``merge_dynamic_shape``)."""
        try:
            specialise(gm, concrete_args(example_inputs))       # provable: the later ones are alike
        except RewriteError as e:
            log.warning("omnicache: a graph with symbolic sizes cannot be specialised per shape (%s); "
                        "its token/frame/block caches are off", e.reason)
            return None

        def build(spec: fx.GraphModule, args: list):
            fn = self(spec, args, options, mode)
            self._graphs[-1].report.specialised = True
            return fn

        def warn(message: str) -> None:
            if message not in self._warnings:
                self._warnings.append(message)
        return PerShape(gm, build, warn)

    def _build(self, gm, example_inputs, cfg, policy, report, inner, found) -> "Runtime | Reason":
        """The runtime of ``gm``, or the reason it is compiled unchanged."""
        merging = cfg.merge.enabled
        if not policy.rewrites and not merging:
            return Reason("policy_none", f"policy {cfg.policy!r} does not rewrite graphs")
        blocks = found["blocks"] = find_blocks(gm)
        report.block_lists = blocks.summary()
        analysis = found["analysis"] = find_spans(gm, blocks)
        report.refused = list(blocks.reasons) + list(analysis.refused)
        report.spans = span_reports(analysis.spans)
        report.timestep_input = analysis.timestep.name if analysis.timestep is not None else None
        report.flops_per_call = _graph_flops(gm)
        merge = None
        if merging:    # token / frame / block caches: planned once, wrap every graph compiled below
            merge = MergeLayer.for_graph(gm, blocks, cfg.merge, report, strict=cfg.strict)
            report.refused.extend(merge.refused)
            if not merge.wraps:
                merge = None
        steps = policy.rewrites and bool(analysis.spans)
        if merging and not steps:        # the token / frame / block caches alone
            if merge is None:
                merge_why = [r for r in report.refused if r.code.startswith("merge_")]
                first = next((r for r in merge_why if r.code in ("merge_unprofitable", "merge_cost_failed")),
                             merge_why[0] if merge_why else None)
                return first or Reason("merge_nothing", "no region wrapped by the token/frame/block caches")
        elif not analysis.spans:
            return decisive_reason(blocks, analysis)
        why = _not_inference(analysis, example_inputs)
        if why is not None:
            return why
        guard = cfg.guard if cfg.guard != "auto" else policy.guards[0]
        secs = _node_seconds(gm, example_inputs, cfg, policy) if steps else None
        ctx = RuntimeContext(gm, example_inputs, blocks, analysis, cfg, report,
                             merge.compiler(inner) if merge is not None else inner,
                             guard if steps else "tokens", merge, self._placement, secs,
                             timing.CallTimer(gm, example_inputs, cp_group(gm.graph)) if secs else None)
        try:
            rt = policy.make_runtime(ctx) if steps else MergeRuntime(ctx)
        finally:        # the timer holds the real inputs (the model's parameters): never kept
            if ctx.timer is not None:
                ctx.timer.close()
                ctx.timer = None
        report.guard = ctx.guard
        return rt

    @staticmethod
    def _write_dump(cfg, gm, report, rt, found) -> None:
        """With ``dump_dir`` set: the full dump of this graph (omnicompile.dump)."""
        if not cfg.dump_dir:
            return
        from omnicompile.dump import write_graph_dump
        write_graph_dump(cfg.dump_dir, report.graph_id, gm, report, rt, config=cfg, blocks=found.get("blocks"),
                         analysis=found.get("analysis"), strict=cfg.strict)


def _reaching(fn: Callable) -> Callable:
    """A graph compiled unchanged, telling compile_pipeline that its model call reached omnicache."""
    def run(*args):
        note_reached()
        return fn(*args)
    return run


def recompile_limit_hit() -> bool:
    """Whether Dynamo reported hitting its recompile limit in this process (later calls of that
    code with new guards run without compiling: they never reach omnicache)."""
    from torch._dynamo.utils import counters
    return any(str(k).startswith("Dynamo recompile limit exceeded") for k in counters.get("unimplemented", {}))


RECOMPILE_HINT = ("Dynamo hit torch._dynamo.config.recompile_limit: calls with new shapes (or other new guards) "
                  "now run eagerly, without omnicache; raise the limit (torch._dynamo.config.recompile_limit = 32) "
                  "or keep shapes in few buckets")


def decisive_reason(blocks, analysis) -> Reason:
    """Why a graph has no cacheable span, the decisive reason first: symbolic stream shapes
    (every span of the graph is refused for them); with block lists found, the refusals of
    their spans; without, what kept the lists from being found (``no_module_metadata`` and
    ``partial_list`` are notes: the blocks were found another way, or without their odd
    members).  A missing timestep is decided later (it refuses a graph *with* spans)."""
    spans = [r for r in analysis.refused if r.code != "no_timestep"]
    for r in spans:
        if r.code == "dynamic_shape":
            return r
    if analysis.groups and spans:
        return spans[0]
    notes = ("no_module_metadata", "partial_list", "odd_tail")
    for r in blocks.reasons:
        if r.code not in notes:
            return r
    for r in list(spans) + list(blocks.reasons) + list(analysis.refused):
        return r
    return Reason("no_spans", "no cacheable span")


def _not_inference(analysis, example_inputs) -> Optional[Reason]:
    """Why a graph cannot be cached across steps at all: no timestep and no generation context
    that counts the steps, or gradients enabled."""
    gen = current_generation()
    if analysis.timestep is None and (gen is None or not gen.count_steps):
        return Reason("no_timestep", "no timestep input found: cannot tell denoising steps apart (a model whose "
                      "blocks follow a graph break is cached when it runs inside compile_pipeline or "
                      "omnicompile.generation(count_steps=True))")
    if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs):
        return Reason("training_graph", "gradients are enabled: caching is for inference; "
                      "call the model under torch.no_grad() or torch.inference_mode()")
    return None


def _graph_flops(gm: fx.GraphModule) -> int:
    from omnicompile.graphs.cost import node_flops
    return sum(node_flops(n) for n in gm.graph.nodes)


#: the OmniCache objects behind ``backend="omnicache"``, one per distinct options (at most 16)
_string_instances: dict[OmniCacheConfig, OmniCache] = {}


def omnicache_backend(gm: fx.GraphModule, example_inputs: list, options: Optional[dict] = None,
                      mode: Optional[str] = None):
    """``torch.compile(model, backend="omnicache", options={...})`` lands here.

    The graphs compiled with the same options share one :class:`OmniCache` (its graph ids
    count 0, 1, ...); ``omnicompile.last_report()`` returns their reports."""
    cfg = OmniCacheConfig.from_options(options or {})
    oc = _string_instances.pop(cfg, None) or OmniCache(cfg)
    _string_instances[cfg] = oc                       # most recently used last
    while len(_string_instances) > 16:
        del _string_instances[next(iter(_string_instances))]
    return oc(gm, example_inputs, mode=mode)


def last_report() -> Report:
    """The report of the graphs compiled through ``backend="omnicache"`` (the most recently
    used options last)."""
    return Report([g for oc in _string_instances.values() for g in oc.report().graphs],
                  warnings=[RECOMPILE_HINT] if recompile_limit_hit() else [])


def _node_seconds(gm, example_inputs, cfg, policy) -> Optional[dict]:
    """Each node's eager seconds, for a policy with a target speedup under
    ``target_cost="measured"`` (:mod:`omnicompile.timing`); None otherwise, or when the eager run
    fails outside strict mode (the FLOP share is used then, and a warning logged)."""
    if cfg.target_cost != "measured" or getattr(policy, "target", None) is None:
        return None
    where = timing.writes_in_place(gm)
    if where is not None:          # running it once more would write into the caller's tensors
        log.info("omnicache: target_cost='measured': the graph writes in place (%s); using the FLOP share", where)
        return None
    try:
        secs = timing.node_seconds(gm, example_inputs)
        group = cp_group(gm.graph)
        if group is not None:       # every rank must size its schedule alike: the group's sum
            names = sorted(secs)
            secs = dict(zip(names, host_sum([secs[n] for n in names], group)))
        return secs
    except Exception:
        if cfg.strict:
            raise
        log.warning("omnicache: timing the graph for target_cost='measured' failed; using the FLOP share",
                    exc_info=True)
        return None
