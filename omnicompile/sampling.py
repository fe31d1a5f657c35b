"""A default sampler: one generation of a flow-matching denoiser, for calibration and
profiling when the caller has no sampler of their own (``omnicache calibrate`` /
``omnicache profile`` use it unless ``--sampler`` names another).

:func:`euler_sampler` counts the timestep down linearly from the example's value towards 0
and applies the Euler flow-matching update ``x += (sigma_next - sigma) * output`` (sigma =
t / t_0) to ``hidden_states`` (or the first floating-point input of rank >= 2) whenever the
output has its shape — the sampler of Flux, SD3 and Wan.  A model whose example kwargs it
cannot drive raises :class:`SamplerError`.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from omnicompile.errors import OmniCacheError
from omnicompile.generation import generation

__all__ = ["euler_sampler", "SamplerError"]


class SamplerError(OmniCacheError, ValueError):
    """The default sampler cannot drive a generation from these example kwargs (use a
    sampler of your own)."""


def euler_sampler(model: Callable, example_kwargs: dict, steps: int,
                  progress: Optional[Callable[[int, int, str], None]] = None):
    """Run ``steps`` calls of ``model(**kwargs)`` as one generation (a generation context that
    counts the steps) and return the final latent (None when no input could be updated).

    The timestep goes linearly from the example's value towards 0 (rounded for integer
    timesteps); ``progress(done, total, message)`` is called after each step."""
    ts = example_kwargs.get("timestep")
    if not isinstance(ts, torch.Tensor):
        raise SamplerError("the example kwargs have no tensor 'timestep'")
    t0 = float(ts.reshape(-1)[0])
    if not t0 > 0:
        raise SamplerError(f"the example timestep is {t0}; the default sampler counts down from a positive timestep")
    values = [t0 * (steps - i) / steps for i in range(steps)]
    if not ts.dtype.is_floating_point:
        values = [float(round(v)) for v in values]
        if len(set(values)) < steps:
            raise SamplerError(f"integer timestep {t0:g} is too small for {steps} distinct steps: use fewer steps")
    key = "hidden_states" if isinstance(example_kwargs.get("hidden_states"), torch.Tensor) else next(
        (k for k, v in example_kwargs.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
         and v.dim() >= 2), None)
    x = example_kwargs[key].clone() if key is not None else None
    with torch.no_grad(), generation(num_steps=steps, count_steps=True) as g:
        for i, t in enumerate(values):
            kw = dict(example_kwargs)
            kw["timestep"] = torch.full_like(ts, t)
            if key is not None:
                kw[key] = x
            out = model(**kw)
            v = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
            if key is not None and isinstance(v, torch.Tensor) and v.shape == x.shape:
                x = x + (values[i + 1] / t0 - t / t0 if i + 1 < steps else -t / t0) * v
            g.step_done()
            if progress is not None:
                progress(i + 1, steps, f"t={t:g}")
    return x
