"""Tiny diffusers denoisers and a pipeline-like sampling loop for the differential fuzzer
(``test_fuzz.py``).  Test helper, not a test file.

Models are built once per ``(family, config)`` and kept for the whole process (random weights,
seeded: the same config is the same model).  Each is compiled once per ``dynamic`` flag with a
:class:`Dispatcher` as the backend: Dynamo traces a graph once per model config and input shape
(a few seconds each), and the dispatcher hands each graph to the backend of the *current*
example (an ``OmniCache`` behind a :class:`reference_executor.Recorder`), compiled on its first
call there.  So one trace serves every example that uses the same model and shape, and each
example still gets a fresh ``OmniCache`` that sees Dynamo's graph and example inputs exactly as
a ``torch.compile(..., backend=oc)`` would.

:func:`run_generation` is the loop: seeded noise, a decreasing timestep schedule, CFG off, split
(two calls per step: cond then uncond) or batched (one call on ``cat([uncond, cond])``), an Euler
update, inside ``omnicompile.generation(timesteps=...)``, ``generation(num_steps=...)`` or no
context (the runtime infers the steps).  It returns every model output and the true
``(step, slot)`` of each call.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch

import omnicompile

__all__ = ["FAMILIES", "CONFIGS", "RESOLUTIONS", "Dispatcher", "Shape", "get_model", "compiled",
           "run_generation", "DISPATCH"]

FAMILIES = ("flux", "sd3", "wan", "latte")
#: per family, the configs the fuzzer draws: layer counts (Flux: double, single blocks).  SD3's last
#: block differs from the others (no encoder output), so 3 is its smallest cacheable depth.
CONFIGS = {"flux": ((2, 2), (1, 3)), "sd3": (3, 4), "wan": (2, 3), "latte": (2, 3)}
#: per family, the latent resolutions drawn (Flux: the token grid; others: latent H x W)
RESOLUTIONS = {"flux": ((4, 4), (4, 6)), "sd3": ((8, 8), (8, 12)), "wan": ((8, 8), (8, 12)),
               "latte": ((8, 8), (8, 12))}
TEXT = {"flux": 5, "sd3": 6, "wan": 6, "latte": 6}


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int
    res: tuple


@functools.lru_cache(maxsize=None)
def get_model(family: str, config) -> torch.nn.Module:
    """The model of ``(family, config)``: built once per process."""
    from omnicompile import testing
    if family == "flux":
        m, _ = testing.tiny_flux(num_layers=config[0], num_single_layers=config[1])
    elif family == "sd3":
        m, _ = testing.tiny_sd3(num_layers=config)
    elif family == "wan":
        m, _ = testing.tiny_wan(num_layers=config)
    elif family == "latte":
        m, _ = testing.tiny_latte(num_layers=config, frames=2)
    else:
        raise ValueError(family)
    return m


class Dispatcher:
    """A ``torch.compile`` backend that forwards each graph to the current example's backend."""

    def __init__(self, name: str):
        self.__name__ = f"fuzz_dispatch_{name}"
        self.target = None            # the current example's backend: (gm, example_inputs) -> callable
        self.served: dict = {}        # graph key -> callable, for the current target
        self.log: list = []           # per call of the current target: the index of the graph served
        self.traces = 0

    def __call__(self, gm, example_inputs):
        self.traces += 1
        key = object()

        def run(*args):
            target = self.target
            if target is None:
                raise RuntimeError("fuzz dispatcher: no backend set for this call")
            entry = self.served.get(key)
            if entry is None:       # graphs are numbered in the order the target first saw them
                entry = self.served[key] = (len(self.served), target(gm, example_inputs))
            self.log.append(entry[0])
            return entry[1](*args)
        return run

    @contextlib.contextmanager
    def serving(self, target):
        self.target, self.served, self.log = target, {}, []
        try:
            yield self.log
        finally:
            self.target, self.served = None, {}


DISPATCH = {False: Dispatcher("static"), True: Dispatcher("dynamic")}
_COMPILED: dict = {}


def compiled(family: str, config, dynamic: bool):
    """``torch.compile(model, backend=DISPATCH[dynamic], fullgraph=True, dynamic=dynamic)``, once."""
    key = (family, config, dynamic)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(get_model(family, config), backend=DISPATCH[dynamic], fullgraph=True,
                                       dynamic=dynamic)
    return _COMPILED[key]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def latent_shape(family: str, shape: Shape) -> tuple:
    b, (h, w) = shape.batch, shape.res
    if family == "flux":
        return (b, h * w, 4)
    if family == "sd3":
        return (b, 4, h, w)
    return (b, 4, 2, h, w)          # wan, latte: 2 latent frames


def embeddings(family: str, batch: int, seed: int, negative: bool) -> dict:
    """Seeded text embeddings (a negative prompt: one row, repeated)."""
    g = _gen(seed * 7 + (1 if negative else 0))
    rows = 1 if negative else batch
    dim = 32 if family == "flux" else 16
    enc = torch.randn(rows, TEXT[family], dim, generator=g).expand(batch, -1, -1).contiguous()
    out = {"encoder_hidden_states": enc}
    if family in ("flux", "sd3"):
        out["pooled_projections"] = torch.randn(rows, dim, generator=g).expand(batch, -1).contiguous()
    return out


def _ids(res):
    h, w = res
    ids = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(-1, 2)
    return torch.cat([torch.zeros(ids.shape[0], 1), ids.float()], 1)


def model_kwargs(family: str, x, emb: dict, t, res) -> dict:
    kw = dict(hidden_states=x, timestep=t, return_dict=False, **emb)
    if family == "flux":
        kw.update(img_ids=_ids(res), txt_ids=torch.zeros(TEXT["flux"], 3))
    elif family == "latte":
        kw.update(enable_temporal_attentions=True)
    return kw


def timesteps(family: str, steps: int, int_timesteps: bool) -> list:
    """A decreasing schedule on the family's scale (Flux (0, 1], others [0, 1000])."""
    sigmas = [1.0 - i / steps for i in range(steps)]
    if family == "flux":
        return sigmas
    ts = [s * 1000.0 for s in sigmas]
    return [float(round(t)) for t in ts] if int_timesteps else ts


def run_generation(fn, family: str, shape: Shape, steps: int, cfg: str, context: str, seed: int,
                   int_timesteps: bool = False, scale: float = 2.0):
    """One generation of ``steps`` steps through ``fn``; returns ``(outputs, places)``: every model
    output (the first return value, in call order) and the true ``(step, slot)`` of each call."""
    ts = timesteps(family, steps, int_timesteps)
    x = torch.randn(latent_shape(family, shape), generator=_gen(seed))
    b = shape.batch
    cond = embeddings(family, b, seed, False)
    uncond = embeddings(family, b, seed, True)
    dtype = torch.int64 if int_timesteps and family != "flux" else torch.float32
    outs, places = [], []
    if context == "timesteps":
        ctx = omnicompile.generation(timesteps=ts)
    elif context == "num_steps":
        ctx = omnicompile.generation(num_steps=steps)
    else:
        ctx = contextlib.nullcontext()
    norm = 1.0 if family == "flux" else 1000.0

    def call(xin, emb, t, rows, step, slot):
        out = fn(**model_kwargs(family, xin, emb, torch.full((rows,), t, dtype=dtype), shape.res))[0]
        outs.append(out)
        places.append((step, slot))
        return out[:, :4] if family == "latte" else out      # Latte: learned sigma, 8 channels

    with torch.no_grad(), ctx:
        for i, t in enumerate(ts):
            if cfg == "off":
                v = call(x, cond, t, b, i, 0)
            elif cfg == "split":
                vc = call(x, cond, t, b, i, 0)
                vu = call(x, uncond, t, b, i, 1)
                v = vu + scale * (vc - vu)
            elif cfg == "batched":
                both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
                vu, vc = call(torch.cat([x, x]), both, t, 2 * b, i, 0).chunk(2)
                v = vu + scale * (vc - vu)
            else:
                raise ValueError(cfg)
            t_next = ts[i + 1] if i + 1 < len(ts) else 0.0
            x = x + (t_next - t) / norm * v
    return outs, places
