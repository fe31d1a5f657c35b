"""Side inputs added into the streams between blocks (issue 15, item 2).

Wan VACE adds a hint of its control branch into the hidden states after some blocks; Flux adds
ControlNet residuals (``controlnet_block_samples``) after every block.  Such an addition
``stream + side`` is a *side addition*: the span's residual is taken against ``in + side`` and a
reuse adds this call's side values (``passes/spans.py``), so a control signal that changes per
step is applied fresh.  Every call is replayed by the reference executor with those semantics.
A side value mixed into a stream any other way is refused (``side_input_not_additive``).
"""
import pytest
import torch

import omnicompile
from omnicompile import OmniCache
from omnicompile.passes.blocks import find_blocks
from omnicompile.passes.spans import find_spans
from omnicompile.testing import tiny_flux, tiny_wan_vace, with_timestep
from reference_executor import Recorder, replay_all


pytestmark = pytest.mark.usefixtures("one_thread")


def denoise(fn, kw, ts, latent="hidden_states", per_step=None):
    """A small Euler-like loop inside a generation context; ``per_step(i, kw)`` may change
    other inputs per step (a ControlNet's residuals)."""
    x = kw[latent]
    outs = []
    with torch.no_grad(), omnicompile.generation(timesteps=ts):
        for i, t in enumerate(ts):
            k = {**with_timestep(kw, t), latent: x}
            if per_step is not None:
                k = per_step(i, k)
            out = fn(**k)[0]
            outs.append(out)
            x = x - 0.05 * out
    return outs


def cached(model, kw, ts, per_step=None, **options):
    oc = OmniCache(inner_backend="eager", num_steps=len(ts), **options)
    rec = Recorder(oc)
    denoise(torch.compile(model, backend=rec, fullgraph=True), kw, ts, per_step=per_step)
    return oc.report().graphs[0], rec


VACE_TS = [1000.0 - 125.0 * i for i in range(8)]


@pytest.mark.parametrize("options", [dict(policy="static", interval=2, warmup=1),
                                     dict(policy="probe", threshold=0.5, align=False)],
                         ids=["static", "probe"])
def test_vace_is_cached_and_equals_the_reference(options):
    model, kw = tiny_wan_vace()
    g, rec = cached(model, kw, VACE_TS, **options)
    assert g.cached, g.fallback
    # the span list covers the main blocks (the probe computes block 0 itself)
    first = 1 if options["policy"] == "probe" else 0
    assert [(s.name, s.units) for s in g.spans] == [(f"blocks[{first}:4]", 4 - first)]
    # the report names the hints added after blocks 0 and 2 (block 0 belongs to the probe)
    assert len(g.spans[0].side_additions) == 2 - first
    assert all(a.startswith("hidden_states += ") for a in g.spans[0].side_additions)
    counts = replay_all(rec)
    assert counts["reused"] > 0 and counts["computed"] > 0


def test_vace_hints_are_side_additions_of_the_span():
    model, kw = tiny_wan_vace()
    gm = _trace(model, kw)
    analysis = find_spans(gm, find_blocks(gm))
    (span,) = analysis.spans
    (stream,) = span.live_streams
    # one hint per VACE layer (after blocks 0 and 2), each computed outside the reused body
    assert len(stream.adds) == 2
    assert all(h in span.keep or h not in span.nodes for h in stream.adds)


def test_flux_controlnet_residuals_are_fresh_on_reuse():
    model, kw = tiny_flux(num_layers=4, num_single_layers=2)
    gen = torch.Generator().manual_seed(3)
    base = [torch.randn(1, 16, 32, generator=gen) for _ in range(2)]
    single = [torch.randn(1, 16, 32, generator=gen) for _ in range(2)]

    def per_step(i, k):        # a ControlNet's residuals change from step to step
        s = 1.0 - 0.1 * i
        return {**k, "controlnet_block_samples": [s * b for b in base],
                "controlnet_single_block_samples": [s * b for b in single]}

    kw = per_step(0, kw)
    ts = [1.0 - 0.1 * i for i in range(6)]
    g, rec = cached(model, kw, ts, per_step=per_step, policy="static", interval=2, warmup=1)
    assert g.cached, g.fallback
    assert [s.name for s in g.spans] == ["transformer_blocks[0:4]", "single_transformer_blocks[0:2]"]
    for sp in rec.graphs[0].runtime.known_spans():
        hs = next(s for s in sp.live_streams if s.name == "hidden_states")
        assert hs.adds and all("controlnet" in h.name for h in hs.adds)
    assert replay_all(rec)["reused"] > 0


class _Block(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.a, self.b = torch.nn.Linear(d, d), torch.nn.Linear(d, d)

    def forward(self, h, temb):
        return h + self.b(torch.nn.functional.gelu(self.a(h + temb)))


class _SideModel(torch.nn.Module):
    """Blocks with a per-call side input mixed into the stream after block 0 only:
    ``add`` (``h + side``), ``mul`` (``h * side``) or ``cat`` (a gate from both)."""

    def __init__(self, how, d=16, n=4):
        super().__init__()
        self.how = how
        self.proj = torch.nn.Linear(d, d)
        self.blocks = torch.nn.ModuleList([_Block(d) for _ in range(n)])

    def forward(self, hidden_states, timestep, side):
        temb = torch.sin(timestep[:, None, None] * torch.arange(16.0))
        h = self.proj(hidden_states)
        for i, block in enumerate(self.blocks):
            h = block(h, temb)
            if i == 0:
                if self.how == "add":
                    h = h + side
                elif self.how == "mul":
                    h = h * side
                else:
                    h = h + torch.cat([side[..., :8], h[..., 8:]], -1)
        return (h,)


def _side_kwargs():
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 6, 16, generator=g), timestep=torch.tensor([1.0]),
                side=torch.randn(1, 6, 16, generator=g))


def test_a_side_addition_in_any_model_is_cached_fresh():
    torch.manual_seed(0)
    model = _SideModel("add").eval()
    kw = _side_kwargs()
    ts = [1.0 - 0.1 * i for i in range(6)]
    g, rec = cached(model, kw, ts, per_step=lambda i, k: {**k, "side": k["side"] * (1 + i)},
                    policy="static", interval=2, warmup=1)
    assert g.cached and [s.name for s in g.spans] == ["blocks[0:4]"]
    assert replay_all(rec)["reused"] > 0
    # fresh: at a reused step the output moves with that step's side input
    oc = OmniCache(policy="static", reuse_steps=[1], inner_backend="eager", num_steps=2)
    fn = torch.compile(model, backend=oc, fullgraph=True)
    outs = []
    for scale in (1.0, 3.0):      # step 0 (computed) is the same; step 1 (reused) gets another side
        outs.append(denoise(fn, kw, [1.0, 0.9],
                            per_step=lambda i, k: {**k, "side": k["side"] * (scale if i == 1 else 1.0)})[1])
    steps = oc.report().graphs[0].steps
    assert [s.decisions for s in steps] == [{"blocks[0:4]": "computed"}, {"blocks[0:4]": "reused"}] * 2
    # the blocks are skipped and the model's output is the stream: in + side + residual, so the
    # change of the side input passes 1:1 (a stale reuse would leave the output unchanged)
    torch.testing.assert_close(outs[1] - outs[0], 2.0 * kw["side"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("how", ["mul", "cat"])
def test_a_side_input_that_is_not_an_addition_is_refused(how):
    torch.manual_seed(0)
    model = _SideModel(how).eval()
    kw = _side_kwargs()
    oc = OmniCache(policy="static", interval=2, warmup=1, inner_backend="eager")
    fn = torch.compile(model, backend=oc, fullgraph=True)
    with torch.no_grad():
        out = fn(**kw)[0]
        torch.testing.assert_close(out, model(**kw)[0])
    g = oc.report().graphs[0]
    assert not g.cached
    assert g.fallback.code == "side_input_not_additive", g.fallback
    assert "side" in g.fallback.message and g.fallback.subject == "blocks[0:4]"


def _trace(model, kw):
    from conftest import trace
    return trace(model, kw)[0]


def _vace_pipeline():
    """A tiny ``WanVACEPipeline``: the transformer of :func:`tiny_wan_vace` (4 latent channels, so
    the control input has 2 * 4 + 64 channels: video latents, reactive latents and the 8 x 8 mask)
    and a tiny ``AutoencoderKLWan`` that encodes the control video; text embeddings precomputed."""
    import numpy as np
    import PIL.Image
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanVACEPipeline
    from diffusers import WanVACETransformer3DModel
    from pipelines import _build

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                           latents_std=[1.0] * 4).eval()
    transformer = WanVACETransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=4, rope_max_seq_len=32, vace_layers=[0, 2],
        vace_in_channels=2 * 4 + 64).eval()
    pipe = _build(WanVACEPipeline, transformer=transformer, vae=vae,
                  scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    g = torch.Generator().manual_seed(0)
    frames = [PIL.Image.fromarray((torch.rand(32, 32, 3, generator=g).numpy() * 255).astype(np.uint8))
              for _ in range(5)]
    kw = dict(prompt_embeds=torch.randn(1, 6, 16, generator=g), negative_prompt_embeds=torch.randn(1, 6, 16, generator=g),
              video=frames, height=32, width=32, num_frames=5, num_inference_steps=6, guidance_scale=4.0,
              output_type="latent", return_dict=False)
    return pipe, kw


def test_wan_vace_pipeline_is_cached_and_equals_the_reference():
    pipe, kw = _vace_pipeline()
    cache = omnicompile.compile_pipeline(pipe, dynamic=False, policy="static", interval=2, warmup=1, cooldown=1,
                                         inner_backend="eager")
    rec = Recorder(cache.backends["transformer"])
    pipe.transformer = torch.compile(cache.originals["transformer"], backend=rec, dynamic=False)
    with torch.no_grad():
        pipe(**kw, generator=torch.Generator().manual_seed(0))
    (g,) = cache.backends["transformer"].report().graphs
    assert g.cached and [s.name for s in g.spans] == ["blocks[0:4]"]
    counts = replay_all(rec)
    assert counts["calls"] == 12 and counts["reused"] == 4      # CFG: two calls per step, steps 1 and 3 reused
