"""Train the shipped video reference model: a small Latte transformer on moving digits.

What it trains (see ``bench/video.py`` for the data, the model configuration and the sampler): a
diffusers ``LatteTransformer3DModel`` (4 spatial + 4 temporal blocks, alternating, 4 heads of 16,
patch 2) on 8-frame 16x16 videos of a scikit-learn digit bouncing around the canvas, drawn fresh
every step from the trainer's generator, class-conditional through
:class:`bench.models.LabelEncoder` (4 "text" tokens; class 10 = null class for CFG).

Objective, schedule and tricks are those of ``bench/train_reference.py`` (whose learning-rate
schedule and checkpoint writer this script imports): rectified flow (``x_s = (1 - s) x0 + s noise``,
target ``noise - x0``, ``s`` logit-normal; the Latte transformer receives ``timestep = 1000 s``),
label dropout for classifier-free guidance, identity (adaLN-zero style) initialisation, AdamW with
warmup and cosine decay, gradient clipping, and an EMA of the weights, which is what is shipped.

Reproducible and resumable: all randomness comes from generators seeded by ``--seed``; every
``--checkpoint-every`` steps the full state goes to ``bench/.cache/video_ckpt.pt`` (outside git) and
a rerun with the same configuration resumes from it (``--fresh`` starts over); a rerun that
differs only in ``--steps`` resumes too, with the cosine schedule stretched to the new length.  ``--minutes`` caps
the wall time of one invocation (the schedule is still planned for ``--steps``; rerun to continue);
whenever it stops, the current EMA weights are written.  One CPU thread unless ``--threads``.

Output in ``--out`` (default ``bench/reference_video/``): ``model.safetensors`` (EMA transformer +
label encoder, float32), ``config.json``, ``samples.png`` (one video per row, frames left to right)
and ``README.md`` with the evaluation (per-frame class accuracy with the image reference's digit
classifier, valid-motion fraction, and the same on real data as the ceiling).  It commits nothing.

    python bench/train_video.py                  # train (resumes), then evaluate
    python bench/train_video.py --eval-only      # evaluate / redraw the grid of the shipped weights
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.models import NULL_CLASS, NUM_CLASSES  # noqa: E402
from bench.train_reference import CACHE_DIR, FlowTrainer, save_checkpoint, save_grid  # noqa: E402
from bench.video import (  # noqa: E402
    MODEL_DEFAULTS,
    MODEL_FILE,
    VIDEO_REFERENCE_DIR,
    VideoDigitMetrics,
    build_label_encoder,
    build_transformer,
    load_video_reference,
    sample_moving_digits,
    to_model_layout,
    zero_init,
)

# guidance 3: per-frame class accuracy ~98 % and ~93 % of videos keep one class in every frame
# (2: 97 % / 83 %; no CFG: 81 % / 37 %); the motion metrics do not depend on it (see the README)
DEFAULT_GUIDANCE = 3.0
CHECKPOINT = "video_ckpt.pt"

TRAIN_DEFAULTS = dict(
    steps=2000,
    batch_size=16,
    lr=1e-3,
    warmup=100,
    min_lr_ratio=0.05,
    weight_decay=0.0,
    grad_clip=1.0,
    ema_decay=0.998,
    label_dropout=0.1,
    logit_normal_std=1.0,
)


class VideoTrainer(FlowTrainer):
    """The video reference: fresh moving-digit videos every step."""

    def __init__(self, model_cfg: dict, train_cfg: dict, seed: int):
        torch.manual_seed(seed)
        transformer = build_transformer(model_cfg["transformer"])
        zero_init(transformer)
        super().__init__(model_cfg, train_cfg, seed, transformer, build_label_encoder(model_cfg))

    def batch_loss(self) -> torch.Tensor:
        tc, mc, g = self.train_cfg, self.model_cfg, self.gen
        b = tc["batch_size"]
        data = sample_moving_digits(b, g, mc["frames"], mc["canvas"], mc["digit_size"], mc["max_speed"])
        x0 = to_model_layout(data["videos"])  # [B, 1, F, H, W] in [-1, 1]
        labels = data["labels"].clone()
        labels[torch.rand(b, generator=g) < tc["label_dropout"]] = NULL_CLASS
        noise = torch.randn(x0.shape, generator=g)
        s = torch.sigmoid(torch.randn(b, generator=g) * tc["logit_normal_std"])
        sb = s[:, None, None, None, None]
        xt = (1 - sb) * x0 + sb * noise
        ehs = self.label_encoder(labels)[0]
        pred = self.transformer(
            hidden_states=xt, timestep=s * 1000.0, encoder_hidden_states=ehs,
            enable_temporal_attentions=True, return_dict=False,
        )[0]
        return F.mse_loss(pred, noise - x0)


def write_weights(trainer: VideoTrainer, out: Path, guidance: float) -> None:
    from safetensors.torch import save_file

    from bench.train_classifier import update_config

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().float() for k, v in trainer.ema.items()}, str(out / MODEL_FILE))
    update_config(
        out,
        {
            **{k: trainer.model_cfg[k] for k in ("frames", "canvas", "digit_size", "max_speed", "num_text_tokens")},
            "num_classes": NUM_CLASSES,
            "null_class": NULL_CLASS,
            "transformer": trainer.model_cfg["transformer"],
            "scheduler": trainer.model_cfg["scheduler"],
            "default_guidance": guidance,
            "training": {
                **trainer.train_cfg,
                "seed": trainer.seed,
                "steps_done": trainer.step,
                "objective": "rectified flow, v = noise - x0, sigma ~ logit-normal, timestep = 1000 sigma",
                "final_loss_ema": round(trainer.loss_avg, 5),
                "train_seconds": round(trainer.elapsed, 1),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
            },
        },
    )


def save_video_grid(videos: torch.Tensor, path: Path, scale: int = 4) -> None:
    """``[N, F, 1, H, W]`` in [0, 1] as a PNG: one video per row, frames left to right."""
    n, f = videos.shape[:2]
    save_grid(videos.reshape(n * f, *videos.shape[2:]), n, path, scale=scale)


def evaluate(out: Path, per_class: int, steps: int, guidance: float | None, scan: tuple[float, ...] = ()) -> dict:
    """Sample the weights in ``out`` (``per_class`` videos per digit), write ``samples.png``; the metrics."""
    from bench.video import moving_digits

    ref = load_video_reference(out)
    metrics = VideoDigitMetrics.load()
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    g = ref.default_guidance if guidance is None else guidance

    def draw(scale: float) -> tuple[torch.Tensor, float]:
        t0 = time.time()
        v = torch.cat([ref.sample(c, steps=steps, guidance=scale, seed=1000 + i) for i, c in enumerate(labels.split(50))])
        return v, time.time() - t0

    videos, seconds = draw(g)
    result = metrics.evaluate(videos, labels)
    real_v, real_y = moving_digits(len(labels), seed=999)
    real = metrics.evaluate(real_v, real_y)
    scan_results = []
    for s in scan:
        if s == g:
            continue
        r = metrics.evaluate(draw(s)[0], labels)
        scan_results.append({"guidance": s, **{k: round(v, 4) for k, v in r.items()}})
    grid = torch.stack([videos[c * per_class] for c in range(NUM_CLASSES)])
    save_video_grid(grid, out / "samples.png")
    return dict(
        steps=steps, guidance=g, cfg="batched", samples=len(labels),
        **{k: round(v, 4) for k, v in result.items()},
        real_data={k: round(v, 4) for k, v in real.items()},
        sample_seconds=round(seconds, 1),
        guidance_scan=scan_results,
    )


README = """# Video reference model (generated by `bench/train_video.py`)

A diffusers `LatteTransformer3DModel` (Latte-1's block layout: {layers} spatial + {layers} temporal
transformer blocks, alternating; PixArt-alpha `ada_norm_single` blocks, {heads} heads x {head_dim},
patch {patch}, `{act}` feed-forward, caption projection into spatial cross-attention), {params:,}
parameters including the label embedding, trained with rectified flow on procedurally generated
videos of {frames} frames, {canvas}x{canvas}, 1 channel: a scikit-learn digit scaled to
{digit}x{digit} px moving with a constant velocity (each component in {{-1, 0, 1}} px/frame) and
bouncing off the borders.  Class-conditional through a learned label embedding ({text_tokens}
tokens of {cc} channels; class 10 = null class for classifier-free guidance).  Load it with
`bench.video.load_video_reference()`; `bench.video.video_reference_spec()` gives
`(transformer, example_kwargs)`.

| file | what |
|---|---|
| `model.safetensors` | EMA weights: `transformer.*` (the Latte transformer), `label_encoder.*` ({size_kb} KB) |
| `config.json` | data, model, scheduler, training and evaluation settings and results |
| `samples.png` | one {eval_steps}-step sample per digit 0-9 (rows), frames left to right, guidance {guidance} |

Call convention (as `LattePipeline`): `hidden_states [B, 1, F, H, W]` in [-1, 1] space,
`timestep = 1000 * sigma` (float), `encoder_hidden_states [B, {text_tokens}, {cc}]`,
`enable_temporal_attentions=True`.  `out_channels = in_channels = 1`: no learned-variance half
(Latte-1 has `out = 2 * in` and its pipeline drops the second half; the transformer does not
require it).

## Training run

- {steps} steps, batch {batch} videos (fresh random videos every step), AdamW lr {lr} (warmup
  {warmup}, cosine), EMA {ema}, label dropout {dropout}, seed {seed}; {minutes:.1f} min of wall
  time on {threads} CPU thread(s) of a 2-core machine shared with other work, torch {torch}.
- final training loss (running mean): {loss:.4f}

## Evaluation ({samples} videos, {eval_steps} Euler steps, batched CFG, guidance {guidance})

Per frame, the digit is located (bounding box of pixels > 0.3), its 10x10 window upscaled to
32x32 and classified by the image reference's digit classifier (`bench/reference/classifier.safetensors`).
Motion is judged on the digit's centre of intensity: "valid motion" = the trajectory keeps a
constant speed per axis (within 0.35 px) and reverses only at its extremes, i.e. a bounce
(`bench.video.valid_bounce`); "speed jitter" = mean change of per-axis speed between frame steps.

| metric | samples | real videos (ceiling) |
|---|---|---|
| per-frame class accuracy | {fa:.3f} | {rfa:.3f} |
| video class accuracy (majority over frames) | {va:.3f} | {rva:.3f} |
| class consistency (all frames agree) | {cons:.3f} | {rcons:.3f} |
| valid motion | {vm:.3f} | {rvm:.3f} |
| speed jitter (px/frame) | {sj:.3f} | {rsj:.3f} |
| mean tracked speed (px/frame/axis) | {sp:.3f} | {rsp:.3f} |

{motion_note}Sampling time: {sample_seconds:.0f} s for the {samples} videos (1 thread).

{scan}
Reproduce: `python bench/train_video.py` (`--threads N` to use more cores; `--fresh` to ignore the
checkpoint in `bench/.cache/`).
"""


MOTION_NOTE = """Known limitation: the digits are sharp, keep their class and move in a consistent
direction at about the right mean speed, but their speed is not constant from frame to frame (speed
jitter above), so few trajectories pass the strict bounce test: the training budget (about half an
hour on one CPU thread) buys the appearance and the coarse motion, not exact constant-velocity
physics.  For judging caching (cached vs. uncached samples of the same seeds) this does not matter;
train longer (`--steps`, resumable) for better motion.

"""


def write_readme(out: Path) -> None:
    cfg = json.loads((out / "config.json").read_text())
    t, tr, ev = cfg["transformer"], cfg["training"], cfg.get("evaluation", {})
    real = ev.get("real_data", {})
    params = sum(p.numel() for p in build_transformer(t).parameters())
    params += sum(p.numel() for p in build_label_encoder(cfg).parameters())
    scan = ""
    if ev.get("guidance_scan"):
        rows = sorted([{**ev, "guidance": ev["guidance"]}] + ev["guidance_scan"], key=lambda r: r["guidance"])
        scan = "Guidance scan (same seeds; 1 = no CFG):\n\n" + "\n".join(
            ["| guidance | per-frame accuracy | class consistency | valid motion | speed jitter |", "|---|---|---|---|---|"]
            + [f"| {r['guidance']} | {r['frame_accuracy']:.3f} | {r['class_consistency']:.3f} | {r['valid_motion']:.3f} "
               f"| {r['speed_jitter']:.3f} |" for r in rows]
        ) + "\n"
    nan = float("nan")
    text = README.format(
        layers=t["num_layers"], heads=t["num_attention_heads"], head_dim=t["attention_head_dim"],
        patch=t["patch_size"], act=t["activation_fn"], params=params, frames=cfg["frames"], canvas=cfg["canvas"],
        digit=cfg["digit_size"], text_tokens=cfg["num_text_tokens"], cc=t["caption_channels"],
        size_kb=round((out / MODEL_FILE).stat().st_size / 1024),
        eval_steps=ev.get("steps", "?"), guidance=ev.get("guidance", cfg.get("default_guidance")),
        steps=tr["steps_done"], batch=tr["batch_size"], lr=tr["lr"], warmup=tr["warmup"], ema=tr["ema_decay"],
        dropout=tr["label_dropout"], seed=tr["seed"], minutes=tr["train_seconds"] / 60, threads=tr["threads"],
        torch=tr["torch"], loss=tr["final_loss_ema"], samples=ev.get("samples", 0),
        fa=ev.get("frame_accuracy", nan), va=ev.get("video_accuracy", nan), cons=ev.get("class_consistency", nan),
        vm=ev.get("valid_motion", nan), sp=ev.get("mean_speed", nan), sj=ev.get("speed_jitter", nan),
        rsj=real.get("speed_jitter", nan),
        rfa=real.get("frame_accuracy", nan), rva=real.get("video_accuracy", nan),
        rcons=real.get("class_consistency", nan), rvm=real.get("valid_motion", nan), rsp=real.get("mean_speed", nan),
        sample_seconds=ev.get("sample_seconds", nan), scan=scan, motion_note=MOTION_NOTE
        if ev.get("valid_motion", 1.0) < 0.5 else "",
    )
    (out / "README.md").write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=VIDEO_REFERENCE_DIR)
    p.add_argument("--cache-dir", type=Path, default=CACHE_DIR)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--steps", type=int, default=TRAIN_DEFAULTS["steps"], help="length of the LR schedule")
    p.add_argument("--minutes", type=float, default=None, help="stop this invocation after this much wall time")
    p.add_argument("--batch-size", type=int, default=TRAIN_DEFAULTS["batch_size"])
    p.add_argument("--lr", type=float, default=TRAIN_DEFAULTS["lr"])
    p.add_argument("--num-layers", type=int, default=MODEL_DEFAULTS["transformer"]["num_layers"])
    p.add_argument("--guidance", type=float, default=None,
                   help=f"default CFG scale stored in the config ({DEFAULT_GUIDANCE} when training); with --eval-only: evaluate at it and store it")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--eval-only", action="store_true", help="only evaluate the weights in --out")
    p.add_argument("--eval-per-class", type=int, default=20, help="videos per digit for the evaluation")
    p.add_argument("--eval-steps", type=int, default=20)
    p.add_argument("--scan-guidance", default="1,3", help="comma-separated further guidance scales ('' = none)")
    p.add_argument("--no-eval", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from bench.train_classifier import update_config

    if not args.eval_only:
        from tqdm import tqdm

        model_cfg = json.loads(json.dumps(MODEL_DEFAULTS))
        model_cfg["transformer"]["num_layers"] = args.num_layers
        train_cfg = dict(TRAIN_DEFAULTS, steps=args.steps, batch_size=args.batch_size, lr=args.lr)
        trainer = VideoTrainer(model_cfg, train_cfg, args.seed)
        ckpt = args.cache_dir / CHECKPOINT
        if ckpt.is_file() and not args.fresh:
            sd = torch.load(ckpt, weights_only=False)
            same = {k: v for k, v in sd["train_cfg"].items() if k != "steps"} == {
                k: v for k, v in train_cfg.items() if k != "steps"}
            if (sd["model_cfg"], sd["seed"]) == (model_cfg, args.seed) and same and sd["step"] <= train_cfg["steps"]:
                trainer.load_state_dict(sd)
                if sd["train_cfg"]["steps"] != train_cfg["steps"]:  # extending (or shortening) the run
                    print(f"schedule length {sd['train_cfg']['steps']} -> {train_cfg['steps']}", file=sys.stderr)
                print(f"resuming from {ckpt} at step {trainer.step}", file=sys.stderr)
            else:
                print(f"{ckpt} is from another configuration: starting over", file=sys.stderr)
        bar = tqdm(total=train_cfg["steps"], initial=trainer.step, desc="video", smoothing=0.05, mininterval=10)
        start = t_last = time.time()
        while trainer.step < train_cfg["steps"]:
            if args.minutes is not None and time.time() - start > 60 * args.minutes:
                print(f"\n--minutes {args.minutes} reached at step {trainer.step}", file=sys.stderr)
                break
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
        save_checkpoint(trainer, ckpt)
        write_weights(trainer, args.out, DEFAULT_GUIDANCE if args.guidance is None else args.guidance)
        print(f"wrote {args.out / MODEL_FILE} at step {trainer.step} ({trainer.elapsed / 60:.1f} min of training, "
              f"loss {trainer.loss_avg:.4f})", file=sys.stderr)

    elif args.guidance is not None:
        update_config(args.out, {"default_guidance": args.guidance})

    if not args.no_eval:
        scan = tuple(float(v) for v in args.scan_guidance.split(",") if v.strip())
        ev = evaluate(args.out, args.eval_per_class, args.eval_steps, None, scan)
        update_config(args.out, {"evaluation": ev})
        write_readme(args.out)
        print(json.dumps(ev, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
