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
pick the lowest-curvature steps — runs of at most ``max_run`` consecutive reuses, at least
``min_gap`` steps between two runs (the default ``max_run=1, min_gap=2``: every reuse follows a
freshly computed step) — chosen by a dynamic program, never in the protected warm-up and final steps, and
with the budget allocated across phases of sampling (``phase_weights``: early, middle, late
thirds; the paper spreads reuse over early and middle sampling, where the denoiser can
still correct errors, instead of the late-only reuse similarity triggers produce).

*Cost.*  The dynamic program's states are (run length, gap, picks so far): it runs as a
loop over a dict of states for short runs and as tensor operations over every pick count
at once for long ones (:func:`_pack`), in time linear in the step count — 4,000 steps went
from 47 s (and over 14 minutes with runs of up to three) to 7-14 s on 2 loaded CPU cores.
:data:`MAX_STEPS` bounds the steps a schedule takes; the trajectory policy refuses longer
generations with a typed error.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

__all__ = ["angle_scores", "output_change_scores", "select_reuse_steps", "fit_gamma", "GAMMA_MIN", "GAMMA_MAX",
           "DEFAULT_PHASE_WEIGHTS", "MAX_STEPS"]

DEFAULT_PHASE_WEIGHTS = (0.45, 0.45, 0.10)
#: the longest run :func:`select_reuse_steps` schedules.  Its dynamic program takes a few
#: tensor operations per step and pick count (2 CPU cores under load: 1,000 steps ~1-2 s,
#: 4,000 steps ~7-14 s); samplers use tens to a thousand steps.
MAX_STEPS = 10_000


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


#: programs with at most this many states per step run as a loop (:func:`_pack`); both take
#: time linear in the steps, the loop's per step grows with the states times the picks kept
#: per state, the tensors' barely (about even at 1,500 on 2 CPU cores)
_LOOP_STATES = 1_500
#: rank of a transition that lost on cost (ranks are compared only between equal costs)
_UNREACHED = 1 << 62
#: ranks double every step; they are renumbered densely before they pass this
_RENUMBER_AT = 1 << 50


def _pack(scores: Sequence[float], ok: Sequence[bool], lo: int, hi: int, phase_of, targets: Optional[Sequence[int]],
          max_run: Optional[int], gap_need: int, kmax: int):
    """Dynamic program over steps ``lo..hi-1``: the cheapest (sum of scores) set of picks on
    ``ok`` steps where runs of consecutive picks are at most ``max_run`` long (None: any)
    and two runs are separated by at least ``gap_need`` unpicked steps.

    With ``targets``, phase ``p`` gets exactly ``targets[p]`` picks; returns the picks or None
    when that is infeasible.  Without, returns ``{k: cost}`` for every reachable count
    ``k <= kmax``.  Ties go to the earlier steps (lexicographically smallest picks).

    Two implementations give the same answer (tests/test_schedule.py compares them): a loop
    over a dict of states (:func:`_pack_loop`, quickest for small programs) and tensor
    operations over every pick count at once (:func:`_pack_tensor`, for long runs: its cost
    per step barely grows with the quota, where the loop's grows with the quota squared —
    4,000 steps took 47 s with the loop alone, runs of up to three over 14 minutes)."""
    counts = (max(targets) if targets is not None else kmax) + 1
    kinds = max(gap_need, 1) + 1 + (max_run if max_run is not None else 1)
    if counts * kinds <= _LOOP_STATES:
        return _pack_loop(scores, ok, lo, hi, phase_of, targets, max_run, gap_need, kmax)
    return _pack_tensor(scores, ok, lo, hi, phase_of, targets, max_run, gap_need, kmax)


def _pack_loop(scores: Sequence[float], ok: Sequence[bool], lo: int, hi: int, phase_of, targets: Optional[Sequence[int]],
          max_run: Optional[int], gap_need: int, kmax: int):
    """:func:`_pack` as a plain loop over a dict of states, each holding its best prefix's
    picks: the quicker one for small programs (a few hundred states), its cost grows with
    the steps times the states times the picks copied."""
    r_cap = max_run if max_run is not None else 1
    # state: (run length so far (0 = last step unpicked), unpicked steps since the last run
    # (capped at gap_need), picks in the current phase) -> (cost, picks)
    states = {(0, gap_need, 0): (0.0, ())}
    for i in range(lo, hi):
        if targets is not None and i > lo and phase_of(i) != phase_of(i - 1):
            want = targets[phase_of(i - 1)]
            states = {(r, g, 0): v for (r, g, c), v in states.items() if c == want}
        cap = targets[phase_of(i)] if targets is not None else kmax
        new: dict = {}

        def relax(key, val):
            old = new.get(key)
            if old is None or val < old:
                new[key] = val

        for (r, g, c), (cost, picks) in states.items():
            relax((0, 1 if r > 0 else min(g + 1, gap_need), c), (cost, picks))
            if ok[i] and c < cap:
                if r > 0 and (max_run is None or r < max_run):
                    relax((min(r + 1, r_cap), 0, c + 1), (cost + scores[i], picks + (i,)))
                elif r == 0 and g >= gap_need:
                    relax((1, 0, c + 1), (cost + scores[i], picks + (i,)))
        states = new
    if targets is not None:
        want = targets[phase_of(hi - 1)] if hi > lo else 0
        best = min((v for (r, g, c), v in states.items() if c == want), default=None)
        return None if best is None else list(best[1])
    by_k: dict = {}
    for (r, g, c), (cost, _) in states.items():
        if c not in by_k or cost < by_k[c]:
            by_k[c] = cost
    return by_k


def _pack_tensor(scores: Sequence[float], ok: Sequence[bool], lo: int, hi: int, phase_of, targets: Optional[Sequence[int]],
          max_run: Optional[int], gap_need: int, kmax: int):
    """The tensor form of :func:`_pack` (same program, same answer, same tie-breaking).

    A state is (run length so far (0 = last step unpicked), unpicked steps since the last run
    (capped), picks in the current phase); the program keeps, per state, the cost of its best
    prefix as one float64 tensor over the pick count (one row per (run, gap) kind), so a step
    is a few tensor operations whatever the quota, and a back-pointer per state (which
    transition won) from which the picks are read at the end.  Ties between prefixes of equal
    cost are broken by the *rank* of each state's prefix among the live ones: ordering
    prefixes ``P`` by ``P + (inf,)`` lexicographically, a prefix extended by step ``i`` (larger
    than every step in it) keeps its place against every other, just before its own
    unextended self — so the new rank is ``2 * rank + (0 if picked else 1)``, renumbered
    densely before it overflows, and among prefixes with as many picks this is the
    lexicographic order of their steps.  Costs add up in step order along a path, as a plain
    loop would."""
    r_cap = max_run if max_run is not None else 1
    g_cap = max(gap_need, 1)
    kinds = [(0, g) for g in range(g_cap + 1)] + [(r, 0) for r in range(1, r_cap + 1)]
    index = {k: j for j, k in enumerate(kinds)}
    n_k = len(kinds)
    # the transitions into each kind: (source kind, picked)
    into: list[list[tuple[int, bool]]] = [[] for _ in kinds]
    for j, (r, g) in enumerate(kinds):
        into[index[(0, 1 if r > 0 else min(g + 1, gap_need))]].append((j, False))
        if r > 0 and (max_run is None or r < max_run):
            into[index[(min(r + 1, r_cap), 0)]].append((j, True))
        elif r == 0 and g >= gap_need:
            into[index[(1, 0)]].append((j, True))
    width = max(len(t) for t in into)
    length = (max(targets) if targets is not None else kmax) + 1
    inf = math.inf
    # column c + 1 holds pick count c; column 0 is count -1, never reached: a pick's source
    cost = torch.full((n_k, length + 1), inf, dtype=torch.float64)
    rank = torch.zeros((n_k, length + 1), dtype=torch.long)    # meaningful where cost is finite
    start = index[(0, gap_need)]
    cost[start, 1] = 0.0
    nothing = torch.full((1, length), inf, dtype=torch.float64)
    nothing_rank = torch.zeros((1, length), dtype=torch.long)
    # what a pick adds on top of its score: inf at counts above the phase's cap
    over = {}

    def penalty(cap):
        if cap not in over:
            over[cap] = torch.tensor([0.0 if c <= cap else inf for c in range(length)], dtype=torch.float64)
        return over[cap]

    def candidates(stay, pick, none):
        """[kind, transition, count]: the value of every transition into each kind."""
        parts = []
        for t in into:
            parts += [(pick if picked else stay)[j:j + 1] for j, picked in t] + [none] * (width - len(t))
        return torch.cat(parts).view(n_k, width, length)

    choices = []
    top = 0                                   # the largest rank a state may hold
    for i in range(lo, hi):
        if targets is not None and i > lo and phase_of(i) != phase_of(i - 1):
            want = targets[phase_of(i - 1)]
            kept_cost, kept_rank = cost[:, want + 1].clone(), rank[:, want + 1].clone()
            cost[:, 1:] = inf
            cost[:, 1] = kept_cost
            rank[:, 1] = kept_rank
        cap = targets[phase_of(i)] if targets is not None else kmax
        pick = cost[:, :length] + (penalty(cap) + float(scores[i])) if ok[i] else cost[:, :1].expand(n_k, length)
        cand = candidates(cost[:, 1:], pick, nothing)
        best = cand.amin(dim=1)
        if targets is not None:
            twice = rank * 2
            cand_rank = candidates(twice[:, 1:] + 1, twice[:, :length], nothing_rank)
            cand_rank = torch.where(cand == best.unsqueeze(1), cand_rank, _UNREACHED)
            best_rank, choice = cand_rank.min(dim=1)
            rank[:, 1:] = best_rank
            choices.append(choice.to(torch.uint8) if width < 256 else choice)
            top = 2 * top + 1
            if top >= _RENUMBER_AT:            # dense ranks again (their order is all that counts)
                rank = torch.unique(rank, return_inverse=True)[1]
                top = n_k * (length + 1)
        cost[:, 1:] = best
    if targets is None:
        by_k = cost[:, 1:].amin(dim=0).tolist()
        return {c: v for c, v in enumerate(by_k) if math.isfinite(v)}
    want = targets[phase_of(hi - 1)] if hi > lo else 0
    end_cost, end_rank = cost[:, want + 1].tolist(), rank[:, want + 1].tolist()
    finals = [j for j in range(n_k) if math.isfinite(end_cost[j])]
    if not finals:
        return None
    kind = min(finals, key=lambda j: (end_cost[j], end_rank[j]))
    c, picks = want, []
    for i in range(hi - 1, lo - 1, -1):
        kind, picked = into[kind][int(choices[i - lo][kind, c])]
        if picked:
            picks.append(i)
            c -= 1
        if i > lo and phase_of(i) != phase_of(i - 1):
            c = targets[phase_of(i - 1)]
    return picks[::-1]


def select_reuse_steps(scores: Sequence[float], budget: float, min_gap: int = 2, warmup: int = 2,
                       cooldown: int = 1, phase_weights: Sequence[float] = DEFAULT_PHASE_WEIGHTS,
                       max_run: Optional[int] = 1) -> list[int]:
    """Steps to reuse, ascending.

    Invariants (tested with hypothesis): at most ``floor(budget * n)`` steps; none among the
    first ``warmup`` or the last ``cooldown``; never a step whose score is not finite; runs of
    consecutive reused steps at most ``max_run`` long (None: unbounded); two runs at least
    ``min_gap`` apart (last step of one to first of the next; ``min_gap=2, max_run=1``: never two
    reuses in a row, every reuse follows a computed step).

    The quota is split over the early / middle / late thirds by ``phase_weights`` (largest
    remainder); a phase that cannot hold its share (too few eligible steps under the gap and
    run rules) passes the rest to the phase where one more reuse costs least.  Then a dynamic
    program picks, per phase, exactly its share with the lowest total score — packing steps
    tightly where a greedy choice would strand quota between its picks.  Ties: earlier steps.
    More than :data:`MAX_STEPS` scores raise ``ValueError``.
    """
    n = len(scores)
    if n > MAX_STEPS:
        raise ValueError(f"a schedule has at most MAX_STEPS = {MAX_STEPS} steps, got {n}")
    if not 0.0 <= budget < 1.0:
        raise ValueError(f"budget must be in [0, 1), got {budget}")
    if min_gap < 1:
        raise ValueError(f"min_gap must be >= 1, got {min_gap}")
    if max_run is not None and max_run < 1:
        raise ValueError(f"max_run must be >= 1 or None, got {max_run}")
    quota = int(math.floor(budget * n + 1e-9))
    ok = [warmup <= s < n - cooldown and math.isfinite(scores[s]) for s in range(n)]
    if quota <= 0 or not any(ok):
        return []
    gap_need = min_gap - 1
    phase_of = lambda s: _phase(s, n)
    # per phase alone: the cheapest cost of k picks, for every feasible k
    bounds = []
    for ph in range(3):
        steps = [s for s in range(n) if _phase(s, n) == ph]
        bounds.append((steps[0], steps[-1] + 1) if steps else (0, 0))
    curves = [_pack(scores, ok, lo, hi, phase_of, None, max_run, gap_need, quota) if hi > lo else {0: 0.0}
              for lo, hi in bounds]
    caps = [max(c) for c in curves]
    w = [max(0.0, float(x)) for x in list(phase_weights)[:3]] + [0.0] * max(0, 3 - len(phase_weights))
    total_w = sum(w)
    if total_w > 0:
        raw = [quota * wi / total_w for wi in w]
        targets = [int(math.floor(x)) for x in raw]
        for ph in sorted(range(3), key=lambda p: (-(raw[p] - targets[p]), p))[:quota - sum(targets)]:
            targets[ph] += 1
    else:
        targets = [0, 0, 0]
    targets = [min(t, c) for t, c in zip(targets, caps)]

    def marginal(ph):
        t = targets[ph]
        return curves[ph][t + 1] - curves[ph][t]

    while sum(targets) < quota:
        room = [ph for ph in range(3) if targets[ph] < caps[ph]]
        if not room:
            break
        targets[min(room, key=lambda ph: (marginal(ph), ph))] += 1
    while True:   # the phases' edges can make the joint problem tighter than each phase alone
        picks = _pack(scores, ok, 0, n, phase_of, targets, max_run, gap_need, quota)
        if picks is not None:
            return picks
        # move one reuse to another phase (cheapest feasible move), else give one up
        best = None
        for a in range(3):
            for b in range(3):
                if a != b and targets[a] > 0 and targets[b] < caps[b]:
                    t = list(targets)
                    t[a] -= 1
                    t[b] += 1
                    got = _pack(scores, ok, 0, n, phase_of, t, max_run, gap_need, quota)
                    if got is not None:
                        key = (sum(scores[i] for i in got), got)
                        if best is None or key < best[0]:
                            best = (key, got)
        if best is not None:
            return best[1]
        ph = max((p for p in range(3) if targets[p] > 0),
                 key=lambda p: (curves[p][targets[p]] - curves[p][targets[p] - 1], p))
        targets[ph] -= 1


#: the range :func:`fit_gamma` clips the noise ratio to: a negative ratio would flip the
#: correction's sign, one above 1.5 amplifies the measured noise by more than the staleness
#: grows it (calibration files are checked against the same range)
GAMMA_MIN, GAMMA_MAX = 0.0, 1.5


def fit_gamma(dots: Sequence[float], sq_norms: Sequence[float], lo: float = GAMMA_MIN,
              hi: float = GAMMA_MAX) -> list[Optional[float]]:
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
