import logging
import os

import pytest
import torch

# The whole suite runs in strict mode: an exception inside the backend's analysis, rewrite or
# dump propagates instead of being turned into an uncached graph, so a test that expects a
# refusal sees a deliberate one (with its reason), never a bug in disguise.
os.environ.setdefault("OMNICACHE_STRICT", "1")

# Under pytest-xdist (`make test` runs one worker per CPU) each worker computes on one thread:
# the workers share the cores instead of oversubscribing them.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every test starts with an empty Dynamo cache (tests compile the same tiny models)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (restored after): tiny models time and compare alike."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def capture_graphs():
    """A backend that records Dynamo's graphs and runs them eagerly."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    backend.graphs = graphs
    return backend


def trace(model, kwargs):
    """Dynamo's GraphModule for ``model(**kwargs)`` (fullgraph), as a backend receives it."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(**kwargs)
    assert len(graphs) == 1
    return graphs[0]


logging.getLogger("omnicompile").setLevel(logging.ERROR)
