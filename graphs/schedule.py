"""Trajectory-guided reuse schedules (OmniCache, trajectory-oriented; seeds 000/001).

Pure functions over per-step numbers, so they are property-tested on their own.

*Curvature scores* say how much the sampling trajectory bends at each step:

* ``angle``: the angle between consecutive displacements ``x_{s+1} - x_s`` of the latent the
  sampler feeds the model (for an Euler flow sampler this is the angle between consecutive
  model outputs);
* ``output``: the relative L2 change of the model output from the previous step.

A step with low curvature continues the previous step's direction: reusing the previous
step's features there costs least.

*Selection* (:func:`select_reuse_steps`): under a global budget (a fraction of all steps),
pick the lowest-curvature steps with at least ``min_gap`` steps between two reuses (so every
reuse follows a freshly computed step), never in the protected warm-up and final steps, and
with the budget allocated across phases of sampling (``phase_weights``: early, middle, late
thirds; the paper spreads reuse over early and middle sampling, where the denoiser can
still correct errors, instead of the late-only reuse similarity triggers produce).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

__all__ = ["angle_scores", "output_change_scores", "select_reuse_steps", "fit_gamma", "DEFAULT_PHASE_WEIGHTS"]

DEFAULT_PHASE_WEIGHTS = (0.45, 0.45, 0.10)


def angle_scores(dots: Sequence[float], norms: Sequence[float]) -> list[float]:
    """Angle (radians) between displacement ``s-1`` and displacement ``s``.

    ``dots[s]`` = <d_s, d_{s-1}> and ``norms[s]`` = |d_s| where ``d_s = x_s - x_{s-1}``
    (the displacement that *arrives* at step s).  Score of step s = angle(d_s, d_{s-1}):
    how much the path turned on the way to step s.  Steps 0 and 1 have no score (inf).
    """
    out = [math.inf] * len(norms)
    for s in range(2, len(norms)):
        den = norms[s] * norms[s - 1]
        if den > 0 and math.isfinite(dots[s]):
            out[s] = math.acos(max(-1.0, min(1.0, dots[s] / den)))
    return out


def output_change_scores(rel_changes: Sequence[float]) -> list[float]:
    """Relative change of the model output at step s against step s-1 (step 0: inf)."""
    out = [math.inf] + [float(v) if math.isfinite(v) else math.inf for v in rel_changes[1:]]
    return out[:len(rel_changes)] if rel_changes else []


def _phase(s: int, n: int) -> int:
    return min(2, (3 * s) // n)


def select_reuse_steps(scores: Sequence[float], budget: float, min_gap: int = 2, warmup: int = 2,
                       cooldown: int = 1, phase_weights: Sequence[float] = DEFAULT_PHASE_WEIGHTS) -> list[int]:
    """Steps to reuse, ascending.

    Invariants (tested with hypothesis): at most ``floor(budget * n)`` steps; none among the
    first ``warmup`` or the last ``cooldown``; any two chosen steps at least ``min_gap``
    apart (``min_gap=2``: never two reuses in a row); never a step whose score is not finite.
    Each phase gets ``round(weight * quota)`` (leftovers flow to the other phases, lowest
    score first); inside a phase the lowest scores win (ties: earlier step first).
    """
    n = len(scores)
    if not 0.0 <= budget < 1.0:
        raise ValueError(f"budget must be in [0, 1), got {budget}")
    if min_gap < 1:
        raise ValueError(f"min_gap must be >= 1, got {min_gap}")
    quota = int(math.floor(budget * n + 1e-9))
    eligible = [s for s in range(warmup, n - cooldown) if math.isfinite(scores[s])]
    if quota <= 0 or not eligible:
        return []
    w = list(phase_weights) + [0.0] * (3 - len(phase_weights))
    total_w = sum(w) or 1.0
    per_phase = [int(round(quota * wi / total_w)) for wi in w[:3]]
    chosen: list[int] = []

    def ok(s: int) -> bool:
        return all(abs(s - c) >= min_gap for c in chosen)

    for ph in range(3):
        cands = sorted((s for s in eligible if _phase(s, n) == ph), key=lambda s: (scores[s], s))
        take = per_phase[ph]
        for s in cands:
            if take <= 0 or len(chosen) >= quota:
                break
            if ok(s):
                chosen.append(s)
                take -= 1
    for s in sorted(eligible, key=lambda s: (scores[s], s)):   # leftovers
        if len(chosen) >= quota:
            break
        if s not in chosen and ok(s):
            chosen.append(s)
    return sorted(chosen)


def fit_gamma(dots: Sequence[float], sq_norms: Sequence[float], lo: float = 0.0, hi: float = 1.5) -> list[Optional[float]]:
    """Per-step gamma of the cache-noise model q_s ≈ gamma_s q_{s-1} (least squares):
    ``gamma_s = <q_s, q_{s-1}> / |q_{s-1}|^2``, clipped to [lo, hi]; None where unknown.

    ``dots[s]`` = <q_s, q_{s-1}>, ``sq_norms[s]`` = |q_s|^2 (the noise a reuse at step s would
    have made, measured while calibrating)."""
    out: list[Optional[float]] = [None] * len(sq_norms)
    for s in range(1, len(sq_norms)):
        den = sq_norms[s - 1]
        if den and den > 0 and math.isfinite(dots[s]):
            out[s] = max(lo, min(hi, dots[s] / den))
    return out
