"""The calibration protocol shared by the policies that learn from a first generation
(``trajectory``: its curvature and cache-noise calibration; ``layered``: its (unit, step)
profile).

A runtime with something to calibrate holds a :class:`Calibrator` as ``runtime.calibrator``
(``None`` otherwise).  Results are kept **per model and per step count**: a calibration made
on 20 steps is never applied to a generation of 28, and two models sharing a graph each
calibrate on their own generations.  A result loaded from a file applies to every model
(``model=None``) at its own step count.  A policy whose results depend on more (the trajectory
calibration on the latent's shape: a graph with symbolic sizes serves several) keys them by a
*variant* too (:meth:`Calibrator.variant`).

The base class is the state machine; a policy implements how to start, record, end, read and
use its own result:

* ``request()`` — the next generation of every session is a calibration
  (``OmniCache.calibrate(fn)``);
* ``generation_started(call)`` — the runtime calls it when a session begins a generation
  (after ``session_ended`` for the session's previous one): it begins a calibration if
  requested, or when ``calibrate="first"`` and there is no result for the call's model and
  step count (:meth:`auto`);
* ``begin(session)`` / ``record(call, args, outputs, state)`` / ``end(session)`` — the policy's
  measurement, kept in the session; ``end`` returns the result, or None when the generation
  cannot make one — too short, or **abandoned** (fewer steps recorded than the generation
  had): it is then recalibrated the next time;
* ``session_ended(session)`` / ``finish_ended()`` / ``finish()`` — end the calibration of a
  session whose generation is over (the next generation of a stream without a context; a
  closed context; everything, at the end of ``OmniCache.calibrate``) and ``use`` its result;
* ``lookup(model, num_steps)`` — the result for a generation; ``result`` / ``source`` — the most
  recent one and where it came from (``"calibrated"`` or a file path); ``save(path)``,
  ``load(path)``.

Results are JSON-serialisable objects with ``to_json()``, ``save(path)`` and ``num_steps``.
"""
from __future__ import annotations

import abc
from typing import Any, Optional

from omnicompile.passes.collectives import group_rank
from omnicompile.errors import CalibrationError

__all__ = ["Calibrator"]


class Calibrator(abc.ABC):
    #: what the result is called in messages ("trajectory calibration", "layered profile")
    kind = "calibration"

    def __init__(self, mode: Optional[str]):
        #: the ``calibrate`` option: "first", a JSON path, or None
        self.mode = mode
        #: (model or None for every model, step count) -> result
        self.results: dict[tuple, Any] = {}
        self.sources: dict[tuple, str] = {}
        self._latest: Optional[tuple] = None
        self.requested = False
        #: sessions measuring a calibration generation now
        self.active: dict[int, Any] = {}
        #: calibration generations given up because they ended early (abandoned)
        self.abandoned = 0

    # ------------------------------------------------------------ results
    @property
    def result(self) -> Any:
        """The most recent result (calibrated or loaded), or None."""
        return self.results.get(self._latest) if self._latest is not None else None

    @property
    def source(self) -> str:
        return self.sources.get(self._latest, "") if self._latest is not None else ""

    def variant(self, call) -> Any:
        """What else a result depends on, from the call (the trajectory calibration: the latent's
        shape — a graph with symbolic sizes serves several); None when nothing."""
        return None

    def lookup(self, model: int, num_steps: Optional[int], variant: Any = None) -> Any:
        """The result for a generation of ``model`` with ``num_steps`` steps (None when the step
        count is unknown: no result is applied to a generation of unknown length)."""
        if num_steps is None:
            return None
        r = self.results.get((model, num_steps, variant))
        return r if r is not None else self.results.get((None, num_steps, variant))

    def for_steps(self, num_steps: int) -> Any:
        """A result for ``num_steps`` steps, of any model and variant (model 0 or every model
        first): what previews show."""
        keys = sorted((k for k in self.results if k[1] == num_steps), key=lambda k: (k[0] not in (0, None), str(k)))
        return self.results[keys[0]] if keys else None

    def step_counts(self) -> list[int]:
        """The step counts results exist for."""
        return sorted({k[1] for k in self.results})

    def lookup_call(self, call) -> Any:
        return self.lookup(call.model, call.num_steps, self.variant(call))

    def source_of(self, model: int, num_steps: Optional[int], variant: Any = None) -> str:
        """Where the result :meth:`lookup` gives came from."""
        key = (model, num_steps, variant)
        return self.sources.get(key if key in self.results else (None, num_steps, variant), "")

    def for_generation(self, call, noun: str) -> tuple[Any, str]:
        """(the result the generation of ``call`` runs by, or None and the words for the report:
        a calibration generation, or no ``noun`` for its step count)."""
        if self.calibrating(call):
            return None, f"calibration generation (every step computed and measured for the {noun})"
        res = self.lookup_call(call)
        if res is None:
            n = "an unknown number of" if call.num_steps is None else str(call.num_steps)
            v = self.variant(call)
            return None, f"no {noun} for {n} steps{f' at {list(v)}' if v is not None else ''}: every step computed"
        return res, ""

    def store(self, result: Any, source: str, model: Optional[int], variant: Any = None) -> None:
        key = (model, result.num_steps, variant)
        self.results[key] = result
        self.sources[key] = source
        self._latest = key

    # ------------------------------------------------------------ the state machine
    def request(self) -> None:
        """The next generation of every session is a calibration generation."""
        self.requested = True

    def auto(self, call) -> bool:
        """Whether a generation calibrates without being asked: ``calibrate="first"`` and no
        result for its model and step count."""
        return self.mode == "first" and self.lookup_call(call) is None

    def generation_started(self, call) -> bool:
        """A session begins a generation: returns True when it is a calibration generation."""
        self.finish_ended()
        if self.requested or self.auto(call):
            self.requested = False
            self.active[id(call.session)] = call.session
            call.session.data["calibrating"] = True
            self.begin(call)
            return True
        return False

    def calibrating(self, call) -> bool:
        return bool(call.session.data.get("calibrating"))

    def session_ended(self, session) -> Any:
        """The session's generation is over: end its calibration (if any) and use the result."""
        if self.active.pop(id(session), None) is None:
            return None
        session.data["calibrating"] = False
        res = self.end(session)
        if res is None:
            self.abandoned += 1
            return None
        self.use(res, "calibrated", session.model)
        return res

    def finish_ended(self) -> None:
        """End the calibrations of sessions whose generation context has closed."""
        for s in list(self.active.values()):
            if s.ended:
                self.session_ended(s)

    def finish(self) -> None:
        """End every active calibration (``OmniCache.calibrate``, after its generation)."""
        for s in list(self.active.values()):
            self.session_ended(s)

    def load(self, path: str) -> None:
        self.use(self.read(path), path, None)

    def save(self, path: str) -> None:
        if self.result is None:
            raise CalibrationError(f"no {self.kind} to save: run a calibration generation first")
        owner = getattr(self, "owner", None)
        if group_rank(getattr(owner, "cp_group", None)) != 0:
            return          # context parallelism: every rank holds the same result, rank 0 writes it
        self.result.save(path)

    # ------------------------------------------------------------ what a policy implements
    @abc.abstractmethod
    def begin(self, call) -> None:
        """Prepare to measure the generation of ``call`` (in ``call.session.data``; the runtime
        computes every step meanwhile)."""

    @abc.abstractmethod
    def record(self, call, args, outputs, state) -> None:
        """One call of a calibration generation: the inputs, the compiled graph's outputs and
        the slot's state after the call."""

    @abc.abstractmethod
    def end(self, session) -> Any:
        """The result of the measured generation (None when too short or abandoned)."""

    @abc.abstractmethod
    def read(self, path: str) -> Any:
        """A result from a JSON file (raises CalibrationError naming the bad field)."""

    @abc.abstractmethod
    def use(self, result: Any, source: str, model: Optional[int]) -> None:
        """Check that ``result`` fits this graph (CalibrationError if not) and :meth:`store` it
        for ``model`` (None: every model) and its variant."""
