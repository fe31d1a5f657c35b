"""Train the digit classifier shipped with the reference model (reference-free quality metrics).

The classifier judges generated digits: the accuracy of samples with respect to the label they were
drawn for, and a Fréchet distance between its penultimate features of samples and of the real
digits (an FID analogue; see ``bench/metrics.py``).  It is a tiny CNN
(:class:`bench.models.DigitClassifier`) trained on the same upscaled scikit-learn digits as the
reference transformer, on a seeded 80 % split; the other 20 % gives the held-out accuracy written
to ``bench/reference/config.json``.

Training uses mild augmentation (shifts of up to 2 pixels, small contrast changes and pixel noise)
so the classifier does not reject a generated digit for artefacts that a person would not notice.
It takes a minute or two on one CPU thread.

    python bench/train_classifier.py [--epochs 30] [--seed 0] [--threads 1] [--out bench/reference]

Writes ``classifier.safetensors`` and the ``classifier`` section of ``config.json``; commits nothing.
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

from bench.models import CLASSIFIER_FILE, CONFIG_FILE, REFERENCE_DIR, DigitClassifier, load_digit_images

DEFAULTS = dict(width=16, feature_dim=64, epochs=30, batch_size=64, lr=2e-3, test_fraction=0.2)


def update_config(root: Path, updates: dict) -> dict:
    """Merge ``updates`` into ``root/config.json`` (top-level keys replaced), creating it if needed."""
    path = root / CONFIG_FILE
    cfg = json.loads(path.read_text()) if path.is_file() else {}
    cfg.update(updates)
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=False) + "\n")
    return cfg


def split_indices(n: int, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded train/test split of ``range(n)``."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 12345))
    n_test = int(round(n * test_fraction))
    return perm[n_test:], perm[:n_test]


def augment(x: torch.Tensor, g: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random shifts (zero padding at background level), contrast jitter and pixel noise; x in [0, 1]."""
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=0.0)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=g)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=g)
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])
    scale = 0.8 + 0.4 * torch.rand(b, 1, 1, 1, generator=g)
    out = out * scale + 0.05 * torch.randn(out.shape, generator=g)
    return out.clamp(0.0, 1.0)


@torch.no_grad()
def accuracy(model: DigitClassifier, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += (model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum().item()
    return correct / max(len(x), 1)


def train_classifier(
    out: Path = REFERENCE_DIR,
    image_size: int = 32,
    seed: int = 0,
    epochs: int = DEFAULTS["epochs"],
    batch_size: int = DEFAULTS["batch_size"],
    lr: float = DEFAULTS["lr"],
    width: int = DEFAULTS["width"],
    feature_dim: int = DEFAULTS["feature_dim"],
    progress: bool = True,
) -> dict:
    """Train, save ``classifier.safetensors`` + config section under ``out``; return the section."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    torch.manual_seed(seed)
    x, y = load_digit_images(image_size)
    x = (x + 1.0) / 2.0  # the classifier takes [0, 1] images, like the sampler returns
    train_idx, test_idx = split_indices(len(x), DEFAULTS["test_fraction"], seed)
    xtr, ytr, xte, yte = x[train_idx], y[train_idx], x[test_idx], y[test_idx]

    model = DigitClassifier(image_size, width, feature_dim)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = (len(xtr) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    bar = tqdm(range(epochs), desc="classifier", disable=not progress)
    for _ in bar:
        model.train()
        perm = torch.randperm(len(xtr), generator=g)
        total = 0.0
        for i in range(0, len(xtr), batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(model(augment(xtr[idx], g)), ytr[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        bar.set_postfix(loss=f"{total / len(xtr):.3f}")
    model.eval()
    section = dict(
        width=width,
        feature_dim=feature_dim,
        seed=seed,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        train_images=len(xtr),
        test_images=len(xte),
        test_accuracy=round(accuracy(model, xte, yte), 4),
        train_accuracy=round(accuracy(model, xtr, ytr), 4),
        train_seconds=round(time.time() - t0, 1),
    )
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / CLASSIFIER_FILE))
    update_config(out, {"classifier": section})
    return section


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REFERENCE_DIR)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    section = train_classifier(
        args.out, args.image_size, args.seed, args.epochs, args.batch_size, args.lr
    )
    print(json.dumps(section, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
