"""The peers of omnicompile, applied to a transformer the way their own documentation says.

``bench/quality.py`` runs every method on the shipped reference model (a diffusers
``FluxTransformer2DModel``) side by side.  This module holds the adapters for the caching
methods we compare against; each one is applied to a *fresh copy* of the transformer, so no hook,
patched forward or cache state leaks from one method into the next.

diffusers' cache hooks (``diffusers.hooks``, installed with diffusers)
    ``transformer.enable_cache(config)`` with ``FirstBlockCacheConfig``, ``TaylorSeerCacheConfig``,
    ``MagCacheConfig``, ``FasterCacheConfig`` or ``PyramidAttentionBroadcastConfig``.  The sampler
    (``bench.models.Reference.sample``) wraps every call in ``transformer.cache_context(name, ...)``
    as the diffusers pipelines do ("cond" / "uncond" for split CFG, "cond_uncond" for batched), and
    :meth:`Applied.reset` calls ``transformer._reset_stateful_cache()`` before each generation, which
    is what ``DiffusionPipeline.maybe_free_model_hooks()`` does at the end of every pipeline call.

    * MagCache needs model-specific magnitude ratios: its documented procedure is to run one
      generation with ``MagCacheConfig(calibrate=True)``, copy the ratios it prints, and pass them
      as ``mag_ratios``.  :func:`calibrate_magcache` does exactly that (on its own copy of the
      model, capturing the printed list) once per harness run; every MagCache setting reuses it.
    * PyramidAttentionBroadcast and FasterCache keep their state per attention module, not per
      ``cache_context``, and FasterCache's CFG cache splits a batch into its unconditional and
      conditional halves: both only make sense with batched CFG (one call per step).  With split
      CFG they raise :class:`NotApplicable`.  Both need ``current_timestep_callback``
      (``lambda: pipe.current_timestep`` in a pipeline); :class:`PeerEnv.current_timestep` plays
      that role (the scheduler timestep of the step being computed, a 0-d tensor like the
      pipelines').
    * FasterCache's CFG cache (reusing the unconditional branch) splits the denoiser output into
      frequency bands with a 2-D FFT written for image/video latents (``tensor_format`` BCHW,
      BCFHW, BFCHW; "TODO: Support BSC" in diffusers' source); Flux's transformer returns packed
      tokens ``[B, N, C]`` and the split fails on them.  That setting raises :class:`NotApplicable`;
      FasterCache's attention reuse runs on its own ("attention only": ``is_guidance_distilled=True``
      turns the CFG cache off and lets the attention hooks extrapolate the whole batch).

cache-dit (``pip install cache-dit``)
    ``cache_dit.enable_cache(transformer, cache_config=DBCacheConfig(...), calibrator_config=...)``.
    ``FluxTransformer2DModel`` has a registered ``BlockAdapter`` in cache-dit, used for a bare
    transformer through cache-dit's transformer-only path (a ``FakeDiffusionPipeline`` with a
    persistent context).  Each generation starts with ``cache_dit.refresh_context(transformer,
    cache_config=...)``, the documented call for transformer-only flows: the automatic refresh after
    ``num_inference_steps`` happens one call late, so the next generation's first step ran against the
    previous generation's cache (consecutive generations differed).  ``Fn_compute_blocks`` defaults to 8, more than the reference model's 2 + 4 blocks
    (every block would be computed), so DBCache runs as F1B0 (cache-dit's fastest documented
    configuration: the first block is the probe, the rest is cached).  ``enable_separate_cfg`` is
    set from the sampler's CFG form.  Under ``torch.compile`` cache-dit's docs call
    ``cache_dit.set_compile_configs()`` first; :meth:`Applied.compile_config` applies it and the
    harness restores Dynamo's and Inductor's configs afterwards.

Every adapter raises :class:`NotApplicable` (with the reason) when the peer cannot run on this
model or sampler form; the harness records the reason instead of a row.
"""
from __future__ import annotations

import ast
import contextlib
import copy
import io
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import numpy as np
import torch

__all__ = ["PeerSetting", "PeerEnv", "Applied", "NotApplicable", "PEER_FAMILIES", "default_peer_settings",
           "apply_peer", "calibrate_magcache"]


class NotApplicable(Exception):
    """The peer cannot be applied to this model / sampler; the message says why."""


#: family key -> (display name, package)
PEER_FAMILIES = {
    "diffusers-fbc": ("diffusers FirstBlockCache", "diffusers"),
    "diffusers-taylorseer": ("diffusers TaylorSeerCache", "diffusers"),
    "diffusers-taylorseer-lite": ("diffusers TaylorSeerCache (lite)", "diffusers"),
    "diffusers-magcache": ("diffusers MagCache", "diffusers"),
    "diffusers-fastercache": ("diffusers FasterCache", "diffusers"),
    "diffusers-pab": ("diffusers PyramidAttentionBroadcast", "diffusers"),
    "cachedit-dbcache": ("cache-dit DBCache", "cache-dit"),
    "cachedit-dbcache-ts": ("cache-dit DBCache+TaylorSeer", "cache-dit"),
}


@dataclass(frozen=True)
class PeerSetting:
    family: str                      # a key of PEER_FAMILIES
    label: str                       # short setting text, e.g. "t=0.1"
    params: tuple = ()               # sorted (name, value) pairs

    @property
    def kwargs(self) -> dict:
        return dict(self.params)

    @property
    def name(self) -> str:
        return f"{PEER_FAMILIES[self.family][0]} {self.label}".strip()


def _setting(family: str, label: str, **params) -> PeerSetting:
    return PeerSetting(family, label, tuple(sorted(params.items())))


def default_peer_settings() -> list[PeerSetting]:
    """The grid the harness runs by default: several settings per peer, spanning roughly the
    same speed range as omnicompile's grid on the reference model."""
    s = []
    # diffusers' default 0.05 (no reuse at all on this model: the hooks' overhead alone);
    # ParaAttention suggests 0.08-0.12 for Flux
    for t in (0.05, 0.1, 0.2, 0.4):
        s.append(_setting("diffusers-fbc", f"t={t:g}", threshold=t))
    for n in (3, 5):                               # the docs' Flux example uses cache_interval=5
        s.append(_setting("diffusers-taylorseer", f"interval={n}", cache_interval=n))
    for n in (3, 5):
        s.append(_setting("diffusers-taylorseer-lite", f"interval={n}", cache_interval=n))
    for t in (0.06, 0.24, 0.5):                    # default 0.06
        s.append(_setting("diffusers-magcache", f"t={t:g}", threshold=t))
    s.append(_setting("diffusers-fastercache", "attn=2 + CFG cache uncond=5", attn=2, uncond=5))
    s.append(_setting("diffusers-fastercache", "attn=2 (attention only)", attn=2))
    for n in (2, 3):
        s.append(_setting("diffusers-pab", f"attn={n}", attn=n))
    # cache-dit's default 0.08; its docs go to 0.12-0.24+; 0.001 never reuses: the hooks' overhead
    for t in (0.001, 0.08, 0.24, 0.5):
        s.append(_setting("cachedit-dbcache", f"F1B0 t={t:g}", threshold=t))
    for t in (0.24, 0.5):
        s.append(_setting("cachedit-dbcache-ts", f"F1B0 t={t:g} order=1", threshold=t))
    return s


@dataclass
class PeerEnv:
    """What an adapter may use from the harness."""

    steps: int
    cfg: str                                             # "batched" | "split"
    generate: Callable[[torch.nn.Module], torch.Tensor]  # one generation with the sampler (eager)
    fresh: Callable[[], torch.nn.Module]                 # a fresh copy of the uncached transformer
    memo: dict = field(default_factory=dict)             # shared across settings (calibrations)

    def __post_init__(self):
        # the scheduler's timesteps (sigmas * 1000) of bench.models.Reference.sample, as 0-d
        # tensors like the ``t`` a pipeline stores in ``self._current_timestep``
        sig = np.linspace(1.0, 1.0 / self.steps, self.steps)
        self._timesteps = [torch.tensor(float(s) * 1000.0) for s in sig]
        self._current = self._timesteps[0]

    def current_timestep(self) -> torch.Tensor:
        """``pipe.current_timestep`` of a diffusers pipeline: the timestep being computed.

        Returns the stored tensor itself (no Python index in the traced path), so that under
        torch.compile the hooks see a tensor input, as they do with a real pipeline, rather than
        a Python int that Dynamo would specialise on at every step."""
        return self._current

    def start_generation(self) -> None:
        self._current = self._timesteps[0]

    def step_done(self, step_index: int, sigma: float, latents: torch.Tensor) -> None:
        """The sampler's ``callback``: step ``step_index`` is finished."""
        self._current = self._timesteps[min(step_index + 1, len(self._timesteps) - 1)]


class Applied:
    """A peer applied to one transformer: the hooked module and how to drive it."""

    def __init__(self, setting: PeerSetting, model: torch.nn.Module, reset: Callable[[], None],
                 stats: Callable[[], dict] = lambda: {}, compile_config: Optional[Callable[[], None]] = None,
                 notes: Optional[list[str]] = None, calibration_s: float = 0.0):
        self.setting = setting
        self.model = model
        self._reset = reset
        self._stats = stats
        self._compile_config = compile_config
        self.notes = list(notes or [])
        self.calibration_s = calibration_s

    def reset(self) -> None:
        """Called before every generation."""
        self._reset()

    def stats(self) -> dict:
        try:
            return self._stats()
        except Exception as e:  # statistics are informative only
            return {"error": f"{type(e).__name__}: {e}"}

    @contextlib.contextmanager
    def compile_config(self) -> Iterator[None]:
        """The global torch.compile settings the peer's docs ask for (restored on exit)."""
        if self._compile_config is None:
            yield
            return
        import torch._dynamo.config as dcfg
        import torch._inductor.config as icfg
        saved_d, saved_i = dcfg.get_config_copy(), icfg.get_config_copy()
        try:
            self._compile_config()
            yield
        finally:
            import warnings
            with warnings.catch_warnings():   # the snapshot includes deprecated keys
                warnings.simplefilter("ignore", FutureWarning)
                dcfg.load_config(saved_d)
                icfg.load_config(saved_i)


# ------------------------------------------------------------------------------------------
# diffusers
# ------------------------------------------------------------------------------------------


def _diffusers_reset(transformer) -> Callable[[], None]:
    # what DiffusionPipeline.maybe_free_model_hooks() does after every pipeline call
    return lambda: transformer._reset_stateful_cache()


def _need_batched(env: PeerEnv, what: str, why: str) -> None:
    if env.cfg != "batched":
        raise NotApplicable(f"{what} needs batched CFG ({why}); this run uses cfg={env.cfg!r}")


def calibrate_magcache(env: PeerEnv) -> tuple[list[float], float]:
    """MagCache's documented calibration: one generation with ``MagCacheConfig(calibrate=True)``,
    then read the ratios it prints.  Returns ``(ratios, seconds)``; memoised per harness run."""
    if "magcache" in env.memo:
        return env.memo["magcache"], 0.0
    import time
    from diffusers import MagCacheConfig

    model = env.fresh()
    model.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=env.steps))
    buf = io.StringIO()
    t0 = time.perf_counter()
    model._reset_stateful_cache()
    with contextlib.redirect_stdout(buf):
        env.generate(model)
    seconds = time.perf_counter() - t0
    lists = []
    for line in buf.getvalue().splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]") and not line.startswith("[MagCache]"):
            try:
                lists.append([float(v) for v in ast.literal_eval(line)])
            except (ValueError, SyntaxError):
                continue
    if not lists:
        raise NotApplicable("MagCache calibration printed no ratios (did the run reach num_inference_steps?)")
    # split CFG prints one list per cache context ("cond" first); MagCacheConfig takes one
    ratios = lists[0]
    if len(ratios) != env.steps:
        raise NotApplicable(f"MagCache calibration gave {len(ratios)} ratios for {env.steps} steps")
    env.memo["magcache"] = ratios
    return ratios, seconds


def _apply_diffusers(setting: PeerSetting, model, env: PeerEnv) -> Applied:
    import diffusers

    kw = setting.kwargs
    fam = setting.family
    notes: list[str] = []
    calib_s = 0.0
    if fam == "diffusers-fbc":
        config = diffusers.FirstBlockCacheConfig(threshold=kw["threshold"])
    elif fam in ("diffusers-taylorseer", "diffusers-taylorseer-lite"):
        config = diffusers.TaylorSeerCacheConfig(
            cache_interval=kw["cache_interval"], disable_cache_before_step=3, max_order=1,
            taylor_factors_dtype=torch.float32, use_lite_mode=fam.endswith("lite"))
        if fam.endswith("lite"):
            notes.append("lite mode: every block skipped on predicted steps, proj_out predicted")
        else:
            notes.append("default mode: the attention modules are predicted, MLPs always run")
    elif fam == "diffusers-magcache":
        ratios, calib_s = calibrate_magcache(env)
        config = diffusers.MagCacheConfig(threshold=kw["threshold"], max_skip_steps=3, retention_ratio=0.2,
                                          num_inference_steps=env.steps, mag_ratios=ratios)
    elif fam == "diffusers-pab":
        _need_batched(env, "PyramidAttentionBroadcast",
                      "its per-attention-module state is shared by the cond and uncond calls")
        config = diffusers.PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=kw["attn"], spatial_attention_timestep_skip_range=(100, 800),
            current_timestep_callback=env.current_timestep)
    elif fam == "diffusers-fastercache":
        _need_batched(env, "FasterCache", "its CFG cache splits the batch into uncond/cond halves and its "
                      "attention state is shared by the cond and uncond calls")
        cfg_cache = kw.get("uncond") is not None
        if cfg_cache:
            raise NotApplicable(
                "FasterCache's CFG cache (reuse of the unconditional branch) works on image/video latents "
                "only (tensor_format BCHW/BCFHW/BFCHW; diffusers: 'TODO: Support BSC'). On Flux it first fails "
                "because pooled_projections is not in its default list of batch-split kwargs (size mismatch "
                "10 vs 20); with it added, the FFT frequency split of the packed-token output [B, N, C] fails "
                "(RuntimeError: Tensors must have same number of dimensions: got 4 and 3). The attention "
                "part runs alone as 'attention only'.")
        config = diffusers.FasterCacheConfig(
            spatial_attention_block_skip_range=kw["attn"], spatial_attention_timestep_skip_range=(-1, 681),
            attention_weight_callback=lambda _: 0.3,
            current_timestep_callback=env.current_timestep, tensor_format="BCHW",
            # no CFG cache: the denoiser-level hook passes the batch through, the attention
            # hooks extrapolate the full batch (what the flag does for guidance-distilled models)
            is_guidance_distilled=True)
        notes.append("attention reuse only: the CFG cache needs image/video latents (see the 'CFG cache' row)")
    else:
        raise KeyError(fam)
    if not hasattr(model, "enable_cache") and fam == "diffusers-fbc":
        # models without diffusers' CacheMixin (SD3, PixArt in 0.42): the hook's documented
        # functional form, and the registry's reset in place of _reset_stateful_cache
        from diffusers.hooks import HookRegistry, apply_first_block_cache
        try:
            apply_first_block_cache(model, config)
        except (TypeError, ValueError, AttributeError, NotImplementedError) as e:
            raise NotApplicable(f"apply_first_block_cache raised {type(e).__name__}: {e}") from None
        # the hooks read the context CacheMixin.cache_context sets; bind that method to the instance
        import types
        from diffusers.models.cache_utils import CacheMixin
        model.cache_context = types.MethodType(CacheMixin.cache_context, model)
        notes.append(f"{type(model).__name__} has no enable_cache: diffusers.hooks.apply_first_block_cache")
        registry = HookRegistry.check_if_exists_or_initialize(model)
        return Applied(setting, model, lambda: registry.reset_stateful_hooks(recurse=True), notes=notes)
    try:
        model.enable_cache(config)
    except (TypeError, ValueError, AttributeError, NotImplementedError) as e:
        raise NotApplicable(f"enable_cache({type(config).__name__}) raised {type(e).__name__}: {e}") from None
    return Applied(setting, model, _diffusers_reset(model), notes=notes, calibration_s=calib_s)


# ------------------------------------------------------------------------------------------
# cache-dit
# ------------------------------------------------------------------------------------------


def _cachedit_stats(model) -> dict:
    import cache_dit

    out = {}
    with contextlib.redirect_stdout(io.StringIO()):
        stats = cache_dit.summary(model, logging=False)
    for i, st in enumerate(stats or []):
        cached = getattr(st, "cached_steps", None)
        if cached is not None:
            out[f"cached_steps_{i}"] = sorted(int(v) for v in cached)
    return out


#: transformers cache-dit registers for their pipeline only: (block list, forward pattern) as in
#: cache-dit's own pipeline adapter (``caching/block_adapters/adapters.py``)
_CACHEDIT_BLOCKS = {"SD3Transformer2DModel": ("transformer_blocks", "Pattern_1")}


def _apply_cachedit(setting: PeerSetting, model, env: PeerEnv) -> Applied:
    try:
        import cache_dit
    except ImportError:
        raise NotApplicable("cache-dit is not installed (pip install cache-dit)") from None
    kw = setting.kwargs
    cache_config = cache_dit.DBCacheConfig(
        Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=kw["threshold"],
        num_inference_steps=env.steps, enable_separate_cfg=(env.cfg == "split"))
    calibrator = None
    if setting.family == "cachedit-dbcache-ts":
        calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1)
    target, notes = model, ["F1B0 (the default Fn=8 would compute every block of these few-block models)"]
    if type(model).__name__ in _CACHEDIT_BLOCKS:
        # registered for its pipeline only (StableDiffusion3 -> SD3Transformer2DModel): the
        # BlockAdapter cache-dit's docs ask for, with the pattern of its own pipeline adapter
        attr, pattern = _CACHEDIT_BLOCKS[type(model).__name__]
        target = cache_dit.BlockAdapter(transformer=model, blocks=getattr(model, attr),
                                        forward_pattern=getattr(cache_dit.ForwardPattern, pattern))
        notes.append(f"BlockAdapter({attr}, {pattern}) as cache-dit's pipeline adapter for this model")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            cache_dit.enable_cache(target, cache_config=cache_config, calibrator_config=calibrator)
    except (AssertionError, ValueError, TypeError, AttributeError) as e:
        raise NotApplicable(f"cache_dit.enable_cache raised {type(e).__name__}: {e}") from None

    def reset():
        # transformer-only flows start each request with cache_dit.refresh_context (its
        # documented API); relying on the automatic refresh after num_inference_steps runs
        # the first step of the next generation against the previous one's cache
        kwargs = {"cache_config": copy.deepcopy(cache_config)}
        if calibrator is not None:
            kwargs["calibrator_config"] = copy.deepcopy(calibrator)
        cache_dit.refresh_context(model, **kwargs)

    return Applied(setting, model, reset, stats=lambda: _cachedit_stats(model),
                   compile_config=lambda: cache_dit.set_compile_configs(), notes=notes)


def apply_peer(setting: PeerSetting, model: torch.nn.Module, env: PeerEnv) -> Applied:
    """Apply ``setting`` to ``model`` (a fresh copy of the transformer, modified in place)."""
    if setting.family not in PEER_FAMILIES:
        raise KeyError(f"unknown peer family {setting.family!r}; known: {', '.join(PEER_FAMILIES)}")
    if PEER_FAMILIES[setting.family][1] == "cache-dit":
        return _apply_cachedit(setting, model, env)
    return _apply_diffusers(setting, model, env)

