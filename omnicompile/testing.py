"""Tiny configurations of real diffusers transformers with random weights.

Each ``tiny_*`` function returns ``(model, example_kwargs)`` — the ``SPEC`` form the CLI
takes (``omnicompile.testing:tiny_flux``) and what the tests use.  ``example_kwargs``
holds a ``timestep`` entry shaped like a pipeline's; :func:`with_timestep` swaps it.
Needs the ``[diffusers]`` extra.
"""
from __future__ import annotations

import torch

__all__ = ["tiny_flux", "tiny_sd3", "tiny_wan", "tiny_wan_vace", "tiny_latte", "tiny_dit", "TINY_MODELS",
           "with_timestep"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_flux(seed: int = 0, num_layers: int = 2, num_single_layers: int = 2, tokens: int = 16,
              text_tokens: int = 5, batch: int = 1, heads: int = 2, head_dim: int = 16):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    m = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=num_layers,
                               num_single_layers=num_single_layers, attention_head_dim=head_dim,
                               num_attention_heads=heads, joint_attention_dim=32, pooled_projection_dim=32,
                               axes_dims_rope=[head_dim // 4, head_dim // 4, head_dim // 2]).eval()
    g = _gen(seed)
    side = int(tokens ** 0.5)
    ids = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
    img_ids = torch.cat([torch.zeros(ids.shape[0], 1), ids.float()], 1)
    kw = dict(hidden_states=torch.randn(batch, side * side, 4, generator=g),
              encoder_hidden_states=torch.randn(batch, text_tokens, 32, generator=g),
              pooled_projections=torch.randn(batch, 32, generator=g),
              timestep=torch.full((batch,), 1.0), img_ids=img_ids, txt_ids=torch.zeros(text_tokens, 3),
              return_dict=False)
    return m, kw


def tiny_sd3(seed: int = 0, num_layers: int = 3, batch: int = 1):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=num_layers,
                              attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                              caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
                              pos_embed_max_size=16).eval()
    g = _gen(seed)
    kw = dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
              encoder_hidden_states=torch.randn(batch, 6, 16, generator=g),
              pooled_projections=torch.randn(batch, 16, generator=g),
              timestep=torch.full((batch,), 1000.0), return_dict=False)
    return m, kw


def tiny_wan(seed: int = 0, num_layers: int = 2, batch: int = 1):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                              in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32,
                              num_layers=num_layers, rope_max_seq_len=32).eval()
    g = _gen(seed)
    kw = dict(hidden_states=torch.randn(batch, 4, 2, 8, 8, generator=g),
              encoder_hidden_states=torch.randn(batch, 6, 16, generator=g),
              timestep=torch.full((batch,), 1000.0), return_dict=False)
    return m, kw


def tiny_wan_vace(seed: int = 0, num_layers: int = 4, vace_layers=(0, 2), batch: int = 1):
    """Wan VACE: the control branch (``vace_blocks``) computes one hint per VACE layer, added
    into the hidden states after blocks ``vace_layers`` — side inputs between blocks."""
    from diffusers import WanVACETransformer3DModel

    torch.manual_seed(seed)
    m = WanVACETransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                  in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32,
                                  num_layers=num_layers, rope_max_seq_len=32, vace_layers=list(vace_layers),
                                  vace_in_channels=12).eval()
    g = _gen(seed)
    kw = dict(hidden_states=torch.randn(batch, 4, 2, 8, 8, generator=g),
              encoder_hidden_states=torch.randn(batch, 6, 16, generator=g),
              control_hidden_states=torch.randn(batch, 12, 2, 8, 8, generator=g),
              timestep=torch.full((batch,), 1000.0), return_dict=False)
    return m, kw


def tiny_latte(seed: int = 0, num_layers: int = 2, batch: int = 1, frames: int = 3):
    from diffusers import LatteTransformer3DModel

    torch.manual_seed(seed)
    m = LatteTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                num_layers=num_layers, cross_attention_dim=16, sample_size=8, patch_size=2,
                                norm_type="ada_norm_single", caption_channels=16, video_length=frames).eval()
    g = _gen(seed)
    kw = dict(hidden_states=torch.randn(batch, 4, frames, 8, 8, generator=g),
              encoder_hidden_states=torch.randn(batch, 6, 16, generator=g),
              timestep=torch.full((batch,), 1000.0), enable_temporal_attentions=True, return_dict=False)
    return m, kw


def tiny_dit(seed: int = 0, num_layers: int = 2, batch: int = 1):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=num_layers,
                              norm_num_groups=2, sample_size=8, patch_size=2).eval()
    g = _gen(seed)
    kw = dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
              timestep=torch.full((batch,), 999, dtype=torch.long),
              class_labels=torch.zeros(batch, dtype=torch.long), return_dict=False)
    return m, kw


TINY_MODELS = {"flux": tiny_flux, "sd3": tiny_sd3, "wan": tiny_wan, "wan_vace": tiny_wan_vace, "latte": tiny_latte,
               "dit": tiny_dit}


def with_timestep(kwargs: dict, t: float) -> dict:
    """A copy of ``kwargs`` with the timestep set to ``t`` (same shape and dtype)."""
    ts = kwargs["timestep"]
    out = dict(kwargs)
    out["timestep"] = torch.full_like(ts, t)
    return out
