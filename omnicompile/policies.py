"""Caching policies, looked up by name in ``POLICIES``.

A policy answers, for each call of a compiled graph, which spans to reuse.  The backend and
runtime never branch on the policy's type: a later policy registers itself with
``@register_policy("name")`` and implements the same small protocol:

* ``rewrites`` — False leaves the graph to the inner backend untouched (``none``);
* ``static`` — True when ``decide`` depends only on the step index, so the host can choose
  between specialised compiled variants with no device sync;
* ``decide(step, num_steps, n_spans) -> tuple[bool, ...]`` — True = reuse that span;
* ``variants(n_spans)`` — the decision tuples to compile up front;
* ``describe()`` — a dict for reports.

The runtime still forces a compute where a slot has no cache yet, so a policy need not
know about CFG slots or generation boundaries.
"""
from __future__ import annotations

from typing import Callable, Optional

from omnicompile.config import OmniCacheConfig

__all__ = ["POLICIES", "register_policy", "make_policy", "Policy", "NonePolicy", "StaticPolicy"]

POLICIES: dict[str, type] = {}


def register_policy(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        if name in POLICIES and POLICIES[name] is not cls:
            raise ValueError(f"policy {name!r} is already registered by {POLICIES[name].__name__}")
        POLICIES[name] = cls
        cls.name = name
        return cls
    return deco


class Policy:
    name = "?"
    rewrites = True
    static = True
    #: True for policies whose decision is computed inside the graph (see InGraphRuntime)
    in_graph = False

    def __init__(self, config: OmniCacheConfig):
        self.config = config

    @classmethod
    def validate(cls, config: OmniCacheConfig) -> None:
        """Raise ConfigError for option combinations this policy cannot honour."""

    def select_spans(self, gm, analysis) -> list:
        """The spans this policy guards (default: one per block group, from the analysis).
        A policy that decides per unit returns finer spans (``passes.spans.make_span``)."""
        return list(analysis.spans)

    @classmethod
    def runtime_class(cls):
        """The runtime that executes this policy's graphs."""
        from omnicompile.runtime import GraphRuntime, InGraphRuntime
        return InGraphRuntime if cls.in_graph else GraphRuntime

    def decide(self, step: int, num_steps: Optional[int], n_spans: int) -> tuple[bool, ...]:
        raise NotImplementedError

    def variants(self, n_spans: int) -> list[tuple[bool, ...]]:
        return [(False,) * n_spans, (True,) * n_spans]

    def describe(self) -> dict:
        return {"policy": self.name}


@register_policy("none")
class NonePolicy(Policy):
    """No caching: the graph goes to the inner backend unchanged (the parity baseline)."""

    rewrites = False

    def decide(self, step, num_steps, n_spans):
        return (False,) * n_spans

    def variants(self, n_spans):
        return [(False,) * n_spans]


@register_policy("static")
class StaticPolicy(Policy):
    """A fixed schedule: every span is reused at the same steps.

    With ``reuse_steps`` those steps are reused.  Otherwise steps ``< warmup`` and the last
    ``cooldown`` steps are computed; after warm-up, reuse starts at once and every
    ``interval``-th step refreshes the cache: step ``s`` is computed when
    ``(s - warmup) % interval == interval - 1`` (interval 2: C C R C R C ... for warmup 2).
    """

    def is_reuse_step(self, step: int, num_steps: Optional[int]) -> bool:
        c = self.config
        if c.reuse_steps is not None:
            return step in c.reuse_steps
        if step < c.warmup or c.interval <= 1:
            return False
        if c.cooldown and num_steps is not None and step >= num_steps - c.cooldown:
            return False
        return (step - c.warmup) % c.interval != c.interval - 1

    def decide(self, step, num_steps, n_spans):
        return (self.is_reuse_step(step, num_steps),) * n_spans

    def variants(self, n_spans):
        c = self.config
        if c.reuse_steps is None and c.interval <= 1:
            return [(False,) * n_spans]
        return super().variants(n_spans)

    def describe(self):
        c = self.config
        if c.reuse_steps is not None:
            return {"policy": "static", "reuse_steps": list(c.reuse_steps)}
        return {"policy": "static", "interval": c.interval, "warmup": c.warmup, "cooldown": c.cooldown}


def make_policy(config: OmniCacheConfig) -> Policy:
    return POLICIES[config.policy](config)


@register_policy("probe")
class ProbePolicy(Policy):
    """DiCache: an online shallow-layer probe decides, per sample and step, inside the graph.

    The first ``probe_depth`` blocks always run; their output's relative change against
    the previous step, accumulated, is compared with ``threshold``; below it the remaining
    blocks are skipped and their residual is extrapolated along the last two cached ones
    (``align``).  Steps within the first ``ret_ratio`` of sampling and the last step are
    always computed — the host knows those from the step index, everything else is decided
    on the device (``omnicompile.passes.probe``).  With ``probe_depth=1`` and
    ``align=False`` this is First-Block-Cache.  CFG batched in one call decides once for
    the whole batch (compute if the batch's mean error says so); CFG run as separate calls
    keeps a separate probe state per call.
    """

    static = False
    in_graph = True

    @classmethod
    def validate(cls, config):
        from omnicompile.errors import ConfigError
        if config.guard == "variants":
            raise ConfigError("guard", config.guard, "policy 'probe' decides inside the graph; use 'cond' or 'auto'")

    def build(self, gm, analysis):
        from omnicompile.errors import RewriteError
        from omnicompile.passes.probe import plan_probe

        plan, why = plan_probe(gm, analysis, self.config.probe_depth)
        if plan is None:
            raise RewriteError(why.code, why.message, why.subject)
        return plan

    def build_graph(self, gm, plan):
        from omnicompile.passes.probe import build_probe

        c = self.config
        return build_probe(gm, plan, float(c.threshold), c.error, c.align, c.align_clip)

    def force(self, step: int, num_steps: Optional[int], t: float, tracker) -> bool:
        """Steps computed whatever the probe says: the first ``ret_ratio`` of sampling and
        the last step (DiCache: ``step <= int(ret_ratio * N) or step == N - 1``).  Without
        a known step count the first ``ret_ratio`` is measured on the timestep value
        (progress ``1 - t / t_0``) and the last step cannot be protected."""
        if num_steps is not None:
            return step <= int(self.config.ret_ratio * num_steps) or step == num_steps - 1
        t0 = tracker.t0
        if not t0:
            return True
        return (1.0 - t / t0) <= self.config.ret_ratio

    def decide(self, step, num_steps, n_spans):
        return (False,) * n_spans

    def variants(self, n_spans):
        return []

    def describe(self):
        c = self.config
        return {"policy": "probe", "threshold": c.threshold, "probe_depth": c.probe_depth,
                "ret_ratio": c.ret_ratio, "error": c.error, "align": c.align}
