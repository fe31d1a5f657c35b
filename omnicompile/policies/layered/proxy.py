"""The layered policy's one-generation profile (``method="residual"``): per (unit, step), the
L2 change of the unit's residual from the previous step — the error a reuse at that step
would inject.  It is the :class:`~omnicompile.calibration.Calibrator` of the layered runtime
(``calibrate="first"``, ``oc.calibrate(fn)``, ``omnicache calibrate``), and the reference
generation of :func:`~omnicompile.policies.layered.profiling.profile` records it too.

A weaker signal than the paper's ``final`` profile: Spearman rank correlation 0.53 with it on
the reference model (``bench/profile_layered.py``).
"""
from __future__ import annotations

import math
from typing import Optional

from omnicompile.calibration import Calibrator
from omnicompile.passes.collectives import host_sum
from omnicompile.policies.layered.files import Profile, dag_to_json, load_file

__all__ = ["ResidualProxy"]


class ResidualProxy(Calibrator):
    """The layered runtime's calibrator: one recording per session, results per model and step
    count (a generation that stops before its last step is abandoned: recalibrated next time)."""

    kind = "layered profile"

    def __init__(self, owner, mode):
        super().__init__(mode)
        self.owner = owner

    def auto(self, call) -> bool:
        # calibrate="first" profiles only while the runtime follows plans (not while profile()
        # drives it)
        return super().auto(call) and self.owner.mode == "plan"

    def begin(self, call) -> None:
        call.session.data.update(proxy_rows=[], proxy_prev=None, proxy_first=call.step, proxy_n=call.num_steps,
                                 proxy_broken=False)

    def record(self, call, args, outputs, state) -> None:
        """Slot 0 of a profiled step (``state``: the slot's residuals per span)."""
        d = call.session.data
        rows = d.get("proxy_rows")
        if call.slot != 0 or rows is None:
            return
        if call.step != d["proxy_first"] + len(rows):
            d["proxy_broken"] = True
            return
        cur = [[r.detach().float() for r in rs] if rs is not None else None for rs in state]
        prev = d["proxy_prev"]
        have = [not (prev is None or rs is None or prev[i] is None) for i, rs in enumerate(cur)]
        sq = [sum(float((a - b).pow(2).sum()) for a, b in zip(rs, prev[i])) if h else 0.0
              for i, (rs, h) in enumerate(zip(cur, have))]
        sq = host_sum(sq, self.owner.cp_group)      # each rank holds a shard: the norm of the whole
        rows.append([float(math.sqrt(v)) if h else None for v, h in zip(sq, have)])
        d["proxy_prev"] = cur

    def take(self) -> Optional[list]:
        """Stop the (single) active recording and return its table without using it
        (``profile()`` plans from its own measurements)."""
        if len(self.active) != 1:
            return None
        (session,) = self.active.values()
        self.active.clear()
        d = session.data
        d["calibrating"] = False
        rows = d.get("proxy_rows")
        return None if d.get("proxy_broken") or d.get("proxy_first", 0) != 0 else rows

    def end(self, session) -> Optional[Profile]:
        d = session.data
        rows, n, first = d.get("proxy_rows"), d.get("proxy_n"), d.get("proxy_first", 0)
        if rows is None or d.get("proxy_broken") or len(rows) < 2:
            return None
        last = first + len(rows) - 1
        if n is not None and last != n - 1 and not session.completed:
            return None                         # stopped early: abandoned
        n = n if n is not None else last + 1
        width = len(rows[0])
        table = [[None] * width] * first + rows + [[None] * width] * (n - 1 - last)
        return self.make_profile("residual", table)

    def make_profile(self, method: str, per_step: list, seconds: float = 0.0, **extra) -> Profile:
        """A :class:`Profile` from ``per_step[step][span index]`` (spans = reusable units)."""
        ug = self.owner.ug
        reusable = [u for u in ug.units if ug.unit_spans[u] is not None]
        n = len(per_step)
        delta = []
        for u in ug.units:
            if u not in reusable:
                delta.append([None] * n)
                continue
            k = reusable.index(u)
            delta.append([None if t == 0 else per_step[t][k] for t in range(n)])
        return Profile(ug.fingerprint, n, list(ug.units), method, delta, dag_to_json(ug.dag), seconds=seconds,
                       settings={"sizes": ug.sizes, "flops": {u: str(ug.costs[u].flops) for u in ug.units}}, **extra)

    def adopt(self, prof: Profile, source: str) -> None:
        """Use ``prof`` for every model at its step count (``profile()``)."""
        self.store(prof, source, None)

    def read(self, path: str):
        return load_file(path)

    def use(self, result, source: str, model) -> None:
        if source != "calibrated":        # (measured on this very graph: nothing to check)
            self.owner.check_file(result, source)
        self.store(result, source if source != "calibrated" else result.method, model)
        self.owner.prepare(result)
