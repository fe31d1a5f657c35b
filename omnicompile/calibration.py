"""The calibration protocol shared by the policies that learn from a first generation
(``trajectory``: its curvature and cache-noise calibration; ``layered``: its (unit, step)
profile).

A runtime with something to calibrate holds a :class:`Calibrator` as ``runtime.calibrator``
(``None`` otherwise).  The base class is the state machine; a policy implements how to
start, record, end, read and use its own result:

* ``request()`` — the next generation is a calibration (``OmniCache.calibrate(fn)``);
* ``generation_started()`` — called by the runtime when a generation starts: it finishes a
  calibration still active (the previous generation ended) and begins one if requested, or
  when ``calibrate="first"`` and there is no result yet;
* ``begin()`` / ``record(step, slot, args, outputs, state)`` / ``end()`` — the policy's
  measurement: ``end()`` returns the result, or None when the generation was too short;
* ``finish()`` — ends an active calibration and ``use``\\ s its result;
* ``result`` / ``source`` — the result in use and where it came from (``"calibrated"`` or a
  file path); ``save(path)`` writes it as JSON, ``load(path)`` reads and uses one.

Results are JSON-serialisable objects with ``to_json()``, ``save(path)`` and ``num_steps``.
"""
from __future__ import annotations

import abc
from typing import Any, Optional, Sequence

from omnicompile.errors import CalibrationError

__all__ = ["Calibrator"]


class Calibrator(abc.ABC):
    #: what the result is called in messages ("trajectory calibration", "layered profile")
    kind = "calibration"

    def __init__(self, mode: Optional[str]):
        #: the ``calibrate`` option: "first", a JSON path, or None
        self.mode = mode
        self.result: Any = None
        self.source = ""
        self.requested = False
        self.active = False

    # ------------------------------------------------------------ the state machine
    def request(self) -> None:
        """The next generation is a calibration generation."""
        self.requested = True

    def generation_started(self) -> bool:
        """A generation starts: returns True when it is a calibration generation."""
        if self.active:
            self.finish()
        if self.requested or self.auto():
            self.requested = False
            self.active = True
            self.begin()
            return True
        return False

    def auto(self) -> bool:
        """Whether a generation calibrates without being asked (``calibrate="first"`` and no
        result yet)."""
        return self.mode == "first" and self.result is None

    def finish(self) -> Any:
        """End the active calibration (if any) and use its result; returns the result in use."""
        if self.active:
            self.active = False
            res = self.end()
            if res is not None:
                self.use(res, "calibrated")
        return self.result

    def load(self, path: str) -> None:
        self.use(self.read(path), path)

    def save(self, path: str) -> None:
        if self.result is None:
            raise CalibrationError(f"no {self.kind} to save: run a calibration generation first")
        self.result.save(path)

    # ------------------------------------------------------------ what a policy implements
    @abc.abstractmethod
    def begin(self) -> None:
        """Prepare to measure a generation (the runtime computes every step meanwhile)."""

    @abc.abstractmethod
    def record(self, step: int, slot: int, args: Sequence, outputs: Sequence, state: Any) -> None:
        """One call of the calibration generation: the inputs, the compiled graph's outputs and
        the slot's state after the call."""

    @abc.abstractmethod
    def end(self) -> Any:
        """The result of the measured generation (None when it cannot make one)."""

    @abc.abstractmethod
    def read(self, path: str) -> Any:
        """A result from a JSON file (raises CalibrationError naming the bad field)."""

    @abc.abstractmethod
    def use(self, result: Any, source: str) -> None:
        """Check that ``result`` fits this graph (CalibrationError if not) and apply it."""
