"""The policy protocol: everything the backend, the CLI and the dumps ask of a policy.

A policy is a class registered by name (:func:`omnicompile.register_policy`), built from the
config once per compiled graph (``cls(config)``).  It decides *what* is reused *when*; its
runtime (:class:`~omnicompile.runtime.base.Runtime`) carries the state.  The backend never
asks anything else of it and never branches on its type:

``rewrites`` (class attribute)
    False: the graph goes to the inner backend unchanged (policy ``none``; the
    token/frame/block caches may still wrap it — they are a layer of their own,
    :mod:`omnicompile.merging`).
``guards`` (class attribute)
    The guards the policy runs under, its default first (``guard="auto"`` picks it):
    ``"variants"`` (the host picks a compiled graph per step) and/or ``"cond"`` (one graph,
    ``torch.cond`` on an in-graph predicate).  The config refuses any other.
``options`` (class attribute)
    The names of the config options it reads beyond those every policy runs with
    (:data:`omnicompile.config.COMMON_OPTIONS`: ``num_steps``, ``guard``, the token/frame/block
    caches, ...).  An option the user sets that is in neither raises
    :class:`~omnicompile.errors.ConfigError` naming the policies whose ``options`` list it, so
    a plugin lists every option it reads (``toy-tail``: ``("warmup",)``).  A subclass inherits
    its parent's (the trajectory presets).
``calibratable`` (class attribute)
    True when its runtimes hold a :class:`~omnicompile.calibration.Calibrator` (they learn
    from a first generation): ``OmniCache.calibrate`` and ``omnicache calibrate`` accept it.
``validate(config)`` (classmethod)
    Raise :class:`~omnicompile.errors.ConfigError` for option combinations it cannot honour.
``make_runtime(ctx)``
    Rewrite the graph and build the runtime from a
    :class:`~omnicompile.runtime.base.RuntimeContext`.  A rewrite it cannot prove safe raises
    :class:`~omnicompile.errors.RewriteError` (a deliberate refusal: the graph is compiled
    unchanged and the report says why); any other exception is a bug.
``describe()``
    A small JSON-safe dict for reports (the policy name and its settings).

What a runtime previews for ``explain``/``dump`` comes from the runtime
(``runtime.preview(steps)``), from the rules it runs by.

Most policies decide per step from the host: subclass :class:`SchedulePolicy` and implement
``decide(step, num_steps, n_spans)``; it runs on :class:`~omnicompile.runtime.spans.SpanRuntime`
(variants or cond, the forced-compute rule for a slot without a cache, the preview).  See
``README.md`` ("Writing a policy") and ``tests/toy_policy.py``.
"""
from __future__ import annotations

import abc
from typing import ClassVar, Optional

from omnicompile.runtime.base import Runtime, RuntimeContext
from omnicompile.runtime.spans import SpanRuntime

__all__ = ["Policy", "SchedulePolicy", "RuntimeContext", "Runtime"]


class Policy(abc.ABC):
    name: ClassVar[str] = "?"
    rewrites: ClassVar[bool] = True
    guards: ClassVar[tuple[str, ...]] = ("variants", "cond")
    #: config options this policy reads beyond omnicompile.config.COMMON_OPTIONS
    options: ClassVar[tuple[str, ...]] = ()
    calibratable: ClassVar[bool] = False

    def __init__(self, config):
        self.config = config

    @classmethod
    def validate(cls, config) -> None:
        """Raise ConfigError for option combinations this policy cannot honour."""

    @abc.abstractmethod
    def make_runtime(self, ctx: RuntimeContext) -> Runtime:
        """The runtime of one compiled graph (raises RewriteError to refuse it)."""

    def describe(self) -> dict:
        return {"policy": self.name}


class SchedulePolicy(Policy):
    """A policy decided on the host, per step: which spans to reuse.

    The runtime computes a span the schedule wants reused while its slot has no cache yet
    (the first step of a generation, a new CFG slot), so ``decide`` need not know about
    slots or generation boundaries."""

    def select_spans(self, ctx: RuntimeContext) -> list:
        """The spans this policy guards (default: one per block group, from the analysis)."""
        return list(ctx.analysis.spans)

    @abc.abstractmethod
    def decide(self, step: int, num_steps: Optional[int], n_spans: int) -> tuple[bool, ...]:
        """True = reuse that span at ``step`` (0-based; ``num_steps`` None when unknown)."""

    def variants(self, n_spans: int) -> list[tuple[bool, ...]]:
        """The decision tuples worth compiling up front (``guard="variants"``)."""
        return [(False,) * n_spans, (True,) * n_spans]

    def make_runtime(self, ctx: RuntimeContext) -> Runtime:
        return SpanRuntime(ctx, self)
