"""similarity_topk: pick the r most redundant rows to skip (bipartite matching of the token,
frame and block caches, OmniCache §3.2–3.3), fused scoring and selection.

Rows of ``x [B, N, C]`` are split into *src* rows (candidates to skip) and *dst* rows (always
computed).  Each src row's redundancy is its best cosine similarity to a dst row — within its
patch for the hierarchical variant (a src row only matches dst rows of the same group).  The
``r`` src rows with the highest scores are skipped (their values will come from last step's
output, see :func:`unmerge`); all other rows are kept.  Returns ``(skip_idx [B, r],
keep_idx [B, N - r])``, int64, both sorted ascending, so the block computes the kept rows in
their original order and gathered positional tables stay aligned.

Splits (one mechanism for the three axes):

* :func:`token_split` — tokens of an ``h x w`` frame: one dst per ``cell x cell`` cell (ToMeSD's
  choice; ``offset`` picks which position of the cell, vary it per step for ToMeSD's randomness),
  every other token src.  ``patch=k`` cuts the frame into ``k x k`` patches and matches only within
  a patch (hierarchical caching, §3.3; the selection of r stays global across patches).
* :func:`frame_split` — rows of a sequence (frames in ``[B, T, H*W*C]``, or spatial positions in
  ``[B, H*W, T*C]`` for the block cache): every ``stride``-th row is dst.  The hierarchical frame
  cache (patch content per frame, ``[B*k*k, T, (H/k)*(W/k)*C]``) is a reshape done by the caller.
* any index lists: ``src_idx [S]``, ``dst_idx [D]`` (disjoint, no repeats), optional
  ``src_group [S]`` / ``dst_group [D]`` patch ids.

Ranking (kernel and reference agree exactly): scores descending; equal scores in src-list order;
``-0.0`` ranks as ``+0.0``; a src row with no dst row in its group scores ``-inf``.

Kernels (two launches, no host sync, no ``S x D`` matrix in memory):

1. ``_similarity_scores_kernel`` — per (tile of src rows, sample): src norms once, then for each
   dst tile the dot products ``tl.dot`` (fp16/bf16 on tensor cores with fp32 accumulation; fp32 in
   IEEE precision) and dst norms over C chunks, cosine, running max.  With groups, dst tiles that
   share no group with the src tile are skipped after loading their group ids (lists sorted by
   group, as :func:`token_split` makes them, skip almost everything; unsorted lists stay correct).
2. ``_select_kernel`` — one program per sample: finds the r-th largest score by a radix select
   (8 rounds of 4 bits) over order-preserving integer keys of the scores, marks the skipped rows
   (ties in list order), then a running prefix sum over the N rows writes both sorted index lists.
"""
from typing import NamedTuple, Optional

import torch

from ._common import (
    KernelArgumentError,
    KernelDTypeError,
    check_devices,
    check_index,
    check_tensor,
    interpreting,
    jit,
    next_pow2,
    tl,
    triton,
    triton_runs,
)

__all__ = ["Split", "frame_split", "similarity_scores", "similarity_scores_reference", "similarity_topk",
           "similarity_topk_reference", "token_split"]

EPS = 1e-6  # norms are clamped to at least EPS (as F.normalize), so zero rows score 0
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Split(NamedTuple):
    """A src/dst split of the rows of one axis (``similarity_topk(x, r, *split)``)."""

    src_idx: torch.Tensor  # [S] rows that may be skipped
    dst_idx: torch.Tensor  # [D] rows they are matched against (always kept)
    src_group: Optional[torch.Tensor] = None  # [S] patch id of each src row (hierarchical matching)
    dst_group: Optional[torch.Tensor] = None  # [D] patch id of each dst row


# ---------------------------------------------------------------------------------------------
# splits

def _complement(n: int, chosen: torch.Tensor) -> torch.Tensor:
    """Rows of ``range(n)`` not in ``chosen``, ascending (static shapes: traceable, no sync)."""
    flag = torch.zeros(n, dtype=torch.int8, device=chosen.device)
    flag[chosen] = 1
    return torch.argsort(flag, stable=True)[: n - chosen.numel()]


def _by_group(rows: torch.Tensor, groups: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.argsort(groups * n + rows)
    return rows[order], groups[order]


def token_split(h: int, w: int, *, cell: int = 2, offset: int = 0, patch: Optional[int] = None,
                device=None) -> Split:
    """Split the ``h*w`` tokens of a frame (row-major): one dst per ``cell x cell`` cell.

    ``offset`` in ``[0, cell*cell)`` is the dst's position in its cell (row-major).  Tokens of
    partial cells at the bottom/right edge are src.  ``patch=k`` adds groups: token ``(y, x)``
    is in patch ``(cy*k//(h//cell), cx*k//(w//cell))`` of a ``k x k`` grid, where ``(cy, cx)`` is
    its cell (edge tokens join the last cell), so every patch holds whole cells and so dst rows;
    both lists are then ordered by (patch, row).
    """
    for name, v in (("h", h), ("w", w), ("cell", cell)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise KernelArgumentError(f"token_split: {name} must be a positive int, got {v!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < cell * cell:
        raise KernelArgumentError(f"token_split: offset must be an int in [0, {cell * cell}), got {offset!r}")
    if h < cell or w < cell:
        raise KernelArgumentError(f"token_split: the frame ({h}x{w}) must hold at least one {cell}x{cell} cell")
    cells_y, cells_x = h // cell, w // cell
    if patch is not None and (isinstance(patch, bool) or not isinstance(patch, int)
                              or not 1 <= patch <= min(cells_y, cells_x)):
        raise KernelArgumentError(
            f"token_split: patch must be None or an int in [1, {min(cells_y, cells_x)}] (at most one patch per "
            f"{cell}x{cell} cell along each side), got {patch!r}")
    n = h * w
    dy, dx = divmod(offset, cell)
    ys = torch.arange(h // cell, device=device) * cell + dy
    xs = torch.arange(w // cell, device=device) * cell + dx
    dst = (ys[:, None] * w + xs[None, :]).reshape(-1)
    src = _complement(n, dst)
    if patch is None:
        return Split(src, dst)

    def group(rows):  # patches cut along cell boundaries, so each patch holds whole cells (and dst rows)
        cy = torch.clamp(rows // w // cell, max=cells_y - 1)
        cx = torch.clamp(rows % w // cell, max=cells_x - 1)
        return (cy * patch // cells_y) * patch + cx * patch // cells_x

    src, src_group = _by_group(src, group(src), n)
    dst, dst_group = _by_group(dst, group(dst), n)
    return Split(src, dst, src_group, dst_group)


def frame_split(n: int, *, stride: int = 2, offset: int = 0, device=None) -> Split:
    """Split ``n`` rows (frames, or spatial positions): rows ``offset, offset+stride, ...`` are dst."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise KernelArgumentError(f"frame_split: n must be a positive int, got {n!r}")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 2:
        raise KernelArgumentError(f"frame_split: stride must be an int >= 2 (one dst row per stride rows), got {stride!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < min(stride, n):
        raise KernelArgumentError(f"frame_split: offset must be an int in [0, {min(stride, n)}), got {offset!r}")
    dst = torch.arange(offset, n, stride, device=device)
    return Split(_complement(n, dst), dst)


# ---------------------------------------------------------------------------------------------
# kernels

@jit
def _similarity_scores_kernel(
    x_ptr, src_ptr, dst_ptr, sgrp_ptr, dgrp_ptr, score_ptr,
    N, S, D, C,
    stride_xb, stride_xn, stride_xc,
    eps,
    HAS_GROUPS: tl.constexpr, NATIVE_DOT: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    xb = x_ptr + b * stride_xb
    offs_s = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    smask = offs_s < S
    srow = tl.load(src_ptr + offs_s, mask=smask, other=0).to(tl.int64)
    sload = smask & (srow >= 0) & (srow < N)
    if HAS_GROUPS:
        sgrp = tl.load(sgrp_ptr + offs_s, mask=smask, other=-1)
    # src norms once; the dot products below reuse them for every dst tile
    sq = tl.full([BLOCK_S], 0.0, tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        xs = tl.load(xb + srow[:, None] * stride_xn + offs_c[None, :] * stride_xc,
                     mask=sload[:, None] & (offs_c < C)[None, :], other=0.0).to(tl.float32)
        sq += tl.sum(xs * xs, axis=1)
    inv_s = 1.0 / tl.maximum(tl.sqrt(sq), eps)
    best = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        pair = smask[:, None] & dmask[None, :]
        if HAS_GROUPS:
            dgrp = tl.load(dgrp_ptr + offs_d, mask=dmask, other=-2)
            pair = pair & (sgrp[:, None] == dgrp[None, :])
        if tl.max(pair.to(tl.int32)) > 0:
            drow = tl.load(dst_ptr + offs_d, mask=dmask, other=0).to(tl.int64)
            dload = dmask & (drow >= 0) & (drow < N)
            dot = tl.full([BLOCK_S, BLOCK_D], 0.0, tl.float32)
            dq = tl.full([BLOCK_D], 0.0, tl.float32)
            for c0 in range(0, C, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                cmask = offs_c < C
                xs = tl.load(xb + srow[:, None] * stride_xn + offs_c[None, :] * stride_xc,
                             mask=sload[:, None] & cmask[None, :], other=0.0)
                xd = tl.load(xb + drow[:, None] * stride_xn + offs_c[None, :] * stride_xc,
                             mask=dload[:, None] & cmask[None, :], other=0.0)
                xdf = xd.to(tl.float32)
                dq += tl.sum(xdf * xdf, axis=1)
                if NATIVE_DOT:
                    dot = tl.dot(xs, tl.trans(xd), acc=dot)
                else:
                    dot = tl.dot(xs.to(tl.float32), tl.trans(xdf), acc=dot, input_precision="ieee")
            inv_d = 1.0 / tl.maximum(tl.sqrt(dq), eps)
            sim = dot * inv_s[:, None] * inv_d[None, :]
            sim = tl.where(pair, sim, float("-inf"))
            best = tl.maximum(best, tl.max(sim, axis=1))
    best = tl.where(best == 0.0, 0.0, best)  # -0.0 ranks as +0.0 (the keys below would order them)
    tl.store(score_ptr + b * S + offs_s, best, mask=smask)


@jit
def _select_kernel(
    score_ptr, src_ptr, flag_ptr, skip_ptr, keep_ptr,
    S, N, r,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    digits = tl.arange(0, 16)
    scores = score_ptr + b * S
    flags = flag_ptr + b * N
    for n0 in range(0, N, BLOCK):
        tl.store(flags + n0 + offs, tl.full([BLOCK], 0, tl.int32), mask=n0 + offs < N)
    tl.debug_barrier()
    # Radix select of the r-th largest key, 4 bits a round from the top.  Keys map float32 bits to
    # [0, 2**32) preserving order (negative floats: flip the 31 low bits; then offset by 2**31).
    # `prefix` holds the threshold's digits so far, `need` how many keys still to take among the
    # keys that share them; a round counts those keys per next digit and picks the digit where
    # the count from the top reaches `need`.
    prefix = tl.full([], 0, tl.int64)
    need = tl.full([], 0, tl.int32) + r
    for rnd in range(8):
        shift = 28 - 4 * rnd
        counts = tl.full([16], 0, tl.int32)
        for s0 in range(0, S, BLOCK):
            m = s0 + offs < S
            bits = tl.load(scores + s0 + offs, mask=m, other=0.0).to(tl.int32, bitcast=True)
            key = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64) + 2147483648
            match = m & ((key >> (shift + 4)) == prefix)
            hit = match[:, None] & (((key >> shift) & 15)[:, None] == digits[None, :])
            counts += tl.sum(hit.to(tl.int32), axis=0)
        from_top = tl.cumsum(counts, 0, reverse=True)  # keys with this digit or a higher one
        # the highest digit whose from_top reaches `need`, packed with the count above it (one
        # reduction: each standard-library call costs ~2 ms under the interpreter)
        best = tl.max(tl.where(from_top >= need, digits.to(tl.int64) * 4294967296 + (from_top - counts), -1))
        need -= (best & 0xFFFFFFFF).to(tl.int32)
        prefix = prefix * 16 + (best >> 32)
    # skip every key above the threshold and the first `need` keys equal to it (src-list order)
    seen = tl.full([], 0, tl.int32)
    for s0 in range(0, S, BLOCK):
        m = s0 + offs < S
        bits = tl.load(scores + s0 + offs, mask=m, other=0.0).to(tl.int32, bitcast=True)
        key = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64) + 2147483648
        eq = (m & (key == prefix)).to(tl.int32)
        rank = seen + tl.cumsum(eq, 0) - eq
        row = tl.load(src_ptr + s0 + offs, mask=m, other=-1).to(tl.int64)
        skip = ((m & (key > prefix)) | ((eq == 1) & (rank < need))) & (row >= 0) & (row < N)
        tl.store(flags + row, tl.full([BLOCK], 1, tl.int32), mask=skip)
        seen += tl.sum(eq)
    tl.debug_barrier()
    # compaction: a skipped row goes to skip_idx[#skipped before it], a kept one to keep_idx[n - that]
    done = tl.full([], 0, tl.int32)
    for n0 in range(0, N, BLOCK):
        n = n0 + offs
        m = n < N
        f = tl.load(flags + n, mask=m, other=0)
        before = done + tl.cumsum(f, 0) - f
        tl.store(skip_ptr + b * r + before, n.to(tl.int64), mask=m & (f == 1))
        tl.store(keep_ptr + b * (N - r) + (n - before), n.to(tl.int64), mask=m & (f == 0))
        done += tl.sum(f)


# ---------------------------------------------------------------------------------------------
# checks, references, launchers

def _check_split(op, x, src_idx, dst_idx, src_group, dst_group) -> None:
    check_tensor(op, "x", x, "[B, N, C] rows to score")
    if x.dtype not in _FLOAT_DTYPES:
        raise KernelDTypeError(f"{op}: x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.ndim != 3:
        raise KernelArgumentError(
            f"{op}: x must be [B, N, C] (reshape frames to [B, T, H*W*C], positions to [B, H*W, T*C]), "
            f"got shape {tuple(x.shape)}")
    check_index(op, "src_idx", src_idx, "[S]")
    check_index(op, "dst_idx", dst_idx, "[D]")
    for name, t in (("src_idx", src_idx), ("dst_idx", dst_idx)):
        if t.ndim != 1:
            raise KernelArgumentError(f"{op}: {name} must be 1-D (the same split for every sample), got shape {tuple(t.shape)}")
    if (src_group is None) != (dst_group is None):
        raise KernelArgumentError(f"{op}: give both src_group and dst_group (hierarchical matching) or neither")
    if src_group is not None:
        check_index(op, "src_group", src_group, f"[{src_idx.shape[0]}]")
        check_index(op, "dst_group", dst_group, f"[{dst_idx.shape[0]}]")
        if tuple(src_group.shape) != tuple(src_idx.shape):
            raise KernelArgumentError(
                f"{op}: src_group must be [{src_idx.shape[0]}] (one group per src row), got shape {tuple(src_group.shape)}")
        if tuple(dst_group.shape) != tuple(dst_idx.shape):
            raise KernelArgumentError(
                f"{op}: dst_group must be [{dst_idx.shape[0]}] (one group per dst row), got shape {tuple(dst_group.shape)}")
    check_devices(op, x=x, src_idx=src_idx, dst_idx=dst_idx, src_group=src_group, dst_group=dst_group)


def _check_topk(x, r, src_idx, dst_idx, src_group, dst_group) -> None:
    op = "similarity_topk"
    _check_split(op, x, src_idx, dst_idx, src_group, dst_group)
    s = src_idx.shape[0]
    if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= s:
        raise KernelArgumentError(f"{op}: r must be an int in [0, {s}] (at most the number of src rows), got {r!r}")
    if r > 0 and dst_idx.shape[0] == 0:
        raise KernelArgumentError(f"{op}: dst_idx is empty, so there is nothing to match src rows against")


def similarity_scores_reference(x, src_idx, dst_idx, src_group=None, dst_group=None) -> torch.Tensor:
    """Plain-torch :func:`similarity_scores` (normalise, batched matmul, mask, max)."""
    _check_split("similarity_scores", x, src_idx, dst_idx, src_group, dst_group)
    return _scores_reference(x, src_idx, dst_idx, src_group, dst_group)


def _scores_reference(x, src_idx, dst_idx, src_group, dst_group) -> torch.Tensor:
    xf = x.double() if x.dtype == torch.float64 else x.float()
    xn = xf / xf.norm(dim=-1, keepdim=True).clamp_min(EPS)
    sim = xn[:, src_idx.long()] @ xn[:, dst_idx.long()].transpose(1, 2)
    if src_group is not None:
        sim = sim.masked_fill(src_group[:, None] != dst_group[None, :], float("-inf"))
    if sim.shape[-1] == 0:
        best = sim.new_full(sim.shape[:2], float("-inf"))
    else:
        best = sim.amax(dim=-1)
    return torch.where(best == 0, torch.zeros_like(best), best).float()


def _select_reference(scores: torch.Tensor, src_idx: torch.Tensor, n: int, r: int):
    batch = scores.shape[0]
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :r]
    flags = torch.zeros(batch, n, dtype=torch.int8, device=scores.device)
    flags.scatter_(1, src_idx.long()[order], 1)
    perm = torch.sort(flags, dim=1, stable=True).indices  # kept rows ascending, then skipped ascending
    # clones, not .contiguous(): with one sample both slices are already contiguous views of
    # perm, and a custom op's outputs may not alias each other
    return perm[:, n - r:].clone(memory_format=torch.contiguous_format), \
        perm[:, : n - r].clone(memory_format=torch.contiguous_format)


def similarity_topk_reference(x, r, src_idx, dst_idx, src_group=None, dst_group=None):
    """Plain-torch :func:`similarity_topk`: scores, stable sort, scatter flags, stable sort."""
    _check_topk(x, r, src_idx, dst_idx, src_group, dst_group)
    scores = _scores_reference(x, src_idx, dst_idx, src_group, dst_group)
    return _select_reference(scores, src_idx, x.shape[1], r)


def _score_tiles(s: int, d: int, c: int, itemsize: int) -> tuple[int, int, int, int]:
    if interpreting():
        def fit(v, cap):
            return max(16, min(next_pow2(v), cap))
        return fit(s, 128), fit(d, 128), fit(c, 256), 1
    return 64, max(16, min(next_pow2(d), 64)), 64 if itemsize <= 2 else 32, 4


def _scores_triton(x, src_idx, dst_idx, src_group, dst_group) -> torch.Tensor:
    batch, n, c = x.shape
    s, d = src_idx.shape[0], dst_idx.shape[0]
    scores = torch.empty(batch, s, dtype=torch.float32, device=x.device)
    if scores.numel() == 0:
        return scores
    has_groups = src_group is not None
    block_s, block_d, block_c, warps = _score_tiles(s, d, c, x.dtype.itemsize)
    native = x.dtype in (torch.float16, torch.bfloat16) and not interpreting()
    src_idx, dst_idx = src_idx.contiguous(), dst_idx.contiguous()
    if has_groups:
        sgrp, dgrp = src_group.contiguous(), dst_group.contiguous()
    else:
        sgrp, dgrp = src_idx, dst_idx  # unused (HAS_GROUPS=False)
    _similarity_scores_kernel[(triton.cdiv(s, block_s), batch)](
        x, src_idx, dst_idx, sgrp, dgrp, scores,
        n, s, d, c, *x.stride(), EPS,
        HAS_GROUPS=has_groups, NATIVE_DOT=native,
        BLOCK_S=block_s, BLOCK_D=block_d, BLOCK_C=block_c, num_warps=warps,
    )
    return scores


def _select_block(s: int, n: int) -> int:
    """BLOCK of the selection kernel (its only program per sample loops over S and N in tiles)."""
    cap = (1 << 14) if interpreting() else 1024
    return max(16, min(next_pow2(max(s, n)), cap))


def _select_triton(scores, src_idx, n, r):
    batch, s = scores.shape
    skip = torch.empty(batch, r, dtype=torch.int64, device=scores.device)
    keep = torch.empty(batch, n - r, dtype=torch.int64, device=scores.device)
    flags = torch.empty(batch, n, dtype=torch.int32, device=scores.device)
    block = _select_block(s, n)
    _select_kernel[(batch,)](scores, src_idx.contiguous(), flags, skip, keep, s, n, r,
                             BLOCK=block, num_warps=4 if block <= 1024 else 8)
    return skip, keep


@torch.library.custom_op("omnicompile::similarity_topk", mutates_args=())
def _similarity_topk_op(x: torch.Tensor, r: int, src_idx: torch.Tensor, dst_idx: torch.Tensor,
                        src_group: Optional[torch.Tensor] = None,
                        dst_group: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    _check_topk(x, r, src_idx, dst_idx, src_group, dst_group)
    batch, n = x.shape[0], x.shape[1]
    if r == 0 or batch == 0:
        keep = torch.arange(n, device=x.device).expand(batch, n).contiguous()
        return torch.empty(batch, r, dtype=torch.int64, device=x.device), keep
    if not triton_runs(x) or x.dtype == torch.float64:
        return similarity_topk_reference(x, r, src_idx, dst_idx, src_group, dst_group)
    scores = _scores_triton(x, src_idx, dst_idx, src_group, dst_group)
    return _select_triton(scores, src_idx, n, r)


@_similarity_topk_op.register_fake
def _similarity_topk_fake(x, r, src_idx, dst_idx, src_group=None, dst_group=None):
    _check_topk(x, r, src_idx, dst_idx, src_group, dst_group)
    batch, n = x.shape[0], x.shape[1]
    return (x.new_empty(batch, r, dtype=torch.int64), x.new_empty(batch, n - r, dtype=torch.int64))


def similarity_scores(x, src_idx, dst_idx, src_group=None, dst_group=None) -> torch.Tensor:
    """Each src row's best cosine similarity to a dst row (of its group), ``[B, S]`` float32.

    The scoring half of :func:`similarity_topk` (Triton where it runs), for diagnostics and tests;
    not a custom op.
    """
    _check_split("similarity_scores", x, src_idx, dst_idx, src_group, dst_group)
    if not triton_runs(x) or x.dtype == torch.float64:
        return similarity_scores_reference(x, src_idx, dst_idx, src_group, dst_group)
    return _scores_triton(x, src_idx, dst_idx, src_group, dst_group)


def similarity_topk(x: torch.Tensor, r: int, src_idx: torch.Tensor, dst_idx: torch.Tensor,
                    src_group: Optional[torch.Tensor] = None, dst_group: Optional[torch.Tensor] = None):
    """The r most redundant src rows of ``x`` and the kept rows (``torch.ops.omnicompile.similarity_topk``).

    Args:
        x: float ``[B, N, C]`` (float16, bfloat16, float32; float64 runs the reference).
        r: how many src rows to skip, ``0 <= r <= S``.
        src_idx, dst_idx: int ``[S]`` / ``[D]`` rows (see :func:`token_split`, :func:`frame_split`).
        src_group, dst_group: optional int ``[S]`` / ``[D]`` patch ids: match only within a patch.

    Returns:
        ``(skip_idx [B, r], keep_idx [B, N - r])``, int64, each sorted ascending; together a
        permutation of ``range(N)``.  Typical use: ``similarity_topk(x, r, *token_split(h, w))``.
    """
    _check_topk(x, r, src_idx, dst_idx, src_group, dst_group)
    return torch.ops.omnicompile.similarity_topk(x, r, src_idx, dst_idx, src_group, dst_group)
