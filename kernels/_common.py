"""Plumbing shared by the kernel files: when Triton runs, jitting, tile sizes, argument checks
and their exception classes.

When a kernel runs as Triton.  Triton decides between compiled and interpreted code when it is
imported: ``TRITON_INTERPRET=1`` at that moment turns its own library (``tl.max``, ``tl.sum``,
``tl.zeros`` …) into interpreted functions, and an interpreted kernel cannot call compiled ones
or the reverse.  ``torch._dynamo`` imports triton, so in most processes the mode is fixed before
this package loads.  :data:`INTERPRETED` records the mode ``triton.language`` was set up in,
:func:`jit` decorates our kernels in that same mode (whatever ``TRITON_INTERPRET`` says later),
and :func:`triton_runs` answers, per call, whether the Triton path can run on a tensor:

* Triton importable, and ``OMNICOMPILE_KERNELS`` is not ``reference`` (a switch for debugging
  and benchmarks), and
* interpreted mode (the interpreter runs CPU tensors; about 1 ms per program, so the launchers
  pick large tiles then), or a CUDA (or ROCm) tensor in compiled mode.

Everywhere else the custom ops run the plain-torch reference of the same kernel.  To test the
kernels on CPU, set ``TRITON_INTERPRET=1`` before anything imports triton (or torch._dynamo).

Data-movement kernels (merge, unmerge) copy bits, so they view every tensor as a same-width
integer dtype (:func:`as_bits`): one compiled kernel per element width serves float32, bfloat16,
bool masks and float8 alike, and the interpreter (which cannot compute in bfloat16) moves
bfloat16 rows exactly.
"""
import os
import types

import torch

try:  # Triton is a dependency, but a broken or missing install must not break the reference path
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only without triton
    triton = None
    tl = types.SimpleNamespace(constexpr=None)  # kernel signatures still evaluate their annotations
    HAS_TRITON = False


def _library_interpreted() -> bool:
    if not HAS_TRITON:
        return False
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except Exception:  # pragma: no cover - a Triton without the interpreter
        return False
    return isinstance(getattr(tl, "zeros", None), InterpretedFunction)


INTERPRETED: bool = _library_interpreted()
"""Whether triton.language was imported for the interpreter (``TRITON_INTERPRET=1`` at its import)."""

__all__ = ["HAS_TRITON", "INTERPRETED", "KernelArgumentError", "KernelDTypeError", "as_bits", "interpreting",
           "jit", "next_pow2", "triton_runs", "tl", "triton"]


class KernelArgumentError(ValueError):
    """A kernel argument has the wrong shape, size or value (the message names it and what is allowed)."""


class KernelDTypeError(TypeError):
    """A kernel argument is not a tensor, or has a dtype the kernel does not take."""


def interpreting() -> bool:
    """Whether our Triton kernels are interpreted in this process (fixed when triton is imported)."""
    return INTERPRETED


def triton_runs(t: torch.Tensor) -> bool:
    """Whether the Triton path of a kernel can run on tensor ``t`` in this process, now."""
    if not HAS_TRITON or os.environ.get("OMNICOMPILE_KERNELS", "").lower() == "reference":
        return False
    return INTERPRETED or t.device.type == "cuda"


def jit(fn):
    """``triton.jit`` in the mode triton.language was imported in (see the module docstring)."""
    if not HAS_TRITON:  # pragma: no cover - never launched without triton
        return fn
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = INTERPRETED
        return triton.jit(fn)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits_dtype(dtype: torch.dtype):
    """The integer dtype of the same width as ``dtype``, or None (e.g. complex128)."""
    return _BITS.get(dtype.itemsize)


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` viewed (no copy, any strides) as the integer dtype of its element width."""
    target = _BITS[t.dtype.itemsize]
    return t if t.dtype == target else t.view(target)


# ---------------------------------------------------------------------------------------------
# argument checks (shared by the launchers, the references and the fake implementations)

INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(op: str, name: str, t, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise KernelDTypeError(f"{op}: {name} must be a torch.Tensor ({what}), got {type(t).__name__}")


def check_index(op: str, name: str, t, shapes: str) -> None:
    check_tensor(op, name, t, f"int32/int64 indices of shape {shapes}")
    if t.dtype not in INDEX_DTYPES:
        raise KernelDTypeError(f"{op}: {name} must hold int32 or int64 indices (shape {shapes}), got {t.dtype}")


def check_devices(op: str, **tensors) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise KernelArgumentError(f"{op}: all tensors must be on one device, got {listed}")


def feature_size(shape: tuple) -> int:
    size = 1
    for s in shape:
        size *= s
    return size


def data_tiles(rows: int, features: int, itemsize: int) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_C, num_warps) for a row gather/scatter.

    Compiled: row chunks of at most 2 KiB and tiles of about 32 KiB, enough bytes in flight per
    program to stream at bandwidth while leaving hundreds of programs for a 4096 x 3072 tensor.
    Interpreted: as few programs as possible (each costs about 1 ms), tiles up to 64 Ki elements.
    """
    if interpreting():
        block_c = min(next_pow2(features), 1 << 14)
        block_rows = max(1, min(next_pow2(rows), (1 << 16) // block_c))
        return block_rows, block_c, 1
    block_c = min(next_pow2(features), max(16, 2048 // itemsize))
    block_rows = max(1, min(next_pow2(rows), 32768 // (block_c * itemsize)))
    num_warps = 8 if block_rows * block_c * itemsize >= 32768 else 4
    return block_rows, block_c, num_warps
