"""diffusers integration: one call caches a whole pipeline.

    pipe = FluxPipeline.from_pretrained(...)
    cache = omnicompile.compile_pipeline(pipe, policy="static", interval=2)
    image = pipe(prompt, num_inference_steps=28).images[0]
    summary = cache.report().summary()

:func:`compile_pipeline` compiles every denoiser of the pipeline (``transformer``,
``transformer_2``, ``unet`` …), each with its own :class:`~omnicompile.OmniCache` (its own
state and report), and makes every call of the pipeline one generation
(:func:`omnicompile.generation` with the pipeline's scheduler): the step of each model call is
the number of ``scheduler.step()`` calls so far (from the scheduler's ``begin_index``: img2img
runs start mid-schedule), the step count is the length of the scheduler's timesteps, known
before step 0, and an interrupted call (``callback_on_step_end`` setting the interrupt, an
exception) never leaks into the next.  Nothing of diffusers is imported until a pipeline is
passed in; the pipeline object is changed in place (its class becomes a subclass whose
``__call__`` opens the context; ``pipe.omnicache`` is the returned handle).
"""
from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import torch

from omnicompile.backend import RECOMPILE_HINT, OmniCache, recompile_limit_hit
from omnicompile.errors import ConfigError
from omnicompile.generation import generation
from omnicompile.report import Report
from omnicompile.runtime.base import model_call

log = logging.getLogger("omnicompile")

__all__ = ["compile_pipeline", "PipelineCache", "denoisers_of"]

#: attribute names of a pipeline's denoisers, in this order
DENOISER_NAMES = ("transformer", "transformer_2", "unet", "unet_2", "prior", "decoder")

_subclasses: dict[type, type] = {}


def denoisers_of(pipe) -> list[str]:
    """The attributes of ``pipe`` that hold a denoiser (a torch module named like one)."""
    return [n for n in DENOISER_NAMES if isinstance(getattr(pipe, n, None), torch.nn.Module)]


class PipelineCache:
    """The handle :func:`compile_pipeline` returns (also ``pipe.omnicache``)."""

    def __init__(self, pipe, backends: dict[str, OmniCache], originals: dict[str, torch.nn.Module]):
        self.pipe = pipe
        #: denoiser attribute -> its OmniCache
        self.backends = backends
        self.originals = originals
        self.calls = 0
        self.interrupted = 0
        #: per denoiser: its calls, and those that reached no omnicache graph (Dynamo ran them
        #: without compiling: past its recompile limit, or a frame it skips)
        self.model_calls: dict[str, int] = {n: 0 for n in backends}
        self.bypassed: dict[str, int] = {n: 0 for n in backends}
        self._warned = False

    def report(self) -> Report:
        """Every compiled graph of every denoiser, in the order of ``backends``; the calls that
        reached no graph, and why, as warnings."""
        graphs = [g for oc in self.backends.values() for g in oc.report().graphs]
        warnings = [RECOMPILE_HINT] if recompile_limit_hit() else []
        bypassed = sum(self.bypassed.values())
        if bypassed:
            warnings.append(f"{bypassed} of {sum(self.model_calls.values())} denoiser calls reached no omnicache "
                            f"graph ({', '.join(f'{n}: {k}' for n, k in self.bypassed.items() if k)})")
        return Report(graphs, warnings, bypassed)

    def counted(self, name: str, forward):
        """``forward`` of a compiled denoiser, counting its calls and those that reach no graph."""
        def run(*args, **kwargs):
            with model_call() as reached:
                out = forward(*args, **kwargs)
            self.model_calls[name] += 1
            if not reached:
                self.bypassed[name] += 1
                if not self._warned:
                    self._warned = True
                    log.warning("omnicache: a call of %s reached no omnicache graph (Dynamo ran it without "
                                "compiling). %s", name, RECOMPILE_HINT if recompile_limit_hit() else "")
            return out
        return run

    def reset(self) -> None:
        for oc in self.backends.values():
            oc.reset()

    def run(self, call, pipe, args, kwargs):
        """One pipeline call as one generation."""
        self.calls += 1
        with generation(scheduler=getattr(pipe, "scheduler", None)) as g:
            out = call(pipe, *args, **kwargs)
            g.completed = not bool(getattr(pipe, "interrupt", False))
            self.interrupted += not g.completed
        return out

    def __repr__(self) -> str:
        return f"PipelineCache({type(self.pipe).__name__}, denoisers={list(self.backends)})"


def _cached_class(cls: type) -> type:
    if getattr(cls, "_omnicache_base", None) is not None:
        return cls
    sub = _subclasses.get(cls)
    if sub is None:
        def __call__(self, *args, **kwargs):
            cache = vars(self).get("omnicache")
            if not isinstance(cache, PipelineCache):
                return cls.__call__(self, *args, **kwargs)
            return cache.run(cls.__call__, self, args, kwargs)

        __call__.__doc__ = cls.__call__.__doc__
        sub = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                           "__qualname__": cls.__qualname__, "_omnicache_base": cls})
        _subclasses[cls] = sub
    return sub


def compile_pipeline(pipe: Any, policy: Optional[str] = None, *, denoisers: Optional[Sequence[str]] = None,
                     fullgraph: bool = False, dynamic: Optional[bool] = None, **options) -> PipelineCache:
    """Compile the denoisers of a diffusers pipeline with omnicache and make each pipeline call
    one generation (module docstring).

    ``policy`` and ``options`` are the omnicache options (``omnicompile.OmniCacheConfig``);
    ``denoisers`` names the attributes to compile (default: :func:`denoisers_of`);
    ``fullgraph`` and ``dynamic`` go to ``torch.compile``.  Calling it again on the same
    pipeline recompiles the original denoisers with the new options."""
    if not callable(getattr(pipe, "__call__", None)) or not hasattr(pipe, "components"):
        raise ConfigError("pipe", type(pipe).__name__, "must be a diffusers pipeline (a DiffusionPipeline with "
                          "its components)")
    old = vars(pipe).get("omnicache")
    originals = dict(old.originals) if isinstance(old, PipelineCache) else {}
    names = list(denoisers) if denoisers is not None else (list(originals) or denoisers_of(pipe))
    if not names:
        raise ConfigError("denoisers", None, f"{type(pipe).__name__} has none of the attributes "
                          f"{', '.join(DENOISER_NAMES)}; name its denoisers with denoisers=[...]")
    if policy is not None:
        options["policy"] = policy
    backends: dict[str, OmniCache] = {}
    for name in names:
        module = originals.get(name, getattr(pipe, name, None))
        if not isinstance(module, torch.nn.Module):
            raise ConfigError("denoisers", name, f"{type(pipe).__name__}.{name} is not a torch module")
        originals[name] = module
        backends[name] = OmniCache(options)
    cache = PipelineCache(pipe, backends, originals)
    for name, oc in backends.items():
        compiled = torch.compile(originals[name], backend=oc, fullgraph=fullgraph, dynamic=dynamic)
        compiled.forward = cache.counted(name, compiled.forward)
        setattr(pipe, name, compiled)
    pipe.__class__ = _cached_class(type(pipe))
    pipe.omnicache = cache
    return cache
