"""The trajectory policy's calibration: what one fully computed generation measures, the
JSON file it is saved as, and the :class:`~omnicompile.calibration.Calibrator` that runs it.

At every step of the calibration generation the runtime records (slot 0) the displacement of
the latent the sampler feeds the model, the model output, and the cache-induced noise ``q``
a reuse would have caused there (the measure variant of :mod:`omnicompile.passes.correct`).
:class:`Recorder` turns those into per-step curvature scores (angle between consecutive
latent displacements, relative change of the output) and the noise ratio ``gamma_s`` (least
squares of ``q_s ≈ gamma_s q_{s-1}``).

Calibration files are JSON (never pickle), keyed by a fingerprint of the graph (op sequence,
input shapes and dtypes), the step count, the input shape and the number of calls per step
(CFG run as one or two calls); loading checks every field and raises
:class:`~omnicompile.errors.CalibrationError` naming the field.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import statistics
from typing import Optional

import torch
import torch.fx as fx

from omnicompile.calibration import Calibrator
from omnicompile.errors import CalibrationError, StepCountError
from omnicompile.graphs.schedule import GAMMA_MAX, GAMMA_MIN, MAX_STEPS, angle_scores, fit_gamma, output_change_scores
from omnicompile.jsonfile import read_json
from omnicompile.passes.common import is_param_placeholder, node_signature

__all__ = ["Calibration", "Recorder", "TrajectoryCalibrator", "graph_fingerprint", "check_steps", "FORMAT",
           "VERSION"]

FORMAT = "omnicompile-trajectory-calibration"
VERSION = 1


def check_steps(policy: str, n: int, where: str) -> None:
    """StepCountError unless a generation of ``n`` steps can be scheduled (``MAX_STEPS``)."""
    if n > MAX_STEPS:
        raise StepCountError(f"policy {policy!r} schedules generations of at most {MAX_STEPS} steps "
                             f"(omnicompile.graphs.schedule.MAX_STEPS); {where} has {n}")


def graph_fingerprint(gm: fx.GraphModule) -> str:
    """Hash of the op sequence and the shapes/dtypes of the non-parameter inputs."""
    h = hashlib.sha256()
    for n in gm.graph.nodes:
        h.update(node_signature(n).encode())
        if n.op == "placeholder" and not is_param_placeholder(n):
            ev = n.meta.get("example_value")
            if isinstance(ev, torch.Tensor):
                h.update(f"{tuple(ev.shape)}{ev.dtype}".encode())
    return h.hexdigest()[:32]


#: the most calls per step a calibration may claim (CFG makes 2, a few guidance schemes 3–4;
#: more would be a corrupted file)
MAX_SLOTS = 64
#: the range of every per-step list, from how :class:`Recorder` computes it:
#: ``angle`` is an ``acos`` (radians, [0, pi]); ``output`` a relative change |y - y'| / |y'|
#: and ``q_norm`` a norm (both >= 0, finite: any finite size may be genuine); ``gamma`` the
#: least-squares noise ratio clipped by :func:`~omnicompile.graphs.schedule.fit_gamma` (a
#: gamma outside it was not measured: 1e308 overflows the correction, -1e6 inverts it)
RANGES = {"angle": (0.0, math.pi, "[0, pi]"), "output": (0.0, math.inf, "[0, inf)"),
          "gamma": (GAMMA_MIN, GAMMA_MAX, f"[{GAMMA_MIN}, {GAMMA_MAX}]"), "q_norm": (0.0, math.inf, "[0, inf)")}
FIELDS = {"fingerprint", "num_steps", "shape", "slots", *RANGES}


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


def _num(v):
    return None if v is None or not math.isfinite(v) else float(v)


@dataclasses.dataclass
class Calibration:
    fingerprint: str
    num_steps: int
    shape: list
    slots: int
    angle: list          # per step, None where undefined
    output: list
    gamma: list
    q_norm: list

    # ---------------------------------------------------------------- JSON
    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(format=FORMAT, version=VERSION)
        return d

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=1)

    @classmethod
    def from_json(cls, d) -> "Calibration":
        """A calibration from its JSON value; every field is checked for its type and for the
        range the recording can produce (see the comments), so a bad file fails here, never in
        the middle of a generation."""
        if not isinstance(d, dict):
            raise CalibrationError(f"calibration: expected a JSON object, got {type(d).__name__}")
        if d.get("format") != FORMAT:
            raise CalibrationError(f"calibration field 'format': expected {FORMAT!r}, got {_short(d.get('format'))}")
        if d.get("version") != VERSION:
            raise CalibrationError(f"calibration field 'version': expected {VERSION}, got {_short(d.get('version'))}")
        unknown = sorted(set(d) - FIELDS - {"format", "version"})
        if unknown:
            raise CalibrationError(f"calibration field {unknown[0]!r} is not a field of a trajectory calibration "
                                   f"(fields: {', '.join(sorted(FIELDS))})")

        def need(name, kind, check=lambda v: True, what=""):
            if name not in d:
                raise CalibrationError(f"calibration field {name!r} is missing")
            v = d[name]
            if not isinstance(v, kind) or isinstance(v, bool) or not check(v):
                raise CalibrationError(f"calibration field {name!r}: got {_short(v)}; expected {what}")
            return v
        fp = need("fingerprint", str, lambda v: 0 < len(v) <= 256, "a non-empty string (the graph's hash)")
        n = need("num_steps", int, lambda v: 1 <= v <= MAX_STEPS,
                 f"a positive integer, at most {MAX_STEPS} (omnicompile.graphs.schedule.MAX_STEPS)")
        shape = need("shape", list, lambda v: 0 < len(v) <= 8 and all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in v),
            "the latent's shape: a list of 1 to 8 positive integers")
        slots = need("slots", int, lambda v: 1 <= v <= MAX_SLOTS,
                     f"the calls per step: an integer in [1, {MAX_SLOTS}]")
        lists = {}
        for name, (lo, hi, words) in RANGES.items():
            lists[name] = need(name, list, lambda v: len(v) == n and all(
                x is None or (isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                              and lo <= x <= hi) for x in v),
                f"a list of {n} nulls or numbers in {words} (one per step)")
        return cls(fp, n, shape, slots, **{k: [None if x is None else float(x) for x in v] for k, v in lists.items()})

    @classmethod
    def load(cls, path: str) -> "Calibration":
        return cls.from_json(read_json(path, "trajectory calibration file", CalibrationError))

    def check_matches(self, fingerprint: str, shape: list, slots: Optional[int] = None) -> None:
        """CalibrationError unless the calibration was made for this graph (``fingerprint``),
        latent ``shape`` and — where known — ``slots`` calls per step (a run's calls per step
        are known only once its first step is over: the runtime checks them then, see
        :meth:`slots_mismatch`)."""
        if self.fingerprint != fingerprint:
            raise CalibrationError(f"calibration field 'fingerprint': {self.fingerprint} was made for another "
                                   f"model or graph (this graph: {fingerprint}); recalibrate")
        if list(self.shape) != list(shape):
            raise CalibrationError(f"calibration field 'shape': {self.shape} but the input is {list(shape)}")
        if slots is not None and self.slots != slots:
            raise CalibrationError(self.slots_mismatch(slots))

    def slots_mismatch(self, slots: int) -> str:
        return (f"calibration field 'slots': calibrated with {self.slots} call(s) per step, this run makes "
                f"{slots}")

    # ---------------------------------------------------------------- schedule
    def scores(self, curvature: str) -> list[float]:
        """Per step, the cost of reusing it (lower = reuse first): ``angle`` / ``output`` (the
        curvature of the trajectory or of the output), or ``error`` — the measured size of the
        noise ``q`` a reuse there caused on the calibration generation (a one-step-stale residual
        against the computed output)."""
        vals = list({"angle": self.angle, "output": self.output, "error": self.q_norm}[curvature])
        if curvature == "error":     # the first recorded step has no earlier residual: no measurement
            first = next((i for i, v in enumerate(vals) if v is not None), None)
            if first is not None:
                vals[first] = None
        return [math.inf if v is None else v for v in vals]

    def gammas(self) -> list[float]:
        known = [g for g in self.gamma if g is not None]
        fallback = statistics.median(known) if known else 1.0
        return [fallback if g is None else g for g in self.gamma]


class Recorder:
    """Accumulates the calibration statistics of slot 0, step by step."""

    def __init__(self):
        self.x_prev = self.d_prev = self.y_prev = self.q_prev = None
        self.dots, self.norms, self.rel, self.q_dots, self.q_sq = [], [], [], [], []

    @staticmethod
    def _f(t):
        return t.detach().reshape(-1).float()

    def step(self, x: torch.Tensor, y: torch.Tensor, q: Optional[torch.Tensor]) -> None:
        x, y = self._f(x), self._f(y)
        if self.x_prev is None:
            self.dots.append(math.nan)
            self.norms.append(0.0)
            self.rel.append(math.inf)
        else:
            d = x - self.x_prev
            self.norms.append(float(d.norm()))
            self.dots.append(float(d @ self.d_prev) if self.d_prev is not None else math.nan)
            self.rel.append(float((y - self.y_prev).norm() / self.y_prev.norm().clamp_min(1e-12)))
            self.d_prev = d
        if q is None:
            self.q_dots.append(math.nan)
            self.q_sq.append(0.0)
        else:
            qf = self._f(q)
            self.q_sq.append(float(qf @ qf))
            self.q_dots.append(float(qf @ self.q_prev) if self.q_prev is not None else math.nan)
            self.q_prev = qf
        self.x_prev, self.y_prev = x, y

    def finish(self, fingerprint, shape, slots) -> Calibration:
        n = len(self.norms)
        return Calibration(fingerprint, n, list(shape), slots,
                           [_num(v) for v in angle_scores(self.dots, self.norms)],
                           [_num(v) for v in output_change_scores(self.rel)],
                           [_num(v) if v is not None else None for v in fit_gamma(self.q_dots, self.q_sq)],
                           [_num(math.sqrt(v)) for v in self.q_sq])


class TrajectoryCalibrator(Calibrator):
    """Runs trajectory calibrations on its runtime (``owner``), one per session: records slot
    0 of each step, counts the calls per step, and keys the result by model and step count.

    A model that serves only part of a generation's steps (Wan 2.2's two experts) calibrates
    on its own steps: the others are ``None`` (never reused).  A calibration generation is
    *abandoned* — dropped, recalibrated the next time — when its steps stop before the last
    one of a known step count, unless its pipeline finished normally (the other expert took
    over), or when a step of it was skipped."""

    kind = "trajectory calibration"

    def __init__(self, owner, mode):
        super().__init__(mode)
        self.owner = owner

    def variant(self, call):
        """Calibrations are per latent shape (a graph with symbolic sizes serves several)."""
        return tuple(call.args[self.owner.latent_index].shape)

    def begin(self, call) -> None:
        call.session.data.update(recorder=Recorder(), first_step=call.step, next_step=call.step, slots_seen=1,
                                 num_steps=call.num_steps, broken=False, shape=list(self.variant(call)))

    def record(self, call, args, outputs, state) -> None:
        d = call.session.data
        d["slots_seen"] = max(d["slots_seen"], call.slot + 1)
        if call.slot != 0:
            return
        if call.step != d["next_step"]:
            d["broken"] = True
            return
        q = state.get("q")
        d["recorder"].step(args[self.owner.latent_index], outputs[self.owner.out_float[0]], q[0] if q else None)
        d["next_step"] += 1

    def end(self, session) -> Optional[Calibration]:
        d = session.data
        rec = d.get("recorder")
        if rec is None or d.get("broken") or len(rec.norms) <= 1:
            return None
        first, last, n = d["first_step"], d["next_step"] - 1, d.get("num_steps")
        if n is not None and last != n - 1 and not session.completed:
            return None                         # stopped early: abandoned
        n = n if n is not None else last + 1
        cal = rec.finish(self.owner.fingerprint, d["shape"], d["slots_seen"])
        pad = ([None] * first, [None] * (n - 1 - last))
        for name in ("angle", "output", "gamma", "q_norm"):
            setattr(cal, name, pad[0] + list(getattr(cal, name)) + pad[1])
        cal.num_steps = n
        return cal

    def read(self, path: str) -> Calibration:
        return Calibration.load(path)

    def use(self, result: Calibration, source: str, model) -> None:
        self.owner.check_calibration(result)
        self.store(result, source, model, tuple(result.shape))
