"""Micro-benchmark of the cache kernels (omnicompile.kernels) on a GPU: Triton against the plain
PyTorch reference (eager, and compiled by Inductor) and against the memory-bandwidth roofline.

    python bench/kernels_bench.py                       # B=2, N=4096, C=3072, keep 0.5, bfloat16
    python bench/kernels_bench.py --dtype float16 --n 16384 --json out.json
    python bench/kernels_bench.py --markdown            # a table to paste into bench/RESULTS.md

Each case is checked against its reference before it is timed: exactly for the data movement;
for similarity_topk the selections may differ only in rows whose scores tie with the threshold
within 1e-3 (random data has many near-ties; the kernel's dot products round differently).  Times are medians of ``triton.testing.do_bench`` (CUDA events, L2 flushed between
repeats).  Two Triton columns: ``op`` calls ``torch.ops.omnicompile.*`` as a graph would (argument
checks and dispatch included), ``kernel`` calls the launcher directly.  The roofline is the
minimal traffic of the operation (bytes that must be read and written once) over the copy
bandwidth measured on this GPU (a large device-to-device copy); the theoretical peak from the
device's memory clock and bus width is printed for reference.  ``% roofline`` = roofline time /
kernel time.  The paper (OmniCache, Appendix A.1) reports > 2x over PyTorch for merge/unmerge.

Minimal traffic per case (s = element size, K kept rows, R = N - K skipped rows, per sample):
merge K*C*s read + K*C*s written; unmerge (functional) N*C*s read (K computed + R cached rows) +
N*C*s written; unmerge_into (in place) K*C*s read + K*C*s written; similarity_topk N*C*s read
(x once; the kernel re-reads tiles from L2).  The eager reference of unmerge moves N*C*s more
(``clone`` then an indexed write).

On a machine without a CUDA GPU this prints that it needs one and exits 0.
"""
from __future__ import annotations

import argparse
import json
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--n", type=int, default=4096, help="rows (tokens); a square number for the token split")
    p.add_argument("--c", type=int, default=3072, help="features per row")
    p.add_argument("--keep", type=float, default=0.5, help="fraction of rows kept (computed)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--patch", type=int, default=4, help="patch size k of the hierarchical similarity_topk case")
    p.add_argument("--no-compile", action="store_true", help="skip the Inductor-compiled references")
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    p.add_argument("--json", help="write the results to this JSON file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("kernels_bench needs a CUDA GPU (the kernels run as Triton only there); nothing to measure here.")
        return 0
    import triton
    import triton.testing

    import omnicompile.kernels as K

    km = sys.modules["omnicompile.kernels.merge"]
    ku = sys.modules["omnicompile.kernels.unmerge"]
    ks = sys.modules["omnicompile.kernels.similarity_topk"]
    if not K.triton_runs(torch.empty(1, device="cuda")):
        print("the Triton path is switched off (OMNICOMPILE_KERNELS=reference?); nothing to compare")
        return 1

    dev = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    b, n, c = args.batch, args.n, args.c
    side = int(round(n ** 0.5))
    if side * side != n:
        raise SystemExit(f"--n must be a square number (the token split is over a side x side grid), got {n}")
    k = int(round(n * args.keep))
    r = n - k
    s = dtype.itemsize
    torch.manual_seed(0)
    x = torch.randn(b, n, c, device=dev, dtype=dtype)
    cache = torch.randn(b, n, c, device=dev, dtype=dtype)
    split = K.token_split(side, side, device=dev)
    if r > split.src_idx.numel():
        raise SystemExit(f"--keep {args.keep} skips {r} rows, more than the {split.src_idx.numel()} src rows")
    skip_idx, keep_idx = K.similarity_topk(x, r, *split)
    computed = torch.randn(b, k, c, device=dev, dtype=dtype)
    hier = K.token_split(side, side, patch=args.patch, device=dev)

    props = torch.cuda.get_device_properties(dev)
    big = torch.empty(1 << 28, dtype=torch.float32, device=dev)  # 1 GiB
    copy_ms = triton.testing.do_bench(lambda: big.clone(), return_mode="median")
    copy_bw = 2 * big.numel() * 4 / (copy_ms * 1e-3)
    del big
    peak_bw = None
    if getattr(props, "memory_clock_rate", 0) and getattr(props, "memory_bus_width", 0):
        peak_bw = 2 * props.memory_clock_rate * 1e3 * props.memory_bus_width / 8

    def compiled(fn):
        if args.no_compile:
            return None
        return torch.compile(fn, fullgraph=True, dynamic=False)

    cases = [
        dict(name="merge", bytes=2 * b * k * c * s,
             op=lambda: K.merge(x, keep_idx),
             kernel=lambda: km._merge_triton(x, keep_idx, 1, (b, k, c)),
             ref=lambda: K.merge_reference(x, keep_idx),
             compiled=compiled(K.merge_reference), args=(x, keep_idx)),
        dict(name="unmerge", bytes=2 * b * n * c * s,
             op=lambda: K.unmerge(computed, keep_idx, cache),
             kernel=lambda: ku._unmerge_triton(computed, keep_idx, cache),
             ref=lambda: K.unmerge_reference(computed, keep_idx, cache),
             compiled=compiled(K.unmerge_reference), args=(computed, keep_idx, cache)),
        dict(name="unmerge_into", bytes=2 * b * k * c * s,
             op=lambda: K.unmerge_into(computed, keep_idx, cache),
             kernel=lambda: ku._unmerge_into_triton(computed, keep_idx, cache),
             ref=lambda: K.unmerge_into_reference(computed, keep_idx, cache),
             compiled=None, args=None),
        dict(name=f"similarity_topk (r={r})", bytes=b * n * c * s,
             op=lambda: K.similarity_topk(x, r, *split),
             kernel=lambda: ks._select_triton(ks._scores_triton(x, *split), split.src_idx, n, r),
             ref=lambda: K.similarity_topk_reference(x, r, *split),
             compiled=compiled(K.similarity_topk_reference), args=(x, r, *split)),
        dict(name=f"similarity_topk patch={args.patch}", bytes=b * n * c * s,
             op=lambda: K.similarity_topk(x, r, *hier),
             kernel=lambda: ks._select_triton(ks._scores_triton(x, *hier), hier.src_idx, n, r),
             ref=lambda: K.similarity_topk_reference(x, r, *hier),
             compiled=compiled(K.similarity_topk_reference), args=(x, r, *hier)),
    ]

    # correctness first: data movement copies bits, so exactly; a selection may differ from the
    # reference's only in rows whose scores tie with the threshold within the scoring error
    def same(a, b_):
        if isinstance(a, tuple):
            return all(same(u, v) for u, v in zip(a, b_))
        return torch.equal(a, b_)

    def same_selection(got, want, sp, tol=1e-3):
        if same(got, want):
            return True
        scores = K.similarity_scores_reference(x, *sp)
        row_score = torch.full((b, n), float("-inf"), device=dev)
        row_score[:, sp.src_idx] = scores
        threshold = scores.sort(dim=1, descending=True).values[:, r - 1:r]
        for i in range(b):
            differ = set(got[0][i].tolist()) ^ set(want[0][i].tolist())
            if differ and (row_score[i, list(differ)] - threshold[i]).abs().max() > tol:
                return False
        return bool((torch.cat([got[0], got[1]], 1).sort(1).values == torch.arange(n, device=dev)).all())

    for case in cases:
        if case["name"].startswith("similarity_topk"):
            sp = hier if "patch" in case["name"] else split
            ok = same_selection(case["op"](), case["ref"](), sp)
            if case["compiled"] is not None:
                ok = ok and same_selection(case["compiled"](*case["args"]), case["ref"](), sp)
        elif case["name"] == "unmerge_into":
            want = cache.clone()
            K.unmerge_into_reference(computed, keep_idx, want)
            got = cache.clone()
            K.unmerge_into(computed, keep_idx, got)
            ok = torch.equal(got, want)
        else:
            ok = same(case["op"](), case["ref"]())
            if case["compiled"] is not None:
                ok = ok and same(case["compiled"](*case["args"]), case["ref"]())
        case["correct"] = bool(ok)

    def bench(fn):
        return triton.testing.do_bench(fn, return_mode="median")

    rows = []
    for case in cases:
        row = dict(name=case["name"], correct=case["correct"], bytes=case["bytes"],
                   op_ms=bench(case["op"]), kernel_ms=bench(case["kernel"]), ref_ms=bench(case["ref"]))
        if case["compiled"] is not None:
            fn, a = case["compiled"], case["args"]
            row["compiled_ref_ms"] = bench(lambda: fn(*a))
        row["roofline_ms"] = case["bytes"] / copy_bw * 1e3
        row["pct_roofline"] = 100 * row["roofline_ms"] / row["kernel_ms"]
        row["speedup_vs_ref"] = row["ref_ms"] / row["op_ms"]
        if "compiled_ref_ms" in row:
            row["speedup_vs_compiled_ref"] = row["compiled_ref_ms"] / row["op_ms"]
        rows.append(row)

    header = (f"{props.name}; B={b} N={n} C={c} keep={args.keep} (K={k}) {args.dtype}; copy bandwidth "
              f"{copy_bw / 1e9:.0f} GB/s" + (f" (theoretical {peak_bw / 1e9:.0f} GB/s)" if peak_bw else ""))
    print(header)
    cols = ["case", "ok", "MB", "triton op ms", "triton kernel ms", "torch ms", "torch compiled ms", "roofline ms",
            "% roofline", "x vs torch", "x vs compiled"]

    def fmt(v, spec=".3f"):
        return "-" if v is None else format(v, spec)

    table = [[row["name"], "yes" if row["correct"] else "NO", fmt(row["bytes"] / 1e6, ".1f"), fmt(row["op_ms"]),
              fmt(row["kernel_ms"]), fmt(row["ref_ms"]), fmt(row.get("compiled_ref_ms")), fmt(row["roofline_ms"]),
              fmt(row["pct_roofline"], ".0f"), fmt(row["speedup_vs_ref"], ".2f"),
              fmt(row.get("speedup_vs_compiled_ref"), ".2f")] for row in rows]
    if args.markdown:
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
        for line in table:
            print("| " + " | ".join(line) + " |")
    else:
        widths = [max(len(cols[i]), *(len(line[i]) for line in table)) for i in range(len(cols))]
        print("  ".join(col.ljust(w) for col, w in zip(cols, widths)))
        for line in table:
            print("  ".join(v.ljust(w) for v, w in zip(line, widths)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=props.name, batch=b, n=n, c=c, keep=args.keep, dtype=args.dtype,
                           copy_bandwidth=copy_bw, peak_bandwidth=peak_bw, rows=rows), f, indent=2)
    return 0 if all(row["correct"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
