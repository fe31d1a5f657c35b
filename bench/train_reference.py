"""Train the shipped reference model: a small Flux transformer on scikit-learn digits.

What it trains (see ``bench/models.py`` for the packing, the label encoder and the sampler): a
diffusers ``FluxTransformer2DModel`` (2 dual-stream + 4 single-stream blocks by default, 3 heads
of 32, RoPE on ``(0, row, col)``) on the 1,797 digits upscaled to 32x32, packed into 8x8 = 64
tokens of 4x4 pixels, class-conditional through :class:`bench.models.LabelEncoder`.

Objective: rectified flow, the convention of diffusers' ``FlowMatchEulerDiscreteScheduler``:
``x_s = (1 - s) x0 + s noise``, the model predicts ``noise - x0`` and receives ``timestep = s``
(the Flux transformer multiplies by 1000 itself).  ``s`` is drawn logit-normal (SD3's choice; it
spends more training on the middle of the trajectory).  Labels are replaced by the null class
with probability ``--label-dropout`` (10 %) so classifier-free guidance works.

Choices that make a few CPU minutes enough: AdaLN-zero initialisation (every block's modulation
and the output projection start at zero, so each block starts as the identity, as in DiT), AdamW
with warmup and cosine decay, gradient clipping, and an exponential moving average of the weights,
which is what is shipped.

Reproducible and resumable: everything random comes from generators seeded by ``--seed``; every
``--checkpoint-every`` steps the full state (weights, EMA, optimiser, generator states, elapsed
time) goes to ``bench/.cache/reference_ckpt.pt`` (outside git), and a rerun with the same
configuration resumes from it (``--fresh`` starts over).  A resumed run gives the same weights as
an uninterrupted one.  Uses one CPU thread unless ``--threads`` says otherwise.

At the end it writes into ``--out`` (default ``bench/reference/``): ``model.safetensors`` (the EMA
transformer + label encoder, float32), ``config.json`` (the model, scheduler and training
sections; the classifier section is kept), and, if the classifier exists, ``samples.png`` (a grid,
one row per digit, 28-step batched CFG), an ``evaluation`` section (sample accuracy and Fréchet
distance) and ``README.md``.  It commits nothing.

    python bench/train_reference.py                 # train (resumes), then evaluate
    python bench/train_reference.py --eval-only     # evaluate / redraw the grid of the shipped weights
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.models import (
    MODEL_FILE,
    NULL_CLASS,
    NUM_CLASSES,
    REFERENCE_DIR,
    LabelEncoder,
    build_transformer,
    load_digit_images,
    load_reference,
    make_img_ids,
    make_txt_ids,
    pack_images,
)

# guidance 1.5: 99 % class accuracy at a Fréchet distance near the real-data floor; higher scales
# saturate accuracy at 100 % and lose diversity (see the scan in bench/reference/README.md)
DEFAULT_GUIDANCE = 1.5

CACHE_DIR = Path(__file__).resolve().parent / ".cache"
CHECKPOINT = "reference_ckpt.pt"

MODEL_DEFAULTS = dict(
    image_size=32,
    patch_size=4,
    num_text_tokens=4,
    transformer=dict(
        patch_size=1,  # packing happens outside the transformer, as in FluxPipeline
        in_channels=16,  # 4x4 pixel patches
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=32,
        num_attention_heads=3,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        guidance_embeds=False,
        axes_dims_rope=[8, 12, 12],
    ),
    scheduler=dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False),
)

TRAIN_DEFAULTS = dict(
    steps=3500,
    batch_size=64,
    lr=1e-3,
    warmup=200,
    min_lr_ratio=0.05,
    weight_decay=0.0,
    grad_clip=1.0,
    ema_decay=0.999,
    label_dropout=0.1,
    logit_normal_std=1.0,
)


def adaln_zero_init(transformer: torch.nn.Module) -> None:
    """Zero the AdaLN modulation of every block and the output projection (DiT's adaLN-zero)."""
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and (
            name.endswith(("norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear"))
            or name == "proj_out"
        ):
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)


def lr_at(step: int, steps: int, lr: float, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class FlowTrainer:
    """What every reference-model training run shares: AdamW with warmup + cosine decay, gradient
    clipping, an EMA of the weights (what is shipped), a seeded generator and resumable state.
    Subclasses build ``transformer`` / ``label_encoder`` (after seeding) and define
    :meth:`batch_loss` (draw a batch from ``self.gen``, return the rectified-flow loss)."""

    def __init__(self, model_cfg: dict, train_cfg: dict, seed: int, transformer: torch.nn.Module,
                 label_encoder: torch.nn.Module):
        self.model_cfg, self.train_cfg, self.seed = model_cfg, train_cfg, seed
        self.transformer, self.label_encoder = transformer, label_encoder
        self.modules = torch.nn.ModuleDict({"transformer": self.transformer, "label_encoder": self.label_encoder})
        self.ema = {k: v.detach().clone() for k, v in self.modules.state_dict().items()}
        self.opt = torch.optim.AdamW(
            self.modules.parameters(), lr=train_cfg["lr"], betas=(0.9, 0.99), weight_decay=train_cfg["weight_decay"]
        )
        self.gen = torch.Generator().manual_seed(seed)
        self.step = 0
        self.elapsed = 0.0  # seconds of training, summed over resumed runs
        self.loss_avg = None

    def state_dict(self) -> dict:
        return dict(
            model_cfg=self.model_cfg,
            train_cfg=self.train_cfg,
            seed=self.seed,
            modules=self.modules.state_dict(),
            ema=self.ema,
            opt=self.opt.state_dict(),
            gen=self.gen.get_state(),
            step=self.step,
            elapsed=self.elapsed,
            loss_avg=self.loss_avg,
        )

    def load_state_dict(self, sd: dict) -> None:
        self.modules.load_state_dict(sd["modules"])
        self.ema = sd["ema"]
        self.opt.load_state_dict(sd["opt"])
        self.gen.set_state(sd["gen"])
        self.step, self.elapsed, self.loss_avg = sd["step"], sd["elapsed"], sd["loss_avg"]

    def batch_loss(self) -> torch.Tensor:
        raise NotImplementedError

    def train_step(self) -> float:
        tc = self.train_cfg
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, tc["steps"], tc["lr"], tc["warmup"], tc["min_lr_ratio"])
        self.modules.train()
        loss = self.batch_loss()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.modules.parameters(), tc["grad_clip"])
        self.opt.step()

        decay = min(tc["ema_decay"], (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for k, v in self.modules.state_dict().items():
                if v.dtype.is_floating_point:
                    self.ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
                else:
                    self.ema[k].copy_(v)
        self.step += 1
        value = loss.item()
        self.loss_avg = value if self.loss_avg is None else 0.98 * self.loss_avg + 0.02 * value
        return value


class Trainer(FlowTrainer):
    """The image reference: the scikit-learn digits, packed into tokens."""

    def __init__(self, model_cfg: dict, train_cfg: dict, seed: int):
        torch.manual_seed(seed)
        transformer = build_transformer(model_cfg["transformer"])
        adaln_zero_init(transformer)
        tc = model_cfg["transformer"]
        label_encoder = LabelEncoder(model_cfg["num_text_tokens"], tc["joint_attention_dim"], tc["pooled_projection_dim"])
        super().__init__(model_cfg, train_cfg, seed, transformer, label_encoder)
        x, y = load_digit_images(model_cfg["image_size"])
        self.x0 = pack_images(x, model_cfg["patch_size"])  # [N, tokens, p*p] in [-1, 1]
        self.y = y
        grid = model_cfg["image_size"] // model_cfg["patch_size"]
        self.img_ids = make_img_ids(grid)
        self.txt_ids = make_txt_ids(model_cfg["num_text_tokens"])

    def batch_loss(self) -> torch.Tensor:
        tc, g = self.train_cfg, self.gen
        b = tc["batch_size"]
        idx = torch.randint(0, len(self.x0), (b,), generator=g)
        x0, labels = self.x0[idx], self.y[idx].clone()
        labels[torch.rand(b, generator=g) < tc["label_dropout"]] = NULL_CLASS
        noise = torch.randn(x0.shape, generator=g)
        s = torch.sigmoid(torch.randn(b, generator=g) * tc["logit_normal_std"])
        xt = (1 - s[:, None, None]) * x0 + s[:, None, None] * noise
        ehs, pooled = self.label_encoder(labels)
        pred = self.transformer(
            hidden_states=xt,
            encoder_hidden_states=ehs,
            pooled_projections=pooled,
            timestep=s,
            img_ids=self.img_ids,
            txt_ids=self.txt_ids,
            return_dict=False,
        )[0]
        return F.mse_loss(pred, noise - x0)


def save_checkpoint(trainer: Trainer, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ignore = path.parent / ".gitignore"  # the cache never belongs in git
    if not ignore.exists():
        ignore.write_text("*\n")
    tmp = path.with_suffix(".tmp")
    torch.save(trainer.state_dict(), tmp)
    os.replace(tmp, path)


def write_weights(trainer: Trainer, out: Path) -> None:
    from safetensors.torch import save_file

    from bench.train_classifier import update_config

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().float() for k, v in trainer.ema.items()}, str(out / MODEL_FILE))
    tc = trainer.train_cfg
    update_config(
        out,
        {
            **{k: trainer.model_cfg[k] for k in ("image_size", "patch_size", "num_text_tokens")},
            "num_classes": NUM_CLASSES,
            "null_class": NULL_CLASS,
            "transformer": trainer.model_cfg["transformer"],
            "scheduler": trainer.model_cfg["scheduler"],
            "default_guidance": tc["default_guidance"],
            "training": {
                **{k: v for k, v in tc.items() if k != "default_guidance"},
                "seed": trainer.seed,
                "objective": "rectified flow, v = noise - x0, timestep = sigma ~ logit-normal",
                "final_loss_ema": round(trainer.loss_avg, 5),
                "train_seconds": round(trainer.elapsed, 1),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
            },
        },
    )


def save_grid(images: torch.Tensor, rows: int, path: Path, scale: int = 2) -> None:
    """Save ``[N, 1, H, W]`` images in [0, 1] as a ``rows x N/rows`` grid PNG (white digits on black)."""
    from PIL import Image

    n, _, h, w = images.shape
    cols = n // rows
    pad = 2
    canvas = torch.full((rows * (h + pad) + pad, cols * (w + pad) + pad), 0.35)
    for i in range(rows * cols):
        r, c = divmod(i, cols)
        canvas[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = images[i, 0]
    arr = (canvas.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    img = Image.fromarray(arr)  # uint8 [H, W] -> mode "L"
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)


def evaluate(
    out: Path,
    per_class: int,
    steps: int,
    guidance: float | None,
    scan: tuple[float, ...] = (),
    scan_per_class: int = 30,
    grid_cols: int = 10,
) -> dict:
    """Sample the weights in ``out`` at the default guidance, write ``samples.png``; return the metrics.

    ``scan``: further guidance scales, each measured on ``scan_per_class`` samples per digit.
    """
    from bench.metrics import DigitMetrics

    ref = load_reference(out)
    if ref.classifier is None:
        raise FileNotFoundError(f"no classifier in {out}: run bench/train_classifier.py first")
    metrics = DigitMetrics.from_reference(ref)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    g = ref.default_guidance if guidance is None else guidance
    t0 = time.time()
    images = torch.cat([ref.sample(chunk, steps=steps, guidance=g, seed=1000 + i) for i, chunk in enumerate(labels.split(100))])
    sample_seconds = time.time() - t0
    result = metrics.evaluate(images, labels)
    scan_results = []
    scan_labels = torch.arange(NUM_CLASSES).repeat_interleave(scan_per_class)
    for s in scan:
        imgs = torch.cat([ref.sample(c, steps=steps, guidance=s, seed=1000 + i) for i, c in enumerate(scan_labels.split(100))])
        r = metrics.evaluate(imgs, scan_labels)
        scan_results.append(dict(guidance=s, samples=len(scan_labels), accuracy=round(r["accuracy"], 4),
                                 frechet_distance=round(r["frechet_distance"], 3)))
    grid_idx = torch.cat([torch.arange(c * per_class, c * per_class + min(grid_cols, per_class)) for c in range(NUM_CLASSES)])
    save_grid(images[grid_idx], NUM_CLASSES, out / "samples.png")
    return dict(
        steps=steps,
        guidance=g,
        cfg="batched",
        samples=len(labels),
        accuracy=round(result["accuracy"], 4),
        frechet_distance=round(result["frechet_distance"], 3),
        real_self_frechet_distance=round(metrics.real_split_fd(), 3),
        sample_seconds=round(sample_seconds, 1),
        guidance_scan=scan_results,
    )


README = """# Reference model (generated by `bench/train_reference.py`)

A diffusers `FluxTransformer2DModel` (real Flux architecture: {num_layers} dual-stream + {num_single_layers}
single-stream blocks, {heads} heads x {head_dim}, RoPE axes {axes}, AdaLN), {params:,} parameters, trained
with rectified flow on scikit-learn's digits upscaled to {size}x{size}, packed into {tokens} tokens of
{patch}x{patch} pixels, class-conditional through a learned label embedding ({text_tokens} text tokens +
a pooled vector; class 10 = null class for classifier-free guidance). Load it with
`bench.models.load_reference()`.

| file | what |
|---|---|
| `model.safetensors` | EMA weights: `transformer.*` (the Flux transformer), `label_encoder.*` |
| `classifier.safetensors` | tiny CNN digit classifier for reference-free metrics (`bench/metrics.py`) |
| `config.json` | model, scheduler, training and evaluation settings and results |
| `samples.png` | {grid_note} |

## Training run

- {steps} steps, batch {batch}, AdamW lr {lr} (warmup {warmup}, cosine), EMA {ema}, label dropout
  {dropout}, seed {seed}; {minutes:.1f} min of wall time on {threads} CPU thread(s) of a 2-core machine
  shared with other work, torch {torch}.
- final training loss (running mean): {loss:.4f}
- classifier: held-out accuracy {clf_acc:.3f} on {clf_test} real digits ({clf_seconds:.0f} s of training).

## Evaluation ({samples} samples, {eval_steps} Euler steps, batched CFG, guidance {guidance})

| metric | value |
|---|---|
| class accuracy of samples (classifier) | {acc:.3f} |
| Fréchet distance, samples vs real digits (classifier features) | {fd:.2f} |
| Fréchet distance, two halves of the real digits (floor) | {fd_floor:.2f} |

Guidance scan ({scan_n} samples each, same seeds; guidance 1 = no CFG):

| guidance | accuracy | Fréchet distance |
|---|---|---|
{scan_rows}

Reproduce: `python bench/train_classifier.py && python bench/train_reference.py`
(`--threads N` to use more cores; `--fresh` to ignore the checkpoint in `bench/.cache/`).
"""


def write_readme(out: Path) -> None:
    cfg = json.loads((out / "config.json").read_text())
    t, tr, ev, cl = cfg["transformer"], cfg["training"], cfg.get("evaluation", {}), cfg.get("classifier", {})
    params = sum(p.numel() for p in build_transformer(t).parameters())
    text = README.format(
        num_layers=t["num_layers"], num_single_layers=t["num_single_layers"], heads=t["num_attention_heads"],
        head_dim=t["attention_head_dim"], axes=tuple(t["axes_dims_rope"]), params=params,
        size=cfg["image_size"], tokens=(cfg["image_size"] // cfg["patch_size"]) ** 2, patch=cfg["patch_size"],
        text_tokens=cfg["num_text_tokens"],
        grid_note=f"one row per digit 0-9, {ev.get('steps', 28)}-step samples, batched CFG, guidance {ev.get('guidance', '?')}",
        steps=tr["steps"], batch=tr["batch_size"], lr=tr["lr"], warmup=tr["warmup"], ema=tr["ema_decay"],
        dropout=tr["label_dropout"], seed=tr["seed"], minutes=tr["train_seconds"] / 60, threads=tr["threads"],
        torch=tr["torch"], loss=tr["final_loss_ema"], clf_acc=cl.get("test_accuracy", float("nan")),
        clf_test=cl.get("test_images", 0), clf_seconds=cl.get("train_seconds", float("nan")),
        samples=ev.get("samples", 0), eval_steps=ev.get("steps", 28), guidance=ev.get("guidance", "?"),
        acc=ev.get("accuracy", float("nan")), fd=ev.get("frechet_distance", float("nan")),
        fd_floor=ev.get("real_self_frechet_distance", float("nan")),
        scan_n=(ev.get("guidance_scan") or [{}])[0].get("samples", 0),
        scan_rows="\n".join(
            f"| {r['guidance']} | {r['accuracy']:.3f} | {r['frechet_distance']:.2f} |" for r in ev.get("guidance_scan", [])
        ),
    )
    (out / "README.md").write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REFERENCE_DIR)
    p.add_argument("--cache-dir", type=Path, default=CACHE_DIR)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--steps", type=int, default=TRAIN_DEFAULTS["steps"])
    p.add_argument("--batch-size", type=int, default=TRAIN_DEFAULTS["batch_size"])
    p.add_argument("--lr", type=float, default=TRAIN_DEFAULTS["lr"])
    p.add_argument("--num-layers", type=int, default=MODEL_DEFAULTS["transformer"]["num_layers"])
    p.add_argument("--num-single-layers", type=int, default=MODEL_DEFAULTS["transformer"]["num_single_layers"])
    p.add_argument("--guidance", type=float, default=None,
                   help=f"CFG scale stored in the config as the default ({DEFAULT_GUIDANCE} when training); with --eval-only: evaluate at it and store it")
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--eval-only", action="store_true", help="only evaluate the weights in --out")
    p.add_argument("--eval-per-class", type=int, default=50, help="samples per digit for the evaluation")
    p.add_argument("--eval-steps", type=int, default=28)
    p.add_argument("--scan-guidance", default="1,1.5,2,3", help="comma-separated guidance scales to scan ('' = none)")
    p.add_argument("--scan-per-class", type=int, default=30)
    p.add_argument("--no-eval", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from bench.train_classifier import update_config

    if not args.eval_only:
        from tqdm import tqdm

        model_cfg = json.loads(json.dumps(MODEL_DEFAULTS))
        model_cfg["transformer"]["num_layers"] = args.num_layers
        model_cfg["transformer"]["num_single_layers"] = args.num_single_layers
        train_cfg = dict(TRAIN_DEFAULTS, steps=args.steps, batch_size=args.batch_size, lr=args.lr)
        trainer = Trainer(model_cfg, train_cfg, args.seed)
        ckpt = args.cache_dir / CHECKPOINT
        if ckpt.is_file() and not args.fresh:
            sd = torch.load(ckpt, weights_only=False)
            if (sd["model_cfg"], sd["train_cfg"], sd["seed"]) == (model_cfg, train_cfg, args.seed):
                trainer.load_state_dict(sd)
                print(f"resuming from {ckpt} at step {trainer.step}", file=sys.stderr)
            else:
                print(f"{ckpt} is from another configuration: starting over", file=sys.stderr)
        bar = tqdm(total=train_cfg["steps"], initial=trainer.step, desc="reference", smoothing=0.05)
        t_last = time.time()
        while trainer.step < train_cfg["steps"]:
            trainer.train_step()
            now = time.time()
            trainer.elapsed += now - t_last
            t_last = now
            bar.update(1)
            if trainer.step % 20 == 0:
                bar.set_postfix(loss=f"{trainer.loss_avg:.4f}")
            if trainer.step % args.checkpoint_every == 0 or trainer.step == train_cfg["steps"]:
                save_checkpoint(trainer, ckpt)
        bar.close()
        train_cfg["default_guidance"] = DEFAULT_GUIDANCE if args.guidance is None else args.guidance
        write_weights(trainer, args.out)
        print(f"wrote {args.out / MODEL_FILE} ({trainer.elapsed / 60:.1f} min of training)", file=sys.stderr)

    elif args.guidance is not None:
        update_config(args.out, {"default_guidance": args.guidance})

    if not args.no_eval:
        scan = tuple(float(v) for v in args.scan_guidance.split(",") if v.strip())
        ev = evaluate(args.out, args.eval_per_class, args.eval_steps, None, scan, args.scan_per_class)
        update_config(args.out, {"evaluation": ev})
        write_readme(args.out)
        print(json.dumps(ev, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
