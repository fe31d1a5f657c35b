"""The options of the token, frame and block caches: :class:`MergeOptions`.

One set of names and defaults: the same as the user-facing options of the same names (the
package's config), with the same validation, so a config hands its values over field by field.
This module imports nothing of omnicompile's above ``passes`` (see ``passes/README.md``).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from ..errors import OptionError

__all__ = ["AXES", "PLACEMENTS", "FILLS", "LAYERS", "AUTO_RATIOS", "MergeOptions"]

AXES = ("token", "frame", "block")
#: the ratio ``"auto"`` stands for (the paper's Latte ratios: r_t 0.2, r_f 0.3, r_b 0.4); with
#: ``"auto"`` a region is wrapped only where the cost model predicts a wall-time saving
AUTO_RATIOS = {"token": 0.2, "frame": 0.3, "block": 0.4}
#: ``merge_placement``: "paper" (S2T/T2S) or "swapped" (the paper's S2S/T2T ablation)
PLACEMENTS = ("paper", "swapped")
#: ``merge_fill``: where a skipped row's value comes from
FILLS = ("auto", "output", "residual", "interpolate")
#: the layer type each cache wraps, per placement (None: no such placement)
LAYERS = {"paper": {"token": "spatial", "frame": "spatial", "block": "temporal"},
          "swapped": {"token": None, "frame": "temporal", "block": "spatial"}}


@dataclasses.dataclass(frozen=True)
class MergeOptions:
    """What the token / frame / block caches do (see the package docstring).  Validated on
    construction: a wrong type or value raises :class:`~omnicompile.passes.errors.OptionError`
    naming the field, the value and what is allowed."""

    #: token cache (OmniCache, any policy): fraction of the tokens of a frame skipped in the
    #: wrapped spatial blocks and filled from the previous step (0 = off; the paper: <= 0.4).
    #: All three ratios also take ``"auto"``: the ratio of :data:`AUTO_RATIOS`, on the blocks
    #: where the calibrated cost model (:mod:`omnicompile.merge_cost`) predicts the merged
    #: region plus its scoring / gather / scatter to be faster than the region in full
    token_ratio: float = 0.0
    #: frame cache: fraction of the frames skipped in the spatial blocks of a video model
    frame_ratio: float = 0.0
    #: block cache: fraction of the spatial positions skipped in the temporal blocks
    block_ratio: float = 0.0
    #: token / block caches: match tokens only within k x k patches (hierarchical caching)
    patch: Optional[int] = None
    #: token / frame / block caches: also merge the feed-forward (False: the paper's choice,
    #: only the attention part of a block runs on the kept rows)
    merge_ffn: bool = False
    #: token / frame / block caches: blocks at each end of a block list never merged
    merge_exclude: int = 1
    #: token / frame / block caches: what a skipped row gets, "auto" ("residual" where the
    #: region's output is a residual stream of its input, else "output"; residual measured
    #: 3-17 dB better on the video reference), "output" (last step's output of
    #: the wrapped region), "residual" (this step's input + last step's output - input) or
    #: "interpolate" (this step's output of the dst row it matched: no cache, the paper's
    #: interpolation baseline)
    merge_fill: str = "auto"
    #: token / frame / block caches: "paper" (S2T/T2S: token and frame caches in spatial layers,
    #: block cache in temporal ones) or "swapped" (the paper's S2S/T2T ablation: frame cache in
    #: temporal layers, block cache in spatial ones; the token cache is refused)
    merge_placement: str = "paper"
    #: token / frame / block caches: the src/dst split changes from step to step (the dst
    #: position in each 2x2 cell, the dst frame parity, cycle with the call index), so no row
    #: is src at every step and none keeps step 0's value for the whole generation
    merge_rotate: bool = True
    #: token / frame / block caches: every N-th call of a generation (k % N == 0; the step index
    #: with policy "none", computed steps with a step policy) runs the full graph, refreshing
    #: every cached row; None = only the first call
    merge_refresh: Optional[int] = None

    def __post_init__(self):
        for name in ("token_ratio", "frame_ratio", "block_ratio"):
            v = getattr(self, name)
            if v == "auto":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise OptionError(name, v, "must be a number in [0.0, 1.0) or 'auto'")
            if not 0.0 <= v < 1.0:      # written so that NaN fails too (inf fails the bound)
                raise OptionError(name, v, "must be in [0.0, 1.0) or 'auto'")
        if self.patch is not None:
            _check_int("patch", self.patch)
            if self.patch < 1:
                raise OptionError("patch", self.patch, "must be None or an integer >= 1 (k x k patches)")
        if not isinstance(self.merge_ffn, bool):
            raise OptionError("merge_ffn", self.merge_ffn, "must be True or False")
        _check_int("merge_exclude", self.merge_exclude)
        if self.merge_exclude < 0:
            raise OptionError("merge_exclude", self.merge_exclude, "must be an integer >= 0")
        _check_choice("merge_fill", self.merge_fill, FILLS)
        _check_choice("merge_placement", self.merge_placement, PLACEMENTS)
        if not isinstance(self.merge_rotate, bool):
            raise OptionError("merge_rotate", self.merge_rotate, "must be True or False")
        if self.merge_refresh is not None:
            _check_int("merge_refresh", self.merge_refresh)
            if self.merge_refresh < 1:
                raise OptionError("merge_refresh", self.merge_refresh,
                                  "must be None (only the first call is full) or an integer >= 1 (a full call "
                                  "every N calls)")

    def ratio(self, axis: str) -> float:
        """The fraction of rows the ``axis`` cache skips (``"auto"``: :data:`AUTO_RATIOS`)."""
        v = getattr(self, f"{axis}_ratio")
        return AUTO_RATIOS[axis] if v == "auto" else float(v)

    def auto(self, axis: str) -> bool:
        """Whether the ``axis`` cache runs only where the cost model predicts a saving."""
        return getattr(self, f"{axis}_ratio") == "auto"

    @property
    def enabled(self) -> bool:
        """Whether any of the three caches is on (a ratio above 0, or ``"auto"``)."""
        return any(self.ratio(a) > 0 for a in AXES)


def _check_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError(name, value, "must be of type int")


def _check_choice(name: str, value, allowed) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise OptionError(name, value, f"allowed: {', '.join(allowed)}")
