"""The ``omnicache`` torch.compile backend.

``OmniCache.__call__(gm, example_inputs)`` is what Dynamo calls once per graph:

1. analysis passes (``omnicompile.passes``): repeated blocks, units, streams, spans, the
   timestep input;
2. the policy (``omnicompile.policies``) says whether the graph is rewritten at all;
3. the rewrite (guarded reuse branches) and the inner backend (Inductor, or eager) build
   the compiled callables, held by a :class:`~omnicompile.runtime.GraphRuntime`.

Whenever any of that cannot be done safely — no repeated blocks, no timestep input, a span
whose outputs are not streams, a training graph, an exception in a rewrite — the original
graph goes to the inner backend unchanged and the graph's report carries the reason.
"""
from __future__ import annotations

import itertools
import logging
import os
from typing import Callable, Optional

import torch
import torch.fx as fx

from omnicompile.config import OmniCacheConfig
from omnicompile.errors import CalibrationError, OmniCacheError
from omnicompile.passes.blocks import find_blocks
from omnicompile.passes.common import Reason, is_param_placeholder
from omnicompile.passes.spans import find_spans
from omnicompile.policies import make_policy
from omnicompile.report import GraphReport, Report, SpanReport

log = logging.getLogger("omnicompile")

__all__ = ["OmniCache", "omnicache_backend", "inner_compiler"]

_graph_ids = itertools.count()


def inner_compiler(name: str) -> Callable[[fx.GraphModule, list], Callable]:
    if name == "eager":
        return lambda gm, example_inputs: gm.forward
    from torch._inductor.compile_fx import compile_fx
    return compile_fx


class OmniCache:
    """The backend object: ``torch.compile(model, backend=OmniCache(policy=..., ...))``.

    Accepts the fields of :class:`~omnicompile.config.OmniCacheConfig` as keywords (or a
    config/dict as the single positional argument).  Keeps one report per compiled graph.
    """

    __name__ = "omnicache"  # torch.compile names the compiler after this

    def __init__(self, config: Optional[OmniCacheConfig | dict] = None, **fields):
        self.config = OmniCacheConfig.from_options(config, **fields)
        self._graphs: list[tuple[GraphReport, Optional[object]]] = []
        self._calibrating = False

    # ------------------------------------------------------------------ public
    def report(self) -> Report:
        for _, rt in self._graphs:
            if rt is not None:
                rt.flush()
        return Report([r for r, _ in self._graphs])

    def reset(self) -> None:
        """Forget every cache and step counter (the next call starts a new generation)."""
        for _, rt in self._graphs:
            if rt is not None:
                rt.reset()

    @property
    def runtimes(self) -> list:
        return [rt for _, rt in self._graphs if rt is not None]

    def calibrate(self, fn: Callable[[], object], path: Optional[str] = None) -> list:
        """Run ``fn`` (one full generation) as the calibration of every calibratable graph
        (policy ``trajectory``): each step is computed and measured; afterwards the
        schedule is derived.  Returns the calibrations; ``path`` saves them as JSON
        (``path`` itself for one graph, ``path`` with ``.N`` before the suffix for more)."""
        if not getattr(make_policy(self.config), "calibratable", False):
            raise CalibrationError(f"policy {self.config.policy!r} has nothing to calibrate; "
                                   "use policy 'trajectory' (or its presets)")
        for rt in self.runtimes:
            if hasattr(rt, "force_calibrate"):
                rt.force_calibrate = True
        self._calibrating = True
        try:
            fn()
        finally:
            self._calibrating = False
        cals = []
        for rt in self.runtimes:
            if getattr(rt, "calibrating", False):
                rt._finish_calibration()
            if getattr(rt, "calibration", None) is not None:
                cals.append(rt.calibration)
        if not cals:
            raise CalibrationError("the calibration function ran no generation through this backend")
        if path is not None:
            root, ext = os.path.splitext(os.fspath(path))
            for i, cal in enumerate(cals):
                cal.save(os.fspath(path) if len(cals) == 1 else f"{root}.{i}{ext}")
        return cals

    # ------------------------------------------------------------------ backend
    def __call__(self, gm: fx.GraphModule, example_inputs: list, options: Optional[dict] = None,
                 mode: Optional[str] = None):
        cfg = self.config.replace(**options) if options else self.config
        if mode not in (None, "default"):
            log.warning("omnicache ignores torch.compile mode=%r; Inductor options go through "
                        "the inner backend's defaults", mode)
        gid = next(_graph_ids)
        policy = make_policy(cfg)
        report = GraphReport(graph_id=gid, nodes=len(gm.graph.nodes), cached=False,
                             policy=policy.describe(), inner_backend=cfg.inner_backend)
        inner = inner_compiler(cfg.inner_backend)
        blocks = analysis = None          # read (late-bound) by the dump below

        def fallback(reason: Reason, warn: bool = True):
            report.fallback = reason
            if warn:
                log.warning("omnicache: graph %d compiled without caching: %s", gid, reason)
            self._graphs.append((report, None))
            self._write_dump(cfg, gm, report, None, blocks, analysis)
            return inner(gm, example_inputs)

        from omnicompile.tokens import token_cache_enabled

        merging = token_cache_enabled(cfg)
        if not policy.rewrites and not merging:
            return fallback(Reason("policy_none", f"policy {cfg.policy!r} does not rewrite graphs"), warn=False)
        try:
            blocks = find_blocks(gm)
            report.block_lists = blocks.summary()
            analysis = find_spans(gm, blocks)
        except Exception as e:  # an analysis bug must never break the user's model
            log.exception("omnicache: analysis failed")
            return fallback(Reason("analysis_failed", f"{type(e).__name__}: {e}"))
        report.refused = list(blocks.reasons) + list(analysis.refused)
        report.spans = [SpanReport(s.name, s.last_unit - s.first_unit + 1, [st.name for st in s.live_streams],
                                   [n.name for n in s.side_inputs], s.flops) for s in analysis.spans]
        report.timestep_input = analysis.timestep.name if analysis.timestep is not None else None
        report.flops_per_call = _graph_flops(gm)
        compile_fn = inner
        if merging:   # token / frame / block caches: plan once, rewrite every graph compiled below
            compile_fn, token_reasons = _token_compiler(gm, blocks, cfg, report, inner)
            report.refused.extend(token_reasons)
            if not policy.rewrites or not analysis.spans:
                return self._token_only(gm, example_inputs, analysis, cfg, policy, report, compile_fn,
                                        fallback, blocks)
        if not analysis.spans:
            first = next((r for r in report.refused if r.code != "no_module_metadata"), None)
            return fallback(first or Reason("no_spans", "no cacheable span"))
        why = _not_inference(analysis, example_inputs)
        if why is not None:
            return fallback(why)
        guard = cfg.guard if cfg.guard != "auto" else ("variants" if policy.static else "cond")
        report.guard = guard
        try:
            rt = policy.runtime_class()(gm, example_inputs, analysis, cfg, policy, report, compile_fn, guard)
            if compile_fn is not inner:
                compile_fn.state.bind(rt.tracker)
            if self._calibrating and hasattr(rt, "force_calibrate"):
                rt.force_calibrate = True
        except CalibrationError:
            raise   # the user named a calibration that does not fit: say so, never ignore it
        except OmniCacheError as e:
            return fallback(Reason(getattr(e, "code", "rewrite_failed"), str(e), getattr(e, "subject", "")))
        except Exception as e:
            log.exception("omnicache: rewrite or inner compile failed")
            return fallback(Reason("rewrite_failed", f"{type(e).__name__}: {e}"))
        report.cached = True
        report.spans = [SpanReport(s.name, s.last_unit - s.first_unit + 1, [st.name for st in s.live_streams],
                                   [n.name for n in s.side_inputs], s.flops) for s in rt.spans]
        self._graphs.append((report, rt))
        self._write_dump(cfg, gm, report, rt, blocks, analysis)
        return rt

    def _token_only(self, gm, example_inputs, analysis, cfg, policy, report, compile_fn, fallback, blocks):
        """Token / frame / block caches without a step policy (``policy="none"`` or no cacheable
        span): :class:`~omnicompile.tokens.TokenRuntime` or, where nothing is wrapped, the
        unchanged graph."""
        from omnicompile.tokens import TokenCompiler, TokenRuntime

        if not isinstance(compile_fn, TokenCompiler):
            first = next((r for r in report.refused if r.code.startswith("merge_")), None)
            return fallback(first or Reason("merge_nothing", "no region wrapped by the token/frame/block caches"))
        why = _not_inference(analysis, example_inputs)
        if why is not None:
            return fallback(why)
        try:
            rt = TokenRuntime(gm, example_inputs, analysis, cfg, policy, report, compile_fn)
            compile_fn.state.bind(rt.tracker)
        except Exception as e:
            log.exception("omnicache: token cache rewrite or inner compile failed")
            return fallback(Reason("rewrite_failed", f"{type(e).__name__}: {e}"))
        report.cached = True
        report.guard = "tokens"
        report.spans = []
        self._graphs.append((report, rt))
        self._write_dump(cfg, gm, report, rt, blocks, analysis)
        return rt

    @staticmethod
    def _write_dump(cfg, gm, report, rt, blocks, analysis) -> None:
        """With ``dump_dir`` set: the full dump of this graph (omnicompile.dump); never raises."""
        if not cfg.dump_dir:
            return
        from omnicompile.dump import write_graph_dump
        write_graph_dump(cfg.dump_dir, report.graph_id, gm, report, rt, config=cfg,
                         blocks=blocks, analysis=analysis)


def _not_inference(analysis, example_inputs) -> Optional[Reason]:
    """Why a graph cannot be cached across steps at all: no timestep, or gradients enabled."""
    if analysis.timestep is None:
        return Reason("no_timestep", "no timestep input found: cannot tell denoising steps apart")
    if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs):
        return Reason("training_graph", "gradients are enabled: caching is for inference; "
                      "call the model under torch.no_grad() or torch.inference_mode()")
    return None


def _token_compiler(gm, blocks, cfg, report, inner):
    """Plan the token / frame / block caches on ``gm``: (a TokenCompiler wrapping ``inner``,
    or ``inner`` where nothing is wrapped; the refusals)."""
    from omnicompile.tokens import TokenCompiler, TokenState, plan_for_config

    try:
        plan = plan_for_config(gm, blocks, cfg)
    except Exception as e:  # a planning bug must never break the user's model
        log.exception("omnicache: token cache planning failed")
        return inner, [Reason("merge_failed", f"{type(e).__name__}: {e}")]
    state = TokenState(plan, report)
    if not plan.wraps:
        return inner, plan.refused
    return TokenCompiler(inner, plan, state), plan.refused


def _graph_flops(gm: fx.GraphModule) -> int:
    from omnicompile.graphs.cost import node_flops
    return sum(node_flops(n) for n in gm.graph.nodes)


_string_instances: list[OmniCache] = []


def omnicache_backend(gm: fx.GraphModule, example_inputs: list, options: Optional[dict] = None,
                      mode: Optional[str] = None):
    """``torch.compile(model, backend="omnicache", options={...})`` lands here.

    Each compiled graph gets its own :class:`OmniCache`; ``omnicompile.last_report()``
    returns the report of the most recent one.
    """
    oc = OmniCache(options or {})
    _string_instances.append(oc)
    del _string_instances[:-16]
    return oc(gm, example_inputs, mode=mode)


def last_report() -> Report:
    """The report of the graphs compiled through ``backend="omnicache"`` (most recent last)."""
    return Report([g for oc in _string_instances for g in oc.report().graphs])
