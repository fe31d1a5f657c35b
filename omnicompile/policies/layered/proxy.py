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
from omnicompile.policies.layered.files import Profile, dag_to_json, load_file

__all__ = ["ResidualProxy"]


class ResidualProxy(Calibrator):
    kind = "layered profile"

    def __init__(self, owner, mode):
        super().__init__(mode)
        self.owner = owner
        self.rows: Optional[list] = None       # [step][span]: the recording of the active generation
        self.prev: Optional[list] = None

    def auto(self) -> bool:
        # calibrate="first" profiles only while the runtime follows a plan it does not have yet
        # (not while profile() drives it)
        return super().auto() and self.owner.mode == "plan" and self.owner.plan is None

    def begin(self) -> None:
        self.owner.use_units("compute")
        self.rows, self.prev = [], None

    def record(self, step, slot, args, outputs, state) -> None:
        """Slot 0 of a profiled step (``state``: the slot's residuals per span)."""
        if slot != 0 or self.rows is None or step != len(self.rows):
            return
        cur = [[r.detach().float() for r in rs] if rs is not None else None for rs in state]
        prev = self.prev
        row = []
        for i, rs in enumerate(cur):
            if prev is None or rs is None or prev[i] is None:
                row.append(None)
            else:
                row.append(float(math.sqrt(sum(float((a - b).pow(2).sum()) for a, b in zip(rs, prev[i])))))
        self.rows.append(row)
        self.prev = cur

    def take(self) -> Optional[list]:
        """Stop recording and return the table without using it (``profile()`` plans from its
        own measurements)."""
        rows = self.rows
        self.rows, self.prev, self.active = None, None, False
        return rows

    def end(self) -> Optional[Profile]:
        rows = self.take()
        if rows is None or len(rows) < 2:
            self.owner.use_plan()
            return None
        return self.make_profile("residual", rows)

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
        """Plan from ``prof`` without switching the runtime to the plan yet (``profile()``
        keeps every graph computing until all are profiled)."""
        self.owner.set_profile(prof, source, switch=False)
        self.result, self.source = prof, source

    def read(self, path: str):
        return load_file(path)

    def use(self, result, source: str) -> None:
        if source == "calibrated":        # measured on this very graph: planned as it is
            self.owner.set_profile(result, result.method)
        else:
            self.owner.use_file(result, source)
        self.result, self.source = result, source
