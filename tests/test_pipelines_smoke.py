"""Each tiny pipeline of ``tests/pipelines.py`` runs eagerly: shape, finiteness, determinism, CFG layout."""
import pytest
import torch

pytest.importorskip("transformers")  # without it diffusers exports placeholder pipeline classes

from pipelines import BUILDERS, FAMILIES  # noqa: E402

# diffusers' DPM++ scheduler (PixArt's default) trips a numpy 2 deprecation; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

# (transformer calls per step, batch of each call) with CFG on and one prompt: batched CFG is one call
# on [uncond, cond], Flux's true CFG and Wan two calls.
CFG_LAYOUT = {"flux": (2, 1), "sd3": (1, 2), "pixart": (1, 2), "wan22": (2, 1), "latte": (1, 2)}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy machine they lose a lot."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("family", FAMILIES)
def test_eager_generation(family):
    tp = BUILDERS[family]()
    calls = []
    for index, module in enumerate(tp.denoiser_modules()):
        module.register_forward_pre_hook(
            lambda mod, args, kwargs, index=index: calls.append(
                (index, (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).shape[0])),
            with_kwargs=True)

    out = tp(num_inference_steps=4, seed=0)
    assert tuple(out.shape) == tp.latent_shape()
    assert torch.isfinite(out).all()

    per_step, batch = CFG_LAYOUT[family]
    assert len(calls) == 4 * per_step
    assert all(b == batch for _, b in calls)
    assert {i for i, _ in calls} == set(range(len(tp.denoisers)))  # Wan 2.2: both experts run

    again = tp(num_inference_steps=4, seed=0)
    assert torch.equal(out, again)
    assert not torch.equal(out, tp(num_inference_steps=4, seed=1))
