"""The shipped video reference model (bench/reference_video/), its data and its metrics (bench/video.py).

CPU only and fast: generates a few videos, loads the committed weights offline, samples a few
steps, traces the Latte transformer once through the omnicache backend; never trains.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is not installed; import it from the checkout
    sys.path.insert(0, str(ROOT))

pytest.importorskip("sklearn")
pytest.importorskip("skimage")

from bench.models import NULL_CLASS  # noqa: E402
from bench.video import (  # noqa: E402
    MODEL_DEFAULTS,
    VIDEO_REFERENCE_DIR,
    VideoDigitMetrics,
    bounce,
    compare_videos,
    digit_centre,
    frame_psnr,
    frame_ssim,
    from_model_layout,
    load_sprites,
    load_video_reference,
    moving_digits,
    sample_moving_digits,
    speed_jitter,
    temporal_consistency,
    to_model_layout,
    track_digit,
    valid_bounce,
    video_reference_spec,
)

STEPS = 3


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ref(one_thread):
    old = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    try:
        yield load_video_reference()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def video_metrics(one_thread):
    return VideoDigitMetrics.load()


class Recorder(torch.nn.Module):
    """Wraps the transformer and records how the sampler calls it."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = []

    def forward(self, **kwargs):
        self.calls.append(kwargs)
        return self.inner(**kwargs)


# -- the data ------------------------------------------------------------------------------------


def test_moving_digits_shapes_and_determinism():
    v, y = moving_digits(6, seed=3)
    assert v.shape == (6, 8, 1, 16, 16) and v.dtype == torch.float32
    assert y.shape == (6,) and y.min() >= 0 and y.max() <= 9
    assert v.min() >= 0 and v.max() <= 1
    v2, y2 = moving_digits(6, seed=3)
    assert torch.equal(v, v2) and torch.equal(y, y2)
    v3, _ = moving_digits(6, seed=4)
    assert not torch.equal(v, v3)
    # model layout round trip: [B, F, C, H, W] in [0, 1] <-> Latte's [B, C, F, H, W] in [-1, 1]
    x = to_model_layout(v)
    assert x.shape == (6, 1, 8, 16, 16) and x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(from_model_layout(x), v)


def test_bounce_known_values():
    pos = bounce(torch.tensor([4, 0]), torch.tensor([1, -1]), frames=8, limit=6)
    assert pos.tolist() == [[4, 5, 6, 5, 4, 3, 2, 1], [0, 1, 2, 3, 4, 5, 6, 5]]


def test_moving_digits_are_rigid_bounces():
    d = sample_moving_digits(40, torch.Generator().manual_seed(0))
    v, pos, vel = d["videos"], d["positions"], d["velocity"]
    sprites, labels = load_sprites()
    assert torch.equal(d["labels"], labels[d["index"]])
    # every frame is the whole sprite, pasted at the recorded corner
    for i in range(0, 40, 7):
        for f in range(8):
            r, c = pos[i, f].tolist()
            assert torch.equal(v[i, f, 0, r : r + 10, c : c + 10], sprites[d["index"][i]])
            assert v[i, f].sum() == pytest.approx(float(sprites[d["index"][i]].sum()), rel=1e-5)
    assert (vel.abs() <= 1).all() and (vel.abs().sum(1) > 0).all()
    assert pos.min() >= 0 and pos.max() <= 6
    assert valid_bounce(pos.float()).all()
    # the tracker is translation-equivariant: a constant offset from the true corner
    tracked = track_digit(v)
    offset = tracked - pos.float()
    assert torch.allclose(offset, offset[:, :1].expand_as(offset))
    assert valid_bounce(tracked).all()
    centre = digit_centre(v)
    offset = centre - pos.float()
    assert torch.allclose(offset, offset[:, :1].expand_as(offset), atol=1e-4)
    assert valid_bounce(centre, tol=0.01).all() and speed_jitter(centre) < 1e-4
    # conditional draws honour the requested labels
    d = sample_moving_digits(5, torch.Generator().manual_seed(1), labels=torch.tensor([0, 3, 3, 9, 7]))
    assert d["labels"].tolist() == [0, 3, 3, 9, 7]


def test_valid_bounce_rejects_bad_motion():
    good = torch.tensor([[[2, 4], [3, 4], [4, 4], [5, 4], [6, 4], [5, 4], [4, 4], [3, 4]]]).float()
    assert valid_bounce(good).tolist() == [True]
    stops = good.clone()
    stops[0, 4:, 0] = 5  # moves, then stands still
    turns = good.clone()
    turns[0, :, 0] = torch.tensor([2.0, 3, 4, 3, 2, 3, 4, 5])  # turns at 4 although the wall (max) is 5
    jumps = good.clone()
    jumps[0, 3, 1] = 7
    assert valid_bounce(torch.cat([stops, turns, jumps])).tolist() == [False, False, False]


# -- the metrics ---------------------------------------------------------------------------------


def _videos(seed=0, n=3):
    return torch.rand(n, 8, 1, 16, 16, generator=torch.Generator().manual_seed(seed)) * 0.8


def test_frame_metrics_known_values():
    x = _videos()
    assert math.isinf(frame_psnr(x, x))
    assert frame_ssim(x, x) == pytest.approx(1.0)
    y = x + 0.1  # MSE 0.01 in every frame -> 20 dB
    assert frame_psnr(x, y) == pytest.approx(20.0, abs=1e-4)
    per_frame = frame_psnr(x, y, reduction="none")
    assert per_frame.shape == (3, 8)
    assert frame_ssim(x, y, reduction="none").shape == (3, 8)
    assert frame_psnr(x[:, :, 0], y[:, :, 0]) == pytest.approx(20.0, abs=1e-4)  # [N, F, H, W] works too
    with pytest.raises(ValueError):
        frame_psnr(x, x[:, :4])


def test_temporal_consistency_known_values():
    x = _videos()
    assert temporal_consistency(x, x) == pytest.approx({"diff_mae": 0.0, "diff_corr": 1.0, "flicker_ratio": 1.0})
    # a constant offset changes every frame but not the motion
    r = compare_videos(x + 0.1, x)
    assert r["psnr"] == pytest.approx(20.0, abs=1e-4)
    assert r["diff_mae"] == pytest.approx(0.0, abs=1e-6) and r["flicker_ratio"] == pytest.approx(1.0)
    # a frozen video (every frame = the first) has no motion at all
    frozen = x[:, :1].expand_as(x)
    r = temporal_consistency(frozen, x)
    assert r["flicker_ratio"] == 0.0 and r["diff_corr"] == 0.0
    assert r["diff_mae"] == pytest.approx(float((x[:, 1:] - x[:, :-1]).abs().mean()))
    # twice the change per frame: ratio 2, perfectly correlated, error = mean |change|
    base, step = x[:, :1], torch.randn(3, 1, 1, 16, 16, generator=torch.Generator().manual_seed(2)) * 0.01
    t = torch.arange(8.0).reshape(1, 8, 1, 1, 1)
    slow, fast = base + t * step, base + 2 * t * step
    r = temporal_consistency(fast, slow)
    assert r["flicker_ratio"] == pytest.approx(2.0) and r["diff_corr"] == pytest.approx(1.0)
    assert r["diff_mae"] == pytest.approx(float(step.abs().mean()), rel=1e-6)


def test_video_metrics_on_real_videos(video_metrics):
    v, y = moving_digits(30, seed=7)
    r = video_metrics.evaluate(v, y)
    assert r["frame_accuracy"] >= 0.95 and r["video_accuracy"] >= 0.95
    assert r["valid_motion"] == 1.0 and r["class_consistency"] >= 0.95
    assert r["speed_jitter"] < 1e-4 and 0.5 < r["mean_speed"] <= 1.0
    # noise is no digit
    noise = torch.rand(v.shape, generator=torch.Generator().manual_seed(0))
    assert video_metrics.evaluate(noise, y)["frame_accuracy"] < 0.5


# -- the shipped model ---------------------------------------------------------------------------


def test_shipped_files_are_small_and_present():
    for name in ("config.json", "model.safetensors", "samples.png", "README.md"):
        assert (VIDEO_REFERENCE_DIR / name).is_file(), name
    assert (VIDEO_REFERENCE_DIR / "model.safetensors").stat().st_size < 5 * 2**20


def test_load_video_reference(ref):
    from diffusers import FlowMatchEulerDiscreteScheduler, LatteTransformer3DModel

    assert isinstance(ref.transformer, LatteTransformer3DModel)
    assert not ref.transformer.training
    assert isinstance(ref.scheduler, FlowMatchEulerDiscreteScheduler)
    assert (ref.frames, ref.canvas) == (8, 16)
    # alternating spatial / temporal blocks, at least two of each
    assert len(ref.transformer.transformer_blocks) == len(ref.transformer.temporal_transformer_blocks) >= 2
    assert dict(ref.transformer.config)["video_length"] == ref.frames
    assert ref.config["transformer"] == MODEL_DEFAULTS["transformer"]


def test_video_reference_spec_runs(ref):
    transformer, kwargs = video_reference_spec()
    with torch.no_grad():
        out = transformer(**kwargs)[0]
    assert out.shape == kwargs["hidden_states"].shape == (2, 1, 8, 16, 16)
    assert kwargs["timestep"].tolist() == [1000.0, 1000.0]
    assert kwargs["encoder_hidden_states"].shape == (2, ref.config["num_text_tokens"],
                                                     ref.config["transformer"]["caption_channels"])


def test_sample_shape_range_and_determinism(ref):
    a = ref.sample([3, 7], steps=STEPS, seed=5)
    b = ref.sample([3, 7], steps=STEPS, seed=5)
    c = ref.sample([3, 7], steps=STEPS, seed=6)
    assert a.shape == (2, 8, 1, 16, 16)
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_cfg_batched_and_split_agree(ref):
    rb, rs = Recorder(ref.transformer), Recorder(ref.transformer)
    batched = ref.sample([1, 8], steps=STEPS, guidance=3.0, seed=0, transformer=rb, cfg="batched")
    split = ref.sample([1, 8], steps=STEPS, guidance=3.0, seed=0, transformer=rs, cfg="split")
    torch.testing.assert_close(batched, split, atol=1e-4, rtol=0)
    assert len(rb.calls) == STEPS and len(rs.calls) == 2 * STEPS
    cond, uncond = ref.conditioning(torch.tensor([1, 8])), ref.conditioning(torch.tensor([NULL_CLASS] * 2))
    assert torch.equal(rb.calls[0]["encoder_hidden_states"], torch.cat([uncond, cond]))
    assert torch.equal(rs.calls[0]["encoder_hidden_states"], cond)
    assert torch.equal(rs.calls[1]["encoder_hidden_states"], uncond)
    # Latte convention: timestep = 1000 * sigma, from 1000 down
    first = [c["timestep"][0].item() for c in rb.calls]
    assert first[0] == pytest.approx(1000.0) and all(a > b > 0 for a, b in zip(first, first[1:]))
    assert all(c["enable_temporal_attentions"] is True and c["return_dict"] is False for c in rb.calls + rs.calls)
    # no CFG: one call per step
    r = Recorder(ref.transformer)
    ref.sample([2], steps=STEPS, guidance=1.0, transformer=r, cfg="split")
    assert len(r.calls) == STEPS
    with pytest.raises(ValueError):
        ref.sample([1], steps=STEPS, cfg="interleaved")
    with pytest.raises(ValueError):
        ref.sample([11], steps=STEPS)


def test_samples_are_moving_digits(ref, video_metrics):
    # a cheap check that the weights are the trained ones: short CFG samples are mostly right
    labels = torch.arange(10)
    videos = ref.sample(labels, steps=8, seed=0)
    r = video_metrics.evaluate(videos, labels)
    assert r["frame_accuracy"] >= 0.8  # 1.0 with the shipped weights
    assert r["mean_speed"] > 0.2  # the digits move


def test_traces_under_omnicache_fullgraph(ref):
    from omnicompile import OmniCache

    oc = OmniCache(inner_backend="eager")
    compiled = torch.compile(ref.transformer, backend=oc, fullgraph=True)  # a graph break would raise
    eager_steps, cached_steps = [], []
    eager = ref.sample([4], steps=3, seed=1, callback=lambda i, s, x: eager_steps.append(x.clone()))
    cached = ref.sample([4], steps=3, seed=1, transformer=compiled,
                        callback=lambda i, s, x: cached_steps.append(x.clone()))
    assert cached.shape == eager.shape
    rep = oc.report()
    assert len(rep.graphs) == 1
    g = rep.graphs[0]
    assert g.cached, g.fallback
    lists = " ".join(str(b) for b in g.block_lists)
    assert "temporal_transformer_blocks" in lists and "transformer_blocks" in lists
    decisions = [set(s.decisions.values()) for s in g.steps]
    assert len(decisions) == 3 and decisions[0] == {"computed"}
    # steps computed in full before any reuse match eager exactly
    first_reuse = next((i for i, d in enumerate(decisions) if "reused" in d), len(decisions))
    assert first_reuse >= 1
    for i in range(first_reuse):
        torch.testing.assert_close(cached_steps[i], eager_steps[i], rtol=1e-5, atol=1e-5)
