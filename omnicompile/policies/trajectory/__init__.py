"""Policy ``trajectory``: OmniCache's trajectory-guided global reuse with noise correction.

1. **Calibration** — one generation computed in full.  At every step the runtime records
   (slot 0) the displacement of the latent the sampler feeds the model (angle between
   consecutive displacements), the relative change of the model output, and the
   cache-induced noise ``q_s`` a reuse would have caused (the measure variant of
   :mod:`omnicompile.passes.correct`).  ``calibrate="first"`` calibrates on the first
   generation of each input shape automatically; ``oc.calibrate(fn)`` runs ``fn`` (one
   generation) as the calibration; a JSON path loads a saved calibration.
2. **Schedule** — :func:`omnicompile.graphs.schedule.select_reuse_steps` over the chosen
   curvature score (``curvature="angle"``, ``"output"`` or ``"error"``; ``"uniform"`` spreads the
   budget's reuses evenly instead: an ablation: below ``angle`` on three of the four suite models), under ``budget``, a dynamic
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

Modules: :mod:`.calibration` (what a calibration measures, its JSON file, the calibrator),
:mod:`.policy` (the schedule and the presets), :mod:`.runtime` (the compiled graphs and the
correction).
"""
from omnicompile.policies.trajectory.calibration import Calibration, TrajectoryCalibrator, graph_fingerprint
from omnicompile.policies.trajectory.policy import MIN_STEPS, TrajectoryFast, TrajectoryPolicy, TrajectorySlow
from omnicompile.policies.trajectory.runtime import TrajectoryRuntime

__all__ = ["Calibration", "TrajectoryCalibrator", "TrajectoryPolicy", "TrajectorySlow", "TrajectoryFast",
           "TrajectoryRuntime", "graph_fingerprint", "MIN_STEPS"]
