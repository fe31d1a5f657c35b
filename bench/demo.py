"""``make demo``: omnicache on the shipped reference model, next to plain Inductor.

Loads the trained reference model (``bench/models.py``: a diffusers ``FluxTransformer2DModel`` that
draws digits), samples the same grid of digits (same seeds, same labels) twice —

* with the uncached model compiled by Inductor: ``torch.compile(transformer)``;
* with omnicache's defaults: ``torch.compile(transformer, backend="omnicache")``, no options —

writes them side by side to ``bench/out/demo.png`` and prints the speedup, the PSNR of the cached
images against the uncached ones, the class accuracy of each (the shipped digit classifier) and
omnicache's report.  Each model is compiled and warmed up once, then timed ``--repeats`` times,
alternating, and the medians are compared.  A couple of minutes on 2 CPU cores.

    python bench/demo.py [--per-class 3] [--steps 28] [--repeats 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import omnicompile  # noqa: E402  (registers backend="omnicache" in this process)
from bench import metrics  # noqa: E402
from bench.models import load_reference  # noqa: E402

OUT = ROOT / "bench" / "out" / "demo.png"


def grid(images: torch.Tensor, cols: int) -> np.ndarray:
    """``[N, 1, H, W]`` in [0, 1] -> one ``[rows*(H+2), cols*(W+2)]`` array, 2-pixel gaps of 0."""
    n, _, h, w = images.shape
    rows = (n + cols - 1) // cols
    out = np.zeros((rows * (h + 2), cols * (w + 2)), dtype=np.float32)
    for i in range(n):
        r, c = divmod(i, cols)
        out[r * (h + 2) + 1:r * (h + 2) + 1 + h, c * (w + 2) + 1:c * (w + 2) + 1 + w] = images[i, 0].numpy()
    return out


def save_side_by_side(left, right, titles, path: Path, cols: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    diff = (left - right).abs()
    panels = [grid(left, cols), grid(right, cols), grid((diff / max(float(diff.max()), 1e-8)).clamp(0, 1), cols)]
    rows = panels[0].shape[0] / panels[0].shape[1] * 4.0        # inches of image height per 4 in of width
    fig, axes = plt.subplots(1, 3, figsize=(12.5, rows + 0.6), dpi=100, layout="constrained")
    for ax, img, title, cmap in zip(axes, panels, titles, ("gray_r", "gray_r", "magma")):
        ax.imshow(img, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--per-class", type=int, default=3, help="samples per digit (one column per digit)")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: stable timings on a small shared machine; 0: torch's default)")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("omnicompile").setLevel(logging.ERROR)

    ref = load_reference()
    labels = [c for c in range(10) for _ in range(args.per_class)]
    dm = metrics.DigitMetrics.from_reference(ref)

    def sample(model):
        return ref.sample(labels, steps=args.steps, transformer=model)   # batched CFG, default guidance

    models = {
        "Inductor, uncached": torch.compile(copy.deepcopy(ref.transformer)),
        "omnicache (defaults)": torch.compile(copy.deepcopy(ref.transformer), backend="omnicache"),
    }
    images, first, times = {}, {}, {k: [] for k in models}
    for name, m in models.items():
        t0 = time.perf_counter()
        images[name] = sample(m)            # compile + warm-up
        first[name] = time.perf_counter() - t0
        print(f"[demo] {name}: compile + first generation {first[name]:.1f} s", file=sys.stderr, flush=True)
    report = omnicompile.last_report()      # read before more runs: the report of the omnicache graph
    for _ in range(args.repeats):
        for name, m in models.items():
            t0 = time.perf_counter()
            images[name] = sample(m)
            times[name].append(time.perf_counter() - t0)
    report = omnicompile.last_report() or report

    (base_name, base), (oc_name, cached) = images.items()
    med = {k: statistics.median(v) for k, v in times.items()}
    speedup = med[base_name] / med[oc_name]
    psnr = metrics.psnr(cached, base)
    acc = {k: dm.accuracy(v, labels) for k, v in images.items()}
    print(f"\nreference model, {len(labels)} digits, {args.steps} steps, batched CFG "
          f"(guidance {ref.default_guidance:g}), {torch.get_num_threads()} thread(s), median of {args.repeats}")
    print(f"  {base_name:22s} {med[base_name]:6.2f} s   accuracy {acc[base_name]:.2f}")
    print(f"  {oc_name:22s} {med[oc_name]:6.2f} s   accuracy {acc[oc_name]:.2f}   "
          f"speedup {speedup:.2f}x   PSNR vs uncached {psnr:.1f} dB")
    print()
    print(report if report is not None else "(no omnicache report)")

    titles = [f"{base_name}: {med[base_name]:.2f} s, accuracy {acc[base_name]:.2f}",
              f"{oc_name}: {med[oc_name]:.2f} s ({speedup:.2f}x), PSNR {psnr:.1f} dB, accuracy {acc[oc_name]:.2f}",
              "|difference| (scaled to its max)"]
    # one column per digit, one row per sample
    order = [c * args.per_class + r for r in range(args.per_class) for c in range(10)]
    save_side_by_side(base[order], cached[order], titles, Path(args.out), cols=10)
    print(f"\nwrote {os.path.relpath(args.out)}")
    return {"speedup": speedup, "psnr": psnr, "accuracy": acc, "times": times}


if __name__ == "__main__":
    main()
