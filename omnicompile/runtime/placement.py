"""Which model, generation, step and CFG slot a call belongs to — never a guess that can
reuse the wrong cache.

State is kept per *session*: one model in one generation stream.

* **The model** is told by the parameters the graph receives: Dynamo hands two instances of
  one class the same graph with their own parameter tensors as inputs, so a session is keyed
  by the identity of the first parameter input (held by a weak reference: a model deleted and
  another allocated at the same address never inherits its state; when that parameter is freed,
  the model's sessions and their caches are dropped).  Graphs without parameter inputs belong
  to one model.
* **The stream** is the generation context (:mod:`omnicompile.generation`) when the call runs
  inside one — one session per (model, context), so a new context is always a fresh cache —
  else the calling thread: two threads never share a cache.

Inside a context the step comes from the context (the sampler's step index, an explicit step
counter, the position of the timestep in the context's list, or the timestep's direction) and
the step count is the context's; a call the context cannot place (a timestep that is not in
its list, a sampler step that goes back) is *uncertain*.

Without a context (:class:`Inferred`) the step comes from the timestep, conservatively:

* a timestep equal to the previous call's is the next CFG slot of the same step; one that
  continues the direction of the trajectory is the next step; one that reverses it or repeats
  an earlier step starts a new generation, as do new input shapes, dtypes or devices and
  ``reset()``;
* the calls per step (CFG as one or two calls) are learned on a completed generation.  In a
  first generation whose step 0 had several calls, those could be CFG slots *or* an abandoned
  generation restarting at the same timestep: step 1 is uncertain; a step whose number of
  calls differs from the learned one makes the rest of the generation uncertain;
* the timesteps of completed generations are remembered (per input signature): a generation
  that starts like a known one and then leaves its schedule (an img2img run restarting below
  an interrupted one, another step count) is uncertain from there, and the step count is
  known only while the generation follows known schedules that agree on it.

An uncertain call computes every span (no reuse), refreshes its cache, and the report counts
it with the reason.  One case stays out of reach without a context: a generation interrupted
at step ``k`` followed by one that starts exactly at step ``k + 1`` of the same schedule (an
img2img run at just that strength) looks like a continuation.  Pipelines compiled with
:func:`omnicompile.compile_pipeline` always run in a context.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import threading
import weakref
from typing import Any, Optional

import torch

from omnicompile.generation import Generation, current_generation
from omnicompile.runtime.tracker import StepTracker

__all__ = ["Place", "Session", "Sessions", "Inferred"]

#: completed schedules remembered per input signature (no context)
KNOWN_SCHEDULES = 4
#: sessions of closed contexts kept (their caches are dropped; the count bounds memory)
MAX_SESSIONS = 64


@dataclasses.dataclass
class Place:
    """Where a call sits."""
    model: int                     # index of the model (0, 1, ... in order of first call)
    generation: int                # generation number of the graph (counts from 0)
    step: int
    slot: int
    new: bool                      # the first call of its session's generation
    num_steps: Optional[int]       # None: unknown
    certain: bool
    why: str = ""                  # why not certain
    source: str = "inferred"       # "pipeline", "context" or "inferred"
    context: Optional[int] = None  # the generation context's id


class Counts:
    """How far one model's generation got: the steps and CFG slots counted so far.  Inside a
    generation context it belongs to the generation (one per model, shared by every graph that
    places the model's calls: a generation Dynamo splits over recompiled graphs keeps one
    count); caches stay per graph and slot."""

    def __init__(self):
        self.calls: dict[int, int] = {}
        self.last_step: Optional[int] = None
        self.cursor: Optional[int] = None
        self.calls_here = 0
        self.per_step: Optional[int] = None
        self.last_t: Optional[float] = None
        self.direction = 0
        self.seen: set = set()
        self.uncertain = ""


class Session:
    """The state of one model in one generation stream: caches per CFG slot (``slots``),
    anything a policy keeps for the generation (``data``), the merge layer's state
    (``merge``)."""

    def __init__(self, model: int, stream: Any):
        self.model = model
        self.stream = stream
        self.generation = -1
        self.slots: dict[int, Any] = {}
        self.data: dict[str, Any] = {}
        self.merge: dict[str, Any] = {}
        self.uncertain = ""
        # placement without a context (inside one, the generation holds the Counts)
        self.inferred: Optional[Inferred] = None
        self.inferred_generation: Optional[tuple] = None

    def clear(self) -> None:
        """A new generation: forget the caches and the policy's per-generation state."""
        self.slots.clear()
        self.data.clear()
        self.merge.clear()

    @property
    def completed(self) -> bool:
        """The generation context of this session ran to its end (``compile_pipeline`` sets it
        when the pipeline returns without an interrupt)."""
        gen = self.stream() if isinstance(self.stream, _GenKey) else None
        return gen is not None and gen.completed

    @property
    def ended(self) -> bool:
        """The generation context of this session has closed, or its thread has ended (a stream
        without a context ends a generation only when the next one starts)."""
        key = self.stream
        if isinstance(key, _ThreadKey):
            return not key.alive
        return isinstance(key, _GenKey) and (key() is None or key().closed)

    def held_bytes(self) -> int:
        return _nbytes(self.slots) + _nbytes(self.merge)


def _nbytes(v) -> int:
    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size()
    if isinstance(v, dict):
        return sum(_nbytes(x) for x in v.values())
    if isinstance(v, (list, tuple)):
        return sum(_nbytes(x) for x in v)
    return 0


class Inferred:
    """Placement without a context, for one (model, thread) stream (module docstring)."""

    def __init__(self):
        self.tracker = StepTracker()
        self.known: dict[Any, list[tuple]] = {}       # signature -> completed schedules
        self.per_step: dict[Any, int] = {}            # signature -> calls per step, once learned
        self.seq: list[float] = []
        self.counts: list[int] = []
        self.signature = None
        self.candidates: list[tuple] = []
        self.had_known = False
        self.uncertain = ""

    def reset(self) -> None:
        self.tracker.reset()

    def _close(self) -> None:
        """The current generation ended: remember its schedule and its calls per step."""
        if len(self.seq) >= 2 and not self.uncertain:
            runs = self.known.setdefault(self.signature, [])
            seq = tuple(self.seq)
            if seq in runs:
                runs.remove(seq)
            runs.append(seq)
            del runs[:-KNOWN_SCHEDULES]
            if self.counts[:-1] and len(set(self.counts[:-1])) == 1:
                self.per_step[self.signature] = self.counts[0]

    def place(self, t: float, signature) -> tuple[int, int, int, bool, Optional[int], str]:
        """(generation, step, slot, new, num_steps, why-uncertain or "")."""
        gen, step, slot, new = self.tracker.advance(t, signature)
        if new:
            self._close()
            self.signature = signature
            self.seq, self.counts = [t], [1]
            known = self.known.get(signature, [])
            self.had_known = bool(known)
            self.candidates = [s for s in known if s[0] == t]
            self.uncertain = ""
            if self.had_known and not self.candidates:
                self.uncertain = f"timestep {t:g} starts no schedule of an earlier generation"
            return gen, step, slot, True, self._num_steps(), self.uncertain
        s = self.per_step.get(signature)
        if slot > 0:
            self.counts[-1] += 1
            if s is not None and self.counts[-1] > s:
                self.uncertain = (self.uncertain or f"call {self.counts[-1]} at timestep {t:g}: more calls than the "
                                  f"{s} per step of earlier generations (a restart at the same timestep?)")
        else:
            prev = self.counts[-1]
            self.seq.append(t)
            self.counts.append(1)
            if s is not None and prev != s:
                self.uncertain = self.uncertain or (f"step {step - 1} had {prev} call(s), earlier generations {s} "
                                                    "per step")
            if self.candidates:
                self.candidates = [c for c in self.candidates if len(c) > step and c[step] == t]
                if not self.candidates:
                    self.uncertain = self.uncertain or (f"timestep {t:g} at step {step} leaves the schedule of the "
                                                        "earlier generations")
        why = self.uncertain
        if not why and s is None and step == 1 and self.counts[0] > 1:
            why = (f"step 0 had {self.counts[0]} calls and the calls per step are not known yet: they may be CFG "
                   "slots or a generation restarted at the same timestep")
        return gen, step, slot, False, self._num_steps(), why

    def _num_steps(self) -> Optional[int]:
        lengths = {len(c) for c in self.candidates}
        return lengths.pop() if len(lengths) == 1 else None


#: input signatures whose placement one (model, thread) stream keeps
SHARED_SIGNATURES = 16


class SharedPlacement:
    """The placement of models' calls without a context, per model, thread and input
    signature, shared by every graph one backend (``OmniCache``) compiled: when Dynamo
    recompiles inside a generation (same inputs, a failed guard), the second graph continues
    the first one's step and CFG slot counts instead of starting its own.  Another backend on
    the same model keeps its own."""

    def __init__(self):
        self._by_param: dict[int, tuple] = {}   # id(parameter) -> (weakref, {thread: {signature: Inferred}})
        self._lock = threading.RLock()          # re-entrant: a weakref callback may run inside

    def inferred(self, param, thread: "_ThreadKey", signature) -> Inferred:
        with self._lock:
            key = id(param)
            e = self._by_param.get(key)
            if e is None or e[0]() is not param:
                this = weakref.ref(self)

                def gone(ref, key=key):
                    owner = this()
                    if owner is not None:
                        with owner._lock:
                            if key in owner._by_param and owner._by_param[key][0] is ref:
                                del owner._by_param[key]
                e = self._by_param[key] = (weakref.ref(param, gone), weakref.WeakKeyDictionary())
            per_sig = e[1].setdefault(thread, {})
            inf = per_sig.pop(signature, None) or Inferred()
            per_sig[signature] = inf                       # most recent last
            while len(per_sig) > SHARED_SIGNATURES:
                del per_sig[next(iter(per_sig))]
            return inf


class Sessions:
    """The sessions of one compiled graph, and the placement of each call."""

    def __init__(self, param_index: Optional[int], config_num_steps: Optional[int] = None,
                 shared: Optional[SharedPlacement] = None):
        self.param_index = param_index
        self.config_num_steps = config_num_steps
        #: the placement without a context, shared with the backend's other graphs
        self.shared = shared if shared is not None else SharedPlacement()
        self._lock = threading.RLock()
        self._models: list[weakref.ref] = []
        self._model_ids: dict[int, int] = {}
        self._sessions: dict[tuple, Session] = {}
        self._generations = 0
        self._dead: list[int] = []       # models whose parameters were freed (sessions to drop)

    # ------------------------------------------------------------------ models
    def model_of(self, args) -> int:
        if self.param_index is None:
            return 0
        p = args[self.param_index]
        with self._lock:
            k = self._model_ids.get(id(p))
            if k is not None and self._models[k]() is p:
                return k
            k = len(self._models)
            try:
                ref = weakref.ref(p, _on_model_freed(weakref.ref(self), k))
            except TypeError:       # pragma: no cover - every tensor supports weak references
                return 0
            self._models.append(ref)
            self._model_ids[id(p)] = k
            return k

    @property
    def models(self) -> int:
        return len(self._models)

    def model_freed(self, k: int) -> None:
        """Model ``k``'s parameter was freed: drop its sessions (their caches), now if no other
        thread holds the lock (a weakref callback runs wherever the collector runs), else on
        the next placement."""
        self._dead.append(k)
        if self._lock.acquire(blocking=False):
            try:
                self._prune()
            finally:
                self._lock.release()

    def _prune(self) -> None:
        while self._dead:
            k = self._dead.pop()
            self._model_ids = {i: m for i, m in self._model_ids.items() if m != k}
            for key in [key for key in self._sessions if key[0] == k]:
                del self._sessions[key]

    # ------------------------------------------------------------------ sessions
    def _session(self, key: tuple, model: int) -> Session:
        with self._lock:
            self._prune()
            s = self._sessions.get(key)
            if s is None:
                self._drop_closed()          # a new stream: forget the caches of closed contexts
                s = self._sessions[key] = Session(model, key[1])
            return s

    def _drop_closed(self) -> None:
        for key, s in list(self._sessions.items()):
            if s.ended:
                del self._sessions[key]
        while len(self._sessions) >= MAX_SESSIONS:
            del self._sessions[next(iter(self._sessions))]

    def _next_generation(self) -> int:
        with self._lock:
            g = self._generations
            self._generations += 1
            return g

    def all(self) -> list[Session]:
        with self._lock:
            self._prune()
            return list(self._sessions.values())

    def reset(self) -> None:
        """The next call of every stream starts a new generation."""
        with self._lock:
            for s in self._sessions.values():
                s.clear()
                if s.inferred is not None:
                    s.inferred.reset()

    # ------------------------------------------------------------------ placement
    def place(self, args, t: Optional[float], signature, dtype=None) -> tuple[Place, Session]:
        """Place a call: ``t`` its timestep (None: the graph has none), ``signature`` its input
        shapes/dtypes/devices, ``dtype`` the timestep's dtype (a context's timesteps are
        compared at the precision the model receives)."""
        model = self.model_of(args)
        gen = current_generation()
        if gen is not None:
            key = id(args[self.param_index]) if self.param_index is not None else id(self)
            return self._in_context(model, gen.counts(key, Counts), gen, t, dtype)
        sess = self._session((model, _thread_key()), model)
        if t is None:
            p = Place(model, max(sess.generation, 0), 0, 0, False, None, False,
                      "the graph has no timestep input: only a generation context that counts steps places its calls")
            return p, sess
        inferred = (self.shared.inferred(args[self.param_index], _thread_key(), signature)
                    if self.param_index is not None else sess.inferred or Inferred())
        sess.inferred = inferred
        g, step, slot, new, num_steps, why = inferred.place(t, signature)
        if new or sess.inferred_generation != (id(inferred), g):
            # a new generation of the stream, or this graph's first call in it (Dynamo recompiled
            # inside the generation: the graphs share the stream's counts, each its own caches)
            new = True
            sess.inferred_generation = (id(inferred), g)
            sess.generation = self._next_generation()
        if self.config_num_steps is not None:
            num_steps = self.config_num_steps
        return Place(model, sess.generation, step, slot, new, num_steps, not why, why), sess

    def _in_context(self, model: int, c: Counts, gen: Generation, t: Optional[float],
                    dtype=None) -> tuple[Place, Session]:
        """Place a call in a generation context: the step and slot from the model's shared
        ``Counts`` ``c``; the caches in this graph's session."""
        sess = self._session((model, _GenKey(gen)), model)
        new = sess.generation < 0
        if new:
            sess.generation = self._next_generation()
        n = gen.num_steps if gen.num_steps is not None else self.config_num_steps
        why = ""
        explicit = gen.explicit_step()
        if explicit is not None:
            step = explicit
            if c.last_step is not None and step < c.last_step:
                c.uncertain = c.uncertain or f"the sampler's step went back from {c.last_step} to {step}"
            slot = c.calls.get(step, 0)
            c.calls[step] = slot + 1
        elif t is None:
            step, slot = max(c.last_step or 0, 0), 0
            why = ("the graph has no timestep input and the context does not count steps (use compile_pipeline, "
                   "or generation(count_steps=True) with step_done())")
        elif gen.timesteps is not None:
            step, slot = self._by_value(c, _rounded(gen.timesteps, dtype), t)
        else:
            step, slot = self._by_direction(c, t)
        if n is not None and not 0 <= step < n:
            c.uncertain = c.uncertain or f"step {step} is outside the generation's {n} steps"
        c.last_step = step
        sess.uncertain = c.uncertain
        why = why or c.uncertain
        return Place(model, sess.generation, step, slot, new, n, not why, why, gen.source, gen.id), sess

    @staticmethod
    def _by_value(sess: Counts, ts: tuple, t: float) -> tuple[int, int]:
        if sess.cursor is None:
            idx = _find(ts, t, 0)
            if idx is None:
                sess.uncertain = sess.uncertain or f"timestep {t:g} is not in the generation's timesteps"
                return 0, 0
            sess.cursor, sess.calls_here = idx, 1
            return idx, 0
        if _same(ts[sess.cursor], t) and (sess.per_step is None or sess.calls_here < sess.per_step):
            sess.calls_here += 1
            return sess.cursor, sess.calls_here - 1
        idx = _find(ts, t, sess.cursor + 1)
        if idx is None:
            sess.uncertain = sess.uncertain or f"timestep {t:g} does not follow step {sess.cursor} in the timesteps"
            return sess.cursor, sess.calls_here
        if sess.per_step is None:
            sess.per_step = sess.calls_here
        elif sess.calls_here != sess.per_step:
            sess.uncertain = sess.uncertain or (f"step {sess.cursor} had {sess.calls_here} call(s), the first step "
                                                f"{sess.per_step}")
        sess.cursor, sess.calls_here = idx, 1
        return idx, 0

    @staticmethod
    def _by_direction(sess: Counts, t: float) -> tuple[int, int]:
        if sess.last_t is None:
            sess.last_t, sess.seen = t, {t}
            sess.calls_here = 1
            return 0, 0
        step = sess.last_step or 0
        if t == sess.last_t:
            sess.calls_here += 1
            return step, sess.calls_here - 1
        d = 1 if t > sess.last_t else -1
        if (sess.direction and d != sess.direction) or t in sess.seen or math.isnan(t):
            sess.uncertain = sess.uncertain or f"timestep {t:g} reverses or repeats the generation's timesteps"
        sess.direction = d
        sess.last_t = t
        sess.seen.add(t)
        sess.calls_here = 1
        return step + 1, 0


def _on_model_freed(sessions_ref: weakref.ref, k: int):
    """The weakref callback of model ``k``'s parameter (holds the sessions weakly)."""
    def freed(_):
        sessions = sessions_ref()
        if sessions is not None:
            sessions.model_freed(k)
    return freed


class _ThreadKey:
    """The stream of a thread without a context: a new object per thread (held by the thread
    and the session, so a thread id the system reuses never inherits a dead thread's cache)."""

    __slots__ = ("thread", "__weakref__")

    def __init__(self, thread: threading.Thread):
        self.thread = weakref.ref(thread)

    @property
    def alive(self) -> bool:
        t = self.thread()
        return t is not None and t.is_alive()


_local = threading.local()


def _thread_key() -> _ThreadKey:
    key = getattr(_local, "key", None)
    if key is None:
        key = _local.key = _ThreadKey(threading.current_thread())
    return key


class _GenKey:
    """A session key for a generation context: equal by identity, holding it weakly."""

    __slots__ = ("ref", "id")

    def __init__(self, gen: Generation):
        self.ref = weakref.ref(gen)
        self.id = gen.id

    def __call__(self):
        return self.ref()

    def __hash__(self):
        return hash(self.id)

    def __eq__(self, other):
        return isinstance(other, _GenKey) and other.id == self.id


@functools.lru_cache(maxsize=64)
def _rounded(ts: tuple, dtype) -> tuple:
    """The timesteps as the model receives them in ``dtype`` (bf16 rounds them)."""
    if dtype is None or dtype in (torch.float32, torch.float64):
        return ts
    return tuple(float(v) for v in torch.tensor(ts, dtype=torch.float64).to(dtype))


def _same(a: float, b: float) -> bool:
    return a == b or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def _find(ts, t: float, start: int) -> Optional[int]:
    for i in range(start, len(ts)):
        if _same(ts[i], t):
            return i
    return None
