"""Tiny real diffusers pipelines, called the way users call them, for omnicompile's tests.

Test helper, not a test file.  No tokenizer, text encoder or VAE weights, no downloads: every pipeline
gets tiny random transformer(s) (the :mod:`omnicompile.testing` configs where they exist), ``None`` for
the text stack and the VAE, and precomputed embeddings.  Needs ``transformers`` importable (without
it diffusers 0.42.1 exports placeholder pipeline classes).

API.  ``flux_pipeline``, ``sd3_pipeline``, ``pixart_sigma_pipeline``, ``wan22_pipeline``,
``latte_pipeline`` (``BUILDERS[family]``, ``build_pipeline(family)``; families ``FAMILIES``) return a
:class:`TinyPipeline`: ``.pipe`` (progress bar off), ``.denoisers`` (``["transformer"]``, Wan 2.2:
``["transformer", "transformer_2"]``), ``.call_kwargs(**overrides)`` (one generation: seeded embeddings,
seeded noise ``generator``, ``output_type="latent"``, 8 steps, 64x64 px = 8x8 latents, video 2 latent
frames, CFG on), ``.latent_shape(**overrides)``, ``tp(**overrides)`` (run it, return the latents).
``with_scheduler(pipe, name)`` swaps the scheduler; ``interrupt_after(n)`` is a ``callback_on_step_end``
that stops a generation after ``n`` loop iterations.  One 8-step CFG generation takes 0.03-0.15 s on
CPU (Flux the slowest), plus ~4 s once per process for diffusers' lazy imports; on a 2-core machine
busy with other jobs, two intra-op threads made it up to 30x slower than one thread.

Per family (diffusers 0.42.1; "t" is what the transformer gets, default scheduler, 8 steps):

- ``flux`` (``FluxPipeline``, vae=None).  CFG is "true CFG": two transformer calls per step, cond then
  uncond (inside ``cache_context("cond")`` / ``("uncond")``), on when ``true_cfg_scale > 1`` *and*
  ``negative_prompt_embeds`` + ``negative_pooled_prompt_embeds`` are given (``cfg=True``:
  ``true_cfg_scale=4``).  ``guidance_scale`` is never CFG, only the distilled-guidance embedding of
  ``guidance_embeds=True`` models (``flux_pipeline(guidance_embeds=True)``: FLUX.1-dev-like).
  t = ``timestep / 1000``: float32, shape (B,), in (0, 1]: 1.0 .92 .83 .73 .61 .49 .35 .18 (FlowMatchEuler,
  shift ``mu`` from the image token count; float32 whatever the scheduler).  Also gets
  ``guidance=None``, ``joint_attention_kwargs={}``, 2-D ``txt_ids``/``img_ids``.  The latent output is
  *packed*: (B, H/16 * W/16, 4 * C) = (B, 16, 4).
- ``sd3`` (``StableDiffusion3Pipeline``, vae=None).  CFG batched: one call per step on
  ``cat([uncond, cond])`` (batch 2B), ``guidance_scale > 1``; needs negative embeddings (it would
  tokenize ``""`` otherwise).  t in [0, 1000], float32, shape (2B,): 1000 947.5 882.8 800.8 693.8 548.1
  338.0 8.9 (FlowMatchEuler shift 3); int64 999 954 ... 299 with dpm++/unipc.
- ``pixart`` (``PixArtSigmaPipeline``, vae=None).  CFG batched (2B), ``guidance_scale > 1``.  Default
  DPM++ (epsilon, linear betas): t int64 999 874 749 ... 125, shape (2B,); euler/heun/kdpm2 float32
  999 ... 0; ddim int64 875 ... 0.  The transformer is called with ``hidden_states`` *positional*, plus
  ``encoder_attention_mask`` and ``added_cond_kwargs={"resolution": None, "aspect_ratio": None}``; it
  outputs 8 channels (learned sigma), the pipeline keeps the first 4.
- ``wan22`` (``WanPipeline``, two ``WanTransformer3DModel``, ``boundary_ratio=0.875``, vae=None).
  CFG: two calls per step (cond, uncond) on the current expert, inside ``cache_context("cond"/"uncond",
  step_index=, sigma=, num_inference_steps=)``.  Switch: ``t >= boundary_ratio * num_train_timesteps``
  (875) -> ``transformer`` (high noise, ``guidance_scale``), else ``transformer_2`` (low noise,
  ``guidance_scale_2``, defaulting to ``guidance_scale``).  Default UniPC (flow prediction, shift 3):
  t int64, shape (B,): 999 954 900 | 833 750 643 500 301 (3 steps on ``transformer``, 5 on
  ``transformer_2``; 4 steps: 999 900 | 750 500).  Euler: float32 1000 947.5 882.8 | 800.8 ... 8.9
  (4 steps: 1000 | 857.7 602.2 8.9).  ``num_frames`` are pixel frames, ``4k + 1``: 5 -> 2 latent frames.
- ``latte`` (``LattePipeline``, vae=None; preferred over CogVideoX).  CFG batched (2B),
  ``guidance_scale > 1``.  Default DDIM (linear betas, "leading" spacing): t int64 875 750 ... 0, shape
  (2B,).  Called with ``enable_temporal_attentions=True``; learned sigma as PixArt.  ``video_length``
  are latent frames (no temporal VAE compression).

Schedulers (``SCHEDULERS_THAT_WORK``, each pair run here at 4 and 8 steps: finite, deterministic):
flux euler dpm++ unipc; sd3 and wan22 euler heun dpm++ unipc; pixart and latte euler heun dpm++ unipc
kdpm2 ddim.  Flow models get the flow variants (FlowMatchEuler / FlowMatchHeun; DPM++ and UniPC with
``prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3``); kdpm2 and ddim have no
flow prediction in diffusers, so they do not apply to flux, sd3, wan22.  Flux + heun fails:
``FluxPipeline`` always passes custom ``sigmas`` (unless the scheduler config has ``use_flow_sigmas``)
and ``FlowMatchHeunDiscreteScheduler.set_timesteps`` takes none.  Flux + dpm++/unipc need
``use_dynamic_shifting=True, time_shift_type="exponential"`` since Flux always passes ``mu``; DPM++ then
writes ``flow_shift = exp(mu)`` into its own config.  Heun and KDPM2 take 2N-1 loop iterations (and
transformer calls) for N steps.  Timestep dtype follows the scheduler: FlowMatch*, Euler, Heun, KDPM2
float32; DPM++, UniPC, DDIM int64.  Defaults (``DEFAULT_SCHEDULER``): Flux, SD3 FlowMatchEuler,
PixArt-Σ DPM++ and Wan UniPC-flow as those checkpoints ship; Latte DDIM.

Interrupts.  Flux, SD3, Wan, Latte call ``callback_on_step_end(pipe, i, t, callback_kwargs)`` after
each loop iteration (``i`` counts iterations over ``scheduler.timesteps``, not solver steps).  Setting
``pipe._interrupt = True`` makes every later iteration ``continue`` at its top (no transformer call, no
scheduler step); the call still returns normally, with the latents as of the interrupting iteration
(checked: equal to the full run's latents after that step).  ``_interrupt`` stays True after the call
and is reset at the start of the next.  PixArt-Σ has neither: its ``**kwargs`` silently swallows
``callback_on_step_end`` (so ``call_kwargs`` refuses it); it only has the legacy ``callback(step, t,
latents)`` every ``callback_steps``, and stopping early means raising from it.

Surprises.
- Flux, SD3 and Wan do not repeat *precomputed* embeddings for ``num_images_per_prompt`` (PixArt and
  Latte do; Wan calls it ``num_videos_per_prompt``).  With one prompt the transformer then gets a text
  batch of 1 against an image batch of n and broadcasts it (runs for Flux, Wan, SD3 without CFG); SD3
  with CFG, and any of the three with 2 prompts x 2 images, fail with a size mismatch.  So
  ``call_kwargs`` repeats the embeddings itself, as their ``encode_prompt(num_images_per_prompt=n)``
  would, and passes 1; ``expand_embeds=False`` hands ``n`` to the pipeline as is.
- PixArt and Latte default ``negative_prompt=""`` and refuse it together with ``negative_prompt_embeds``:
  ``call_kwargs`` passes ``negative_prompt=None``.
- PixArt: ``use_resolution_binning`` (default True) raises "Invalid sample size" unless the transformer's
  ``sample_size`` is 32/64/128/256: passed False.  Embeddings need ``prompt_attention_mask`` (and the
  negative one); here T5-like: 4 of 6 tokens for prompts, 1 for the empty negative prompt.
- Latte: ``mask_feature=True`` (default) breaks CFG off: embeddings count as "provided" only when both
  prompt and negative ones are, otherwise they are masked with a bogus all-ones mask of shape
  (batch, tokens * dim) and the call fails.  Passed False, which changes nothing when both are given.
- No pipeline mutates the passed embedding tensors (checked, every family, batch 1 and 2, CFG on/off).
  Every keyword the pipelines pass is accepted by the tiny models.
- Epsilon models (PixArt, Latte) with Euler/Heun/KDPM2/DPM++/UniPC end with latents of std ~180: the
  random network does not predict the noise and ``init_noise_sigma`` is ~157.  Finite, expected.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from omnicompile.testing import tiny_flux, tiny_latte, tiny_sd3, tiny_wan

__all__ = ["TinyPipeline", "flux_pipeline", "sd3_pipeline", "pixart_sigma_pipeline", "wan22_pipeline",
           "latte_pipeline", "BUILDERS", "FAMILIES", "build_pipeline", "with_scheduler", "SCHEDULERS",
           "SCHEDULERS_THAT_WORK", "DEFAULT_SCHEDULER", "interrupt_after", "make_scheduler", "tiny_pixart"]

FAMILIES = ("flux", "sd3", "pixart", "wan22", "latte")
FLOW_FAMILIES = ("flux", "sd3", "wan22")  # flow matching (velocity); the others are DDPM / epsilon
SCHEDULERS = ("euler", "heun", "dpm++", "unipc", "kdpm2", "ddim")

# Filled in by running every pair (see the module docstring); ``with_scheduler`` refuses the others.
SCHEDULERS_THAT_WORK: dict[str, list[str]] = {
    "flux": ["euler", "dpm++", "unipc"],
    "sd3": ["euler", "heun", "dpm++", "unipc"],
    "pixart": ["euler", "heun", "dpm++", "unipc", "kdpm2", "ddim"],
    "wan22": ["euler", "heun", "dpm++", "unipc"],
    "latte": ["euler", "heun", "dpm++", "unipc", "kdpm2", "ddim"],
}

# Flux/SD3 FlowMatchEuler, PixArt-Σ DPM++, Wan UniPC-flow: what those checkpoints ship; Latte DDIM.
DEFAULT_SCHEDULER = {"flux": "euler", "sd3": "euler", "pixart": "dpm++", "wan22": "unipc", "latte": "ddim"}

_PIPELINE_FAMILY = {"FluxPipeline": "flux", "StableDiffusion3Pipeline": "sd3", "PixArtSigmaPipeline": "pixart",
                    "WanPipeline": "wan22", "LattePipeline": "latte"}

# Flow-matching shift per family: Flux shifts by image size (``mu``, exponential time shift, as FLUX.1
# ships); SD3 3.0 (as SD3/3.5 ship); Wan 3.0 (Wan 2.1 480p's ``flow_shift``).
_FLOW_SHIFT = {"flux": 3.0, "sd3": 3.0, "wan22": 3.0}
_DDPM_BETAS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _family_of(pipe) -> str:
    name = type(pipe).__name__
    if name not in _PIPELINE_FAMILY:
        raise ValueError(f"no family for pipeline class {name}")
    return _PIPELINE_FAMILY[name]


def make_scheduler(family: str, name: str):
    """A fresh scheduler ``name`` configured for ``family`` (no check against the table)."""
    import diffusers as d

    if family in FLOW_FAMILIES:
        shift = _FLOW_SHIFT[family]
        dyn = family == "flux"  # Flux always passes ``mu`` to ``set_timesteps``
        if name == "euler":
            extra = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                         max_image_seq_len=4096) if dyn else {}
            return d.FlowMatchEulerDiscreteScheduler(shift=shift, **extra)
        if name == "heun":
            return d.FlowMatchHeunDiscreteScheduler(shift=shift)
        flow = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
        if dyn:
            flow.update(use_dynamic_shifting=True, time_shift_type="exponential")
        if name == "dpm++":
            return d.DPMSolverMultistepScheduler(**flow)
        if name == "unipc":
            return d.UniPCMultistepScheduler(**flow)
        if name in ("kdpm2", "ddim"):
            raise ValueError(f"{name} has no flow-matching (velocity) prediction in diffusers; "
                             f"it does not apply to {family}")
    else:
        cls = {"euler": d.EulerDiscreteScheduler, "heun": d.HeunDiscreteScheduler,
               "dpm++": d.DPMSolverMultistepScheduler, "unipc": d.UniPCMultistepScheduler,
               "kdpm2": d.KDPM2DiscreteScheduler, "ddim": d.DDIMScheduler}.get(name)
        if cls is not None:
            return cls(**_DDPM_BETAS)
    raise ValueError(f"unknown scheduler {name!r}; one of {SCHEDULERS}")


def with_scheduler(pipe, name: str, *, check: bool = True):
    """Swap ``pipe``'s scheduler (a pipeline or a :class:`TinyPipeline`) for ``name``; returns ``pipe``.

    ``name="default"`` restores the family's default.  Pairs missing from ``SCHEDULERS_THAT_WORK``
    raise unless ``check=False``.
    """
    target = pipe.pipe if isinstance(pipe, TinyPipeline) else pipe
    family = _family_of(target)
    if name == "default":
        name = DEFAULT_SCHEDULER[family]
    if check and name not in SCHEDULERS_THAT_WORK[family]:
        raise ValueError(f"scheduler {name!r} does not work with {family} in diffusers "
                         f"(works: {SCHEDULERS_THAT_WORK[family]})")
    target.scheduler = make_scheduler(family, name)
    if isinstance(pipe, TinyPipeline):
        pipe.scheduler_name = name
    return pipe


def interrupt_after(num_steps: int, log: list | None = None):
    """A ``callback_on_step_end`` that interrupts the generation after ``num_steps`` loop iterations.

    It sets ``pipe._interrupt = True`` at the end of iteration ``num_steps - 1``; the pipelines check
    ``self.interrupt`` at the top of each later iteration and ``continue`` (no transformer call, no
    scheduler step), then return the latents as they were.  Iterations run over ``scheduler.timesteps``:
    one per step, except Heun and KDPM2 (2N - 1 for N steps).  ``log`` (if given) gets ``(i, t)`` of
    every iteration the callback saw.  Not for PixArt-Σ (no ``callback_on_step_end``).
    """
    def callback(pipe, i, t, callback_kwargs):
        if log is not None:
            log.append((i, float(t)))
        if i + 1 >= num_steps:
            pipe._interrupt = True
        return {}

    return callback


def _build(cls, **components):
    """``cls(**components)``, every required component not given set to None; progress bar off."""
    params = inspect.signature(cls.__init__).parameters
    kw = {n: None for n, p in params.items() if n != "self" and p.default is inspect.Parameter.empty}
    kw.update(components)
    pipe = cls(**kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass
class TinyPipeline:
    """A tiny diffusers pipeline with the kwargs of one generation.

    ``call_kwargs(**overrides)`` builds the pipeline kwargs.  Besides any real pipeline argument
    (passed verbatim, e.g. ``num_inference_steps=8``, ``guidance_scale=1.0``,
    ``callback_on_step_end=...``), it takes:

    - ``batch`` (1): number of prompts; prompt ``i``'s embeddings do not depend on ``batch``.
    - ``seed`` (0): seed of the ``generator`` that draws the initial noise.
    - ``prompt_seed`` (0): seed of the precomputed embeddings.
    - ``cfg`` (True): classifier-free guidance on (family's usual scale) or off (scale 1).  An
      explicit ``guidance_scale`` (``true_cfg_scale`` for Flux) wins.  Negative embeddings (the same
      for every prompt, as the embedding of ``""`` would be) are added only when CFG is on.
    - ``num_images_per_prompt`` (1): also for Wan, where the pipeline calls it ``num_videos_per_prompt``.
      Flux, SD3 and Wan do not repeat precomputed embeddings: by default the embeddings are repeated
      here (``repeat_interleave``, as their ``encode_prompt`` does) and the pipeline gets 1;
      ``expand_embeds=False`` passes the count to the pipeline as is (see the module docstring).

    Explicit embedding overrides (``prompt_embeds=...``) replace the generated ones.  PixArt refuses
    ``callback_on_step_end``, which its pipeline would silently ignore.
    """

    family: str
    pipe: Any
    denoisers: list[str]
    scheduler_name: str
    _make: Callable[..., dict] = field(repr=False)
    _shape: Callable[[dict], tuple] = field(repr=False)

    def call_kwargs(self, **overrides) -> dict:
        return self._make(**overrides)

    def latent_shape(self, **overrides) -> tuple:
        """Shape of the ``output_type="latent"`` output of ``pipe(**call_kwargs(**overrides))``."""
        return self._shape(self.call_kwargs(**overrides))

    def denoiser_modules(self) -> list[torch.nn.Module]:
        return [getattr(self.pipe, n) for n in self.denoisers]

    def __call__(self, **overrides) -> torch.Tensor:
        """One generation (``torch.no_grad``); the latent output."""
        kwargs = self.call_kwargs(**overrides)
        kwargs["return_dict"] = False
        with torch.no_grad():
            return self.pipe(**kwargs)[0]


def _embeds(seed: int, batch: int, shape: tuple, stream: int = 0) -> torch.Tensor:
    """``batch`` rows; row ``i`` depends only on ``(seed, stream, i)``."""
    return torch.stack([torch.randn(*shape, generator=_gen(((seed * 1000 + i) << 3) | stream))
                        for i in range(batch)])


def _neg(seed: int, batch: int, shape: tuple, stream: int = 0) -> torch.Tensor:
    """The negative (empty-prompt) embedding, the same for every row."""
    return _embeds(seed, 1, shape, stream + 4).expand(batch, *shape).clone()


class _Spec:
    """What differs between families in ``call_kwargs``."""

    def __init__(self, family, base, positive, negative, cfg_key, cfg_on, expand, nipp_key="num_images_per_prompt",
                 rejects=None):
        self.family, self.base, self.positive, self.negative = family, base, positive, negative
        self.cfg_key, self.cfg_on, self.expand, self.nipp_key = cfg_key, cfg_on, expand, nipp_key
        self.rejects = rejects or {}

    def make(self, *, batch: int = 1, seed: int = 0, prompt_seed: int = 0, cfg: bool = True,
             num_images_per_prompt: int = 1, expand_embeds: bool = True, **overrides) -> dict:
        for key, why in self.rejects.items():
            if key in overrides:
                raise TypeError(f"{self.family}: {key} {why}")
        n = num_images_per_prompt
        kw = dict(self.base)
        kw[self.cfg_key] = self.cfg_on if cfg else 1.0
        kw.update(overrides)
        cfg_on = kw[self.cfg_key] > 1.0
        pos = self.positive(prompt_seed, batch)
        neg = self.negative(prompt_seed, batch) if cfg_on else {}
        if self.expand and expand_embeds and n > 1:
            pos = {k: v.repeat_interleave(n, 0) for k, v in pos.items()}
            neg = {k: v.repeat_interleave(n, 0) for k, v in neg.items()}
            n = 1
        out = {**pos, **neg}
        if n != 1:
            out[self.nipp_key] = n
        out["generator"] = _gen(seed)
        out.update(kw)
        return out


def _rows(kw: dict, nipp_key: str = "num_images_per_prompt") -> int:
    return kw["prompt_embeds"].shape[0] * kw.get(nipp_key, 1)


def _finish(family, pipe, denoisers, scheduler, spec, shape) -> TinyPipeline:
    tp = TinyPipeline(family=family, pipe=pipe, denoisers=denoisers, scheduler_name="", _make=spec.make, _shape=shape)
    return with_scheduler(tp, scheduler)


def flux_pipeline(seed: int = 0, num_layers: int = 2, num_single_layers: int = 2, guidance_embeds: bool = False,
                  scheduler: str = "default") -> TinyPipeline:
    """``FluxPipeline`` around :func:`omnicompile.testing.tiny_flux` (``guidance_embeds=True``: FLUX.1-dev-like)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    m, _ = tiny_flux(seed=seed, num_layers=num_layers, num_single_layers=num_single_layers)
    if guidance_embeds:
        torch.manual_seed(seed)
        m = FluxTransformer2DModel.from_config({**m.config, "guidance_embeds": True}).eval()
    pipe = _build(FluxPipeline, transformer=m, scheduler=make_scheduler("flux", "euler"))
    c = m.config
    spec = _Spec(
        "flux",
        base=dict(height=64, width=64, num_inference_steps=8, guidance_scale=3.5, output_type="latent"),
        positive=lambda s, b: dict(prompt_embeds=_embeds(s, b, (5, c.joint_attention_dim)),
                                   pooled_prompt_embeds=_embeds(s, b, (c.pooled_projection_dim,), 1)),
        negative=lambda s, b: dict(negative_prompt_embeds=_neg(s, b, (5, c.joint_attention_dim)),
                                   negative_pooled_prompt_embeds=_neg(s, b, (c.pooled_projection_dim,), 1)),
        cfg_key="true_cfg_scale", cfg_on=4.0, expand=True)
    shape = lambda kw: (_rows(kw), (kw["height"] // 16) * (kw["width"] // 16), c.in_channels)  # packed 2x2
    return _finish("flux", pipe, ["transformer"], scheduler, spec, shape)


def sd3_pipeline(seed: int = 0, num_layers: int = 2, scheduler: str = "default") -> TinyPipeline:
    """``StableDiffusion3Pipeline`` around :func:`omnicompile.testing.tiny_sd3`."""
    from diffusers import StableDiffusion3Pipeline

    m, _ = tiny_sd3(seed=seed, num_layers=num_layers)
    pipe = _build(StableDiffusion3Pipeline, transformer=m, scheduler=make_scheduler("sd3", "euler"))
    c = m.config
    spec = _Spec(
        "sd3",
        base=dict(height=64, width=64, num_inference_steps=8, output_type="latent"),
        positive=lambda s, b: dict(prompt_embeds=_embeds(s, b, (6, c.joint_attention_dim)),
                                   pooled_prompt_embeds=_embeds(s, b, (c.pooled_projection_dim,), 1)),
        negative=lambda s, b: dict(negative_prompt_embeds=_neg(s, b, (6, c.joint_attention_dim)),
                                   negative_pooled_prompt_embeds=_neg(s, b, (c.pooled_projection_dim,), 1)),
        cfg_key="guidance_scale", cfg_on=5.0, expand=True)
    shape = lambda kw: (_rows(kw), c.in_channels, kw["height"] // 8, kw["width"] // 8)
    return _finish("sd3", pipe, ["transformer"], scheduler, spec, shape)


def tiny_pixart(seed: int = 0, num_layers: int = 2):
    """A tiny ``PixArtTransformer2DModel`` (learned sigma: 8 output channels for 4 latent ones)."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                    num_layers=num_layers, cross_attention_dim=16, caption_channels=16,
                                    sample_size=8, patch_size=2, norm_type="ada_norm_single").eval()


def pixart_sigma_pipeline(seed: int = 0, num_layers: int = 2, scheduler: str = "default") -> TinyPipeline:
    """``PixArtSigmaPipeline`` around :func:`tiny_pixart`; T5-like masks (prompt: 4 of 6 tokens, negative: 1)."""
    from diffusers import PixArtSigmaPipeline

    m = tiny_pixart(seed=seed, num_layers=num_layers)
    pipe = _build(PixArtSigmaPipeline, transformer=m, scheduler=make_scheduler("pixart", "dpm++"))
    c = m.config
    spec = _Spec(
        "pixart",
        # ``use_resolution_binning`` only knows sample sizes 32..256; ``negative_prompt`` defaults to ""
        # and may not be given together with ``negative_prompt_embeds``.
        base=dict(height=64, width=64, num_inference_steps=8, output_type="latent", use_resolution_binning=False,
                  negative_prompt=None),
        positive=lambda s, b: dict(prompt_embeds=_embeds(s, b, (6, c.caption_channels)),
                                   prompt_attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0]]).repeat(b, 1)),
        negative=lambda s, b: dict(negative_prompt_embeds=_neg(s, b, (6, c.caption_channels)),
                                   negative_prompt_attention_mask=torch.tensor([[1, 0, 0, 0, 0, 0]]).repeat(b, 1)),
        cfg_key="guidance_scale", cfg_on=4.5, expand=False,
        rejects={"callback_on_step_end": "is silently swallowed by PixArtSigmaPipeline's **kwargs (it has only the "
                                         "legacy callback(step, t, latents) and no interrupt)"})
    shape = lambda kw: (_rows(kw), c.in_channels, kw["height"] // 8, kw["width"] // 8)
    return _finish("pixart", pipe, ["transformer"], scheduler, spec, shape)


def wan22_pipeline(seed: int = 0, num_layers: int = 2, boundary_ratio: float = 0.875,
                   scheduler: str = "default") -> TinyPipeline:
    """``WanPipeline`` Wan 2.2 A14B-style: ``transformer`` (high noise) and ``transformer_2`` (low noise), two
    :func:`omnicompile.testing.tiny_wan` with different weights, switched at ``boundary_ratio``."""
    from diffusers import WanPipeline

    m1, _ = tiny_wan(seed=seed, num_layers=num_layers)
    m2, _ = tiny_wan(seed=seed + 1, num_layers=num_layers)
    pipe = _build(WanPipeline, transformer=m1, transformer_2=m2, boundary_ratio=boundary_ratio,
                  scheduler=make_scheduler("wan22", "unipc"))
    c = m1.config
    spec = _Spec(
        "wan22",
        base=dict(height=64, width=64, num_frames=5, num_inference_steps=8, output_type="latent"),
        positive=lambda s, b: dict(prompt_embeds=_embeds(s, b, (6, c.text_dim))),
        negative=lambda s, b: dict(negative_prompt_embeds=_neg(s, b, (6, c.text_dim))),
        cfg_key="guidance_scale", cfg_on=4.0, expand=True, nipp_key="num_videos_per_prompt")
    shape = lambda kw: (_rows(kw, "num_videos_per_prompt"), c.in_channels, (kw["num_frames"] - 1) // 4 + 1,
                        kw["height"] // 8, kw["width"] // 8)
    return _finish("wan22", pipe, ["transformer", "transformer_2"], scheduler, spec, shape)


def latte_pipeline(seed: int = 0, num_layers: int = 2, scheduler: str = "default") -> TinyPipeline:
    """``LattePipeline`` around :func:`omnicompile.testing.tiny_latte` (2 frames)."""
    from diffusers import LattePipeline

    m, _ = tiny_latte(seed=seed, num_layers=num_layers, frames=2)
    pipe = _build(LattePipeline, transformer=m, scheduler=make_scheduler("latte", "ddim"))
    c = m.config
    spec = _Spec(
        "latte",
        # ``mask_feature`` (default True) breaks CFG off: the embeddings count as "provided" only with
        # both prompt and negative embeddings; otherwise they get masked with a bogus all-ones mask of
        # shape (batch, tokens * dim).  With both given it is a no-op, so False changes nothing else.
        base=dict(height=64, width=64, video_length=2, num_inference_steps=8, output_type="latent",
                  negative_prompt=None, mask_feature=False),
        positive=lambda s, b: dict(prompt_embeds=_embeds(s, b, (6, c.caption_channels))),
        negative=lambda s, b: dict(negative_prompt_embeds=_neg(s, b, (6, c.caption_channels))),
        cfg_key="guidance_scale", cfg_on=7.5, expand=False)
    shape = lambda kw: (_rows(kw), c.in_channels, kw["video_length"], kw["height"] // 8, kw["width"] // 8)
    return _finish("latte", pipe, ["transformer"], scheduler, spec, shape)


BUILDERS = {"flux": flux_pipeline, "sd3": sd3_pipeline, "pixart": pixart_sigma_pipeline, "wan22": wan22_pipeline,
            "latte": latte_pipeline}


def build_pipeline(family: str, **kwargs) -> TinyPipeline:
    return BUILDERS[family](**kwargs)
