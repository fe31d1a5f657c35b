"""The trajectory runtime: calibration generations computed in full (measuring), later ones
on the schedule, with the cache-noise correction.

Compiled graphs: ``variant_C`` (every span computed, residuals out), ``measure`` (also the
noise ``q`` a reuse would have made: before a run of reuses and while calibrating),
``variant_R`` (every span reused) and ``reuse_corrected`` (reused, minus ``c * q``).

The compute and measure graphs also return whether the state they refresh (the residuals, and
``q``) is all finite; the host reads that flag where it already syncs (after the timestep read),
only before a reuse, and a state that is not finite is dropped and the step computed
(``StepRecord.nonfinite``): neither a residual nor a correction carries a NaN of one step into
the reuses after it.
"""
from __future__ import annotations

import logging
import math

import torch
from torch._subclasses.fake_tensor import FakeTensor

from omnicompile.passes.common import Reason
from omnicompile.passes.correct import BandFilter, build_corrected_reuse, build_measure_variant, float_outputs
from omnicompile.passes.rewrite import build_variant
from omnicompile.policies.trajectory.calibration import Calibration, TrajectoryCalibrator, check_steps, graph_fingerprint
from omnicompile.errors import CalibrationError
from omnicompile.preview import Preview
from omnicompile.runtime.base import Runtime
from omnicompile.targets import saved_fraction

log = logging.getLogger("omnicompile")

__all__ = ["TrajectoryRuntime"]


class TrajectoryRuntime(Runtime):
    def __init__(self, ctx, policy):
        self.policy = policy
        super().__init__(ctx, ctx.analysis.spans)
        gm, config, report = self.gm, self.config, self.report
        self.counts = [len(s.live_streams) for s in self.spans]
        self.fingerprint = graph_fingerprint(gm)
        self.out_float = float_outputs(gm)
        self.latent_index = self._find_latent(gm, ctx.analysis)
        self.latent_shape = list(self.input_sizes[self.latent_index])
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        ev = placeholders[self.latent_index].meta.get("example_value")
        self.symbolic_latent = ev is not None and not all(isinstance(d, int) for d in ev.shape)
        self.calibrator = TrajectoryCalibrator(self, config.calibrate)
        self._derived: dict[int, tuple] = {}       # id(calibration) -> (calibration, schedule, gammas)
        self.gamma = torch.ones((), device=self.device)
        if isinstance(config.calibrate, str) and config.calibrate != "first":
            self.calibrator.load(config.calibrate)
        elif config.calibrate is None:
            report.refused.append(Reason("not_calibrated", "calibrate=None and no calibration given: every step "
                                         "is computed until oc.calibrate(fn) runs"))
        res = self._residual_specs()
        outs = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
        q_specs = [outs[i].meta["example_value"] for i in self.out_float]
        measure = build_measure_variant(gm, self.spans, finite=True)
        reuse = build_variant(gm, self.spans, (True,) * len(self.spans))
        corrected = build_corrected_reuse(gm, self.spans) if config.correction else None

        def timed(timer):
            """For :meth:`call_costs`: a computed step before a run of reuses measures the noise
            (``measure``); a reused one is corrected where the correction is on."""
            r = timer.zeros(res)
            if corrected is None:
                return (measure, r), (reuse, r)
            return (measure, r), (corrected, r + [torch.ones((), device=timer.device)] + timer.zeros(q_specs))
        policy.bind_cost(self.call_costs(saved_fraction(self.spans, self.report.flops_per_call, ctx.node_seconds),
                                         timed), self.report)
        self._fn_compute = self.compile("variant_C", build_variant(gm, self.spans, (False,) * len(self.spans),
                                                                   finite=True), [],
                                        "(*inputs) -> (*outputs, *residuals of every span, *finite flag per span)")
        self._fn_measure = self.compile("measure", measure, self.examples(res),
                                        "(*inputs, *residuals) -> (*outputs, *residuals', *q per float output, "
                                        "finite flag of residuals' and q)")
        self._fn_reuse = self.compile("variant_R", reuse, self.examples(res),
                                      "(*inputs, *residuals of every span) -> (*outputs)")
        self._fn_corrected = None
        if config.correction:
            q_ex = self.examples(q_specs)
            self._fn_corrected = self.compile("reuse_corrected", corrected,
                                              self.examples(res) + [self.gamma] + q_ex,
                                              "(*inputs, *residuals, gamma, *q per float output) -> (*outputs)")
        self._bands: dict[tuple, object] = {}     # concrete output shape -> BandFilter (or None: no grid)
        if config.correction and config.correction_band is not None:
            for q in q_ex:                        # static sizes: say now whether the band applies
                if all(isinstance(d, int) for d in q.shape) and not isinstance(q, FakeTensor):
                    self._band(q)

    def _band(self, q: torch.Tensor) -> torch.Tensor:
        """``q`` restricted to the correction band (per concrete shape; an output without a grid
        keeps the whole correction, reported as ``band_unknown``)."""
        shape = tuple(q.shape)
        if shape not in self._bands:
            try:
                self._bands[shape] = BandFilter(shape, self.config.correction_band, self.device)
            except ValueError as e:
                self._bands[shape] = None
                why = Reason("band_unknown", f"correction_band {list(self.config.correction_band)} ignored, the "
                             f"whole correction is applied: the model output has no spatial grid the band can refer "
                             f"to ({e})")
                if why not in self.report.refused:
                    self.report.refused.append(why)
                    log.warning("omnicompile: %s", why.message)
        f = self._bands[shape]
        return q if f is None else f(q)

    def _residual_specs(self) -> list:
        return [s for sp in self.spans for s in sp.live_streams]

    def _find_latent(self, gm, analysis) -> int:
        """The input the sampler moves along its trajectory: the float input shaped like a
        model output (denoisers predict in latent space), else the largest float input the
        first span's streams are computed from."""
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        outs = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
        out_shapes = {str(tuple(outs[i].meta["example_value"].shape)) for i in self.out_float}
        floats = [i for i in self.user_index if isinstance(self.example_inputs[i], torch.Tensor)
                  and self.example_inputs[i].dtype.is_floating_point and i != self.ts_index]
        for i in floats:                   # (symbolic sizes compare by their expressions)
            ev = placeholders[i].meta.get("example_value")
            if ev is not None and str(tuple(ev.shape)) in out_shapes:
                return i
        anc, stack = set(), [s.input for s in self.spans[0].streams]
        while stack:
            n = stack.pop()
            if n not in anc:
                anc.add(n)
                stack.extend(n.all_input_nodes)
        cands = [i for i in floats if placeholders[i] in anc] or floats
        return max(cands, key=lambda i: math.prod(self.input_sizes[i]))

    # ---------------------------------------------------------------- calibration
    def check_calibration(self, cal: Calibration) -> None:
        """Raise CalibrationError unless ``cal`` was made for this graph (a graph with symbolic
        sizes takes a calibration of any shape; it applies to generations of that shape)."""
        shape = cal.shape if self.symbolic_latent else self.latent_shape
        cal.check_matches(self.fingerprint, shape)     # the calls per step: per generation, _slots_fit
        if self.config.num_steps is not None and self.config.num_steps != cal.num_steps:
            raise CalibrationError(f"calibration field 'num_steps': calibrated for {cal.num_steps} steps, "
                                   f"option num_steps is {self.config.num_steps}")

    def _slots_fit(self, call, cal: Calibration) -> bool:
        """Whether the generation of ``call`` makes the calls per step ``cal`` was calibrated
        with (``cal.slots``): a calibration of CFG run as two calls (cond, uncond) does not
        describe a run with CFG batched into one call, nor the reverse — its curvature and
        noise were measured on slot 0 of another kind of call.  Known at the call of one slot
        more than calibrated, or at the first call of the step after one with fewer; no
        reuse comes before (step 0 is never reused).  A mismatch *refuses* the calibration
        for the rest of the generation: every step is computed, ``calibration_slots`` is in
        ``report.refused`` and the generation's log says so (recalibrate with
        ``oc.calibrate(fn)`` on the kind of run that is served)."""
        d = call.session.data
        if d.get("slots_refused"):
            return False
        made = None
        if call.slot + 1 > cal.slots:
            made = f"at least {call.slot + 1}"
        elif call.slot == 0 and d.get("slots_step") is not None and d["slots_step"] < call.step \
                and d["slots_count"] != cal.slots:
            made = str(d["slots_count"])
        if call.slot == 0 and d.get("slots_step") != call.step:
            d["slots_step"], d["slots_count"] = call.step, 1
        else:
            d["slots_count"] = max(d.get("slots_count", 1), call.slot + 1)
        if made is None:
            return True
        d["slots_refused"] = True
        msg = (f"{cal.slots_mismatch(made)} (step {call.step}): the calibration is not used for this generation, "
               f"every step is computed; calibrate on this kind of run (oc.calibrate(fn)) to cache it")
        why = Reason("calibration_slots", msg)
        if why not in self.report.refused:
            self.report.refused.append(why)
            log.warning("omnicompile: %s", msg)
        for rec in reversed(self.report.generation_log):
            if rec.generation == call.generation and rec.model == call.model:
                rec.plan = f"{rec.plan}; refused at step {call.step}: {cal.slots_mismatch(made)}"
                break
        return False

    def schedule_of(self, cal: Calibration) -> tuple[list[int], list[float]]:
        """The reuse steps and the per-step noise ratios of a calibration (derived once)."""
        got = self._derived.get(id(cal))
        if got is None or got[0] is not cal:
            schedule, why = self.policy.schedule(cal)
            got = self._derived[id(cal)] = (cal, schedule, cal.gammas())
            if why is not None and why not in self.report.refused:
                self.report.refused.append(why)
        return got[1], got[2]

    @property
    def schedule(self) -> list[int]:
        """The reuse steps of the most recent calibration ([] without one)."""
        cal = self.calibrator.result
        return self.schedule_of(cal)[0] if cal is not None else []

    @property
    def gammas(self) -> list[float]:
        """The noise ratios of the most recent calibration; assigning overrides them (tests)."""
        cal = self.calibrator.result
        return self.schedule_of(cal)[1] if cal is not None else []

    @gammas.setter
    def gammas(self, values) -> None:
        cal = self.calibrator.result
        if cal is None:
            raise CalibrationError("no calibration to override the noise ratios of")
        schedule = self.schedule_of(cal)[0]
        self._derived[id(cal)] = (cal, schedule, list(values))

    def generation_plan(self, call) -> str:
        cal, words = self.calibrator.for_generation(call, "calibration")
        if cal is None:
            return words
        return (f"calibration of {cal.num_steps} steps ({self.calibrator.source_of(call.model, cal.num_steps, self.calibrator.variant(call))}), "
                f"reuse steps {self.schedule_of(cal)[0]}")

    # ---------------------------------------------------------------- call
    def __call__(self, *args):
        call = self.advance(args)
        step = call.step
        # a step count the schedule cannot take: refused at the generation's first call when
        # it is known (context, num_steps, earlier generations), else at the step past the limit
        check_steps(self.policy.name, call.num_steps if call.num_steps is not None else step + 1,
                    "this generation" if call.num_steps is not None else f"this generation (step {step} reached)")
        calibrating = self.calibrator.calibrating(call)
        st = call.slots.setdefault(call.slot, {})
        cal = None if calibrating else self.calibrator.lookup_call(call)
        if cal is not None and not self._slots_fit(call, cal):
            cal = None
        schedule, gammas = self.schedule_of(cal) if cal is not None else ((), ())
        scheduled = cal is not None and step in schedule and call.certain
        reuse = scheduled and "res" in st and step < cal.num_steps
        nonfinite = []
        if reuse and not self._finite(st):     # never replay a non-finite residual or correction
            reuse = False
            nonfinite = [s.name for s in self.spans]
            for key in ("res", "q", "ok"):
                st.pop(key, None)
        forced = [s.name for s in self.spans] if scheduled and not reuse and not nonfinite else []
        measure = "res" in st and (calibrating or (self.config.correction and not reuse
                                                   and cal is not None and step + 1 in schedule))
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
                    st["coef"] = gammas[step - k + 1] * k / st.get("d", 1)
                elif k == 1 or mode == "chain":
                    st["prod"] = st.get("prod", 1.0) * gammas[step]
                    st["coef"] = st.get("coef", 0.0) + st["prod"]
                elif mode == "first":
                    st["coef"] = 0.0
                coef = st["coef"]           # mode "hold": the first step's coefficient
                self.gamma.fill_(coef)
                outs = self.invoke(call, self._fn_corrected, list(args) + st["res"] + [self.gamma] + st["q"])
            else:
                outs = self.invoke(call, self._fn_reuse, list(args) + st["res"])
        elif measure:
            outs = self.invoke(call, self._fn_measure, list(args) + st["res"])
            k = self.n_out + sum(self.counts)
            # state goes back into graphs compiled for contiguous examples (Inductor asserts strides)
            st["res"] = [r.contiguous() for r in outs[self.n_out:k]]
            st["ok"] = [outs[-1]]
            outs = outs[:-1]
            qs = list(outs[k:])
            if self.config.correction_band is not None:
                qs = [self._band(q) for q in qs]
            st["q"] = [q.contiguous() for q in qs]
            st["prod"], st["coef"], st["k"] = 1.0, 0.0, 0
            st["d"] = max(1, step - st.get("res_step", step - 1))
            st["res_step"] = step
        else:
            outs = self.invoke(call, self._fn_compute, list(args))
            k = self.n_out + sum(self.counts)
            st["res"] = [r.contiguous() for r in outs[self.n_out:k]]
            st["ok"] = list(outs[k:])
            outs = outs[:k]
            st.pop("q", None)
            st["prod"], st["coef"], st["k"] = 1.0, 0.0, 0
            st["res_step"] = step
        if calibrating:
            self.calibrator.record(call, args, outs, st)
        self.record(call, {sp.name: ("reused" if reuse else "computed") for sp in self.spans},
                    sum(sp.flops for sp in self.spans) if reuse else 0, forced,
                    {"gamma": coef} if coef is not None else {})
        self.report.steps[-1].nonfinite = nonfinite
        return tuple(outs[:self.n_out])

    @staticmethod
    def _finite(st: dict) -> bool:
        """Whether the slot's state is all finite: the graphs' flags, read once (the call has
        already synchronised on its timestep)."""
        ok = st.get("ok")
        if ok is None:
            return True
        if not isinstance(ok, bool):
            ok = st["ok"] = all(bool(f) for f in ok)
        return ok

    def preview(self, steps: int) -> Preview:
        cal = self.calibrator.for_steps(steps)
        if cal is None:
            have = self.calibrator.step_counts()
            why = (f"calibrated for {', '.join(map(str, have))} steps only" if have else "not calibrated yet")
            return Preview.computed(steps, self.spans, self.report.flops_per_call,
                                    f"policy {self.policy.name!r} is {why}: a generation of {steps} steps computes "
                                    "every step until it is calibrated on that step count (calibrate='first' "
                                    "calibrates on its first generation)")
        schedule = set(self.schedule_of(cal)[0])
        rows = [["reused" if step in schedule and step > 0 else ("forced" if step in schedule else "computed")]
                * len(self.spans) for step in range(steps)]
        return Preview(steps, [s.name for s in self.spans], [s.flops for s in self.spans],
                       self.report.flops_per_call, rows)
