"""``OmniCacheConfig``: one frozen, typed dataclass for every option.

``OmniCache(**fields)``, ``torch.compile(..., options={...})`` and the CLI's ``--options``
all build this class, so they accept exactly the same names.  Validation happens at
construction: an unknown key, a wrong type or an out-of-range value raises
:class:`~omnicompile.errors.ConfigError` naming the field, the value and what is allowed.

Defaults and where they come from:

* ``policy="static"``, ``interval=2``, ``warmup=2``: DeepCache-style uniform reuse
  (refresh every other step) after a short warm-up — the structure of the denoised image is
  laid down in the first steps, which every caching paper computes in full.
* ``cooldown=0``: steps always computed at the end; needs the step count (``num_steps``,
  or the length of the previous generation).
* ``guard="auto"``: static schedules use host-chosen specialised variants, data-dependent
  policies the in-graph ``torch.cond`` branch (``bench/speed.py`` measures both).

**Options a policy never reads are refused.**  The config remembers which options its caller
*set* (passed by name: ``OmniCacheConfig(...)``, ``OmniCache(...)``, ``options={...}``, the CLI's
``--options``; a field left to its default is not set, whatever its value).  A set option
that is neither one of :data:`COMMON_OPTIONS` (what every policy runs with: the backend, the
runtime, the token/frame/block cache layer, dumps) nor one the selected policy declares in
its ``options`` class attribute (:class:`omnicompile.policy.Policy`) raises
:class:`~omnicompile.errors.ConfigError` naming the option and the registered policies that do
read it — ``policy="static", threshold=0.1`` would otherwise run a static schedule while its
user believes a threshold was applied.  :meth:`OmniCacheConfig.to_options` gives the set
options back (what rebuilds an equal config); :meth:`OmniCacheConfig.to_dict` gives every field.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
from typing import Any, Optional

from omnicompile.errors import ConfigError
from omnicompile.passes.errors import OptionError
from omnicompile.passes.merge.options import MergeOptions
from omnicompile.registry import POLICIES

__all__ = ["OmniCacheConfig", "GUARDS", "INNER_BACKENDS", "STRICT_ENV", "COMMON_OPTIONS"]

GUARDS = ("auto", "variants", "cond")
INNER_BACKENDS = ("inductor", "eager")
#: environment variable that turns strict mode on (``OMNICACHE_STRICT=1``)
STRICT_ENV = "OMNICACHE_STRICT"
_MERGE = MergeOptions()
#: options every policy runs with, so never refused as unused: the policy itself, the step
#: count (the runtime), guard / inner_backend / strict / dump_dir (the backend and dumps) and
#: the token/frame/block caches (:class:`~omnicompile.passes.merge.MergeOptions`, a layer that
#: wraps any policy, ``none`` included).  Everything else belongs to the policies that declare
#: it in their ``options``.
COMMON_OPTIONS = frozenset({"policy", "num_steps", "guard", "inner_backend", "dump_dir", "strict",
                            "report_generations"}
                           | {f.name for f in dataclasses.fields(MergeOptions)})


@dataclasses.dataclass(frozen=True)
class OmniCacheConfig:
    #: caching policy, looked up in ``omnicompile.policies.POLICIES``
    policy: str = "static"
    #: static: a computed step every ``interval`` steps after warm-up (1 = never reuse)
    interval: int = 2
    #: static: number of steps always computed at the start of a generation
    warmup: int = 2
    #: static: number of steps always computed at the end (needs the step count)
    cooldown: int = 0
    #: static: explicit 0-based steps to reuse (overrides interval/warmup/cooldown)
    reuse_steps: Optional[tuple] = None
    #: static (and its presets): a reused span adds r_last + alpha * (k/d) * (r_last - r_prev),
    #: its last two computed residuals extrapolated to this step, alpha fitted online on each
    #: computed step (least squares, clipped to [0, 1]: 0 where extrapolating would not have
    #: helped); False = plain reuse of r_last.  guard="variants" only (cond: plain reuse)
    extrapolate: bool = True
    #: number of denoising steps per generation, when known ahead (used by cooldown)
    num_steps: Optional[int] = None
    #: how the branch is guarded: "variants" (host picks a specialised compiled graph),
    #: "cond" (torch.cond on an in-graph predicate) or "auto"
    guard: str = "auto"
    #: what compiles the rewritten graph: "inductor" or "eager" (no compilation)
    inner_backend: str = "inductor"
    #: write graphs and plans here (also OMNICACHE_DUMP_DIR)
    dump_dir: Optional[str] = None
    #: the report keeps per-call detail (``GraphReport.steps``) for the last this many
    #: generations of each graph; its totals (calls, span decisions, FLOPs saved, ...) count
    #: every call
    report_generations: int = 8
    #: trajectory: fraction of all steps reused (OmniCache; presets trajectory-slow /
    #: trajectory-fast pick 0.5 / 0.7 when this is not set)
    budget: float = 0.4
    #: trajectory: "first" (calibrate on the first generation of each shape), a JSON path
    #: written by oc.calibrate / `omnicache calibrate`, or None (only oc.calibrate(fn));
    #: layered: the same, the file being a profile or a schedule (omnicompile.policies.layered)
    calibrate: Optional[str] = "first"
    #: trajectory: remove the predicted cache-induced noise gamma_s * q while reusing
    correction: bool = True
    #: trajectory: step score, "angle" (between consecutive latent displacements), "output"
    #: (relative change of the model output) or "error" (the measured noise of a reuse there on
    #: the calibration generation)
    curvature: str = "angle"
    #: trajectory: minimum distance between two runs of reused steps (last of one to first of
    #: the next; 2 with max_run=1: never two reuses in a row)
    min_gap: int = 2
    #: trajectory: longest run of consecutive reused steps (None: unbounded); in a run the
    #: correction chains the predicted noise (sum over k of prod gamma); the presets
    #: trajectory-slow / -fast pick 2 / 3 when this is not set
    max_run: Optional[int] = 1
    #: trajectory: restrict the noise correction to a band of spatial frequencies of the
    #: output's token grid: (lo, hi) as fractions of the highest frequency, e.g. (0, 0.5) =
    #: low frequencies only; None = the whole correction
    correction_band: Optional[tuple] = None
    #: trajectory: how the measured noise q is scaled on a reuse step: "scaled" (gamma * k / d:
    #: q was measured with a residual d steps stale, this reuse's is k steps stale), "chain"
    #: (k-th step of a run: sum_j prod gamma, ignoring d), "hold" (the run's first gamma on every
    #: step), "first" (only a run's first step is corrected) — the last three for ablations
    run_correction: str = "scaled"
    #: probe (DiCache): reuse while the accumulated error stays below this (DiCache's
    #: Flux default for error="delta_y")
    threshold: float = 0.4
    #: probe: number of leading blocks always computed to measure the error
    probe_depth: int = 1
    #: probe: fraction of the steps at the start always computed (DiCache: 0.2)
    ret_ratio: float = 0.2
    #: probe: error indicator, "delta_y" (relative L1 change of the probe output) or
    #: "delta_minus" (|delta_y - delta_x|)
    error: str = "delta_y"
    #: probe: extrapolate the reused residual along the last two cached ones (DiCache's
    #: dynamic cache trajectory alignment); False = plain reuse (First-Block-Cache style)
    align: bool = True
    #: probe: the alignment coefficient gamma is clipped to this range (DiCache: [1, 1.5])
    align_clip: tuple = (1.0, 1.5)
    #: layered (OmniCache Layered Cache, Algorithm 1): target speedup s_r; (unit, step) pairs are
    #: reused, lowest quality cost per saved FLOP first, until 1 - 1/s_r of a generation is saved
    target_speedup: float = 2.0
    #: every policy with a target speedup: what a reuse saves, "measured" (the share of an eager
    #: call's time in the spans, and the rewritten graph timed computed and reused, at compile time
    #: on this machine) or "flops" (their share of the FLOPs: deterministic, overstates the saving
    #: on small models; omnicompile.targets)
    target_cost: str = "measured"
    #: layered: caching interval N of Algorithm 1 — no unit reuses more than N - 1 steps in a
    #: row (the paper: N = 5 on SD3); 1 = never reuse
    cache_interval: int = 5
    #: token / frame / block caches (any policy): the fields of
    #: :class:`omnicompile.passes.merge.MergeOptions`, with its defaults and validation
    #: (documented there): token_ratio, frame_ratio, block_ratio, patch, merge_ffn,
    #: merge_exclude, merge_fill, merge_placement, merge_rotate, merge_refresh
    token_ratio: float = _MERGE.token_ratio
    frame_ratio: float = _MERGE.frame_ratio
    block_ratio: float = _MERGE.block_ratio
    patch: Optional[int] = _MERGE.patch
    merge_ffn: bool = _MERGE.merge_ffn
    merge_exclude: int = _MERGE.merge_exclude
    merge_fill: str = _MERGE.merge_fill
    merge_placement: str = _MERGE.merge_placement
    merge_rotate: bool = _MERGE.merge_rotate
    merge_refresh: Optional[int] = _MERGE.merge_refresh
    #: strict mode: any exception during analysis, rewrite or dump propagates instead of the
    #: graph being compiled uncached (deliberate refusals still fall back, with their reason).
    #: Also ``OMNICACHE_STRICT=1``.  The test suite runs strict.
    strict: bool = False

    def __new__(cls, *args, **kwargs):
        # which options the caller set (by name or position): __post_init__ refuses those the
        # policy never reads; a field filled in by its default is never "set"
        self = super().__new__(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        object.__setattr__(self, "_set", frozenset(names[:len(args)]) | frozenset(kwargs))
        return self

    def __post_init__(self):
        _check_type("policy", self.policy, str)
        if self.policy not in POLICIES:
            raise ConfigError("policy", self.policy, f"allowed: {', '.join(sorted(POLICIES))}")
        for name, lo in (("interval", 1), ("warmup", 0), ("cooldown", 0)):
            v = getattr(self, name)
            _check_type(name, v, int)
            if v < lo:
                raise ConfigError(name, v, f"must be an integer >= {lo}")
        if self.num_steps is not None:
            _check_type("num_steps", self.num_steps, int)
            if self.num_steps < 1:
                raise ConfigError("num_steps", self.num_steps, "must be a positive integer or None")
        if self.reuse_steps is not None:
            rs = self.reuse_steps
            if isinstance(rs, (str, bytes, dict)) or not hasattr(rs, "__iter__"):
                raise ConfigError("reuse_steps", rs, "must be a list of non-negative step indices or None")
            items = list(rs)
            for s in items:
                if isinstance(s, bool) or not isinstance(s, int) or s < 0:
                    raise ConfigError("reuse_steps", rs, "must be a list of non-negative integer step indices")
            if 0 in items:
                raise ConfigError("reuse_steps", rs, "step 0 has no cache to reuse; use steps >= 1")
            object.__setattr__(self, "reuse_steps", tuple(sorted(set(items))))
        _check_number("budget", self.budget, lo=0.0, hi=1.0, hi_open=True)
        if self.calibrate is not None:
            _check_type("calibrate", self.calibrate, (str, os.PathLike))
            object.__setattr__(self, "calibrate", os.fspath(self.calibrate))
        if not isinstance(self.correction, bool):
            raise ConfigError("correction", self.correction, "must be True or False")
        _check_choice("curvature", self.curvature, ("angle", "output", "error", "uniform"))
        _check_type("min_gap", self.min_gap, int)
        if self.min_gap < 1:
            raise ConfigError("min_gap", self.min_gap, "must be an integer >= 1")
        if self.max_run is not None:
            _check_type("max_run", self.max_run, int)
            if self.max_run < 1:
                raise ConfigError("max_run", self.max_run, "must be an integer >= 1 or None (unbounded)")
        _check_choice("run_correction", self.run_correction, ("scaled", "chain", "hold", "first"))
        if self.correction_band is not None:
            band = self.correction_band
            if (not isinstance(band, (tuple, list)) or len(band) != 2
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in band)
                    or not 0 <= band[0] < band[1] <= 1):
                raise ConfigError("correction_band", band, "must be None or two numbers lo < hi in [0, 1] "
                                  "(fractions of the highest spatial frequency, e.g. (0, 0.5))")
            object.__setattr__(self, "correction_band", (float(band[0]), float(band[1])))
        _check_number("threshold", self.threshold, lo=0.0, lo_open=True)
        _check_type("probe_depth", self.probe_depth, int)
        if self.probe_depth < 1:
            raise ConfigError("probe_depth", self.probe_depth, "must be an integer >= 1")
        _check_number("ret_ratio", self.ret_ratio, lo=0.0, hi=1.0, hi_open=True)
        _check_choice("error", self.error, ("delta_y", "delta_minus"))
        _check_choice("target_cost", self.target_cost, ("measured", "flops"))
        if not isinstance(self.extrapolate, bool):
            raise ConfigError("extrapolate", self.extrapolate, "must be True or False")
        if not isinstance(self.align, bool):
            raise ConfigError("align", self.align, "must be True or False")
        clip = self.align_clip
        if (isinstance(clip, (str, bytes)) or not hasattr(clip, "__len__") or len(clip) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in clip)
                or not 0 <= clip[0] <= clip[1]):
            raise ConfigError("align_clip", clip, "must be two numbers lo <= hi, lo >= 0 (DiCache: [1, 1.5])")
        object.__setattr__(self, "align_clip", (float(clip[0]), float(clip[1])))
        _check_number("target_speedup", self.target_speedup, lo=1.0)
        _check_type("cache_interval", self.cache_interval, int)
        if self.cache_interval < 1:
            raise ConfigError("cache_interval", self.cache_interval, "must be an integer >= 1")
        try:
            object.__setattr__(self, "merge", MergeOptions(**{f.name: getattr(self, f.name)
                                                             for f in dataclasses.fields(MergeOptions)}))
        except OptionError as e:
            raise ConfigError(e.field, e.value, e.allowed) from None
        if not isinstance(self.strict, bool):
            raise ConfigError("strict", self.strict, "must be True or False")
        _check_type("report_generations", self.report_generations, int)
        if self.report_generations < 1:
            raise ConfigError("report_generations", self.report_generations,
                              "must be an integer >= 1 (generations kept in detail in the report)")
        _check_choice("guard", self.guard, GUARDS)
        _check_choice("inner_backend", self.inner_backend, INNER_BACKENDS)
        if self.dump_dir is not None:
            _check_type("dump_dir", self.dump_dir, (str, os.PathLike))
            if not os.fspath(self.dump_dir).strip():
                raise ConfigError("dump_dir", self.dump_dir, "must be a folder path or None, not empty")
        cls = POLICIES[self.policy]
        self._check_used(cls)
        if self.guard != "auto" and self.guard not in cls.guards:
            raise ConfigError("guard", self.guard, f"policy {self.policy!r} runs under guard "
                              f"{' or '.join(repr(g) for g in cls.guards)}; use that or 'auto'")
        cls.validate(self)

    def _check_used(self, cls) -> None:
        """ConfigError for the first set option (in field order) that neither every policy nor
        policy ``cls`` reads, naming the registered policies that do read it."""
        reads = COMMON_OPTIONS | set(getattr(cls, "options", ()))
        for f in dataclasses.fields(self):
            if f.name in self._set and f.name not in reads:
                users = sorted(name for name, pc in POLICIES.items() if f.name in getattr(pc, "options", ()))
                where = f"it is used by: {', '.join(users)}" if users else "no registered policy uses it"
                raise ConfigError(f.name, getattr(self, f.name),
                                  f"option {f.name!r} is not used by policy {self.policy!r}; {where}")

    def is_set(self, name: str) -> bool:
        """True when the caller set option ``name`` (False for a field left to its default)."""
        return name in self._set

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_options(cls, options: Optional[dict] = None, **more) -> "OmniCacheConfig":
        """Build from an options dict (``torch.compile(..., options=...)``) plus keywords."""
        merged: dict[str, Any] = {}
        if options is not None:
            if isinstance(options, OmniCacheConfig):
                merged.update(options._set_values())
            elif not isinstance(options, dict):
                raise ConfigError("options", options, "must be a dict of omnicache options")
            else:
                merged.update(options)
        merged.update(more)
        names = [f.name for f in dataclasses.fields(cls)]
        for key in merged:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ConfigError(str(key), merged[key], f"unknown option; {hint}known options: {', '.join(names)}")
        if merged.get("dump_dir") is None and os.environ.get("OMNICACHE_DUMP_DIR"):
            merged["dump_dir"] = os.environ["OMNICACHE_DUMP_DIR"]
        if "strict" not in merged and os.environ.get(STRICT_ENV, "").strip() not in ("", "0"):
            merged["strict"] = True
        return cls(**merged)

    def replace(self, **changes) -> "OmniCacheConfig":
        """The config with ``changes`` set on top of the options this one was built from."""
        return self.from_options(self._set_values(), **changes)

    def _set_values(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in self._set}

    def to_options(self) -> dict:
        """The options the caller set, JSON-ready: ``from_options(c.to_options()) == c``
        (``to_dict`` has every field, and would set options the policy does not read)."""
        d = self.to_dict()
        return {k: v for k, v in d.items() if k in self._set}

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("merge", None)
        if d["reuse_steps"] is not None:
            d["reuse_steps"] = list(d["reuse_steps"])
        d["align_clip"] = list(d["align_clip"])
        if d["correction_band"] is not None:
            d["correction_band"] = list(d["correction_band"])
        return d


def _check_type(name: str, value, types) -> None:
    ok = isinstance(value, types) and not (isinstance(value, bool) and types in (int, (int,)))
    if not ok:
        tn = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
        raise ConfigError(name, value, f"must be of type {tn}")


def _check_number(name: str, value, lo=None, hi=None, lo_open=False, hi_open=False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(name, value, "must be a number")
    if not math.isfinite(value):
        raise ConfigError(name, value, "must be a finite number")
    bad = ((lo is not None and (value < lo or (lo_open and value == lo)))
           or (hi is not None and (value > hi or (hi_open and value == hi))))
    if bad:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        raise ConfigError(name, value, f"must be in {left}{lo if lo is not None else '-inf'}, "
                                       f"{hi if hi is not None else 'inf'}{right}")


def _check_choice(name: str, value, allowed) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(name, value, f"allowed: {', '.join(allowed)}")
