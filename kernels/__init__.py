"""Triton kernels of omnicompile (installed as ``omnicompile.kernels``): the merge / unmerge of the
token, frame and block caches (OmniCache, ``002_…`` §3.1–3.3 and Appendix A).

One mechanism serves the three axes (tokens of a frame, frames, spatial positions); the caller
reshapes so the axis is the row axis of ``[B, N, C]``:

1. :func:`similarity_topk` — score each *src* row by its best cosine similarity to a *dst* row
   (optionally only within its ``k x k`` patch), return the r most redundant src rows to skip and
   the kept rows, both sorted ascending (reuse keeps token order and positions).
   :func:`token_split` / :func:`frame_split` make the splits (one dst per 2x2 cell; every other row).
2. :func:`merge` — gather the kept rows of every block input indexed by that axis (hidden states,
   rotary tables ``[N, D]`` / ``[B, N, D]``, masks): ``[B, N, ...] -> [B, K, ...]``.
3. The block runs on ``[B, K, C]``.
4. :func:`unmerge` — write the computed rows into last step's output at their rows, the skipped
   rows keeping last step's values, in one pass over the output; :func:`unmerge_into` does it in
   place in the cache buffer.

Each kernel file holds ``_x_kernel`` (Triton), ``x()`` (the launcher: checks its arguments and
raises :class:`KernelDTypeError` (a ``TypeError``) or :class:`KernelArgumentError` (a
``ValueError``) naming the argument and what is allowed) and ``x_reference()`` (plain torch, the
specification the tests compare against).  Each is a custom op, ``torch.ops.omnicompile.{merge,
unmerge, unmerge_into, similarity_topk}``, with a fake implementation, so Dynamo traces it with
``fullgraph=True`` and Inductor calls it as an opaque kernel.  The op runs Triton on CUDA tensors,
or on any tensor when triton was imported under ``TRITON_INTERPRET=1`` (the interpreter), and
the reference elsewhere (CPU, no triton, ``OMNICOMPILE_KERNELS=reference``); see ``_common``.

Contracts the kernels do not check on the device (each check would cost a host sync): indices
lie in ``[0, N)`` (kernels ignore others — merge reads zeros — while the references raise);
``keep_idx`` holds no repeats; src and dst lists are disjoint.  Shapes, dtypes and devices are
checked on the host, also while tracing.  The ops have no autograd formula (inference only).
The module attribute ``omnicompile.kernels.merge`` is the function; the file is
``sys.modules["omnicompile.kernels.merge"]`` (likewise for the others).

This package depends on nothing else of ours; the graph rewrite (``passes/``) inserts these ops.
"""
from ._common import HAS_TRITON, KernelArgumentError, KernelDTypeError, interpreting, triton_runs
from .merge import merge, merge_reference
from .similarity_topk import (
    Split,
    frame_split,
    similarity_scores,
    similarity_scores_reference,
    similarity_topk,
    similarity_topk_reference,
    token_split,
)
from .unmerge import unmerge, unmerge_into, unmerge_into_reference, unmerge_reference

__all__ = [
    "HAS_TRITON", "KernelArgumentError", "KernelDTypeError", "Split", "frame_split", "interpreting", "merge",
    "merge_reference", "similarity_scores", "similarity_scores_reference", "similarity_topk",
    "similarity_topk_reference", "token_split", "triton_runs", "unmerge", "unmerge_into", "unmerge_into_reference",
    "unmerge_reference",
]
