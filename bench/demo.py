"""``make demo``: omnicache on the shipped reference model, through a real diffusers pipeline,
next to plain Inductor.

Loads the trained reference model (``bench/models.py``: a diffusers ``FluxTransformer2DModel`` that
draws digits) and wraps it in a real diffusers ``FluxPipeline`` (no VAE, no text encoders: the
reference's ``LabelEncoder`` gives the precomputed ``prompt_embeds`` / ``pooled_prompt_embeds``, the
null class the negative ones, ``true_cfg_scale`` = the reference's guidance: Flux's true CFG, a cond
and an uncond transformer call per step).  The pipeline is called the way users call it, with
``output_type="latent"`` and explicit initial ``latents`` (the reference's packed noise), and at
``height = width = 16 * grid`` pixels so that its token grid is the reference's (``vae=None``:
``vae_scale_factor`` 8, ``(height // 16) ** 2`` = 64 tokens of ``in_channels`` = 16 channels, the
pipeline's ``img_ids`` equal to ``make_img_ids``; checked at start-up).  Its default schedule,
``sigmas = linspace(1, 1/steps, steps)``, is the reference's (the scheduler has ``shift=1`` and no
dynamic shifting, so the pipeline's ``mu`` changes nothing): with the uncached eager transformer the
pipeline's latents equal ``Reference.sample(..., cfg="split")``'s bit for bit.  The returned packed
latents become images with the reference's ``unpack_images``.

The same grid of digits (same noise, same labels) is sampled by two pipelines, each around its own
copy of the transformer —

* Inductor, uncached: ``pipe.transformer = torch.compile(transformer)``;
* omnicache's defaults: ``cache = omnicompile.compile_pipeline(pipe)``, no options (every pipeline
  call is one generation, its step count taken from the scheduler) —

writes them side by side to ``bench/out/demo.png`` and prints the speedup, the PSNR of the cached
images against the uncached ones, the class accuracy of each (the shipped digit classifier) and
omnicache's report (``cache.report()``).  Each pipeline is compiled and warmed up by one generation
(reported separately), then timed ``--repeats`` times, alternating, and the medians are compared.
A few minutes on 2 CPU cores.

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
# diffusers exposes FluxPipeline only when transformers imports; keep its import-time notices quiet
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import omnicompile  # noqa: E402
from bench import metrics  # noqa: E402
from bench.models import NULL_CLASS, Reference, load_reference, make_img_ids, unpack_images  # noqa: E402

OUT = ROOT / "bench" / "out" / "demo.png"


def reference_pipeline(ref: Reference, transformer: torch.nn.Module):
    """A diffusers ``FluxPipeline`` around ``transformer`` with a copy of the reference's scheduler,
    no VAE and no text stack (the caller passes precomputed embeddings)."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline(scheduler=type(ref.scheduler).from_config(ref.scheduler.config), vae=None,
                        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                        transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_size(ref: Reference, pipe) -> int:
    """Pixel height (= width) at which the pipeline's packed token grid is the reference's, checked."""
    size = 2 * pipe.vae_scale_factor * ref.grid          # (size // 16) ** 2 tokens with vae_scale_factor 8
    channels = pipe.transformer.config.in_channels // 4
    latents = ref.initial_noise(1)
    out, img_ids = pipe.prepare_latents(1, channels, size, size, latents.dtype, latents.device, None, latents)
    if out.shape != latents.shape or not torch.equal(img_ids.cpu(), make_img_ids(ref.grid)):
        raise RuntimeError(f"FluxPipeline at {size}x{size} px does not give the reference's {ref.grid}x{ref.grid} "
                           f"token grid (latents {tuple(out.shape)}, img_ids {tuple(img_ids.shape)})")
    return size


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
    lab = torch.tensor(labels)
    ehs, pooled = ref.conditioning(lab)                                  # the "text encoder"
    neg_ehs, neg_pooled = ref.conditioning(torch.full_like(lab, NULL_CLASS))

    # two pipelines, each around its own copy of the transformer
    base_name, oc_name = "Inductor, uncached", "omnicache (defaults)"
    pipes = {base_name: reference_pipeline(ref, copy.deepcopy(ref.transformer)),
             oc_name: reference_pipeline(ref, copy.deepcopy(ref.transformer))}
    size = pipeline_size(ref, pipes[base_name])
    pipes[base_name].transformer = torch.compile(pipes[base_name].transformer)
    cache = omnicompile.compile_pipeline(pipes[oc_name])

    def sample(pipe) -> torch.Tensor:
        latents = pipe(prompt_embeds=ehs, pooled_prompt_embeds=pooled,
                       negative_prompt_embeds=neg_ehs, negative_pooled_prompt_embeds=neg_pooled,
                       true_cfg_scale=ref.default_guidance, height=size, width=size,
                       num_inference_steps=args.steps, latents=ref.initial_noise(len(labels)),
                       output_type="latent", return_dict=False)[0]           # packed: [N, tokens, channels]
        images = unpack_images(latents.float().cpu(), ref.image_size, ref.patch_size)
        return ((images + 1.0) / 2.0).clamp(0.0, 1.0)

    images, first, times = {}, {}, {k: [] for k in pipes}
    for name, pipe in pipes.items():
        t0 = time.perf_counter()
        images[name] = sample(pipe)          # compile + warm-up
        first[name] = time.perf_counter() - t0
        print(f"[demo] {name}: compile + first generation {first[name]:.1f} s", file=sys.stderr, flush=True)
    for _ in range(args.repeats):
        for name, pipe in pipes.items():
            t0 = time.perf_counter()
            images[name] = sample(pipe)
            times[name].append(time.perf_counter() - t0)
    report = cache.report()

    base, cached = images[base_name], images[oc_name]
    med = {k: statistics.median(v) for k, v in times.items()}
    speedup = med[base_name] / med[oc_name]
    psnr = metrics.psnr(cached, base)
    acc = {k: dm.accuracy(v, labels) for k, v in images.items()}
    print(f"\nreference model in diffusers' FluxPipeline, {len(labels)} digits, {args.steps} steps, true CFG "
          f"(true_cfg_scale {ref.default_guidance:g}: 2 calls per step), {torch.get_num_threads()} thread(s), "
          f"median of {args.repeats}")
    print(f"  {base_name:22s} {med[base_name]:6.2f} s   accuracy {acc[base_name]:.2f}   "
          f"(compile + first generation {first[base_name]:.1f} s)")
    print(f"  {oc_name:22s} {med[oc_name]:6.2f} s   accuracy {acc[oc_name]:.2f}   "
          f"(compile + first generation {first[oc_name]:.1f} s)   speedup {speedup:.2f}x   "
          f"PSNR vs uncached {psnr:.1f} dB")
    print()
    print(report if report.graphs else "(no omnicache report: nothing was compiled by omnicache)")

    titles = [f"{base_name}: {med[base_name]:.2f} s, accuracy {acc[base_name]:.2f}",
              f"{oc_name}: {med[oc_name]:.2f} s ({speedup:.2f}x), PSNR {psnr:.1f} dB, accuracy {acc[oc_name]:.2f}",
              "|difference| (scaled to its max)"]
    # one column per digit, one row per sample
    order = [c * args.per_class + r for r in range(args.per_class) for c in range(10)]
    save_side_by_side(base[order], cached[order], titles, Path(args.out), cols=10)
    print(f"\nwrote {os.path.relpath(args.out)}")
    return {"speedup": speedup, "psnr": psnr, "accuracy": acc, "times": times, "first": first,
            "report": report}


if __name__ == "__main__":
    main()
