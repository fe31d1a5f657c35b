"""Runtimes: the callables the backend hands Dynamo for cached graphs.

* :mod:`~omnicompile.runtime.base` — the protocol every runtime implements (:class:`Runtime`)
  and what a policy builds it from (:class:`RuntimeContext`);
* :mod:`~omnicompile.runtime.tracker` — generation / step / slot from the timestep;
* :mod:`~omnicompile.runtime.spans` — host-decided schedules over spans (variants or cond).

Policies with runtimes of their own keep them next to the policy
(:mod:`omnicompile.policies`).
"""
from omnicompile.runtime.base import Call, Runtime, RuntimeContext, call_compiled, span_reports
from omnicompile.runtime.spans import SpanRuntime, variant_key
from omnicompile.runtime.tracker import StepTracker

__all__ = ["Call", "Runtime", "RuntimeContext", "SpanRuntime", "StepTracker", "call_compiled", "span_reports",
           "variant_key"]
