"""The third suite model: an SD3-architecture transformer on procedural colour scenes.

Data (generated here, on the fly, from a seeded generator; no photo collection): 32x32 RGB scenes
of a linear two-colour gradient background at a random angle, sometimes overlaid with sinusoidal
stripes (random frequency, angle and phase), one *labelled* shape — kind in {circle, square,
triangle} x colour in a palette of six: 18 classes — at a random place, size and rotation with
anti-aliased edges, and with probability 1/2 a smaller unlabelled distractor shape of random kind and
colour.  Richer than the digits (colour, texture, gradients, occlusion) and a different
architecture: diffusers' ``SD3Transformer2DModel`` (joint attention, patchify inside the model,
learned positional embedding instead of RoPE), class-conditional through a label embedding of
``encoder_hidden_states`` tokens and a pooled vector, rectified flow as the digits model.

Quality metric: PSNR / SSIM of a cached sample against the uncached sample of the same noise and
label (``bench/metrics.py``), as for the other suite models.

    from bench.scenes import load_scenes, render_scenes
    ref = load_scenes()                  # bench/reference_scenes/ (trained by bench/train_scenes.py)
    images = ref.sample(labels, steps=28, guidance=ref.default_guidance, transformer=compiled)
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.models import LabelEncoder, _cache_context

SCENES_DIR = Path(__file__).resolve().parent / "reference_scenes"
MODEL_FILE = "model.safetensors"
KINDS = ("circle", "square", "triangle")
PALETTE = torch.tensor([[0.90, 0.15, 0.15], [0.15, 0.75, 0.20], [0.20, 0.35, 0.95],
                        [0.95, 0.85, 0.15], [0.85, 0.25, 0.85], [0.10, 0.85, 0.85]])
NUM_CLASSES = len(KINDS) * len(PALETTE)        # 18
NULL_CLASS = NUM_CLASSES

MODEL_DEFAULTS = dict(
    image_size=32,
    num_text_tokens=4,
    transformer=dict(sample_size=32, patch_size=4, in_channels=3, out_channels=3, num_layers=6,
                     attention_head_dim=32, num_attention_heads=3, joint_attention_dim=64,
                     caption_projection_dim=96, pooled_projection_dim=64, pos_embed_max_size=16),
)


def _shape_mask(kind: torch.Tensor, cy, cx, size, angle, yy, xx) -> torch.Tensor:
    """Anti-aliased coverage in [0, 1] of one shape per image ([B, H, W]); ``kind`` 0/1/2."""
    dy, dx = yy[None] - cy[:, None, None], xx[None] - cx[:, None, None]
    c, s = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    u, v = c * dx + s * dy, -s * dx + c * dy
    r = size[:, None, None]
    circle = torch.sqrt(u * u + v * v) - r
    square = torch.maximum(u.abs(), v.abs()) - r * 0.85
    # equilateral triangle: the largest of three half-plane distances
    tri = torch.stack([v * math.cos(a) + u * math.sin(a) for a in (0.0, 2 * math.pi / 3, 4 * math.pi / 3)]).amax(0) \
        - r * 0.55
    sd = torch.where(kind[:, None, None] == 0, circle, torch.where(kind[:, None, None] == 1, square, tri))
    return torch.sigmoid(-sd * 2.5)            # about one pixel of soft edge


def render_scenes(labels: torch.Tensor, generator: torch.Generator, size: int = 32) -> torch.Tensor:
    """Scenes ``[B, 3, size, size]`` in [-1, 1] for integer ``labels`` (kind * 6 + colour)."""
    b, g = labels.shape[0], generator
    lin = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    # background: a two-colour gradient at a random angle, muted
    c0, c1 = torch.rand(b, 3, generator=g) * 0.6 + 0.2, torch.rand(b, 3, generator=g) * 0.6 + 0.2
    ang = torch.rand(b, generator=g) * 2 * math.pi
    t = (torch.cos(ang)[:, None, None] * (xx - 0.5) + torch.sin(ang)[:, None, None] * (yy - 0.5)) + 0.5
    img = c0[:, :, None, None] * (1 - t[:, None]) + c1[:, :, None, None] * t[:, None]
    # stripes on half of the backgrounds
    freq = 2 + torch.rand(b, generator=g) * 6
    sang = torch.rand(b, generator=g) * math.pi
    phase = torch.rand(b, generator=g) * 2 * math.pi
    amp = 0.12 * (torch.rand(b, generator=g) < 0.5).float()
    wave = torch.sin(2 * math.pi * freq[:, None, None] * (torch.cos(sang)[:, None, None] * xx
                                                          + torch.sin(sang)[:, None, None] * yy) + phase[:, None, None])
    img = img + amp[:, None, None, None] * wave[:, None]
    # an unlabelled distractor (half of the scenes), then the labelled shape on top
    px = size
    for labelled in (False, True):
        if labelled:
            kind, colour = labels // len(PALETTE), labels % len(PALETTE)
            rgb = PALETTE[colour]
            r = (0.16 + torch.rand(b, generator=g) * 0.12) * px
            on = torch.ones(b)
        else:
            kind = torch.randint(0, len(KINDS), (b,), generator=g)
            rgb = PALETTE[torch.randint(0, len(PALETTE), (b,), generator=g)] * 0.8
            r = (0.08 + torch.rand(b, generator=g) * 0.06) * px
            on = (torch.rand(b, generator=g) < 0.5).float()
        cy = (0.25 + torch.rand(b, generator=g) * 0.5) * px
        cx = (0.25 + torch.rand(b, generator=g) * 0.5) * px
        rot = torch.rand(b, generator=g) * 2 * math.pi
        m = _shape_mask(kind, cy, cx, r, rot, yy * px, xx * px) * on[:, None, None]
        img = img * (1 - m[:, None]) + rgb[:, :, None, None] * m[:, None]
    return (img.clamp(0, 1) * 2 - 1).contiguous()


#: the held-out suite model: a PixArt-class transformer on the same scenes (``--arch pixart``),
#: kept out of every tuning decision
PIXART_DEFAULTS = dict(
    arch="pixart",
    image_size=32,
    num_text_tokens=4,
    transformer=dict(sample_size=32, patch_size=4, in_channels=3, out_channels=3, num_layers=6,
                     attention_head_dim=32, num_attention_heads=3, cross_attention_dim=96, caption_channels=64,
                     norm_type="ada_norm_single", use_additional_conditions=False),
)
HELDOUT_DIR = Path(__file__).resolve().parent / "reference_heldout"


def build_transformer(config: dict[str, Any], arch: str = "sd3") -> nn.Module:
    if arch == "pixart":
        from diffusers import PixArtTransformer2DModel
        return PixArtTransformer2DModel(**config)
    from diffusers import SD3Transformer2DModel
    return SD3Transformer2DModel(**config)


def build_label_encoder(config: dict[str, Any]) -> LabelEncoder:
    tc = config["transformer"]
    if config.get("arch", "sd3") == "pixart":     # caption tokens only (a 1-wide pooled part, unused)
        return LabelEncoder(config["num_text_tokens"], tc["caption_channels"], 1, num_classes=NUM_CLASSES)
    return LabelEncoder(config["num_text_tokens"], tc["joint_attention_dim"], tc["pooled_projection_dim"],
                        num_classes=NUM_CLASSES)


def call_kwargs(arch: str, x, ehs, pooled, timestep) -> dict[str, Any]:
    """One transformer call of architecture ``arch`` (``timestep`` in [0, 1000])."""
    if arch == "pixart":
        return dict(hidden_states=x, encoder_hidden_states=ehs, timestep=timestep,
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)
    return dict(hidden_states=x, encoder_hidden_states=ehs, pooled_projections=pooled, timestep=timestep,
                return_dict=False)


@dataclass
class ScenesReference:
    """The loaded scenes model (:func:`load_scenes`)."""

    transformer: nn.Module
    label_encoder: LabelEncoder
    image_size: int
    default_guidance: float
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def arch(self) -> str:
        return self.config.get("arch", "sd3")

    def initial_noise(self, n: int, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(seed))
        return torch.randn((n, 3, self.image_size, self.image_size), generator=g)

    def example_kwargs(self, batch: int = 2, sigma: float = 1.0, seed: int = 0) -> dict[str, Any]:
        """One transformer call as :meth:`sample` makes it (batched CFG: null half first)."""
        half = batch // 2
        labels = torch.tensor([NULL_CLASS] * half + [i % NUM_CLASSES for i in range(batch - half)])
        with torch.no_grad():
            ehs, pooled = self.label_encoder(labels)
        return call_kwargs(self.arch, self.initial_noise(batch, seed), ehs, pooled, torch.full((batch,), sigma * 1000.0))

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, steps: int = 28, guidance: Optional[float] = None, seed: int = 0,
               transformer: Optional[nn.Module] = None, step_callback=None) -> torch.Tensor:
        """Euler rectified-flow sampling with batched CFG; returns images ``[B, 3, H, W]`` in [0, 1].
        ``transformer`` replaces the model (a compiled one); one call per step on ``cat([null, cond])``."""
        fn = transformer if transformer is not None else self.transformer
        guidance = self.default_guidance if guidance is None else guidance
        b = labels.shape[0]
        x = self.initial_noise(b, seed)
        ehs, pooled = self.label_encoder(torch.cat([torch.full((b,), NULL_CLASS), labels]))
        sigmas = torch.linspace(1.0, 0.0, steps + 1)
        for i in range(steps):
            s, s_next = float(sigmas[i]), float(sigmas[i + 1])
            with _cache_context(fn, "cond_uncond"):      # as diffusers pipelines do (the peers' hooks)
                v = fn(**call_kwargs(self.arch, torch.cat([x, x]), ehs, pooled, torch.full((2 * b,), s * 1000.0)))[0]
            v_u, v_c = v.chunk(2)
            x = x + (s_next - s) * (v_u + guidance * (v_c - v_u))
            if step_callback is not None:
                step_callback(i)
        return ((x.clamp(-1, 1) + 1) / 2).float()


def load_scenes(path: Path | str = SCENES_DIR) -> ScenesReference:
    from safetensors.torch import load_file
    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    transformer = build_transformer(cfg["transformer"], cfg.get("arch", "sd3")).eval()
    encoder = build_label_encoder(cfg).eval()
    sd = load_file(str(path / MODEL_FILE))
    transformer.load_state_dict({k[len("transformer."):]: v for k, v in sd.items() if k.startswith("transformer.")})
    encoder.load_state_dict({k[len("label_encoder."):]: v for k, v in sd.items() if k.startswith("label_encoder.")})
    for p in list(transformer.parameters()) + list(encoder.parameters()):
        p.requires_grad_(False)
    return ScenesReference(transformer, encoder, cfg["image_size"], cfg.get("default_guidance", 3.0), cfg)
