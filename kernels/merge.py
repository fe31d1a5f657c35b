"""merge: gather the kept rows of one axis (the "merge" of the token, frame and block caches).

    out[b, k, ...] = x[b, keep_idx[b, k], ...]

The row axis is whatever the cache skips along (tokens of a frame, frames, spatial positions);
the caller reshapes so that axis is ``dim``.  Every block input indexed by that axis is gathered
with the same ``keep_idx`` so positions stay exact: hidden states ``[B, N, C]``, rotary tables
shared by the batch ``[N, D]`` (``dim=0``) or per sample ``[B, N, D]``, masks ``[B, N]``.

Batch dims broadcast: ``x`` has one (``dim=1``) or none (``dim=0``), ``keep_idx`` is ``[B, K]``
or ``[K]`` (the same rows for every sample), and a size-1 batch broadcasts against the other.
The output has the broadcast batch (if any), then ``K``, then ``x``'s trailing dims.

Kernel: one program per (tile of kept rows, tile of features, sample); it loads the tile's
indices once and copies the rows' bits (any dtype, viewed as the integer of its width).
Indices are not range-checked on the device (that would cost a host sync): the kernel reads
zeros for an index outside ``[0, N)``; the reference raises.
"""
import torch

from ._common import (
    KernelArgumentError,
    as_bits,
    bits_dtype,
    check_devices,
    check_index,
    check_tensor,
    data_tiles,
    feature_size,
    jit,
    tl,
    triton,
    triton_runs,
)

__all__ = ["merge", "merge_reference"]


@jit
def _merge_kernel(
    x_ptr, idx_ptr, out_ptr,
    K, N, C,
    stride_xb, stride_xn, stride_xc,
    stride_ib, stride_ik,
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
    src = x_ptr + b * stride_xb + idx[:, None] * stride_xn + offs_c[None, :] * stride_xc
    rows = tl.load(src, mask=valid[:, None] & cmask[None, :], other=0)
    dst = out_ptr + (b * K + offs_k[:, None]) * C + offs_c[None, :]
    tl.store(dst, rows, mask=kmask[:, None] & cmask[None, :])


def _check_merge(x, keep_idx, dim) -> tuple:
    """Validate the arguments; return the output shape."""
    op = "merge"
    if isinstance(dim, bool) or dim not in (0, 1):
        raise KernelArgumentError(
            f"{op}: dim must be 1 (x is [B, N, ...]) or 0 (x is a table [N, ...] shared by the batch), got {dim!r}")
    check_tensor(op, "x", x, "[B, N, ...] rows to gather" if dim == 1 else "[N, ...] table to gather")
    check_index(op, "keep_idx", keep_idx, "[B, K] or [K]")
    if x.ndim < dim + 1:
        raise KernelArgumentError(
            f"{op}: x must have at least {dim + 1} dims for dim={dim} ([B, N, ...] or [N, ...]), got shape {tuple(x.shape)}")
    if keep_idx.ndim not in (1, 2):
        raise KernelArgumentError(f"{op}: keep_idx must be [B, K] or [K], got shape {tuple(keep_idx.shape)}")
    check_devices(op, x=x, keep_idx=keep_idx)
    x_batch = x.shape[0] if dim == 1 else None
    i_batch = keep_idx.shape[0] if keep_idx.ndim == 2 else None
    if x_batch is not None and i_batch is not None and x_batch != i_batch and x_batch != 1 and i_batch != 1:
        raise KernelArgumentError(
            f"{op}: batch sizes differ: x has {x_batch} and keep_idx has {i_batch} (they must be equal, or one of them 1)")
    if x_batch is None and i_batch is None:
        batch = ()
    elif x_batch is None or (i_batch is not None and x_batch == 1):
        batch = (i_batch,)
    else:
        batch = (x_batch,)
    return (*batch, keep_idx.shape[-1], *x.shape[dim + 1:])


def merge_reference(x: torch.Tensor, keep_idx: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Plain-torch :func:`merge` (advanced indexing)."""
    _check_merge(x, keep_idx, dim)
    idx = keep_idx.long()
    if dim == 0:
        return x[idx]
    if idx.ndim == 1:
        return x[:, idx]
    batch = max(x.shape[0], idx.shape[0])
    rows = torch.arange(batch, device=x.device)[:, None]
    return x.expand(batch, *x.shape[1:])[rows, idx.expand(batch, -1)]


def _merge_triton(x: torch.Tensor, keep_idx: torch.Tensor, dim: int, out_shape: tuple) -> torch.Tensor:
    out = torch.empty(out_shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    lead = dim + 1
    n_rows = x.shape[dim]
    feats = feature_size(x.shape[lead:])
    x3 = as_bits(x).reshape(*x.shape[:lead], feats)
    if dim == 0:
        x3 = x3.unsqueeze(0)
    idx2 = keep_idx if keep_idx.ndim == 2 else keep_idx.unsqueeze(0)
    k = keep_idx.shape[-1]
    batch = out.numel() // (k * feats)
    block_k, block_c, warps = data_tiles(k, feats, x.dtype.itemsize)
    grid = (triton.cdiv(k, block_k), triton.cdiv(feats, block_c), batch)
    _merge_kernel[grid](
        x3, idx2, as_bits(out),
        k, n_rows, feats,
        x3.stride(0) if x3.shape[0] > 1 else 0, x3.stride(1), x3.stride(2),
        idx2.stride(0) if idx2.shape[0] > 1 else 0, idx2.stride(1),
        BLOCK_K=block_k, BLOCK_C=block_c, num_warps=warps,
    )
    return out


@torch.library.custom_op("omnicompile::merge", mutates_args=())
def _merge_op(x: torch.Tensor, keep_idx: torch.Tensor, dim: int = 1) -> torch.Tensor:
    out_shape = _check_merge(x, keep_idx, dim)
    if triton_runs(x) and bits_dtype(x.dtype) is not None:
        return _merge_triton(x, keep_idx, dim, out_shape)
    return merge_reference(x, keep_idx, dim).contiguous()


@_merge_op.register_fake
def _merge_fake(x, keep_idx, dim=1):
    return x.new_empty(_check_merge(x, keep_idx, dim))


def merge(x: torch.Tensor, keep_idx: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Gather rows ``keep_idx`` of ``x`` along ``dim`` (``torch.ops.omnicompile.merge``).

    Args:
        x: ``[B, N, ...]`` with ``dim=1``, or a table ``[N, ...]`` shared by the batch with ``dim=0``.
        keep_idx: int32/int64 ``[B, K]`` or ``[K]``, each in ``[0, N)`` (sorted ascending keeps order).
        dim: the row axis of ``x``, 1 or 0.

    Returns:
        A new contiguous tensor ``[B, K, ...]`` (``[K, ...]`` when neither has a batch dim).

    Raises:
        KernelDTypeError (a TypeError) / KernelArgumentError (a ValueError) naming the argument.
    """
    _check_merge(x, keep_idx, dim)
    return torch.ops.omnicompile.merge(x, keep_idx, dim)
