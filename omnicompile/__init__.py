"""omnicompile: a torch.compile backend that caches diffusion-transformer blocks across
denoising steps.

    model = torch.compile(transformer, backend="omnicache", options={"policy": "static"})
    oc = omnicompile.OmniCache(policy="static", reuse_steps=[4, 6, 8])
    model = torch.compile(transformer, backend=oc); ...; print(oc.report())

Importing this package registers the ``omnicache`` backend name with Dynamo and the built-in
policies (:mod:`omnicompile.policies`); a fresh process finds the backend without the import
through the ``torch_dynamo_backends`` entry point.  A policy of one's own implements
:mod:`omnicompile.policy` and registers with :func:`register_policy`.
"""
from __future__ import annotations

from omnicompile.config import OmniCacheConfig
from omnicompile.errors import (
    CalibrationError, ConfigError, OmniCacheError, ReportError, RewriteError, ScheduleError, StepCountError,
)
from omnicompile.registry import POLICIES, register_policy
from omnicompile.policy import Policy, SchedulePolicy
from omnicompile import policies as _policies  # noqa: F401  (registers the built-in policies)
from omnicompile.backend import OmniCache, last_report, omnicache_backend
from omnicompile.generation import Generation, current_generation, generation
from omnicompile.pipeline import PipelineCache, compile_pipeline
from omnicompile.report import Report

__all__ = ["OmniCache", "OmniCacheConfig", "ConfigError", "OmniCacheError", "RewriteError", "CalibrationError",
           "ScheduleError", "ReportError", "StepCountError", "POLICIES", "register_policy", "Policy", "SchedulePolicy",
           "omnicache_backend",
           "last_report", "Report", "compile_pipeline", "PipelineCache", "generation", "Generation",
           "current_generation"]
__version__ = "0.1.0"


def _register() -> None:
    from torch._dynamo.backends import registry

    if "omnicache" in registry._COMPILER_FNS:
        return
    if registry._BACKENDS.get("omnicache") is not None:
        return  # Dynamo found our entry point and will register it when it loads it
    registry.register_backend(compiler_fn=omnicache_backend, name="omnicache")


_register()
