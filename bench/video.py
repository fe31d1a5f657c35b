"""The shipped video reference model: a small, trained Latte transformer that draws moving digits.

The image reference (``bench/models.py``) judges caching on a Flux transformer; this module does the
same for video, on the architecture the OmniCache paper uses for its video results: Latte's
alternating spatial and temporal transformer blocks.  ``bench/train_video.py`` produces the files
this module reads from ``bench/reference_video/``.

The data (:func:`moving_digits`)
    Videos of ``F = 8`` frames on a 16x16 black canvas, one channel, values in [0, 1].  Each video
    holds one scikit-learn digit (the 8x8 image bilinearly scaled to 10x10) that translates with a
    constant integer velocity, each component in {-1, 0, 1} pixels per frame (not both 0), and
    bounces off the canvas borders (its top-left corner reflects inside ``[0, 16 - 10]``).
    Integer positions keep every frame a crisp copy of the same sprite, so a frame-level classifier
    and a position tracker can judge samples exactly.  The label is the digit class.  Everything is
    a deterministic function of the seed.

The model (:func:`build_transformer`)
    A diffusers :class:`~diffusers.LatteTransformer3DModel` configured like Latte-1 (``norm_type
    ada_norm_single``, i.e. PixArt-alpha blocks with a shared timestep AdaLN and per-block
    ``scale_shift_table``; ``gelu-approximate`` feed-forward; attention bias; a caption projection
    into spatial cross-attention; a fixed sin-cos temporal position embedding added before the
    first temporal block) at a tiny width: 4 spatial + 4 temporal blocks, 4 heads of 16, patch size
    2 (64 tokens per frame, 512 per video).  It is called like the diffusers ``LattePipeline`` calls
    it: ``hidden_states [B, C, F, H, W]``, ``timestep`` in the scheduler's 0..1000 units,
    ``encoder_hidden_states``, ``enable_temporal_attentions=True``.

    Latte quirks worth knowing: ``out_channels`` may equal ``in_channels`` (Latte-1 uses
    ``out = 2 * in`` for a learned variance that its pipeline drops; nothing in the transformer
    requires it, so this model predicts just the velocity, ``in = out = 1``); ``cross_attention_dim``
    must equal the inner width (the caption projection maps ``caption_channels`` to it); and the
    number of frames is fixed by ``video_length`` (the temporal position table).

The "text encoder"
    :class:`bench.models.LabelEncoder` with no pooled vector: a class label (0-9, 10 = null class
    for classifier-free guidance) becomes ``num_text_tokens`` tokens of ``caption_channels``.

The convention (diffusers' ``FlowMatchEulerDiscreteScheduler``, as for the image reference)
    ``x_s = (1 - s) x0 + s noise``, the model predicts ``noise - x0``, sampling integrates ``s``
    from 1 to 0 with ``sigmas = linspace(1, 1/steps, steps)``; Latte's timestep embedding expects
    0..1000, so the transformer receives ``timestep = 1000 s`` (the scheduler's ``t`` itself).

Metrics (video specific; the image ones are in ``bench/metrics.py``)
    Full-reference, cached against uncached video of the same seed: :func:`frame_psnr` and
    :func:`frame_ssim` (per frame, averaged) and :func:`temporal_consistency`, which compares the
    *frame differences* ``x[f+1] - x[f]`` of the two videos: their mean absolute error, their
    correlation, and the ratio of their mean magnitudes (``flicker_ratio``: 1 = same amount of
    change between frames, > 1 = caching added flicker, < 1 = caching froze motion).  Frame
    differences need no optical flow and, for a rigidly moving sprite on a black background,
    carry exactly the motion.  Reference-free: :class:`VideoDigitMetrics` tracks the digit in every
    frame (a 10x10 window on its bright pixels), classifies the crop with the image reference's digit
    classifier, and checks that the digit's trajectory (centre of intensity) is a constant-velocity
    bounce.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.models import (
    NULL_CLASS,
    NUM_CLASSES,
    REFERENCE_DIR,
    DigitClassifier,
    LabelEncoder,
    _cache_context,
    _device_dtype,
    build_scheduler,
    load_digit_images,
)

VIDEO_REFERENCE_DIR = Path(__file__).resolve().parent / "reference_video"
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"  # transformer.* and label_encoder.* tensors

FRAMES = 8
CANVAS = 16
DIGIT_SIZE = 10
MAX_SPEED = 1  # pixels per frame per axis

MODEL_DEFAULTS = dict(
    frames=FRAMES,
    canvas=CANVAS,
    digit_size=DIGIT_SIZE,
    max_speed=MAX_SPEED,
    num_text_tokens=4,
    transformer=dict(
        sample_size=CANVAS,
        patch_size=2,
        in_channels=1,
        out_channels=1,
        num_layers=4,  # 4 spatial + 4 temporal blocks, alternating
        num_attention_heads=4,
        attention_head_dim=16,
        cross_attention_dim=64,  # = inner width (heads * head_dim), as Latte requires
        caption_channels=32,
        activation_fn="gelu-approximate",
        norm_type="ada_norm_single",
        num_embeds_ada_norm=1000,
        attention_bias=True,
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        video_length=FRAMES,
    ),
    scheduler=dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False),
)


# --------------------------------------------------------------------------------------------
# data: moving digits
# --------------------------------------------------------------------------------------------

_SPRITES: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def load_sprites(digit_size: int = DIGIT_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 scikit-learn digits scaled to ``digit_size`` px: ``([N, S, S] in [0, 1], labels [N])``."""
    if digit_size not in _SPRITES:
        x, y = load_digit_images(digit_size)
        _SPRITES[digit_size] = (((x[:, 0] + 1.0) / 2.0).clamp(0.0, 1.0), y)
    return _SPRITES[digit_size]


def bounce(start: torch.Tensor, velocity: torch.Tensor, frames: int, limit: int) -> torch.Tensor:
    """Positions ``[..., frames]`` of a point moving from ``start`` with ``velocity``, reflected into ``[0, limit]``."""
    f = torch.arange(frames)
    p = start[..., None] + velocity[..., None] * f
    if limit == 0:
        return torch.zeros_like(p)
    q = torch.remainder(p, 2 * limit)
    return torch.where(q <= limit, q, 2 * limit - q)


def render(sprites: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, canvas: int = CANVAS) -> torch.Tensor:
    """Paste ``sprites [N, S, S]`` at integer top-left corners ``ys, xs [N, F]``: ``[N, F, 1, canvas, canvas]``."""
    n, s, _ = sprites.shape
    i = torch.arange(canvas)
    rows = i[None, None, :] - ys[..., None]  # [N, F, canvas]
    cols = i[None, None, :] - xs[..., None]
    valid = ((rows >= 0) & (rows < s))[..., :, None] & ((cols >= 0) & (cols < s))[..., None, :]
    r = rows.clamp(0, s - 1)[..., :, None].expand(-1, -1, -1, canvas)
    c = cols.clamp(0, s - 1)[..., None, :].expand(-1, -1, canvas, -1)
    b = torch.arange(n)[:, None, None, None].expand_as(r)
    out = sprites[b, r, c] * valid
    return out[:, :, None]


def sample_moving_digits(
    n: int,
    generator: torch.Generator,
    frames: int = FRAMES,
    canvas: int = CANVAS,
    digit_size: int = DIGIT_SIZE,
    max_speed: int = MAX_SPEED,
    labels: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """``n`` random moving-digit videos drawn from ``generator``.

    Returns ``videos [n, F, 1, H, W]`` in [0, 1], ``labels [n]``, ``positions [n, F, 2]`` (top-left
    corner, (row, col)), ``velocity [n, 2]`` and ``index [n]`` (the sprite used).  With ``labels``
    given, sprites are drawn among the digits of those classes.
    """
    sprites, sprite_labels = load_sprites(digit_size)
    if labels is None:
        idx = torch.randint(0, len(sprites), (n,), generator=generator)
    else:
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        pick = torch.rand(len(labels), generator=generator)
        idx = torch.empty(len(labels), dtype=torch.long)
        for c in labels.unique().tolist():
            pool = (sprite_labels == c).nonzero().flatten()
            m = labels == c
            idx[m] = pool[(pick[m] * len(pool)).long().clamp(max=len(pool) - 1)]
        n = len(labels)
    limit = canvas - digit_size
    start = torch.randint(0, limit + 1, (n, 2), generator=generator)
    choices = [(vy, vx) for vy in range(-max_speed, max_speed + 1) for vx in range(-max_speed, max_speed + 1)
               if (vy, vx) != (0, 0)]
    velocity = torch.tensor(choices)[torch.randint(0, len(choices), (n,), generator=generator)]
    pos = bounce(start, velocity, frames, limit).permute(0, 2, 1)  # [n, F, 2]
    videos = render(sprites[idx], pos[..., 0], pos[..., 1], canvas)
    return dict(videos=videos, labels=sprite_labels[idx], positions=pos, velocity=velocity, index=idx)


def moving_digits(n: int, seed: int = 0, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` moving-digit videos ``[n, F, 1, H, W]`` in [0, 1] and their labels; deterministic in ``seed``."""
    d = sample_moving_digits(n, torch.Generator().manual_seed(int(seed)), **kwargs)
    return d["videos"], d["labels"]


def to_model_layout(videos: torch.Tensor) -> torch.Tensor:
    """``[B, F, C, H, W]`` in [0, 1] -> Latte's ``[B, C, F, H, W]`` in [-1, 1]."""
    return (videos * 2.0 - 1.0).permute(0, 2, 1, 3, 4).contiguous()


def from_model_layout(latents: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_model_layout`, clamped to [0, 1]."""
    return ((latents.permute(0, 2, 1, 3, 4) + 1.0) / 2.0).clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------


def build_transformer(transformer_config: dict[str, Any]):
    """A fresh ``LatteTransformer3DModel`` from the ``transformer`` section of the config."""
    from diffusers import LatteTransformer3DModel

    return LatteTransformer3DModel(**transformer_config)


def build_label_encoder(config: dict[str, Any]) -> LabelEncoder:
    """The label "text encoder": ``num_text_tokens`` tokens of ``caption_channels``, no pooled vector."""
    return LabelEncoder(config["num_text_tokens"], config["transformer"]["caption_channels"], 0)


def zero_init(transformer: nn.Module) -> None:
    """Make every block start as the identity (DiT's adaLN-zero, in Latte/PixArt terms).

    Zeroed: the shared timestep modulation ``adaln_single.linear``, the gate rows (2 and 5) of
    every block's ``scale_shift_table``, every block's cross-attention output projection (it is
    ungated in PixArt blocks) and the final ``proj_out``.
    """
    nn.init.zeros_(transformer.adaln_single.linear.weight)
    nn.init.zeros_(transformer.adaln_single.linear.bias)
    for blocks in (transformer.transformer_blocks, transformer.temporal_transformer_blocks):
        for block in blocks:
            with torch.no_grad():
                block.scale_shift_table[2].zero_()
                block.scale_shift_table[5].zero_()
            if block.attn2 is not None:
                nn.init.zeros_(block.attn2.to_out[0].weight)
                if block.attn2.to_out[0].bias is not None:
                    nn.init.zeros_(block.attn2.to_out[0].bias)
    nn.init.zeros_(transformer.proj_out.weight)
    nn.init.zeros_(transformer.proj_out.bias)


# --------------------------------------------------------------------------------------------
# the loaded reference
# --------------------------------------------------------------------------------------------


@dataclass
class VideoReference:
    """The loaded video reference model.  Build it with :func:`load_video_reference`."""

    transformer: nn.Module  # LatteTransformer3DModel, eval mode
    label_encoder: LabelEncoder
    scheduler: Any  # FlowMatchEulerDiscreteScheduler (a template: sample() works on a copy)
    frames: int
    canvas: int
    digit_size: int
    default_guidance: float
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def initial_noise(self, n: int, seed: int = 0) -> torch.Tensor:
        """Initial latents ``[n, 1, F, H, W]`` (Latte layout), drawn on the CPU from ``seed``."""
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        return torch.randn((n, 1, self.frames, self.canvas, self.canvas), generator=g, dtype=torch.float32)

    def conditioning(self, labels: torch.Tensor) -> torch.Tensor:
        """``encoder_hidden_states [B, T, caption_channels]`` for integer labels (10 = null class)."""
        with torch.no_grad():
            return self.label_encoder(labels.to(self.label_encoder.embedding.weight.device))[0]

    def example_kwargs(self, batch: int = 2, sigma: float = 1.0, seed: int = 0) -> dict[str, Any]:
        """Keyword arguments of one transformer call as :meth:`sample` makes them (batched-CFG layout:
        first half null class, second half digits 0, 1, ...) at noise level ``sigma``."""
        half = batch // 2
        labels = torch.tensor([NULL_CLASS] * half + [i % NUM_CLASSES for i in range(batch - half)])
        device, dtype = self.device, self.dtype
        return dict(
            hidden_states=self.initial_noise(batch, seed).to(device, dtype),
            timestep=torch.full((batch,), 1000.0 * float(sigma), device=device, dtype=dtype),
            encoder_hidden_states=self.conditioning(labels).to(device, dtype),
            enable_temporal_attentions=True,
            return_dict=False,
        )

    def sample(
        self,
        labels: Sequence[int] | torch.Tensor,
        steps: int = 20,
        guidance: float | None = None,
        seed: int = 0,
        transformer: nn.Module | None = None,
        cfg: str = "batched",
        callback: Callable[[int, float, torch.Tensor], None] | None = None,
        use_cache_context: bool = True,
    ) -> torch.Tensor:
        """Draw one video per label; returns ``[N, F, 1, H, W]`` float32 on the CPU, in [0, 1].

        Same contract as :meth:`bench.models.Reference.sample`: ``transformer`` is any callable with
        the ``LatteTransformer3DModel`` call signature (compiled, hooked, cached); ``guidance`` <= 1
        means no CFG; ``cfg`` is ``"batched"`` or ``"split"``; ``callback(step_index, sigma,
        latents)`` sees the ``[N, 1, F, H, W]`` latents after every step; deterministic in ``seed``.
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

        cond = self.conditioning(labels).to(device, dtype)
        if do_cfg:
            unc = self.conditioning(torch.full_like(labels, NULL_CLASS)).to(device, dtype)

        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps), device=device)
        scheduler.set_begin_index(0)
        latents = self.initial_noise(n, seed).to(device, dtype)

        def call(name, hidden, ehs, timestep, ctx):
            with _cache_context(model, name, **ctx) if use_cache_context else contextlib.nullcontext():
                return model(
                    hidden_states=hidden,
                    timestep=timestep,
                    encoder_hidden_states=ehs,
                    enable_temporal_attentions=True,
                    return_dict=False,
                )[0]

        with torch.no_grad():
            for i, t in enumerate(scheduler.timesteps):
                sigma = float(scheduler.sigmas[i])
                ctx = dict(step_index=i, num_inference_steps=steps, timestep=t, sigma=sigma)
                if not do_cfg:
                    v = call("cond", latents, cond, t.expand(n).to(dtype), ctx)
                elif cfg == "batched":
                    out = call("cond_uncond", torch.cat([latents, latents]), torch.cat([unc, cond]),
                               t.expand(2 * n).to(dtype), ctx)
                    v_unc, v_cond = out.chunk(2)
                    v = v_unc + g * (v_cond - v_unc)
                else:
                    v_cond = call("cond", latents, cond, t.expand(n).to(dtype), ctx)
                    v_unc = call("uncond", latents, unc, t.expand(n).to(dtype), ctx)
                    v = v_unc + g * (v_cond - v_unc)
                latents = scheduler.step(v, t, latents, return_dict=False)[0]
                if callback is not None:
                    callback(i, sigma, latents)

        return from_model_layout(latents.float().cpu())


def load_video_reference(
    path: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> VideoReference:
    """Load the shipped video reference model (offline) from ``path`` (default ``bench/reference_video/``)."""
    from safetensors.torch import load_file

    root = Path(path) if path is not None else VIDEO_REFERENCE_DIR
    cfg_path = root / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(
            f"{cfg_path} not found: the video reference model is missing; train it with "
            "`python bench/train_video.py` or restore bench/reference_video/ from git"
        )
    config = json.loads(cfg_path.read_text())
    transformer = build_transformer(config["transformer"])
    label_encoder = build_label_encoder(config)
    state = load_file(str(root / MODEL_FILE))
    transformer.load_state_dict({k[len("transformer."):]: v for k, v in state.items() if k.startswith("transformer.")})
    label_encoder.load_state_dict(
        {k[len("label_encoder."):]: v for k, v in state.items() if k.startswith("label_encoder.")}
    )
    transformer.to(device=device)
    if dtype != torch.float32:
        transformer.to(dtype=dtype)
    transformer.eval().requires_grad_(False)
    label_encoder.to(device=device).eval().requires_grad_(False)
    return VideoReference(
        transformer=transformer,
        label_encoder=label_encoder,
        scheduler=build_scheduler(config.get("scheduler")),
        frames=config["frames"],
        canvas=config["canvas"],
        digit_size=config["digit_size"],
        default_guidance=float(config.get("default_guidance", 1.5)),
        config=config,
    )


def video_reference_spec(batch: int = 2) -> tuple[nn.Module, dict[str, Any]]:
    """``(transformer, example_kwargs)`` of the shipped video reference, for a ``module:callable`` SPEC:
    the loaded Latte transformer (eval mode) and one batched-CFG call at the first sampling step."""
    ref = load_video_reference()
    return ref.transformer, ref.example_kwargs(batch=batch)


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------


def _as_videos(x) -> torch.Tensor:
    """``[N, F, C, H, W]`` / ``[N, F, H, W]`` / ``[F, H, W]`` -> float64 ``[N, F, C, H, W]``."""
    t = torch.as_tensor(x).detach().cpu().double()
    if t.ndim == 3:
        t = t[None, :, None]
    elif t.ndim == 4:
        t = t[:, :, None]
    if t.ndim != 5:
        raise ValueError(f"expected videos shaped [N, F, C, H, W], [N, F, H, W] or [F, H, W], got {tuple(t.shape)}")
    return t


def _pair(x, y) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _as_videos(x), _as_videos(y)
    if a.shape != b.shape:
        raise ValueError(f"video sets differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return a, b


def frame_psnr(x, y, data_range: float = 1.0, reduction: str = "mean"):
    """PSNR (dB) of every frame of ``x`` against the same frame of ``y``.

    ``reduction="mean"``: the mean over all frames of all videos (``inf`` if any frame is
    identical, as :func:`bench.metrics.psnr`); ``"none"``: an array ``[N, F]``.
    """
    from bench.metrics import psnr

    a, b = _pair(x, y)
    n, f = a.shape[:2]
    values = psnr(a.flatten(0, 1).numpy(), b.flatten(0, 1).numpy(), data_range, reduction="none").reshape(n, f)
    return values if reduction == "none" else float(values.mean())


def frame_ssim(x, y, data_range: float = 1.0, reduction: str = "mean"):
    """SSIM (scikit-image defaults) of every frame against the same frame of ``y``; mean, or ``[N, F]``."""
    from bench.metrics import ssim

    a, b = _pair(x, y)
    n, f = a.shape[:2]
    values = ssim(a.flatten(0, 1).numpy(), b.flatten(0, 1).numpy(), data_range, reduction="none").reshape(n, f)
    return values if reduction == "none" else float(values.mean())


def frame_differences(x) -> torch.Tensor:
    """``x[:, f+1] - x[:, f]``: ``[N, F-1, C, H, W]`` float64."""
    v = _as_videos(x)
    return v[:, 1:] - v[:, :-1]


def temporal_consistency(x, y) -> dict[str, float]:
    """How well the motion of videos ``x`` (e.g. cached) matches that of ``y`` (uncached, same seeds).

    Compares the frame differences ``dx = x[f+1] - x[f]`` and ``dy`` (warping-free):

    ``diff_mae``       mean ``|dx - dy|`` (0 for identical motion; [0, 2] units of intensity).
    ``diff_corr``      Pearson correlation of ``dx`` and ``dy``, per video, averaged (1 = same motion;
                       a video with no change in either is counted as 1, in one only as 0).
    ``flicker_ratio``  ``mean |dx| / mean |dy|`` over the set: 1 = as much change between frames as
                       the reference, > 1 = added flicker, < 1 = frozen / smoothed motion.
    """
    a, b = _pair(x, y)
    if a.shape[1] < 2:
        raise ValueError("temporal metrics need at least 2 frames")
    da, db = frame_differences(a).flatten(1), frame_differences(b).flatten(1)
    mae = float((da - db).abs().mean())
    ca, cb = da - da.mean(1, keepdim=True), db - db.mean(1, keepdim=True)
    na, nb = ca.norm(dim=1), cb.norm(dim=1)
    eps = 1e-12
    corr = (ca * cb).sum(1) / (na * nb).clamp_min(eps)
    corr = torch.where((na < eps) & (nb < eps), torch.ones_like(corr), corr)
    corr = torch.where((na < eps) ^ (nb < eps), torch.zeros_like(corr), corr)
    mb = float(db.abs().mean())
    ratio = float(da.abs().mean()) / mb if mb > 0 else (1.0 if float(da.abs().mean()) == 0 else float("inf"))
    return {"diff_mae": mae, "diff_corr": float(corr.mean()), "flicker_ratio": ratio}


def compare_videos(x, y) -> dict[str, float]:
    """All full-reference video metrics of ``x`` against ``y``: frame PSNR/SSIM + :func:`temporal_consistency`."""
    return {"psnr": frame_psnr(x, y), "ssim": frame_ssim(x, y), **temporal_consistency(x, y)}


def track_digit(videos, digit_size: int = DIGIT_SIZE, threshold: float = 0.3) -> torch.Tensor:
    """Where the digit is in every frame: ``[N, F, 2]`` float (row, col) of the top-left corner of a
    ``digit_size`` window centred on the bounding box of the pixels brighter than ``threshold``
    (the canvas centre for an empty frame).  Translation-equivariant: a sprite moved by
    ``(dy, dx)`` moves the result by exactly ``(dy, dx)``.  (Centring on the ink's bounding box
    matches how the scikit-learn digits are centred; a centre-of-mass window is off by a pixel
    often enough to cost the classifier ~4 % accuracy on real frames.)"""
    ink = _as_videos(videos).mean(2) > threshold  # [N, F, H, W]
    h, w = ink.shape[-2:]

    def centre(mask: torch.Tensor, size: int) -> torch.Tensor:
        ar = torch.arange(size)
        lo = torch.where(mask, ar, size).amin(-1)
        hi = torch.where(mask, ar, -1).amax(-1)
        return torch.where(mask.any(-1), (lo + hi) / 2.0, (size - 1) / 2.0)

    pos = torch.stack([centre(ink.any(-1), h), centre(ink.any(-2), w)], dim=-1)
    return (pos - (digit_size - 1) / 2.0).float()


def digit_centre(videos, floor: float = 0.1) -> torch.Tensor:
    """Centre of intensity ``[N, F, 2]`` (row, col) of every frame, intensities below ``floor`` ignored
    (so faint background noise does not pull it); the canvas centre for an empty frame.  Exactly
    translation-equivariant like :func:`track_digit`, and smoother for noisy samples (it moves
    continuously instead of in half pixels), so the motion metrics use it."""
    v = (_as_videos(videos).mean(2) - floor).clamp_min(0.0)  # [N, F, H, W]
    h, w = v.shape[-2:]
    mass = v.sum((-2, -1))
    empty = mass <= 1e-12
    mass = mass.clamp_min(1e-12)
    rows = (v.sum(-1) * torch.arange(h, dtype=v.dtype)).sum(-1) / mass
    cols = (v.sum(-2) * torch.arange(w, dtype=v.dtype)).sum(-1) / mass
    return torch.stack([torch.where(empty, (h - 1) / 2.0, rows), torch.where(empty, (w - 1) / 2.0, cols)], -1).float()


def speed_jitter(positions: torch.Tensor) -> float:
    """Mean change of per-axis speed between consecutive frame steps, ``| |d[f+1]| - |d[f]| |`` in px
    (0 for any constant-velocity bounce; bounces flip the sign, not the size)."""
    size = (positions[:, 1:] - positions[:, :-1]).abs().double()
    return float((size[:, 1:] - size[:, :-1]).abs().mean())


def crop_digits(videos, positions: torch.Tensor, digit_size: int = DIGIT_SIZE) -> torch.Tensor:
    """The ``digit_size`` windows at ``positions [N, F, 2]`` (rounded half up; outside the canvas reads as
    black): ``[N, F, S, S]``."""
    v = F.pad(_as_videos(videos).float().mean(2), (digit_size,) * 4)
    n, f, h, w = v.shape
    r0 = torch.floor(positions[..., 0] + 0.5).long().clamp(-digit_size, h - 2 * digit_size) + digit_size
    c0 = torch.floor(positions[..., 1] + 0.5).long().clamp(-digit_size, w - 2 * digit_size) + digit_size
    i = torch.arange(digit_size)
    rows = (r0[..., None] + i)[..., :, None].expand(-1, -1, -1, digit_size)
    cols = (c0[..., None] + i)[..., None, :].expand(-1, -1, digit_size, -1)
    bi = torch.arange(n)[:, None, None, None].expand_as(rows)
    fi = torch.arange(f)[None, :, None, None].expand_as(rows)
    return v[bi, fi, rows, cols]


def valid_bounce(positions: torch.Tensor, max_speed: int = MAX_SPEED, tol: float = 0.5) -> torch.Tensor:
    """``[N]`` bool: is each tracked trajectory ``[N, F, 2]`` a constant-velocity bounce?

    Per axis, within ``tol`` pixels: every frame-to-frame displacement has the same size (at most
    ``max_speed``), and its sign flips only where the position is at the video's extreme on that
    axis (a wall).  A moving digit that stops, jitters, jumps or turns in mid-canvas fails.
    """
    p = positions.double()
    d = p[:, 1:] - p[:, :-1]  # [N, F-1, 2]
    size = d.abs()
    tol = tol + 1e-6
    ok = (size <= max_speed + tol).all(1).all(1)
    const = ((size - size[:, :1]).abs() <= tol).all(1).all(1)
    moving = size > tol
    flip = moving[:, 1:] & moving[:, :-1] & (torch.sign(d[:, 1:]) != torch.sign(d[:, :-1]))  # at frames 1..F-2
    mid = p[:, 1:-1]
    at_max = (mid >= p.amax(1, keepdim=True) - tol) & (d[:, :-1] > 0)
    at_min = (mid <= p.amin(1, keepdim=True) + tol) & (d[:, :-1] < 0)
    flips_ok = (~flip | at_max | at_min).all(1).all(1)
    return ok & const & flips_ok


class VideoDigitMetrics:
    """Reference-free quality of moving-digit videos, with the image reference's digit classifier.

    Every frame: locate the digit (:func:`track_digit`), crop its ``digit_size`` window, upscale it
    to the classifier's resolution (32x32) and classify it.  :meth:`evaluate` reports
    ``frame_accuracy`` (per frame), ``video_accuracy`` (majority vote over frames),
    ``class_consistency`` (all frames agree), and, on the centre-of-intensity trajectory
    (:func:`digit_centre`), ``valid_motion`` (fraction of videos that pass :func:`valid_bounce`
    within ``motion_tol`` px), ``speed_jitter`` (:func:`speed_jitter`, 0 for real videos) and
    ``mean_speed`` (px per frame per axis).
    """

    def __init__(self, classifier: DigitClassifier, digit_size: int = DIGIT_SIZE, canvas: int = CANVAS,
                 max_speed: int = MAX_SPEED, motion_tol: float = 0.35):
        self.classifier = classifier.eval()
        self.digit_size, self.canvas, self.max_speed, self.motion_tol = digit_size, canvas, max_speed, motion_tol

    @classmethod
    def load(cls, reference_dir: str | Path | None = None, **kwargs: Any) -> "VideoDigitMetrics":
        """With the classifier shipped in ``bench/reference/`` (the image reference's)."""
        from bench.models import load_reference

        root = Path(reference_dir) if reference_dir is not None else REFERENCE_DIR
        clf = load_reference(root, classifier=True).classifier
        if clf is None:
            raise FileNotFoundError(f"no classifier in {root}: run bench/train_classifier.py")
        return cls(clf, **kwargs)

    @torch.no_grad()
    def frame_predictions(self, videos, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted class of every frame: ``[N, F]``."""
        pos = track_digit(videos, self.digit_size) if positions is None else positions
        crops = crop_digits(videos, pos, self.digit_size)
        n, f = crops.shape[:2]
        size = self.classifier.image_size
        x = F.interpolate(crops.reshape(n * f, 1, self.digit_size, self.digit_size), size=(size, size),
                          mode="bilinear", align_corners=False).clamp(0, 1)
        return self.classifier(x).argmax(1).reshape(n, f)

    def evaluate(self, videos, labels) -> dict[str, float]:
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        pred = self.frame_predictions(videos)
        if len(pred) != len(labels):
            raise ValueError(f"{len(pred)} videos but {len(labels)} labels")
        majority = pred.mode(dim=1).values
        centre = digit_centre(videos)
        return {
            "frame_accuracy": float((pred == labels[:, None]).double().mean()),
            "video_accuracy": float((majority == labels).double().mean()),
            "class_consistency": float((pred == pred[:, :1]).all(1).double().mean()),
            "valid_motion": float(valid_bounce(centre, self.max_speed, tol=self.motion_tol).double().mean()),
            "speed_jitter": speed_jitter(centre),
            "mean_speed": float((centre[:, 1:] - centre[:, :-1]).abs().mean()),
        }
