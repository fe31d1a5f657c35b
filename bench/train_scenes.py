"""Train the third suite model: an SD3-architecture transformer on procedural scenes
(``bench/scenes.py``: data, architecture, sampler).

Same recipe as the digits model (``bench/train_reference.py``'s :class:`FlowTrainer`: rectified
flow with logit-normal sigma, AdamW + warmup + cosine, gradient clipping, EMA shipped, label
dropout for CFG, adaLN-zero initialisation); fresh scenes every batch from the seeded generator,
so there is no fixed dataset to overfit.  Resumable (``bench/.cache/scenes_ckpt.pt``).  Writes
``bench/reference_scenes/``: ``model.safetensors`` (EMA transformer + label encoder), ``config.json``,
``samples.png`` (one row per colour, columns the three kinds, two seeds) and ``README.md``.

    python bench/train_scenes.py --threads 2          # about 30-40 min on 2 CPU cores
    python bench/train_scenes.py --eval-only          # redraw the sample grid
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.scenes import (HELDOUT_DIR, KINDS, MODEL_DEFAULTS, MODEL_FILE, NULL_CLASS, NUM_CLASSES, PALETTE,
                          PIXART_DEFAULTS, SCENES_DIR, build_label_encoder, build_transformer, call_kwargs,
                          load_scenes, render_scenes)
from bench.train_reference import CACHE_DIR, FlowTrainer, adaln_zero_init, save_checkpoint

CHECKPOINT = "scenes_ckpt.pt"      # (the held-out model: heldout_ckpt.pt)
DEFAULT_GUIDANCE = 3.0
TRAIN_DEFAULTS = dict(steps=5000, batch_size=48, lr=1e-3, warmup=200, min_lr_ratio=0.05, weight_decay=0.0,
                      grad_clip=1.0, ema_decay=0.999, label_dropout=0.1, logit_normal_std=1.0)


class ScenesTrainer(FlowTrainer):
    def __init__(self, model_cfg: dict, train_cfg: dict, seed: int):
        torch.manual_seed(seed)
        transformer = build_transformer(model_cfg["transformer"], model_cfg.get("arch", "sd3"))
        adaln_zero_init(transformer)
        super().__init__(model_cfg, train_cfg, seed, transformer, build_label_encoder(model_cfg))

    def batch_loss(self) -> torch.Tensor:
        tc, g = self.train_cfg, self.gen
        b = tc["batch_size"]
        labels = torch.randint(0, NUM_CLASSES, (b,), generator=g)
        x0 = render_scenes(labels, g, self.model_cfg["image_size"])
        labels = labels.clone()
        labels[torch.rand(b, generator=g) < tc["label_dropout"]] = NULL_CLASS
        noise = torch.randn(x0.shape, generator=g)
        s = torch.sigmoid(torch.randn(b, generator=g) * tc["logit_normal_std"])
        xt = (1 - s[:, None, None, None]) * x0 + s[:, None, None, None] * noise
        ehs, pooled = self.label_encoder(labels)
        pred = self.transformer(**call_kwargs(self.model_cfg.get("arch", "sd3"), xt, ehs, pooled, s * 1000.0))[0]
        return F.mse_loss(pred, noise - x0)


def write_weights(trainer: ScenesTrainer, out: Path, guidance: float) -> None:
    from safetensors.torch import save_file
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().float() for k, v in trainer.ema.items()}, str(out / MODEL_FILE))
    tc = trainer.train_cfg
    cfg = {**{k: trainer.model_cfg[k] for k in ("image_size", "num_text_tokens")},
           "arch": trainer.model_cfg.get("arch", "sd3"),
           "num_classes": NUM_CLASSES, "null_class": NULL_CLASS, "kinds": list(KINDS),
           "palette": PALETTE.tolist(), "transformer": trainer.model_cfg["transformer"],
           "default_guidance": guidance,
           "training": {**tc, "seed": trainer.seed,
                        "objective": "rectified flow, v = noise - x0, timestep = 1000 sigma, sigma ~ logit-normal",
                        "final_loss_ema": round(trainer.loss_avg, 5), "train_seconds": round(trainer.elapsed, 1),
                        "threads": torch.get_num_threads(), "torch": torch.__version__}}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def save_grid(images: torch.Tensor, cols: int, path: Path, scale: int = 3) -> None:
    from PIL import Image
    n, _, h, w = images.shape
    rows, pad = -(-n // cols), 2
    canvas = torch.full((3, rows * (h + pad) + pad, cols * (w + pad) + pad), 0.5)
    for i in range(n):
        r, c = divmod(i, cols)
        canvas[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = images[i]
    arr = (canvas.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    img = Image.fromarray(arr)
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)


def evaluate(out: Path, steps: int = 28) -> dict:
    """Samples of every class (two seeds) next to rendered scenes of the same classes."""
    ref = load_scenes(out)
    labels = torch.arange(NUM_CLASSES)
    imgs = [ref.sample(labels, steps=steps, seed=s) for s in (0, 1)]
    real = (render_scenes(labels, torch.Generator().manual_seed(0)) + 1) / 2
    grid = torch.stack([real, imgs[0], imgs[1]], 1).reshape(-1, 3, ref.image_size, ref.image_size)
    save_grid(grid, 6 * 3, out / "samples.png")
    # colour fidelity: the mean colour of the 10% pixels closest to the label's palette colour
    want = PALETTE[labels % len(PALETTE)]
    dist = ((imgs[0] - want[:, :, None, None]) ** 2).sum(1).flatten(1)
    near = dist.topk(max(1, dist.shape[1] // 10), largest=False).values.mean(1).sqrt()
    return {"steps": steps, "guidance": ref.default_guidance,
            "palette_distance_median": round(float(near.median()), 4)}


def write_readme(out: Path) -> None:
    cfg = json.loads((out / "config.json").read_text())
    tr = cfg["training"]
    head = ("# Held-out model (PixArt-class on the scenes): never used for a tuning decision\n\n"
            f"diffusers `PixArtTransformer2DModel`: {cfg['transformer']['num_layers']} blocks, "
            if cfg.get("arch") == "pixart" else
            "# Scenes reference model (suite model 3)\n\n"
            f"diffusers `SD3Transformer2DModel`: {cfg['transformer']['num_layers']} joint blocks, ")
    (out / "README.md").write_text(
        head +
        f"{cfg['transformer']['num_attention_heads']} heads of {cfg['transformer']['attention_head_dim']}, "
        f"patch {cfg['transformer']['patch_size']} on 32x32 RGB (64 image tokens), "
        f"{cfg['num_text_tokens']} label tokens; {NUM_CLASSES} classes (3 kinds x 6 colours) + null.\n\n"
        f"Trained by `python bench/train_scenes.py` on procedural scenes (`bench/scenes.py`): {tr['steps']} steps "
        f"of batch {tr['batch_size']}, {tr['train_seconds'] / 60:.1f} min on {tr['threads']} CPU thread(s), "
        f"final loss (EMA) {tr['final_loss_ema']}.  Default CFG scale {cfg['default_guidance']}.\n\n"
        "`samples.png`: per class, a rendered scene (left), then samples of seeds 0 and 1 "
        f"(28 Euler steps, batched CFG).  Evaluation: {json.dumps(cfg.get('evaluation', {}))} (median "
        "RGB distance of the 10% of pixels nearest the label's colour to that colour).\n\n"
        + ("What it learned in 31.5 CPU minutes: the label's colour and the backgrounds (gradients, stripes, "
           "checkers); the shapes come out as ragged blobs.  " if cfg.get("arch") == "pixart" else
           "What it learned in 45 CPU minutes: the label's colour, the gradient backgrounds and the stripes; "
           "the shapes often come out as blobs rather than crisp circles, squares and triangles.  ")
        + "For the suite that is enough: its quality metric is PSNR / SSIM against the uncached sample.\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=("sd3", "pixart"), default="sd3",
                   help="sd3: suite model 3 (bench/reference_scenes); pixart: the held-out model (bench/reference_heldout)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--cache-dir", type=Path, default=CACHE_DIR)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=TRAIN_DEFAULTS["steps"])
    p.add_argument("--batch-size", type=int, default=TRAIN_DEFAULTS["batch_size"])
    p.add_argument("--max-minutes", type=float, default=40.0, help="stop training after this many minutes")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--fresh", action="store_true")
    p.add_argument("--eval-only", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.out is None:
        args.out = HELDOUT_DIR if args.arch == "pixart" else SCENES_DIR
    if not args.eval_only:
        model_cfg = json.loads(json.dumps(PIXART_DEFAULTS if args.arch == "pixart" else MODEL_DEFAULTS))
        train_cfg = dict(TRAIN_DEFAULTS, steps=args.steps, batch_size=args.batch_size)
        trainer = ScenesTrainer(model_cfg, train_cfg, args.seed)
        ckpt = args.cache_dir / ("heldout_ckpt.pt" if args.arch == "pixart" else CHECKPOINT)
        if ckpt.is_file() and not args.fresh:
            sd = torch.load(ckpt, weights_only=False)
            if (sd["model_cfg"], sd["train_cfg"], sd["seed"]) == (model_cfg, train_cfg, args.seed):
                trainer.load_state_dict(sd)
                print(f"resuming from {ckpt} at step {trainer.step}", file=sys.stderr)
        t_last = time.time()
        while trainer.step < train_cfg["steps"] and trainer.elapsed < args.max_minutes * 60:
            trainer.train_step()
            now = time.time()
            trainer.elapsed, t_last = trainer.elapsed + now - t_last, now
            if trainer.step % 50 == 0:
                print(f"step {trainer.step} loss {trainer.loss_avg:.4f} {trainer.elapsed / 60:.1f} min",
                      file=sys.stderr, flush=True)
            if trainer.step % args.checkpoint_every == 0:
                save_checkpoint(trainer, ckpt)
        save_checkpoint(trainer, ckpt)
        train_cfg["steps"] = trainer.step         # what was trained (a time limit may stop it early)
        write_weights(trainer, args.out, args.guidance)
        print(f"wrote {args.out / MODEL_FILE} after {trainer.step} steps, {trainer.elapsed / 60:.1f} min",
              file=sys.stderr)
    ev = evaluate(args.out)
    cfg = json.loads((args.out / "config.json").read_text())
    cfg["evaluation"] = ev
    (args.out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    write_readme(args.out)
    print(json.dumps(ev))
    return 0


if __name__ == "__main__":
    sys.exit(main())
