"""The shipped reference model (bench/reference/) and the quality metrics (bench/metrics.py).

CPU only and fast: loads the committed weights offline, samples a few steps, never trains.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is not installed; import it from the checkout
    sys.path.insert(0, str(ROOT))

pytest.importorskip("sklearn")
pytest.importorskip("skimage")

from bench import metrics  # noqa: E402
from bench.models import (  # noqa: E402
    NULL_CLASS,
    REFERENCE_DIR,
    load_digit_images,
    load_reference,
    make_img_ids,
    pack_images,
    reference_spec,
    unpack_images,
)

STEPS = 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny matmuls: on a busy 2-core machine more threads only add OpenMP contention (50x slower)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ref(one_thread):
    # everything is local: make any hub access an error rather than a download
    old = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    try:
        yield load_reference()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def digit_metrics(ref):
    return metrics.DigitMetrics.from_reference(ref)


class Recorder(torch.nn.Module):
    """Wraps the transformer and records how the sampler calls it."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = []

    def forward(self, **kwargs):
        self.calls.append(kwargs)
        return self.inner(**kwargs)


# -- the shipped files --------------------------------------------------------------------------


def test_shipped_files_are_small_and_present():
    for name in ("config.json", "model.safetensors", "classifier.safetensors", "samples.png", "README.md"):
        assert (REFERENCE_DIR / name).is_file(), name
    total = sum(f.stat().st_size for f in REFERENCE_DIR.glob("*.safetensors"))
    assert total < 20 * 2**20


def test_load_reference(ref):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    assert isinstance(ref.transformer, FluxTransformer2DModel)
    assert not ref.transformer.training
    assert isinstance(ref.scheduler, FlowMatchEulerDiscreteScheduler)
    assert ref.classifier is not None
    assert ref.image_size >= 16
    # the caching needs repeated blocks of both kinds
    assert len(ref.transformer.transformer_blocks) >= 2
    assert len(ref.transformer.single_transformer_blocks) >= 2


def test_pack_unpack_roundtrip_and_ids():
    x = torch.randn(3, 1, 32, 32)
    tokens = pack_images(x, 4)
    assert tokens.shape == (3, 64, 16)
    assert torch.equal(unpack_images(tokens, 32, 4), x)
    # token k of the packed image is patch (row, col) = divmod(k, 8)
    assert torch.equal(tokens[0, 9], x[0, 0, 4:8, 4:8].reshape(-1))
    ids = make_img_ids(8)
    assert ids.shape == (64, 3) and ids[9].tolist() == [0.0, 1.0, 1.0]


def test_reference_spec_runs(ref):
    transformer, kwargs = reference_spec()
    with torch.no_grad():
        out = transformer(**kwargs)[0]
    assert out.shape == kwargs["hidden_states"].shape
    assert kwargs["timestep"].shape == (kwargs["hidden_states"].shape[0],)


# -- the sampler ---------------------------------------------------------------------------------


def test_sample_shape_range_and_determinism(ref):
    a = ref.sample([3, 7], steps=STEPS, guidance=3.0, seed=5)
    b = ref.sample([3, 7], steps=STEPS, guidance=3.0, seed=5)
    c = ref.sample([3, 7], steps=STEPS, guidance=3.0, seed=6)
    assert a.shape == (2, 1, ref.image_size, ref.image_size)
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_cfg_batched_and_split_agree(ref):
    rb, rs = Recorder(ref.transformer), Recorder(ref.transformer)
    batched = ref.sample([1, 8], steps=STEPS, guidance=3.0, seed=0, transformer=rb, cfg="batched")
    split = ref.sample([1, 8], steps=STEPS, guidance=3.0, seed=0, transformer=rs, cfg="split")
    torch.testing.assert_close(batched, split, atol=1e-4, rtol=0)

    assert len(rb.calls) == STEPS and len(rs.calls) == 2 * STEPS
    cond, uncond = ref.conditioning(torch.tensor([1, 8]))[1], ref.conditioning(torch.tensor([NULL_CLASS] * 2))[1]
    # batched: uncond then cond along the batch
    assert torch.equal(rb.calls[0]["pooled_projections"], torch.cat([uncond, cond]))
    # split: cond first, then uncond, with the same timestep values
    assert torch.equal(rs.calls[0]["pooled_projections"], cond)
    assert torch.equal(rs.calls[1]["pooled_projections"], uncond)
    for i in range(STEPS):
        t_cond, t_uncond = rs.calls[2 * i]["timestep"], rs.calls[2 * i + 1]["timestep"]
        assert t_cond.shape == (2,) and torch.equal(t_cond, t_uncond)
        assert torch.equal(rb.calls[i]["timestep"], torch.cat([t_cond, t_cond]))
    # Flux convention: timestep = sigma, from 1 down, in (0, 1]
    first = [c["timestep"][0].item() for c in rb.calls]
    assert first[0] == pytest.approx(1.0) and all(a > b > 0 for a, b in zip(first, first[1:]))
    assert all(c["guidance"] is None and c["return_dict"] is False for c in rb.calls + rs.calls)


def test_no_cfg_is_one_call_per_step(ref):
    r = Recorder(ref.transformer)
    ref.sample([2], steps=STEPS, guidance=1.0, transformer=r, cfg="split")
    assert len(r.calls) == STEPS


def test_sample_rejects_bad_arguments(ref):
    with pytest.raises(ValueError):
        ref.sample([1], steps=STEPS, cfg="interleaved")
    with pytest.raises(ValueError):
        ref.sample([11], steps=STEPS)


# -- metrics -------------------------------------------------------------------------------------


def test_psnr_known_values():
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    assert math.isinf(metrics.psnr(x, x))
    y = x + 0.1  # MSE = 0.01 exactly -> 20 dB
    assert metrics.psnr(x, y) == pytest.approx(20.0, abs=1e-4)
    per_image = metrics.psnr(x, y, reduction="none")
    assert per_image.shape == (4,)
    sigma = 0.05
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)) * sigma
    mse = (noise.double() ** 2).reshape(4, -1).mean(1)
    expected = (10 * torch.log10(1 / mse)).mean().item()
    assert metrics.psnr(x, x + noise) == pytest.approx(expected, rel=1e-6)
    assert metrics.psnr(x, x + noise) == pytest.approx(10 * math.log10(1 / sigma**2), abs=0.5)  # ~26 dB
    assert metrics.psnr(2 * x, 2 * y, data_range=2.0) == pytest.approx(20.0, abs=1e-4)


def test_ssim_known_values():
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    assert metrics.ssim(x, x) == pytest.approx(1.0)
    noisy = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert 0 < metrics.ssim(x, noisy) < 0.95
    with pytest.raises(ValueError):
        metrics.ssim(x, x[:2])


def test_frechet_distance_known_values():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 8))
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # shifting every feature by 1 adds |mu1 - mu2|^2 = 8 and leaves the covariances equal
    assert metrics.frechet_distance(a, a + 1.0) == pytest.approx(8.0, abs=1e-6)
    # N(0, I) vs N(0, 4I) in 3 dims: tr(I + 4I - 2*2I) = 3
    assert metrics.frechet_distance_from_stats(np.zeros(3), np.eye(3), np.zeros(3), 4 * np.eye(3)) == pytest.approx(3.0)
    # rank-deficient covariances (fewer samples than dimensions) stay finite and non-negative
    b = rng.normal(size=(5, 8))
    assert 0 <= metrics.frechet_distance(b, a) < math.inf


def test_classifier_on_real_digits(ref, digit_metrics):
    assert digit_metrics.real_accuracy() > 0.9
    x, y = load_digit_images(ref.image_size)
    assert metrics.class_accuracy(ref.classifier, (x[:200] + 1) / 2, y[:200]) > 0.9
    assert digit_metrics.fd(digit_metrics.real_images) == pytest.approx(0.0, abs=1e-4)
    assert digit_metrics.real_split_fd() < 5.0


def test_samples_are_digits(ref, digit_metrics):
    # a short, cheap check that the weights are the trained ones: 8-step CFG samples are mostly right
    labels = torch.arange(10).repeat(2)
    images = ref.sample(labels, steps=8, seed=0)
    assert digit_metrics.accuracy(images, labels) >= 0.7
