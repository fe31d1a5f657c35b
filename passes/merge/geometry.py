"""Where the merged rows come from: the latent's geometry and the src/dst splits.

:func:`find_geometry` reads the geometry from the patch embedding (see "Placement" in the
package docstring); :func:`split_for` makes the src/dst splits of an axis with the kernels'
:func:`~omnicompile.kernels.token_split` / :func:`~omnicompile.kernels.frame_split`, one per
rotation phase with ``merge_rotate`` (:data:`ROTATION`; see "Staleness" in the package
docstring).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.fx as fx

from ..common import Reason, example_value, is_param_placeholder
from .layout import op_name

__all__ = ["Geometry", "find_geometry", "geo_tokens", "ROTATION", "split_for"]


@dataclasses.dataclass
class Geometry:
    """Where the latent's rows come from (read from the patch embedding)."""

    kind: str                  # "image" | "video" | "joint" | "packed"
    batch: int
    frames: Optional[int]
    h: Optional[int]
    w: Optional[int]

    @property
    def tokens(self) -> int:
        """Rows of the token axis: tokens of a frame (image, video), of the clip (joint)."""
        if self.kind == "joint":
            return self.frames * self.h * self.w
        return self.h * self.w

    def describe(self) -> dict:
        return dataclasses.asdict(self)


def _user_inputs(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder" and not is_param_placeholder(n)]


def find_geometry(gm: fx.GraphModule) -> tuple[Optional[Geometry], Optional[Reason]]:
    """The latent's geometry from the patch embedding before the first block ("Placement" in
    the package docstring)."""
    first = next((n for n in gm.graph.nodes if "omni.block" in n.meta), None)
    if first is None:
        return None, Reason("merge_no_blocks", "no block to wrap")
    conv = None
    for n in gm.graph.nodes:
        if n is first:
            break
        if op_name(n) in ("conv2d", "conv3d") and isinstance(example_value(n), torch.Tensor):
            conv = n
    users = [(n, example_value(n)) for n in _user_inputs(gm)]
    users = [(n, v) for n, v in users if isinstance(v, torch.Tensor)]
    if conv is not None:
        s = tuple(example_value(conv).shape)
        if op_name(conv) == "conv3d" and len(s) == 5:
            return Geometry("joint", s[0], s[2], s[3], s[4]), None
        if len(s) == 4:
            for n, v in users:
                if v.dim() == 5 and v.shape[0] * v.shape[2] == s[0] and v.shape[2] > 1:
                    return Geometry("video", int(v.shape[0]), int(v.shape[2]), s[2], s[3]), None
            return Geometry("image", s[0], None, s[2], s[3]), None
    lat = [(n, v) for n, v in users if v.dim() == 3 and "hidden_states" in n.name and "encoder" not in n.name]
    if len(lat) == 1:
        v = lat[0][1]
        return _packed(int(v.shape[0]), int(v.shape[1])), None
    return None, Reason("merge_no_geometry", "no patch embedding (conv2d/conv3d) or packed latent input "
                        "[B, N, C] found: cannot tell which rows are tokens")


def _packed(batch: int, n: int) -> Geometry:
    g = Geometry("packed", batch, None, None, None)
    g.packed_tokens = n  # type: ignore[attr-defined]
    return g


def geo_tokens(geo: Geometry) -> int:
    """Rows of the token axis, packed latents (no grid) included."""
    return getattr(geo, "packed_tokens", None) or geo.tokens


#: ``merge_rotate``: the dst position cycled through, per step, in each ``2x2`` cell (row-major
#: offsets: diagonal first, so two consecutive steps differ in both coordinates), along every
#: other frame, and in each run of 4 rows of a packed (1-D) axis
ROTATION = {"cell": (0, 3, 1, 2), "frame": (0, 1), "packed": (0, 2, 1, 3)}


def split_for(axis: str, geo: Geometry, n_rows: int, patch: Optional[int], rotate: bool = False) -> tuple:
    """(splits, text): the src/dst splits of the axis, one per rotation phase (one without
    ``rotate``), each ``(src, dst, src_group, dst_group)`` as lists.  Phases whose lists are not
    as long as phase 0's (a dst offset past the last row of an odd count) are left out, so every
    phase fits the same compiled graph."""
    from ... import kernels as K

    if axis == "frame":
        make, kind = (lambda o: K.frame_split(n_rows, stride=2, offset=o, device="cpu")), "frame"
        text = "every other frame is dst" + (" (patch ignored: frames are matched whole)" if patch else "")
    elif geo.kind == "packed":
        make, kind = (lambda o: K.frame_split(n_rows, stride=4, offset=o, device="cpu")), "packed"
        text = "1-D: one dst per 4 rows (no patch grid in the graph)" + (" (patch ignored)" if patch else "")
    else:
        h, w = (geo.frames * geo.h, geo.w) if (axis == "token" and geo.kind == "joint") else (geo.h, geo.w)
        make, kind = (lambda o: K.token_split(h, w, cell=2, offset=o, patch=patch, device="cpu")), "cell"
        text = f"one dst per 2x2 cell of the {h}x{w} grid" + (f", matched within {patch}x{patch} patches" if patch else "")
    offsets = ROTATION[kind] if rotate else (0,)
    splits = []
    for o in offsets:
        try:
            sp = make(o)
        except ValueError:
            if o == 0:
                raise
            continue        # e.g. fewer rows than the stride: no such dst offset
        sp = tuple(None if t is None else t.tolist() for t in sp)
        if splits and any((a is None) != (b is None) or (a is not None and len(a) != len(b))
                          for a, b in zip(sp, splits[0])):
            continue
        splits.append(sp)
    if len(splits) > 1:
        text += f", dst rotated over {len(splits)} offsets"
    return splits, text
