"""The shipped reference model: a small, trained Flux transformer that draws digits.

Speed numbers on random weights say nothing about cache quality (a random network has no smooth
denoising trajectory to reuse), so the project ships a real, trained diffusion transformer and
judges every caching policy on it.  This module loads it offline and samples from it the way a
diffusers pipeline would; ``bench/train_reference.py`` and ``bench/train_classifier.py`` produce
the files it reads from ``bench/reference/``.

The model
    A diffusers :class:`~diffusers.FluxTransformer2DModel` with the real Flux architecture
    (dual-stream blocks, then single-stream blocks, 3-axis RoPE, AdaLN modulation) and a tiny
    width, trained with the rectified-flow objective on scikit-learn's 8x8 digits upscaled to
    32x32 and scaled to [-1, 1].  Images are packed into tokens like Flux packs its latents: each
    ``p x p`` patch becomes one token of ``p*p`` channels (see :func:`pack_images`) and its
    position goes to RoPE as ``img_ids = (0, row, col)``.

The "text encoder"
    :class:`LabelEncoder` maps a class label (0-9, or 10 = the null class used for
    classifier-free guidance) through one ``nn.Embedding`` to ``encoder_hidden_states`` (a few
    "text" tokens, ``txt_ids`` all zero as in Flux) and ``pooled_projections``.  It runs outside
    the transformer, as a text encoder does in a pipeline, so a compiled transformer sees exactly
    the inputs the real Flux transformer sees.

The convention (diffusers' ``FlowMatchEulerDiscreteScheduler``)
    ``x_s = (1 - s) * x0 + s * noise``, the model predicts the velocity ``noise - x0`` and
    sampling integrates ``s`` from 1 down to 0 with Euler steps.  As in ``FluxPipeline`` the
    schedule is ``sigmas = linspace(1, 1/steps, steps)`` and the transformer is called with
    ``timestep = t / 1000`` (= sigma), a float tensor of shape ``[batch]``.

Classifier-free guidance comes in the two forms real pipelines use: ``cfg="batched"`` (uncond and
cond concatenated along the batch, one call per step, like the SD3/PixArt pipelines) and
``cfg="split"`` (two calls per step, cond first, then uncond, like ``FluxPipeline``'s true CFG).
Each call is wrapped in ``transformer.cache_context(name, ...)`` when the transformer has it,
exactly as the diffusers pipelines do, so diffusers' cache hooks work unchanged.

:class:`DigitClassifier` is a tiny CNN trained on the same upscaled digits; its class scores and
its penultimate features give reference-free metrics (see ``bench/metrics.py``).
"""

from __future__ import annotations

import contextlib
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"  # transformer.* and label_encoder.* tensors
CLASSIFIER_FILE = "classifier.safetensors"

NUM_CLASSES = 10
NULL_CLASS = 10  # the "empty prompt" of classifier-free guidance


# --------------------------------------------------------------------------------------------
# data and token packing
# --------------------------------------------------------------------------------------------


def load_digit_images(image_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits (1,797 images, offline) as ``([N, 1, S, S] in [-1, 1], labels [N])``.

    The 8x8 images (values 0..16) are upscaled with bilinear interpolation; the result is what the
    reference model and the classifier are trained on.
    """
    from sklearn.datasets import load_digits  # bench/test extra, not a core dependency

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]  # [N, 1, 8, 8] in [0, 1]
    if image_size != x.shape[-1]:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x.clamp(0.0, 1.0) * 2.0 - 1.0
    y = torch.from_numpy(digits.target.astype(np.int64))
    return x, y


def pack_images(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/p)*(W/p), C*p*p]``, token order row-major, like Flux's ``_pack_latents``."""
    b, c, h, w = x.shape
    p = patch_size
    x = x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpack_images(tokens: torch.Tensor, image_size: int, patch_size: int, channels: int = 1) -> torch.Tensor:
    """Inverse of :func:`pack_images`."""
    b = tokens.shape[0]
    p = patch_size
    g = image_size // p
    x = tokens.reshape(b, g, g, channels, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels, image_size, image_size)


def make_img_ids(grid: int) -> torch.Tensor:
    """RoPE positions of the image tokens: ``[grid*grid, 3]`` rows of ``(0, row, col)``, as in Flux."""
    ids = torch.zeros(grid, grid, 3)
    ids[..., 1] = torch.arange(grid, dtype=torch.float32)[:, None]
    ids[..., 2] = torch.arange(grid, dtype=torch.float32)[None, :]
    return ids.reshape(grid * grid, 3)


def make_txt_ids(num_tokens: int) -> torch.Tensor:
    """RoPE positions of the text tokens: all zero, as in Flux."""
    return torch.zeros(num_tokens, 3)


# --------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------


class LabelEncoder(nn.Module):
    """Class label -> (``encoder_hidden_states [B, T, D]``, ``pooled_projections [B, P]``).

    One embedding table of ``num_classes + 1`` rows (the last is the null class); each row is split
    into ``T`` text tokens of width ``D`` and a pooled vector of width ``P``.
    """

    def __init__(self, num_tokens: int, joint_attention_dim: int, pooled_projection_dim: int,
                 num_classes: int = NUM_CLASSES):
        super().__init__()
        self.num_tokens = num_tokens
        self.joint_attention_dim = joint_attention_dim
        self.pooled_projection_dim = pooled_projection_dim
        self.embedding = nn.Embedding(num_classes + 1, num_tokens * joint_attention_dim + pooled_projection_dim)
        nn.init.normal_(self.embedding.weight, std=1.0)

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.embedding(labels)
        n = self.num_tokens * self.joint_attention_dim
        tokens = e[:, :n].reshape(labels.shape[0], self.num_tokens, self.joint_attention_dim)
        return tokens, e[:, n:]


class DigitClassifier(nn.Module):
    """A tiny CNN for ``[B, 1, S, S]`` digit images in [0, 1]; ``features`` is its penultimate layer."""

    def __init__(self, image_size: int = 32, width: int = 16, feature_dim: int = 64):
        super().__init__()
        self.image_size = image_size
        self.conv = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
        )
        self.fc = nn.Linear(4 * width * 16, feature_dim)
        self.head = nn.Linear(feature_dim, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        # the network sees [-1, 1] internally; callers pass [0, 1] images
        h = self.conv(x * 2.0 - 1.0)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_transformer(transformer_config: dict[str, Any]):
    """A fresh ``FluxTransformer2DModel`` from the ``transformer`` section of the config."""
    from diffusers import FluxTransformer2DModel

    cfg = dict(transformer_config)
    if "axes_dims_rope" in cfg:
        cfg["axes_dims_rope"] = tuple(cfg["axes_dims_rope"])
    return FluxTransformer2DModel(**cfg)


def build_scheduler(scheduler_config: dict[str, Any] | None = None):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**(scheduler_config or {}))


# --------------------------------------------------------------------------------------------
# the loaded reference
# --------------------------------------------------------------------------------------------


def _device_dtype(module: nn.Module, default: tuple[torch.device, torch.dtype]) -> tuple[torch.device, torch.dtype]:
    """Where a (possibly compiled or hooked) transformer lives; ``default`` if it has no parameters."""
    try:
        p = next(module.parameters())
    except (StopIteration, AttributeError, TypeError):
        return default
    return p.device, p.dtype


def _cache_context(transformer: Any, name: str, **kwargs: Any):
    """``transformer.cache_context(name, ...)`` as diffusers pipelines use it, or a no-op.

    Keyword arguments the installed diffusers does not accept are dropped.
    """
    fn = getattr(transformer, "cache_context", None)
    if fn is None:
        return contextlib.nullcontext()
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    return fn(name, **kwargs)


@dataclass
class Reference:
    """The loaded reference model.  Build it with :func:`load_reference`."""

    transformer: nn.Module  # FluxTransformer2DModel, eval mode
    label_encoder: LabelEncoder
    scheduler: Any  # FlowMatchEulerDiscreteScheduler (a template: sample() works on a copy)
    classifier: DigitClassifier | None
    image_size: int
    patch_size: int
    default_guidance: float
    config: dict[str, Any] = field(default_factory=dict)

    # -- shapes -------------------------------------------------------------------------------

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def initial_noise(self, n: int, seed: int = 0) -> torch.Tensor:
        """Packed initial latents ``[n, tokens, p*p]``, drawn on the CPU from ``seed`` (device independent)."""
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        noise = torch.randn((n, 1, self.image_size, self.image_size), generator=g, dtype=torch.float32)
        return pack_images(noise, self.patch_size)

    def conditioning(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(encoder_hidden_states, pooled_projections)`` for integer labels (10 = null class)."""
        with torch.no_grad():
            return self.label_encoder(labels.to(self.label_encoder.embedding.weight.device))

    def example_kwargs(self, batch: int = 2, sigma: float = 1.0, seed: int = 0) -> dict[str, Any]:
        """Keyword arguments of one transformer call, as :meth:`sample` makes them.

        ``batch`` images: the first half null class, the second half digits 0, 1, ... (the
        batched-CFG layout), at noise level ``sigma``.
        """
        half = batch // 2
        labels = torch.tensor([NULL_CLASS] * half + [i % NUM_CLASSES for i in range(batch - half)])
        ehs, pooled = self.conditioning(labels)
        device, dtype = self.device, self.dtype
        return dict(
            hidden_states=self.initial_noise(batch, seed).to(device, dtype),
            encoder_hidden_states=ehs.to(device, dtype),
            pooled_projections=pooled.to(device, dtype),
            timestep=torch.full((batch,), float(sigma), device=device, dtype=dtype),
            img_ids=make_img_ids(self.grid).to(device, dtype),
            txt_ids=make_txt_ids(self.label_encoder.num_tokens).to(device, dtype),
            guidance=None,
            return_dict=False,
        )

    # -- sampling -----------------------------------------------------------------------------

    def sample(
        self,
        labels: Sequence[int] | torch.Tensor,
        steps: int = 28,
        guidance: float | None = None,
        seed: int = 0,
        transformer: nn.Module | None = None,
        cfg: str = "batched",
        callback: Callable[[int, float, torch.Tensor], None] | None = None,
        use_cache_context: bool = True,
    ) -> torch.Tensor:
        """Draw one image per label; returns ``[N, 1, H, W]`` float32 on the CPU, in [0, 1].

        ``transformer`` is any callable with the ``FluxTransformer2DModel`` call signature
        (compiled, hooked, cached); default: the loaded one.  ``guidance`` (default: the config's)
        <= 1 means no CFG, one call per step.  ``cfg``: ``"batched"`` (uncond+cond in one call) or
        ``"split"`` (cond call, then uncond call).  ``callback(step_index, sigma, latents)`` is
        called after every step with the packed latents.  Deterministic in ``seed``.
        """
        if cfg not in ("batched", "split"):
            raise ValueError(f"cfg must be 'batched' or 'split', got {cfg!r}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        model = self.transformer if transformer is None else transformer
        device, dtype = _device_dtype(model, (self.device, self.dtype))
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if labels.numel() and (labels.min() < 0 or labels.max() > NULL_CLASS):
            raise ValueError(f"labels must be in 0..{NULL_CLASS} (10 = null class), got {labels.tolist()}")
        n = labels.numel()
        g = float(self.default_guidance if guidance is None else guidance)
        do_cfg = g > 1.0

        cond_ehs, cond_pooled = (t.to(device, dtype) for t in self.conditioning(labels))
        if do_cfg:
            unc_ehs, unc_pooled = (t.to(device, dtype) for t in self.conditioning(torch.full_like(labels, NULL_CLASS)))
        img_ids = make_img_ids(self.grid).to(device, dtype)
        txt_ids = make_txt_ids(self.label_encoder.num_tokens).to(device, dtype)

        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps), device=device)
        scheduler.set_begin_index(0)
        latents = self.initial_noise(n, seed).to(device, dtype)

        def call(name, hidden, ehs, pooled, timestep, ctx):
            with _cache_context(model, name, **ctx) if use_cache_context else contextlib.nullcontext():
                return model(
                    hidden_states=hidden,
                    encoder_hidden_states=ehs,
                    pooled_projections=pooled,
                    timestep=timestep,
                    img_ids=img_ids,
                    txt_ids=txt_ids,
                    guidance=None,
                    return_dict=False,
                )[0]

        with torch.no_grad():
            for i, t in enumerate(scheduler.timesteps):
                sigma = float(scheduler.sigmas[i])
                ctx = dict(step_index=i, num_inference_steps=steps, timestep=t, sigma=sigma)
                if not do_cfg:
                    timestep = t.expand(n).to(dtype) / 1000
                    v = call("cond", latents, cond_ehs, cond_pooled, timestep, ctx)
                elif cfg == "batched":
                    timestep = t.expand(2 * n).to(dtype) / 1000
                    out = call(
                        "cond_uncond",
                        torch.cat([latents, latents]),
                        torch.cat([unc_ehs, cond_ehs]),
                        torch.cat([unc_pooled, cond_pooled]),
                        timestep,
                        ctx,
                    )
                    v_unc, v_cond = out.chunk(2)
                    v = v_unc + g * (v_cond - v_unc)
                else:
                    timestep = t.expand(n).to(dtype) / 1000
                    v_cond = call("cond", latents, cond_ehs, cond_pooled, timestep, ctx)
                    v_unc = call("uncond", latents, unc_ehs, unc_pooled, timestep, ctx)
                    v = v_unc + g * (v_cond - v_unc)
                latents = scheduler.step(v, t, latents, return_dict=False)[0]
                if callback is not None:
                    callback(i, sigma, latents)

        images = unpack_images(latents.float().cpu(), self.image_size, self.patch_size)
        return ((images + 1.0) / 2.0).clamp(0.0, 1.0)


def load_reference(
    path: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    classifier: bool = True,
) -> Reference:
    """Load the shipped reference model (offline) from ``path`` (default ``bench/reference/``)."""
    from safetensors.torch import load_file

    root = Path(path) if path is not None else REFERENCE_DIR
    cfg_path = root / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(
            f"{cfg_path} not found: the reference model is missing; train it with "
            "`python bench/train_reference.py` or restore bench/reference/ from git"
        )
    config = json.loads(cfg_path.read_text())

    transformer = build_transformer(config["transformer"])
    tc = config["transformer"]
    label_encoder = LabelEncoder(config["num_text_tokens"], tc["joint_attention_dim"], tc["pooled_projection_dim"])
    state = load_file(str(root / MODEL_FILE))
    transformer.load_state_dict({k[len("transformer."):]: v for k, v in state.items() if k.startswith("transformer.")})
    label_encoder.load_state_dict(
        {k[len("label_encoder."):]: v for k, v in state.items() if k.startswith("label_encoder.")}
    )
    transformer.to(device=device)
    if dtype != torch.float32:  # the weights are float32; diffusers warns about any .to(dtype)
        transformer.to(dtype=dtype)
    transformer.eval().requires_grad_(False)
    label_encoder.to(device=device).eval().requires_grad_(False)

    clf = None
    if classifier:
        cc = config.get("classifier", {})
        clf_path = root / CLASSIFIER_FILE
        if clf_path.is_file():
            clf = DigitClassifier(config["image_size"], cc.get("width", 16), cc.get("feature_dim", 64))
            clf.load_state_dict(load_file(str(clf_path)))
            clf.to(device).eval().requires_grad_(False)

    return Reference(
        transformer=transformer,
        label_encoder=label_encoder,
        scheduler=build_scheduler(config.get("scheduler")),
        classifier=clf,
        image_size=config["image_size"],
        patch_size=config["patch_size"],
        default_guidance=float(config.get("default_guidance", 1.5)),
        config=config,
    )


def reference_spec(batch: int = 2) -> tuple[nn.Module, dict[str, Any]]:
    """``(transformer, example_kwargs)`` for a ``module:callable`` model SPEC on the command line.

    The transformer is the loaded reference (eval mode); the kwargs are one batched-CFG call at the
    first sampling step.
    """
    ref = load_reference(classifier=False)
    return ref.transformer, ref.example_kwargs(batch=batch)
