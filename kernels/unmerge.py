"""unmerge: write the rows a block computed back into last step's output (the "unmerge" of the
token, frame and block caches — reuse, not ToMe's broadcast of averages).

    out[b, n] = computed[b, k]   if keep_idx[b, k] == n
              = cache[b, n]      otherwise (a skipped row keeps last step's value)

Two forms:

* :func:`unmerge` (``omnicompile::unmerge``, functional): one pass writes every row of a new
  output, each from exactly one source, so the copy of the cached rows is fused with the scatter
  (traffic: read N rows, write N rows; ``cache.clone()`` + ``index_put`` moves N + K more).
  Each program owns a tile of output rows (all features, in chunks) and finds which of them are
  kept by scanning ``keep_idx`` in tiles; a tile whose [min, max] misses the program's rows is
  skipped after one coalesced load, so for sorted indices (what :func:`similarity_topk` returns)
  only one or two tiles are compared, yet any order of unique indices gives the right answer.
* :func:`unmerge_into` (``omnicompile::unmerge_into``, ``mutates_args=("cache",)``): scatters the
  computed rows into ``cache`` in place (read K rows, write K rows) — for a runtime that owns the
  cache buffer and hands it on as the next step's cache.

Shapes: ``computed [B, K, ...]``, ``keep_idx [B, K]`` or ``[K]`` (same rows for every sample; a
batch of 1 broadcasts), ``cache [B, N, ...]`` with ``computed``'s batch, trailing dims and dtype.
Indices must be unique (a repeated index leaves which computed row wins unspecified) and are not
range-checked on the device; the kernels ignore indices outside ``[0, N)``, the references raise.
"""
import torch

from ._common import (
    KernelArgumentError,
    KernelDTypeError,
    as_bits,
    bits_dtype,
    check_devices,
    check_index,
    check_tensor,
    data_tiles,
    feature_size,
    interpreting,
    jit,
    next_pow2,
    tl,
    triton,
    triton_runs,
)

__all__ = ["unmerge", "unmerge_reference", "unmerge_into", "unmerge_into_reference"]


@jit
def _unmerge_kernel(
    comp_ptr, idx_ptr, cache_ptr, out_ptr,
    K, N, C,
    stride_pb, stride_pk, stride_pc,
    stride_ib, stride_ik,
    stride_cb, stride_cn, stride_cc,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    n_lo = pid_n * BLOCK_N
    offs_n = n_lo + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    # pos[i] = k with keep_idx[b, k] == offs_n[i], or -1 (the row keeps the cache's value); found
    # once per row tile, then used for every feature chunk
    pos = tl.full([BLOCK_N], -1, tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < K
        idx = tl.load(idx_ptr + b * stride_ib + offs_k * stride_ik, mask=kmask, other=-1)
        lo = tl.min(tl.where(kmask, idx, N))
        hi = tl.max(idx)
        if (hi >= n_lo) & (lo < n_lo + BLOCK_N):
            hit = idx[None, :] == offs_n[:, None]
            pos = tl.maximum(pos, tl.max(tl.where(hit, offs_k[None, :], -1), axis=1))
    kept = (pos >= 0)[:, None]
    fresh_rows = comp_ptr + b * stride_pb + pos.to(tl.int64)[:, None] * stride_pk
    old_rows = cache_ptr + b * stride_cb + offs_n.to(tl.int64)[:, None] * stride_cn
    out_rows = out_ptr + (b * N + offs_n[:, None]) * C
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        tile = nmask[:, None] & (offs_c < C)[None, :]
        fresh = tl.load(fresh_rows + offs_c[None, :] * stride_pc, mask=tile & kept, other=0)
        old = tl.load(old_rows + offs_c[None, :] * stride_cc, mask=tile & (pos < 0)[:, None], other=0)
        tl.store(out_rows + offs_c[None, :], tl.where(kept, fresh, old), mask=tile)


@jit
def _unmerge_into_kernel(
    comp_ptr, idx_ptr, cache_ptr,
    K, N, C,
    stride_pb, stride_pk, stride_pc,
    stride_ib, stride_ik,
    stride_cb, stride_cn, stride_cc,
    BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    kmask = offs_k < K
    cmask = offs_c < C
    idx = tl.load(idx_ptr + b * stride_ib + offs_k * stride_ik, mask=kmask, other=-1).to(tl.int64)
    valid = kmask & (idx >= 0) & (idx < N)
    rows = tl.load(
        comp_ptr + b * stride_pb + offs_k.to(tl.int64)[:, None] * stride_pk + offs_c[None, :] * stride_pc,
        mask=kmask[:, None] & cmask[None, :], other=0)
    dst = cache_ptr + b * stride_cb + idx[:, None] * stride_cn + offs_c[None, :] * stride_cc
    tl.store(dst, rows, mask=valid[:, None] & cmask[None, :])


def _check_unmerge(op: str, computed, keep_idx, cache) -> None:
    check_tensor(op, "computed", computed, "the block's output on the kept rows, [B, K, ...]")
    check_index(op, "keep_idx", keep_idx, "[B, K] or [K]")
    check_tensor(op, "cache", cache, "last step's output on all rows, [B, N, ...]")
    if computed.ndim < 2:
        raise KernelArgumentError(f"{op}: computed must be [B, K, ...] (at least 2 dims), got shape {tuple(computed.shape)}")
    b, k, rest = computed.shape[0], computed.shape[1], tuple(computed.shape[2:])
    if cache.ndim != computed.ndim or cache.shape[0] != b or tuple(cache.shape[2:]) != rest:
        want = ", ".join(str(s) for s in (b, "N", *rest))
        raise KernelArgumentError(
            f"{op}: cache must be [{want}] (computed's batch and trailing dims), got shape {tuple(cache.shape)}")
    if cache.shape[1] < k:
        raise KernelArgumentError(
            f"{op}: cache has {cache.shape[1]} rows but computed has {k}; computed must hold at most N rows")
    if computed.dtype != cache.dtype:
        raise KernelDTypeError(f"{op}: computed and cache must have one dtype, got {computed.dtype} and {cache.dtype}")
    if keep_idx.ndim not in (1, 2) or keep_idx.shape[-1] != k or (keep_idx.ndim == 2 and keep_idx.shape[0] not in (b, 1)):
        raise KernelArgumentError(
            f"{op}: keep_idx must be [{b}, {k}] or [{k}] (one index per computed row), got shape {tuple(keep_idx.shape)}")
    check_devices(op, computed=computed, keep_idx=keep_idx, cache=cache)


def _batched_index(keep_idx: torch.Tensor, batch: int) -> torch.Tensor:
    idx = keep_idx.long()
    return idx.unsqueeze(0).expand(batch, -1) if idx.ndim == 1 else idx.expand(batch, -1)


def unmerge_reference(computed: torch.Tensor, keep_idx: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """Plain-torch :func:`unmerge`: ``cache.clone()`` then an indexed write of the computed rows."""
    _check_unmerge("unmerge", computed, keep_idx, cache)
    batch = computed.shape[0]
    out = cache.clone(memory_format=torch.contiguous_format)
    rows = torch.arange(batch, device=cache.device)[:, None]
    out[rows, _batched_index(keep_idx, batch)] = computed
    return out


def unmerge_into_reference(computed: torch.Tensor, keep_idx: torch.Tensor, cache: torch.Tensor) -> None:
    """Plain-torch :func:`unmerge_into` (an in-place indexed write into ``cache``)."""
    _check_unmerge("unmerge_into", computed, keep_idx, cache)
    batch = computed.shape[0]
    rows = torch.arange(batch, device=cache.device)[:, None]
    cache[rows, _batched_index(keep_idx, batch)] = computed


def _launch_args(computed, keep_idx, cache3):
    k = computed.shape[1]
    comp3 = as_bits(computed).reshape(computed.shape[0], k, cache3.shape[2])
    idx2 = keep_idx if keep_idx.ndim == 2 else keep_idx.unsqueeze(0)
    strides = (*comp3.stride(), idx2.stride(0) if idx2.shape[0] > 1 else 0, idx2.stride(1), *cache3.stride())
    return comp3, idx2, strides


def _scan_block(k: int, block_n: int) -> int:
    """BLOCK_K of the keep scan, which compares a [BLOCK_N, BLOCK_K] tile: about 4 Ki elements
    when compiled, everything at once when interpreted."""
    cap = (1 << 16) if interpreting() else max(16, 4096 // block_n)
    return max(16, min(next_pow2(k), cap))


def _unmerge_triton(computed, keep_idx, cache) -> torch.Tensor:
    out = torch.empty(cache.shape, dtype=cache.dtype, device=cache.device)
    if out.numel() == 0:
        return out
    batch, n_rows = cache.shape[0], cache.shape[1]
    feats = feature_size(cache.shape[2:])
    cache3 = as_bits(cache).reshape(batch, n_rows, feats)
    comp3, idx2, strides = _launch_args(computed, keep_idx, cache3)
    k = comp3.shape[1]
    block_n, block_c, warps = data_tiles(n_rows, feats, cache.dtype.itemsize)
    block_k = _scan_block(k, block_n)
    grid = (triton.cdiv(n_rows, block_n), batch)
    _unmerge_kernel[grid](
        comp3, idx2, cache3, as_bits(out), k, n_rows, feats, *strides,
        BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_K=block_k, num_warps=warps,
    )
    return out


def _unmerge_into_triton(computed, keep_idx, cache) -> bool:
    """Scatter in place; False where ``cache`` cannot be viewed as [B, N, C] (the caller falls back)."""
    batch, n_rows = cache.shape[0], cache.shape[1]
    feats = feature_size(cache.shape[2:])
    try:
        cache3 = as_bits(cache).view(batch, n_rows, feats)
    except RuntimeError:
        return False
    comp3, idx2, strides = _launch_args(computed, keep_idx, cache3)
    k = comp3.shape[1]
    if comp3.numel() == 0:
        return True
    block_k, block_c, warps = data_tiles(k, feats, cache.dtype.itemsize)
    grid = (triton.cdiv(k, block_k), triton.cdiv(feats, block_c), batch)
    _unmerge_into_kernel[grid](
        comp3, idx2, cache3, k, n_rows, feats, *strides,
        BLOCK_K=block_k, BLOCK_C=block_c, num_warps=warps,
    )
    return True


@torch.library.custom_op("omnicompile::unmerge", mutates_args=())
def _unmerge_op(computed: torch.Tensor, keep_idx: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    _check_unmerge("unmerge", computed, keep_idx, cache)
    if triton_runs(cache) and bits_dtype(cache.dtype) is not None:
        return _unmerge_triton(computed, keep_idx, cache)
    return unmerge_reference(computed, keep_idx, cache)


@_unmerge_op.register_fake
def _unmerge_fake(computed, keep_idx, cache):
    _check_unmerge("unmerge", computed, keep_idx, cache)
    return torch.empty(cache.shape, dtype=cache.dtype, device=cache.device)


@torch.library.custom_op("omnicompile::unmerge_into", mutates_args=("cache",))
def _unmerge_into_op(computed: torch.Tensor, keep_idx: torch.Tensor, cache: torch.Tensor) -> None:
    _check_unmerge("unmerge_into", computed, keep_idx, cache)
    if triton_runs(cache) and bits_dtype(cache.dtype) is not None and _unmerge_into_triton(computed, keep_idx, cache):
        return
    unmerge_into_reference(computed, keep_idx, cache)


@_unmerge_into_op.register_fake
def _unmerge_into_fake(computed, keep_idx, cache):
    _check_unmerge("unmerge_into", computed, keep_idx, cache)


def unmerge(computed: torch.Tensor, keep_idx: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """Last step's output with the computed rows written in (``torch.ops.omnicompile.unmerge``).

    Args:
        computed: ``[B, K, ...]``, the block's output on the kept rows.
        keep_idx: int32/int64 ``[B, K]`` or ``[K]``, unique, the row of each computed row.
        cache: ``[B, N, ...]``, last step's output on all rows (same dtype and trailing dims).

    Returns:
        A new contiguous ``[B, N, ...]``; ``cache`` is not modified.
    """
    _check_unmerge("unmerge", computed, keep_idx, cache)
    return torch.ops.omnicompile.unmerge(computed, keep_idx, cache)


def unmerge_into(computed: torch.Tensor, keep_idx: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """In-place :func:`unmerge`: write the computed rows into ``cache`` and return ``cache``.

    ``torch.ops.omnicompile.unmerge_into`` (declared ``mutates_args=("cache",)``, returns nothing);
    this wrapper returns ``cache`` for chaining.
    """
    _check_unmerge("unmerge_into", computed, keep_idx, cache)
    torch.ops.omnicompile.unmerge_into(computed, keep_idx, cache)
    return cache
