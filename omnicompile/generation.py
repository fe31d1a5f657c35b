"""Generation contexts: telling the runtime which generation, step and step count a call
belongs to, instead of letting it guess from the timestep.

    with omnicompile.generation(num_steps=len(timesteps)):        # a hand-written loop
        for t in timesteps:
            ...

A generation context is a :mod:`contextvars` value: each thread and each asyncio task has its
own, so two threads sampling on one compiled model never share a generation.  Inside a
context every call belongs to *that* generation — a new context is always a new generation,
whatever the timestep does — and its step comes, in order of preference, from

1. the sampler itself (``scheduler=``: a diffusers scheduler; the context counts its ``step()``
   calls from its ``begin_index`` and takes the step count from its ``timesteps``;
   :func:`omnicompile.compile_pipeline` opens such a context around every pipeline call: Heun's
   and KDPM2's second evaluations of a step are entries of the scheduler's timesteps, so they
   are placed exactly, as are img2img runs that begin mid-schedule),
2. an explicit counter (``count_steps=True``: the loop calls ``step_done()`` after each step),
3. the position of the call's timestep in ``timesteps=`` (the values the model receives;
   repeated values — CFG as several calls, Heun's repeated entries — are told apart by the
   number of calls per step, learned on the first step), or
4. the timestep's direction (steps move monotonically within one generation).

The step count is known before step 0 whenever the context knows the timesteps, the scheduler
or ``num_steps``.  A graph that has no timestep input (its model broke the Dynamo graph before
its blocks) is placed only by 1 or 2.

Without any context (a bare ``torch.compile`` loop) the runtime falls back to inferring from the
timestep, conservatively: see :mod:`omnicompile.runtime.placement`.
"""
from __future__ import annotations

import contextlib
import contextvars
import itertools
import threading
from typing import Any, Iterator, Optional, Sequence

__all__ = ["Generation", "generation", "current_generation"]

_CURRENT: contextvars.ContextVar[Optional["Generation"]] = contextvars.ContextVar("omnicompile_generation",
                                                                                 default=None)
_ids = itertools.count(1)
_ids_lock = threading.Lock()


class Generation:
    """One generation (see the module docstring).  Build it with :func:`generation`."""

    def __init__(self, timesteps: Optional[Sequence] = None, num_steps: Optional[int] = None,
                 scheduler: Any = None, count_steps: bool = False, source: str = "context"):
        if timesteps is not None:
            timesteps = tuple(_as_float(t) for t in timesteps)
            if not timesteps:
                raise ValueError("generation(timesteps=...) needs at least one timestep")
        if num_steps is not None:
            if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
                raise ValueError(f"generation(num_steps=...) must be a positive integer, got {num_steps!r}")
            if timesteps is not None and num_steps != len(timesteps):
                raise ValueError(f"generation(num_steps={num_steps}) disagrees with the {len(timesteps)} timesteps given")
        with _ids_lock:
            self.id = next(_ids)
        self.timesteps = timesteps
        self._num_steps = num_steps
        self.scheduler = scheduler
        self.count_steps = bool(count_steps)
        self.counted = 0
        #: "pipeline" (opened by compile_pipeline) or "context" (omnicompile.generation)
        self.source = source
        self.closed = False
        #: the generation ran to its end (set by compile_pipeline when the pipeline call returns
        #: without an interrupt; a hand-written loop's context never knows)
        self.completed = False
        #: each model's step / CFG-slot counting in this generation, shared by every graph that
        #: places its calls (Dynamo may recompile inside a generation and split its calls over
        #: two graphs): the id of the model's first parameter -> its counts
        self._counts: dict = {}
        self._counts_lock = threading.Lock()

    def counts(self, model_key: int, factory):
        """The placement counts of the model ``model_key`` in this generation (made by
        ``factory`` on its first call), shared by every compiled graph of the model."""
        with self._counts_lock:
            c = self._counts.get(model_key)
            if c is None:
                c = self._counts[model_key] = factory()
            return c

    # ------------------------------------------------------------------ what it knows
    @property
    def num_steps(self) -> Optional[int]:
        """The step count (entries of the scheduler's timesteps, the timesteps given, or
        ``num_steps``), or None when the context was not told."""
        ts = _scheduler_timesteps(self.scheduler)
        if ts is not None:
            return len(ts)
        if self.timesteps is not None:
            return len(self.timesteps)
        return self._num_steps

    def explicit_step(self) -> Optional[int]:
        """The current step when the sampler or the loop counts it (1 and 2 of the module
        docstring), else None."""
        if not self.count_steps:
            return None
        begin = getattr(self.scheduler, "begin_index", None) if self.scheduler is not None else None
        return (begin or 0) + self.counted

    def step_done(self) -> None:
        """The loop finished a step: the next model call belongs to the next one
        (``count_steps=True``; with ``scheduler=`` its ``step()`` calls it)."""
        if not self.count_steps:
            raise RuntimeError("step_done() counts steps only in a generation(count_steps=True) context")
        self.counted += 1

    def __repr__(self) -> str:
        return (f"Generation(id={self.id}, source={self.source!r}, num_steps={self.num_steps}, "
                f"{'closed' if self.closed else 'open'})")


def _as_float(t) -> float:
    try:
        import torch
        if isinstance(t, torch.Tensor):
            return float(t.reshape(-1)[0])
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return float(t)


def _scheduler_timesteps(scheduler) -> Optional[Sequence]:
    if scheduler is None:
        return None
    ts = getattr(scheduler, "timesteps", None)
    return ts if ts is not None and len(ts) > 0 else None


@contextlib.contextmanager
def generation(timesteps: Optional[Sequence] = None, num_steps: Optional[int] = None, *, scheduler: Any = None,
               count_steps: bool = False) -> Iterator[Generation]:
    """Run one generation: every call of an omnicache-compiled model inside belongs to it.

    ``timesteps``: the timestep values the model will receive, in order (tensors or numbers);
    ``num_steps``: the step count, when the values are not known ahead; ``scheduler``: a
    diffusers scheduler whose ``step()`` calls count the steps (from its ``begin_index``) and
    whose ``timesteps`` give the step count (what ``compile_pipeline`` uses);
    ``count_steps=True``: the loop calls ``step_done()`` on the yielded :class:`Generation` after
    each step.  Contexts do not nest: an inner context is a generation of its own."""
    g = Generation(timesteps, num_steps, scheduler, count_steps or scheduler is not None,
                   source="pipeline" if scheduler is not None else "context")
    token = _CURRENT.set(g)
    restore = _count_scheduler_steps(scheduler, g) if scheduler is not None else None
    try:
        yield g
    finally:
        g.closed = True
        if restore is not None:
            restore()
        _CURRENT.reset(token)


def _count_scheduler_steps(scheduler, g: Generation):
    """Make ``scheduler.step(...)`` count a step of ``g`` until the returned function restores it."""
    had = "step" in vars(scheduler)
    prev = vars(scheduler).get("step")
    original = scheduler.step

    def step(*args, **kwargs):
        out = original(*args, **kwargs)
        g.step_done()
        return out

    scheduler.step = step

    def restore():
        if had:
            scheduler.step = prev
        else:
            del scheduler.step
    return restore


def current_generation() -> Optional[Generation]:
    """The generation context of the calling thread / task, or None."""
    return _CURRENT.get()
