"""omnicompile: a torch.compile backend that caches diffusion-transformer blocks across
denoising steps.

    model = torch.compile(transformer, backend="omnicache", options={"policy": "static"})
    oc = omnicompile.OmniCache(policy="static", reuse_steps=[4, 6, 8])
    model = torch.compile(transformer, backend=oc); ...; print(oc.report())

Importing this package registers the ``omnicache`` backend name with Dynamo; a fresh
process finds it without the import through the ``torch_dynamo_backends`` entry point.
"""
from __future__ import annotations

from omnicompile.config import OmniCacheConfig
from omnicompile.errors import CalibrationError, ConfigError, OmniCacheError, RewriteError
from omnicompile.policies import POLICIES, register_policy
from omnicompile import trajectory as _trajectory  # registers the trajectory policies
from omnicompile import layered as _layered  # registers the layered policy
from omnicompile.backend import OmniCache, last_report, omnicache_backend
from omnicompile.report import Report

__all__ = ["OmniCache", "OmniCacheConfig", "ConfigError", "OmniCacheError", "RewriteError", "CalibrationError",
           "POLICIES", "register_policy", "omnicache_backend", "last_report", "Report"]
__version__ = "0.1.0"


def _register() -> None:
    from torch._dynamo.backends import registry

    if "omnicache" in registry._COMPILER_FNS:
        return
    if registry._BACKENDS.get("omnicache") is not None:
        return  # Dynamo found our entry point and will register it when it loads it
    registry.register_backend(compiler_fn=omnicache_backend, name="omnicache")


_register()
