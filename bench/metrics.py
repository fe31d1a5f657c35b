"""Image-quality metrics for judging cached sampling against the uncached reference.

Two kinds of metric, both on images in [0, 1] shaped ``[N, C, H, W]`` (or ``[N, H, W]``):

Full-reference (a cached run against the uncached output of the same seeds and labels)
    :func:`psnr` — peak signal-to-noise ratio per image, ``10 log10(range^2 / MSE)``, averaged over
    images; ``inf`` for identical images.  :func:`ssim` — structural similarity per image,
    scikit-image's ``structural_similarity`` (its defaults: a uniform 7x7 window, K1 = 0.01, K2 = 0.03),
    averaged over images; 1 for identical images.

Reference-free (is it still a digit of the right class?), with the shipped digit classifier
    :func:`class_accuracy` — the fraction of samples the classifier assigns to the label they were
    drawn for.  :func:`frechet_distance` — the Fréchet distance between Gaussians fitted to the
    classifier's penultimate features of two image sets (the FID recipe with the digit classifier in
    place of Inception):  ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)``.  The matrix
    square root uses symmetric eigen-decompositions in float64, which stays real and stable for the
    rank-deficient covariances of small sample sets (no ``scipy.linalg.sqrtm`` needed).
    :class:`DigitMetrics` bundles the classifier with the real digits' feature statistics.

Fréchet distances depend on the number of samples (small sets are biased upwards): compare methods
at equal sample counts; :meth:`DigitMetrics.real_split_fd` gives the floor of two halves of the real
digits.  scikit-image is a ``[bench]``/``[test]`` extra, imported only by :func:`ssim`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch


def _as_batch(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """``[N, C, H, W]`` / ``[N, H, W]`` / ``[H, W]`` -> float64 numpy ``[N, C, H, W]``."""
    a = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    a = a.astype(np.float64, copy=False)
    if a.ndim == 2:
        a = a[None, None]
    elif a.ndim == 3:
        a = a[:, None]
    if a.ndim != 4:
        raise ValueError(f"expected images shaped [N, C, H, W], [N, H, W] or [H, W], got {a.shape}")
    return a


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"image sets differ in shape: {a.shape} vs {b.shape}")


def psnr(x, y, data_range: float = 1.0, reduction: str = "mean"):
    """PSNR in dB of each image of ``x`` against ``y``; mean over images (``reduction="none"``: an array).

    Identical images give ``inf`` (and so does the mean if any pair is identical).
    """
    a, b = _as_batch(x), _as_batch(y)
    _check_pair(a, b)
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        values = 10.0 * np.log10(data_range**2 / mse)
    return values if reduction == "none" else float(values.mean())


def ssim(x, y, data_range: float = 1.0, reduction: str = "mean"):
    """SSIM of each image of ``x`` against ``y`` (channels averaged); mean over images by default."""
    from skimage.metrics import structural_similarity

    a, b = _as_batch(x), _as_batch(y)
    _check_pair(a, b)
    values = np.array(
        [
            np.mean([structural_similarity(a[i, c], b[i, c], data_range=data_range) for c in range(a.shape[1])])
            for i in range(len(a))
        ]
    )
    return values if reduction == "none" else float(values.mean())


@torch.no_grad()
def classifier_features(classifier, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Penultimate features ``[N, D]`` (float64, CPU) of images in [0, 1]."""
    classifier.eval()
    device = next(classifier.parameters()).device
    images = images.reshape(len(images), 1, *images.shape[-2:])
    feats = [classifier.features(images[i : i + batch_size].to(device).float()) for i in range(0, len(images), batch_size)]
    return torch.cat(feats).double().cpu()


@torch.no_grad()
def class_accuracy(classifier, images: torch.Tensor, labels: Sequence[int] | torch.Tensor, batch_size: int = 256) -> float:
    """Fraction of ``images`` (in [0, 1]) that ``classifier`` assigns to their ``labels``."""
    classifier.eval()
    device = next(classifier.parameters()).device
    labels = torch.as_tensor(labels).reshape(-1).cpu()
    images = images.reshape(len(images), 1, *images.shape[-2:])
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    preds = torch.cat(
        [classifier(images[i : i + batch_size].to(device).float()).argmax(1).cpu() for i in range(0, len(images), batch_size)]
    )
    return float((preds == labels).double().mean()) if len(labels) else float("nan")


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and covariance ``[D, D]`` (unbiased) of ``[N, D]`` features, float64."""
    f = features.detach().double().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features, np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need features shaped [N >= 2, D], got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative round-off eigenvalues -> 0)."""
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"statistics differ in shape: {mu1.shape}/{s1.shape} vs {mu2.shape}/{s2.shape}")
    r1 = _sqrt_psd(s1)
    # tr((S1 S2)^1/2) = tr((S1^1/2 S2 S1^1/2)^1/2) = sum of sqrt of the eigenvalues of a PSD matrix
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0.0, None)).sum()
    value = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * cross)
    return max(value, 0.0)


def frechet_distance(features_a, features_b) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``[N, D]`` and ``[M, D]``."""
    return frechet_distance_from_stats(*feature_statistics(features_a), *feature_statistics(features_b))


@dataclass
class DigitMetrics:
    """The digit classifier plus the feature statistics of the real digits.

    ``DigitMetrics.from_reference(load_reference())`` is the usual way to get one.
    """

    classifier: torch.nn.Module
    real_images: torch.Tensor  # [N, 1, H, W] in [0, 1]
    real_labels: torch.Tensor
    real_mu: np.ndarray
    real_sigma: np.ndarray

    @classmethod
    def from_reference(cls, ref) -> "DigitMetrics":
        from bench.models import load_digit_images

        if ref.classifier is None:
            raise ValueError("the reference was loaded without its classifier (load_reference(classifier=True))")
        x, y = load_digit_images(ref.image_size)
        x = (x + 1.0) / 2.0
        mu, sigma = feature_statistics(classifier_features(ref.classifier, x))
        return cls(ref.classifier, x, y, mu, sigma)

    def accuracy(self, images: torch.Tensor, labels) -> float:
        return class_accuracy(self.classifier, images, labels)

    def fd(self, images: torch.Tensor) -> float:
        """Fréchet distance of ``images`` to all real digits, on classifier features."""
        return frechet_distance_from_stats(
            *feature_statistics(classifier_features(self.classifier, images)), self.real_mu, self.real_sigma
        )

    def real_accuracy(self) -> float:
        return self.accuracy(self.real_images, self.real_labels)

    def real_split_fd(self, seed: int = 0) -> float:
        """FD between two random halves of the real digits: the floor an ideal sampler would reach."""
        perm = torch.randperm(len(self.real_images), generator=torch.Generator().manual_seed(seed))
        half = len(perm) // 2
        feats = classifier_features(self.classifier, self.real_images)
        return frechet_distance(feats[perm[:half]], feats[perm[half:]])

    def evaluate(self, images: torch.Tensor, labels) -> dict[str, float]:
        """``{"accuracy": ..., "frechet_distance": ...}`` of generated ``images`` drawn for ``labels``."""
        return {"accuracy": self.accuracy(images, labels), "frechet_distance": self.fd(images)}
