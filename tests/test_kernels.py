"""Kernels (omnicompile.kernels) against their plain-torch references, on odd shapes and dtypes.

Where the Triton kernels run: on a GPU if there is one; otherwise under Triton's interpreter on
CPU, which needs ``TRITON_INTERPRET=1`` before triton is first imported (Triton sets its own
library up for one mode at import).  Run alone, this module sets it before importing anything
that imports triton; in a full test session an earlier module has already imported triton
(``torch._dynamo`` does), so the Triton tests skip here and ``test_interpreted_in_subprocess``
runs this file again in a fresh interpreter-mode process.  Tests of the Triton path replace the
references inside the ops by a tripwire, so a silent fallback cannot pass.  The interpreter costs
about 1 ms per program: small odd shapes (N=37, C=24, B=2) and large tiles keep this file fast.
"""
import os
import subprocess
import sys

import pytest
import torch

if "triton" not in sys.modules and "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    # for the whole process: Triton sets its library up at import and checks the variable later
    os.environ["TRITON_INTERPRET"] = "1"

import omnicompile.kernels as K  # noqa: E402
from omnicompile.kernels import (  # noqa: E402
    KernelArgumentError,
    KernelDTypeError,
    frame_split,
    merge,
    merge_reference,
    similarity_scores,
    similarity_scores_reference,
    similarity_topk,
    similarity_topk_reference,
    token_split,
    unmerge,
    unmerge_into,
    unmerge_into_reference,
    unmerge_reference,
)

if K.interpreting():
    DEV = "cpu"
elif K.HAS_TRITON and torch.cuda.is_available():
    DEV = "cuda"
else:
    DEV = None  # Triton cannot run in this process
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
B, N, C = 2, 37, 24
D = DEV or "cpu"  # where test tensors live


@pytest.fixture
def triton_only(monkeypatch):
    """Inside the ops, the references raise: the result must come from the Triton kernels."""
    if DEV is None:
        pytest.skip("triton was imported before TRITON_INTERPRET=1 and there is no GPU "
                    "(test_interpreted_in_subprocess runs these tests)")

    def tripwire(*args, **kwargs):
        raise AssertionError("the op fell back to the torch reference")

    for module, name in [("merge", "merge_reference"), ("unmerge", "unmerge_reference"),
                         ("unmerge", "unmerge_into_reference"), ("similarity_topk", "similarity_topk_reference"),
                         ("similarity_topk", "similarity_scores_reference")]:
        monkeypatch.setattr(sys.modules[f"omnicompile.kernels.{module}"], name, tripwire)


@pytest.mark.skipif(DEV is not None, reason="the Triton tests ran in this process")
@pytest.mark.skipif(not K.HAS_TRITON, reason="triton is not installed (the ops run their references)")
def test_interpreted_in_subprocess():
    assert "OMNICOMPILE_KERNEL_TESTS_CHILD" not in os.environ, "TRITON_INTERPRET=1 did not take effect in the child"
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMNICOMPILE_KERNEL_TESTS_CHILD": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert "1 skipped" in summary, summary  # only this test skips there: the Triton tests ran


def rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=DEV or "cpu", dtype=dtype)


def sorted_subset(n, k, batch=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    if batch is None:
        return torch.randperm(n, generator=g)[:k].sort().values.to(DEV or "cpu")
    return torch.stack([torch.randperm(n, generator=g)[:k].sort().values for _ in range(batch)]).to(DEV or "cpu")


# --------------------------------------------------------------------------------------------
# merge

@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_matches_reference(dtype, triton_only):
    x = rand(B, N, C, dtype=dtype)
    idx = sorted_subset(N, 19, batch=B)
    out = merge(x, idx)
    assert out.shape == (B, 19, C) and out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out, merge_reference(x, idx))


@pytest.mark.parametrize("case", ["table", "table_1d_idx", "per_sample_table", "mask", "1d_idx", "broadcast_x",
                                  "int32_idx", "strided_4d", "float64", "unsorted"])
def test_merge_layouts(case, triton_only):
    idx = sorted_subset(N, 11, batch=B, seed=1)
    dim = 1
    if case == "table":  # rotary table shared by the batch
        x, dim = rand(N, 6), 0
    elif case == "table_1d_idx":
        x, dim, idx = rand(N, 6), 0, idx[0]
    elif case == "per_sample_table":
        x = rand(B, N, 5, 2)
    elif case == "mask":
        x = rand(B, N) > 0
    elif case == "1d_idx":
        x, idx = rand(B, N, C), idx[0]
    elif case == "broadcast_x":
        x = rand(1, N, C)
    elif case == "int32_idx":
        x, idx = rand(B, N, C), idx.int()
    elif case == "strided_4d":  # [B, heads, N, d] viewed as [B, N, heads, d]: no copy, odd strides
        x = rand(B, 3, N, 8).transpose(1, 2)
    elif case == "float64":
        x = rand(B, N, C, dtype=torch.float64)
    else:  # any order and repeats are fine for a gather
        x, idx = rand(B, N, C), torch.randint(0, N, (B, 11), generator=torch.Generator().manual_seed(3)).to(D)
    assert torch.equal(merge(x, idx, dim), merge_reference(x, idx, dim))


# --------------------------------------------------------------------------------------------
# unmerge

@pytest.mark.parametrize("dtype", DTYPES)
def test_unmerge_matches_reference(dtype, triton_only):
    idx = sorted_subset(N, 23, batch=B)
    computed, cache = rand(B, 23, C, dtype=dtype, seed=1), rand(B, N, C, dtype=dtype, seed=2)
    before = cache.clone()
    out = unmerge(computed, idx, cache)
    assert torch.equal(out, unmerge_reference(computed, idx, cache))
    assert torch.equal(cache, before)  # functional
    unmerge_into(computed, idx, cache)
    assert torch.equal(cache, out)


@pytest.mark.parametrize("case", ["unsorted", "1d_idx", "int32_idx", "all_rows", "no_rows", "strided_4d", "mask"])
def test_unmerge_layouts(case, triton_only):
    g = torch.Generator().manual_seed(5)
    k = 15
    idx = torch.stack([torch.randperm(N, generator=g)[:k] for _ in range(B)]).to(D)  # unique, any order
    computed, cache = rand(B, k, C, seed=1), rand(B, N, C, seed=2)
    if case == "1d_idx":
        idx = idx[0]
    elif case == "int32_idx":
        idx = idx.int()
    elif case == "all_rows":  # K == N: the cache is not read
        idx = torch.stack([torch.randperm(N, generator=g) for _ in range(B)]).to(D)
        computed = rand(B, N, C, seed=3)
    elif case == "no_rows":  # K == 0: the cache is copied
        idx, computed = idx[:, :0], computed[:, :0]
    elif case == "strided_4d":  # odd strides (the in-place form gets a contiguous copy below)
        computed = rand(B, 2, k, 4, seed=3).transpose(1, 2)
        cache = rand(B, 2, N, 4, seed=4).transpose(1, 2)
    elif case == "mask":
        computed, cache = rand(B, k) > 0, rand(B, N) > 0
    want = unmerge_reference(computed, idx, cache)
    assert torch.equal(unmerge(computed, idx, cache), want)
    inplace = cache.contiguous().clone()
    assert unmerge_into(computed, idx, inplace) is inplace
    assert torch.equal(inplace, want)


def test_unmerge_into_cache_view():
    # a cache whose trailing dims cannot be flattened without a copy: the op writes through the
    # view (by the reference; the kernel addresses one feature stride)
    idx = sorted_subset(N, 15, batch=B)
    computed, base = rand(B, 15, 2, 4, seed=3), rand(B, 2, N, 4, seed=4)
    want = unmerge_reference(computed, idx, base.transpose(1, 2))
    assert unmerge_into(computed, idx, base.transpose(1, 2)).data_ptr() == base.data_ptr()
    assert torch.equal(base.transpose(1, 2), want)


# --------------------------------------------------------------------------------------------
# similarity_topk

SPLITS = {
    "token_7x5": lambda: (35, token_split(7, 5, device=D)),  # odd grid: partial cells are src
    "token_7x5_offset3": lambda: (35, token_split(7, 5, offset=3, device=D)),
    "token_6x6_patch2": lambda: (36, token_split(6, 6, patch=2, device=D)),
    "token_7x7_patch3": lambda: (49, token_split(7, 7, patch=3, device=D)),
    "frames_37": lambda: (37, frame_split(37, device=D)),
    "frames_37_stride3": lambda: (37, frame_split(37, stride=3, offset=1, device=D)),
}


def _assert_same_selection(x, r, split):
    skip, keep = similarity_topk(x, r, *split)
    want_skip, want_keep = similarity_topk_reference(x, r, *split)
    assert skip.dtype == keep.dtype == torch.int64
    assert torch.equal(skip, want_skip) and torch.equal(keep, want_keep)
    return skip, keep


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(SPLITS))
def test_similarity_topk_matches_reference(name, dtype, triton_only):
    n, split = SPLITS[name]()
    x = rand(B, n, C, dtype=dtype, seed=7)
    scores = similarity_scores(x, *split)
    want = similarity_scores_reference(x, *split)
    torch.testing.assert_close(scores, want, rtol=0, atol=1e-5)
    # selections agree exactly when no two scores are closer than the scoring error
    assert torch.isfinite(want).all()  # every src row has a dst row in its patch
    gaps = want.sort(dim=1).values.diff(dim=1)
    assert gaps.min() > 1e-5, "test data with near-ties; pick another seed"
    r = split.src_idx.numel() // 2
    skip, keep = _assert_same_selection(x, r, split)
    for b in range(B):
        assert torch.equal(torch.cat([skip[b], keep[b]]).sort().values, torch.arange(n, device=D))
        assert set(skip[b].tolist()) <= set(split.src_idx.tolist())
        assert bool((skip[b].diff() > 0).all()) and bool((keep[b].diff() > 0).all())


def test_similarity_topk_picks_the_most_similar(triton_only):
    # src rows 1 and 3 are copies of dst rows 0 and 2: they and only they are skipped
    x = rand(1, 8, C, seed=9)
    x[0, 1] = x[0, 0] * 3
    x[0, 3] = x[0, 2]
    skip, keep = similarity_topk(x, 2, *frame_split(8, device=D))
    assert skip.tolist() == [[1, 3]] and keep.tolist() == [[0, 2, 4, 5, 6, 7]]


def test_similarity_topk_ties_and_extremes(triton_only):
    split = frame_split(N, device=D)
    s = split.src_idx.numel()
    same = torch.ones(B, N, C, device=D)  # every score is 1: ties break in src-list order
    skip, _ = _assert_same_selection(same, 5, split)
    assert skip[0].tolist() == split.src_idx[:5].tolist()
    x = rand(B, N, C, seed=11)
    _assert_same_selection(x, s, split)  # skip every src row
    _assert_same_selection(x, 1, split)
    skip, keep = similarity_topk(x, 0, *split)
    assert skip.shape == (B, 0) and torch.equal(keep, torch.arange(N, device=D).expand(B, N))
    zeros = torch.zeros(B, N, C, device=D)  # zero rows: scores 0 (norm clamped), no NaN
    _assert_same_selection(zeros, 4, split)
    # unsorted index lists and groups (hierarchical matching in any order); a group with no dst
    g = torch.Generator().manual_seed(2)
    perm = torch.randperm(N, generator=g).to(D)
    src, dst = perm[:25], perm[25:]
    src_group, dst_group = torch.arange(25, device=D) % 4, torch.arange(12, device=D) % 3  # group 3 has no dst: -inf
    scores = similarity_scores(x, src, dst, src_group, dst_group)
    assert torch.isinf(scores[:, 3::4]).all()
    _assert_same_selection(x, 20, (src, dst, src_group, dst_group))


def test_splits():
    split = token_split(7, 5)
    assert split.dst_idx.tolist() == [0, 2, 10, 12, 20, 22]  # one per full 2x2 cell, top-left
    assert token_split(7, 5, offset=3).dst_idx.tolist() == [6, 8, 16, 18, 26, 28]
    assert torch.equal(torch.cat([split.src_idx, split.dst_idx]).sort().values, torch.arange(35))
    assert bool((split.src_idx.diff() > 0).all())
    hier = token_split(8, 8, patch=2)  # 2x2 patches of 4x4 tokens
    rows = torch.cat([hier.src_idx, hier.dst_idx])
    assert torch.equal(rows.sort().values, torch.arange(64))
    for idx, grp in ((hier.src_idx, hier.src_group), (hier.dst_idx, hier.dst_group)):
        assert torch.equal(grp, (idx // 8 // 4) * 2 + (idx % 8) // 4)
        assert bool((grp.diff() >= 0).all())  # ordered by group
    # 7x7 in 3x3 patches: cut along the 2x2 cells (the edge row/column joins the last cells)
    odd = token_split(7, 7, patch=3)
    assert odd.dst_group.unique().tolist() == list(range(9))  # every patch has dst rows
    assert odd.src_group[odd.src_idx == 48].tolist() == [8] and odd.src_group[odd.src_idx == 3].tolist() == [1]
    assert frame_split(7).dst_idx.tolist() == [0, 2, 4, 6] and frame_split(7).src_idx.tolist() == [1, 3, 5]
    assert frame_split(7, stride=3, offset=2).dst_idx.tolist() == [2, 5]


def test_small_tiles(monkeypatch, triton_only):
    """Tiles far smaller than the data: the loops, masks and carries of the compiled-size tiling
    (several row/feature tiles, keep-scan tiles skipped by their [min, max], dst tiles skipped by
    group, radix-select counts and prefix sums carried across tiles)."""
    mods = {name: sys.modules[f"omnicompile.kernels.{name}"] for name in ("merge", "unmerge", "similarity_topk")}
    monkeypatch.setattr(mods["merge"], "data_tiles", lambda rows, feats, size: (4, 8, 1))
    monkeypatch.setattr(mods["unmerge"], "data_tiles", lambda rows, feats, size: (4, 8, 1))
    monkeypatch.setattr(mods["unmerge"], "_scan_block", lambda k, block_n: 16)
    monkeypatch.setattr(mods["similarity_topk"], "_score_tiles", lambda s, d, c, size: (16, 16, 16, 1))
    monkeypatch.setattr(mods["similarity_topk"], "_select_block", lambda s, n: 16)
    idx = sorted_subset(N, 23, batch=B, seed=8)
    x, cache = rand(B, N, C, dtype=torch.bfloat16, seed=8), rand(B, N, C, dtype=torch.bfloat16, seed=9)
    assert torch.equal(merge(x, idx), merge_reference(x, idx))
    computed = rand(B, 23, C, dtype=torch.bfloat16, seed=10)
    assert torch.equal(unmerge(computed, idx, cache), unmerge_reference(computed, idx, cache))
    assert torch.equal(unmerge_into(computed, idx, cache.clone()), unmerge_reference(computed, idx, cache))
    split = token_split(12, 12, patch=3, device=D)  # S=108, D=36: 7 src tiles, 3 dst tiles, 2 C chunks
    x = rand(B, 144, C, seed=11)
    torch.testing.assert_close(similarity_scores(x, *split), similarity_scores_reference(x, *split),
                               rtol=0, atol=1e-5)
    _assert_same_selection(x, 50, split)


# --------------------------------------------------------------------------------------------
# round trip, fallback, errors

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_identity_unmerge_round_trip(dtype, triton_only):
    x = rand(B, 36, C, dtype=dtype, seed=4)
    cache = rand(B, 36, C, dtype=dtype, seed=5)
    skip, keep = similarity_topk(x, 9, *token_split(6, 6, device=D))
    kept = merge(x, keep)  # the block: identity
    out = unmerge(kept, keep, x)
    assert torch.equal(out, x)  # kept rows come back in place
    out = unmerge(kept, keep, cache)
    rows = torch.arange(B, device=D)[:, None]
    assert torch.equal(out[rows, keep], x[rows, keep])
    assert torch.equal(out[rows, skip], cache[rows, skip])  # skipped rows keep last step's values
    _, keep0 = similarity_topk(x, 0, *token_split(6, 6, device=D))  # ratio 0 is the identity
    assert torch.equal(unmerge(merge(x, keep0), keep0, cache), x)
    assert torch.equal(unmerge_into(kept, keep, cache.clone()), out)


def test_reference_fallback(monkeypatch):
    x = rand(B, N, C).cpu()
    assert K.triton_runs(x) == K.interpreting()  # CPU tensors: Triton only under the interpreter
    monkeypatch.setenv("OMNICOMPILE_KERNELS", "reference")
    assert not K.triton_runs(x)
    split = frame_split(N)
    skip, keep = similarity_topk(x, 6, *split)
    assert all(torch.equal(a, b) for a, b in zip((skip, keep), similarity_topk_reference(x, 6, *split)))
    assert torch.equal(merge(x, keep), merge_reference(x, keep))
    cache = rand(B, N, C, seed=1).cpu()
    assert torch.equal(unmerge(merge(x, keep), keep, cache), unmerge_reference(merge(x, keep), keep, cache))


x0, i0 = torch.zeros(B, N, C), torch.zeros(B, 5, dtype=torch.long)
ERRORS = [
    (lambda: merge([1.0], i0), KernelDTypeError, "merge: x must be a torch.Tensor"),
    (lambda: merge(x0, i0.float()), KernelDTypeError, "merge: keep_idx must hold int32 or int64"),
    (lambda: merge(x0, i0, dim=2), KernelArgumentError, r"merge: dim must be 1 .* or 0"),
    (lambda: merge(x0, i0[None]), KernelArgumentError, r"merge: keep_idx must be \[B, K\] or \[K\]"),
    (lambda: merge(torch.zeros(3, N, C), i0), KernelArgumentError, "merge: batch sizes differ: x has 3 and keep_idx has 2"),
    (lambda: merge(torch.zeros(B, N, device="meta"), i0), KernelArgumentError, "merge: all tensors must be on one device"),
    (lambda: unmerge(x0[:, :5], i0, x0[:, :, :3]), KernelArgumentError, r"unmerge: cache must be \[2, N, 24\]"),
    (lambda: unmerge(x0[:, :5], i0, x0.half()), KernelDTypeError, "unmerge: computed and cache must have one dtype"),
    (lambda: unmerge(x0[:, :4], i0, x0), KernelArgumentError, r"unmerge: keep_idx must be \[2, 4\] or \[4\]"),
    (lambda: unmerge(torch.zeros(B, N + 1, C), i0, x0), KernelArgumentError, "computed must hold at most N rows"),
    (lambda: unmerge_into(x0[:, :5], i0.double(), x0), KernelDTypeError, "unmerge_into: keep_idx must hold int32"),
    (lambda: unmerge(x0[0, 0], i0, x0), KernelArgumentError, r"unmerge: computed must be \[B, K, \.\.\.\]"),
    (lambda: similarity_topk(x0, 19, *frame_split(N)), KernelArgumentError, r"similarity_topk: r must be an int in \[0, 18\]"),
    (lambda: similarity_topk(x0, 2.0, *frame_split(N)), KernelArgumentError, "r must be an int"),
    (lambda: similarity_topk(x0.int(), 2, *frame_split(N)), KernelDTypeError, "x must be float16, bfloat16, float32"),
    (lambda: similarity_topk(x0[0], 2, *frame_split(N)), KernelArgumentError, r"x must be \[B, N, C\]"),
    (lambda: similarity_topk(x0, 2, frame_split(N).src_idx[None], frame_split(N).dst_idx), KernelArgumentError,
     "src_idx must be 1-D"),
    (lambda: similarity_topk(x0, 2, *frame_split(N)[:2], frame_split(N).src_idx), KernelArgumentError,
     "give both src_group and dst_group"),
    (lambda: similarity_topk(x0, 2, *frame_split(N)[:2], torch.zeros(3, dtype=torch.long), torch.zeros(19, dtype=torch.long)),
     KernelArgumentError, r"src_group must be \[18\]"),
    (lambda: similarity_topk(x0, 2, frame_split(N).src_idx, torch.zeros(0, dtype=torch.long)), KernelArgumentError,
     "dst_idx is empty"),
    (lambda: token_split(6, 6, offset=4), KernelArgumentError, r"token_split: offset must be an int in \[0, 4\)"),
    (lambda: token_split(6, 7, patch=4), KernelArgumentError, r"token_split: patch must be None or an int in \[1, 3\]"),
    (lambda: token_split(1, 6), KernelArgumentError, "must hold at least one 2x2 cell"),
    (lambda: frame_split(8, stride=1), KernelArgumentError, "frame_split: stride must be an int >= 2"),
]


@pytest.mark.parametrize("i", range(len(ERRORS)))
def test_input_errors(i):
    call, exc, message = ERRORS[i]
    with pytest.raises(exc, match=message):
        call()
    assert issubclass(exc, (ValueError, TypeError))


# --------------------------------------------------------------------------------------------
# custom ops under torch.compile

def test_opcheck():
    x, cache = rand(B, N, C), rand(B, N, C, seed=1)
    split = frame_split(N, device=D)
    skip, keep = similarity_topk(x, 7, *split)
    for op, args in [(torch.ops.omnicompile.merge.default, (x, keep, 1)),
                     (torch.ops.omnicompile.unmerge.default, (x[:, :30].clone(), keep, cache)),
                     (torch.ops.omnicompile.unmerge_into.default, (x[:, :30].clone(), keep, cache.clone())),
                     (torch.ops.omnicompile.similarity_topk.default, (x, 7, *split))]:
        torch.library.opcheck(op, args)  # schema, fake tensor, autograd registration, AOT dispatch


def _pipeline(x, cache, rope, mask, src, dst, src_group, dst_group, ops):
    topk, mrg, unm = ops
    skip, keep = topk(x, 9, src, dst, src_group, dst_group)
    h, pe, m = mrg(x, keep, 1), mrg(rope, keep, 0), mrg(mask, keep, 1)
    y = torch.where(m[..., None], h * 2, -h) + pe.repeat(1, 1, C // pe.shape[-1])
    return unm(y, keep, cache), skip


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_ops_under_torch_compile(backend, triton_only):
    x, cache = rand(B, 36, C, seed=1), rand(B, 36, C, seed=2)
    rope, mask = rand(36, 8, seed=3), rand(B, 36, seed=4) > 0
    args = (x, cache, rope, mask, *token_split(6, 6, patch=2, device=D))
    ours = (similarity_topk, merge, unmerge)
    refs = (similarity_topk_reference, merge_reference, unmerge_reference)
    want = _pipeline(*args, refs)
    compiled = torch.compile(lambda *a: _pipeline(*a, ours), backend=backend, fullgraph=True)
    got = compiled(*args)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    assert torch.equal(got[1], want[1])

    def step(x, keep, cache):  # the in-place form: the cache buffer is updated by the graph
        unmerge_into(merge(x, keep) * 2, keep, cache)
        return cache.sum()

    keep = similarity_topk_reference(x, 9, *frame_split(36, device=D))[1]
    expect = cache.clone()
    unmerge_into_reference(merge_reference(x, keep) * 2, keep, expect)
    buf = cache.clone()
    total = torch.compile(step, backend=backend, fullgraph=True)(x, keep, buf)
    assert torch.equal(buf, expect)
    torch.testing.assert_close(total, expect.sum())
