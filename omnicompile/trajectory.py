"""Policy ``trajectory``: OmniCache's trajectory-guided global reuse with noise correction.

1. **Calibration** — one generation computed in full.  At every step the runtime records
   (slot 0) the displacement of the latent the sampler feeds the model (angle between
   consecutive displacements), the relative change of the model output, and the
   cache-induced noise ``q_s`` a reuse would have caused (the measure variant of
   :mod:`omnicompile.passes.correct`).  ``calibrate="first"`` calibrates on the first
   generation of each input shape automatically; ``oc.calibrate(fn)`` runs ``fn`` (one
   generation) as the calibration; a JSON path loads a saved calibration.
2. **Schedule** — :func:`omnicompile.graphs.schedule.select_reuse_steps` over the chosen
   curvature score (``curvature="angle"`` or ``"output"``), under ``budget``, a dynamic
   program packing runs of at most ``max_run`` consecutive reuses at least ``min_gap`` apart,
   warm-up and final steps protected and the budget spread over early and middle sampling.
   ``reuse_steps`` replaces the selection by an explicit schedule (still corrected).  Runs of
   8 steps or fewer disable reuse (the report says so).  The schedule is known before a
   generation starts: no host sync per step.  Presets: ``trajectory-slow`` (budget 0.5, runs
   of up to two reuses: 14 of 28 steps, 1.96x / 51.5 dB on the reference model) and
   ``trajectory-fast`` (budget 0.7, runs of up to three: 19 of 28 steps, 42.8 dB); single
   reuses cap a 28-step run at 13 reused steps.
3. **Correction** — on a computed step followed by a reuse, the measure variant also
   returns ``q``, the noise a reuse of the cached residual — ``d`` steps stale, ``d`` = the
   distance to the previous computed step — would have made there.  At the ``k``-th reuse of
   the run that follows (residual ``k`` steps stale) the graph returns ``out - c q`` with
   ``c = gamma_s * k / d`` (``run_correction="scaled"``: the noise grows about linearly with
   the staleness; ``s`` the run's first step).  ``gamma_s`` is fitted per step from the
   calibration run, where every step is computed and ``q`` is one step stale (least squares
   of ``q_s ≈ gamma_s q_{s-1}``; steps without a fit use the median of the fitted values).
   The staleness scale matters: the calibrated ``gamma`` alone, applied to a ``q`` measured
   two or three steps stale, over-corrects — on the reference model (10 images, 28 steps,
   PSNR vs uncached) budget 0.45 went from 43.3 dB (unscaled, no better than no correction,
   42.9) to 63.3 dB scaled, budget 0.6 with runs of two from 33.0 dB (chained, ``"chain"``)
   / 37.6 dB (no correction) to 51.4 dB.  ``"chain"``, ``"hold"`` and ``"first"`` keep the
   unscaled variants for ablation.  ``correction_band=(lo, hi)`` keeps only those spatial
   frequencies of ``q`` (:class:`~omnicompile.passes.correct.BandFilter` on the output's grid:
   ``(B, C, H, W)`` or a square token grid ``(B, N, C)``; an output without one is reported,
   and the whole correction applies).  ``correction=False`` reuses plainly.

Calibration files are JSON (never pickle), keyed by a fingerprint of the graph (op
sequence, input shapes and dtypes), the step count, the input shape and the number of
calls per step (CFG run as one or two calls); loading checks every field and raises
:class:`~omnicompile.errors.CalibrationError` naming the field.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import statistics
from typing import Optional

import torch
import torch.fx as fx

from omnicompile.errors import CalibrationError, ConfigError
from omnicompile.graphs.schedule import angle_scores, fit_gamma, output_change_scores, select_reuse_steps
from omnicompile.passes.common import Reason, is_param_placeholder, node_signature
from omnicompile.passes.correct import BandFilter, build_corrected_reuse, build_measure_variant, float_outputs
from omnicompile.passes.rewrite import build_variant
from omnicompile.policies import Policy, register_policy
from omnicompile.report import StepRecord
from omnicompile.runtime import _RuntimeBase, call_compiled

log = logging.getLogger("omnicompile")

__all__ = ["Calibration", "TrajectoryPolicy", "TrajectoryRuntime", "graph_fingerprint", "MIN_STEPS"]

#: runs with this many steps or fewer are not cached (too few steps to skip any)
MIN_STEPS = 8
FORMAT = "omnicompile-trajectory-calibration"
VERSION = 1


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
        if not isinstance(d, dict):
            raise CalibrationError(f"calibration: expected a JSON object, got {type(d).__name__}")
        if d.get("format") != FORMAT:
            raise CalibrationError(f"calibration field 'format': expected {FORMAT!r}, got {d.get('format')!r}")
        if d.get("version") != VERSION:
            raise CalibrationError(f"calibration field 'version': expected {VERSION}, got {d.get('version')!r}")
        def need(name, kind, check=lambda v: True, what=""):
            if name not in d:
                raise CalibrationError(f"calibration field {name!r} is missing")
            v = d[name]
            if not isinstance(v, kind) or isinstance(v, bool) or not check(v):
                raise CalibrationError(f"calibration field {name!r}: got {v!r}; expected {what}")
            return v
        fp = need("fingerprint", str, lambda v: len(v) > 0, "a non-empty string")
        n = need("num_steps", int, lambda v: v >= 1, "a positive integer")
        shape = need("shape", list, lambda v: all(isinstance(x, int) for x in v), "a list of integers")
        slots = need("slots", int, lambda v: v >= 1, "a positive integer")
        lists = {}
        for name in ("angle", "output", "gamma", "q_norm"):
            lists[name] = need(name, list, lambda v: len(v) == n and all(
                x is None or (isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x))
                for x in v), f"a list of {n} numbers or nulls (one per step)")
        return cls(fp, n, shape, slots, **lists)

    @classmethod
    def load(cls, path: str) -> "Calibration":
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise CalibrationError(f"calibration file {path!r} does not exist") from None
        except json.JSONDecodeError as e:
            raise CalibrationError(f"calibration file {path!r} is not valid JSON: {e}") from None
        return cls.from_json(d)

    def check_matches(self, fingerprint: str, shape: list, slots: int) -> None:
        if self.fingerprint != fingerprint:
            raise CalibrationError(f"calibration field 'fingerprint': {self.fingerprint} was made for another "
                                   f"model or graph (this graph: {fingerprint}); recalibrate")
        if list(self.shape) != list(shape):
            raise CalibrationError(f"calibration field 'shape': {self.shape} but the input is {list(shape)}")
        if self.slots != slots:
            raise CalibrationError(f"calibration field 'slots': calibrated with {self.slots} call(s) per step, "
                                   f"this run makes {slots}")

    # ---------------------------------------------------------------- schedule
    def scores(self, curvature: str) -> list[float]:
        vals = self.angle if curvature == "angle" else self.output
        return [math.inf if v is None else v for v in vals]

    def gammas(self) -> list[float]:
        known = [g for g in self.gamma if g is not None]
        fallback = statistics.median(known) if known else 1.0
        return [fallback if g is None else g for g in self.gamma]


class _Recorder:
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


@register_policy("trajectory")
class TrajectoryPolicy(Policy):
    """Trajectory-guided global reuse (see the module docstring)."""

    default_budget: Optional[float] = None   # presets set these
    default_max_run: Optional[int] = None
    calibratable = True

    @classmethod
    def validate(cls, config):
        if config.guard == "cond":
            raise ConfigError("guard", config.guard, "policy 'trajectory' has a static schedule; use 'variants' or 'auto'")

    @classmethod
    def runtime_class(cls):
        return TrajectoryRuntime

    @property
    def budget(self) -> float:
        c = self.config
        if self.default_budget is not None and c.budget == c.__dataclass_fields__["budget"].default:
            return self.default_budget
        return c.budget

    @property
    def max_run(self) -> Optional[int]:
        c = self.config
        if self.default_max_run is not None and c.max_run == c.__dataclass_fields__["max_run"].default:
            return self.default_max_run
        return c.max_run

    def schedule(self, cal: Calibration) -> tuple[list[int], Optional[Reason]]:
        n = cal.num_steps
        if n <= MIN_STEPS:
            return [], Reason("few_steps", f"{n} steps: runs of {MIN_STEPS} steps or fewer are not cached")
        c = self.config
        if c.reuse_steps is not None:       # an explicit schedule, corrected with the calibrated gammas
            return [s for s in c.reuse_steps if 1 <= s < n], None
        steps = select_reuse_steps(cal.scores(c.curvature), self.budget, min_gap=c.min_gap,
                                   warmup=c.warmup, cooldown=max(1, c.cooldown), max_run=self.max_run)
        return steps, None

    def decide(self, step, num_steps, n_spans):
        return (False,) * n_spans

    def describe(self):
        c = self.config
        d = {"policy": self.name, "budget": self.budget, "curvature": c.curvature, "min_gap": c.min_gap,
             "max_run": self.max_run, "correction": c.correction, "calibrate": c.calibrate}
        if c.correction_band is not None:
            d["correction_band"] = list(c.correction_band)
        if c.reuse_steps is not None:
            d["reuse_steps"] = list(c.reuse_steps)
        return d


@register_policy("trajectory-slow")
class TrajectorySlow(TrajectoryPolicy):
    """Preset: about 2x on the whole-stack span (budget 0.5, runs of up to 2 reuses; reference
    model: 14 of 28 steps reused, 51.5 dB)."""
    default_budget = 0.5
    default_max_run = 2


@register_policy("trajectory-fast")
class TrajectoryFast(TrajectoryPolicy):
    """Preset: about 2.5x on the whole-stack span (budget 0.7, runs of up to 3 reuses; reference
    model: 19 of 28 steps reused, 42.8 dB)."""
    default_budget = 0.7
    default_max_run = 3


class TrajectoryRuntime(_RuntimeBase):
    """Runs calibration generations in full (measuring), later ones on the schedule."""

    def __init__(self, gm, example_inputs, analysis, config, policy, report, compile_fn, guard=None):
        super().__init__(gm, example_inputs, analysis, config, policy, report, compile_fn)
        self.spans = analysis.spans
        self.counts = [len(s.live_streams) for s in self.spans]
        self.fingerprint = graph_fingerprint(gm)
        self.out_float = float_outputs(gm)
        self.latent_index = self._find_latent(gm, analysis)
        self.calibration: Optional[Calibration] = None
        self.schedule: list[int] = []
        self.calibrating = False
        self.force_calibrate = False
        self._recorder: Optional[_Recorder] = None
        self._slots_seen = 1
        self.gamma = torch.ones((), device=self.device)
        if isinstance(config.calibrate, str) and config.calibrate != "first":
            self.set_calibration(Calibration.load(config.calibrate))
        elif config.calibrate is None:
            report.refused.append(Reason("not_calibrated", "calibrate=None and no calibration given: every step "
                                         "is computed until oc.calibrate(fn) runs"))
        self._zeros = lambda: [torch.zeros(s.shape, dtype=s.dtype, device=self.device)
                               for sp in self.spans for s in sp.live_streams]
        self._fn_compute = self._compile("variant_C", build_variant(gm, self.spans, (False,) * len(self.spans)), [])
        self._fn_measure = self._compile("measure", build_measure_variant(gm, self.spans), self._zeros())
        self._fn_reuse = self._compile("variant_R", build_variant(gm, self.spans, (True,) * len(self.spans)),
                                       self._zeros())
        self._fn_corrected = None
        if config.correction:
            outs = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
            q_ex = [torch.zeros(tuple(outs[i].meta["example_value"].shape), dtype=outs[i].meta["example_value"].dtype,
                                device=self.device) for i in self.out_float]
            self._fn_corrected = self._compile("reuse_corrected", build_corrected_reuse(gm, self.spans),
                                               self._zeros() + [self.gamma] + q_ex)
        self._band = None
        if config.correction and config.correction_band is not None:
            try:
                self._band = [BandFilter(q.shape, config.correction_band, self.device) for q in q_ex]
            except ValueError as e:
                why = Reason("band_unknown", f"correction_band {list(config.correction_band)} ignored, the whole "
                             f"correction is applied: the model output has no spatial grid the band can refer to ({e})")
                report.refused.append(why)
                log.warning("omnicompile: %s", why.detail)

    def _find_latent(self, gm, analysis) -> int:
        """The input the sampler moves along its trajectory: the float input shaped like a
        model output (denoisers predict in latent space), else the largest float input the
        first span's streams are computed from."""
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        outs = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
        out_shapes = {tuple(outs[i].meta["example_value"].shape) for i in self.out_float}
        floats = [i for i in self.user_index if isinstance(self.example_inputs[i], torch.Tensor)
                  and self.example_inputs[i].dtype.is_floating_point and i != self.ts_index]
        for i in floats:
            if tuple(self.example_inputs[i].shape) in out_shapes:
                return i
        anc, stack = set(), [s.input for s in self.spans[0].streams]
        while stack:
            n = stack.pop()
            if n not in anc:
                anc.add(n)
                stack.extend(n.all_input_nodes)
        cands = [i for i in floats if placeholders[i] in anc] or floats
        return max(cands, key=lambda i: self.example_inputs[i].numel())

    # ---------------------------------------------------------------- calibration
    def set_calibration(self, cal: Calibration) -> None:
        shape = list(self.example_inputs[self.latent_index].shape)
        cal.check_matches(self.fingerprint, shape, cal.slots)
        if self.config.num_steps is not None and self.config.num_steps != cal.num_steps:
            raise CalibrationError(f"calibration field 'num_steps': calibrated for {cal.num_steps} steps, "
                                   f"option num_steps is {self.config.num_steps}")
        self.calibration = cal
        self.schedule, why = self.policy.schedule(cal)
        self._gammas = cal.gammas()
        if why is not None and why not in self.report.refused:
            self.report.refused.append(why)

    def _finish_calibration(self) -> None:
        if self._recorder is not None and len(self._recorder.norms) > 1:
            cal = self._recorder.finish(self.fingerprint, list(self.example_inputs[self.latent_index].shape),
                                        self._slots_seen)
            self.set_calibration(cal)
        self._recorder = None
        self.calibrating = False

    # ---------------------------------------------------------------- call
    def __call__(self, *args):
        gen, step, slot, new, t = self._advance(args)
        if new:
            if self.calibrating:
                self._finish_calibration()
            want = self.force_calibrate or (self.calibration is None and self.config.calibrate == "first")
            if want:
                self.calibrating, self.force_calibrate = True, False
                self._recorder = _Recorder()
                self._slots_seen = 1
        if self.calibrating:
            self._slots_seen = max(self._slots_seen, slot + 1)
        st = self.slots.setdefault(slot, {})
        cal = self.calibration
        scheduled = not self.calibrating and cal is not None and step in self.schedule
        reuse = scheduled and "res" in st and step < cal.num_steps
        forced = [s.name for s in self.spans] if scheduled and not reuse else []
        measure = "res" in st and (self.calibrating or (self.config.correction and not reuse
                                                         and cal is not None and step + 1 in self.schedule))
        coef = None
        if reuse:
            if self._fn_corrected is not None and "q" in st:
                # k-th reuse of a run, residual k steps stale: q_hat = sum_j prod_{i<=j} gamma_i * q
                mode = self.config.run_correction
                k = st.get("k", 0) + 1
                st["k"] = k
                if mode == "scaled":
                    # q was measured with a residual d steps stale; this reuse's is k steps stale:
                    # the noise grows about linearly with the staleness
                    st["coef"] = self._gammas[step - k + 1] * k / st.get("d", 1)
                elif k == 1 or mode == "chain":
                    st["prod"] = st.get("prod", 1.0) * self._gammas[step]
                    st["coef"] = st.get("coef", 0.0) + st["prod"]
                elif mode == "first":
                    st["coef"] = 0.0
                coef = st["coef"]           # mode "hold": the first step's coefficient
                self.gamma.fill_(coef)
                outs = call_compiled(self._fn_corrected, list(args) + st["res"] + [self.gamma] + st["q"])
            else:
                outs = call_compiled(self._fn_reuse, list(args) + st["res"])
        elif measure:
            outs = call_compiled(self._fn_measure, list(args) + st["res"])
            k = self.n_out + sum(self.counts)
            # state goes back into graphs compiled for contiguous examples (Inductor asserts strides)
            st["res"] = [r.contiguous() for r in outs[self.n_out:k]]
            qs = outs[k:] if self._band is None else [f(q) for f, q in zip(self._band, outs[k:])]
            st["q"] = [q.contiguous() for q in qs]
            st["prod"], st["coef"], st["k"] = 1.0, 0.0, 0
            st["d"] = max(1, step - st.get("res_step", step - 1))
            st["res_step"] = step
        else:
            outs = call_compiled(self._fn_compute, list(args))
            st["res"] = [r.contiguous() for r in outs[self.n_out:]]
            st.pop("q", None)
            st["prod"], st["coef"], st["k"] = 1.0, 0.0, 0
            st["res_step"] = step
        if self.calibrating and slot == 0:
            q = st.get("q") if measure else None
            self._recorder.step(args[self.latent_index], outs[self.out_float[0]], q[0] if q else None)
        self.report.cache_bytes = self._held_bytes()
        self.report.steps.append(StepRecord(
            gen, step, slot, t, {sp.name: ("reused" if reuse else "computed") for sp in self.spans},
            sum(sp.flops for sp in self.spans) if reuse else 0, forced,
            signals={"gamma": coef} if coef is not None else {}))
        return tuple(outs[:self.n_out])

    def flush(self) -> None:
        pass
