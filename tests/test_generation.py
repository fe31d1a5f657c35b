"""Which model, generation, step and step count a call belongs to: generation contexts,
threads, graph-broken models, and the conservative inference of bare loops.  Outputs are
checked against the reference executor (``reference_executor.py``) replaying the decisions the
report says were taken, or against single-threaded runs."""
import threading

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import omnicompile
from omnicompile import OmniCache
from omnicompile.testing import tiny_flux, with_timestep
from reference_executor import Recorder, replay_all

STATIC = dict(policy="static", interval=2, warmup=1, inner_backend="eager")


def timesteps(n):
    sched = FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(n)
    return [float(t) / 1000 for t in sched.timesteps]


def loop(fn, kw, ts, seed=0, barrier=None):
    """A bare Euler loop over ``ts`` (the values the model receives)."""
    x = torch.randn(kw["hidden_states"].shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for i, t in enumerate(ts):
            if barrier is not None:
                barrier.wait()
            v = fn(**dict(with_timestep(kw, t), hidden_states=x))[0]
            x = x + ((ts[i + 1] if i + 1 < len(ts) else 0.0) - t) * v
    return x


# ----------------------------------------------------------------------------- contexts


def test_context_by_timestep_values_with_cfg_as_two_calls():
    model, kw = tiny_flux()
    uncond = dict(kw, encoder_hidden_states=torch.zeros_like(kw["encoder_hidden_states"]))
    oc = OmniCache(**STATIC)
    rec = Recorder(oc)
    fn = torch.compile(model, backend=rec, fullgraph=True)
    ts = timesteps(6)
    with torch.no_grad(), omnicompile.generation(timesteps=ts) as g:
        for t in ts:
            fn(**with_timestep(kw, t))
            fn(**with_timestep(uncond, t))
    assert g.closed and g.num_steps == 6
    (graph,) = oc.report().graphs
    assert [(r.step, r.slot) for r in graph.steps] == [(s, k) for s in range(6) for k in (0, 1)]
    assert graph.generation_log[0].num_steps == 6 and graph.generation_log[0].source == "context"
    assert replay_all(rec)["reused"] > 0


def test_a_new_context_is_a_new_generation_even_at_the_same_timestep():
    """An abandoned generation (one call) followed by a new one at the same timestep: without a
    context it would look like a second CFG call; a new context never shares a cache."""
    model, kw = tiny_flux()
    oc = OmniCache(policy="static", reuse_steps=[1], inner_backend="eager")
    rec = Recorder(oc)
    fn = torch.compile(model, backend=rec, fullgraph=True)
    ts = timesteps(4)
    with torch.no_grad():
        with omnicompile.generation(num_steps=4):
            fn(**with_timestep(kw, ts[0]))                     # abandoned after one call
        with omnicompile.generation(num_steps=4):
            loop(fn, kw, ts, seed=3)
    g = oc.report().graphs[0]
    assert [r.generation for r in g.steps] == [0, 1, 1, 1, 1]
    assert g.steps[2].decisions and set(g.steps[2].decisions.values()) == {"reused"}   # its own step 0
    replay_all(rec)


def test_count_steps_context_and_errors():
    with omnicompile.generation(count_steps=True) as g:
        assert g.explicit_step() == 0
        g.step_done()
        assert g.explicit_step() == 1
    with omnicompile.generation(num_steps=3) as g2:
        with pytest.raises(RuntimeError, match="count_steps"):
            g2.step_done()
    with pytest.raises(ValueError, match="num_steps"):
        with omnicompile.generation(num_steps=0):
            pass
    with pytest.raises(ValueError, match="disagrees"):
        with omnicompile.generation(timesteps=[1.0, 0.5], num_steps=3):
            pass
    assert omnicompile.current_generation() is None


# ----------------------------------------------------------------------------- threads


@pytest.mark.parametrize("context", [True, False], ids=["context", "bare"])
def test_two_threads_on_one_compiled_model_equal_their_single_threaded_runs(context):
    model, kw = tiny_flux()
    oc = OmniCache(**STATIC, num_steps=6)
    fn = torch.compile(model, backend=oc, fullgraph=True)
    ts = {0: timesteps(6), 1: [t * 0.9 for t in timesteps(6)]}

    def run(k, barrier=None, out=None):
        if context:
            with omnicompile.generation(timesteps=ts[k]):
                x = loop(fn, kw, ts[k], seed=k, barrier=barrier)
        else:
            x = loop(fn, kw, ts[k], seed=k, barrier=barrier)
        if out is not None:
            out[k] = x
        return x

    alone = {}
    for k in (0, 1):                  # one after the other, each in a thread of its own
        th = threading.Thread(target=run, args=(k, None, alone))
        th.start()
        th.join()
    barrier, out = threading.Barrier(2), {}
    threads = [threading.Thread(target=run, args=(k, barrier, out)) for k in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for k in (0, 1):
        torch.testing.assert_close(out[k], alone[k], rtol=1e-5, atol=1e-5)
    assert oc.report().hit_rate > 0


# ----------------------------------------------------------------------------- graph breaks


class _Broken(torch.nn.Module):
    """Blocks after a graph break: the graph holding them gets no timestep input."""

    def __init__(self):
        super().__init__()
        self.t_embed = torch.nn.Linear(1, 16)
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(),
                                                              torch.nn.Linear(32, 16)) for _ in range(3))
        self.out = torch.nn.Linear(16, 16)

    def forward(self, x, t):
        temb = self.t_embed(t.reshape(-1, 1))[:, None, :]
        torch._dynamo.graph_break()
        h = x + temb
        for b in self.blocks:
            h = h + b(h * 1.5)
        return self.out(h)


def test_a_graph_after_a_break_is_cached_inside_a_counting_context():
    torch.manual_seed(0)
    model = _Broken().eval()
    x = torch.randn(1, 4, 16)
    oc = OmniCache(**STATIC)
    rec = Recorder(oc)
    fn = torch.compile(model, backend=rec)
    with torch.no_grad(), omnicompile.generation(count_steps=True, num_steps=5) as g:
        for t in (1.0, 0.8, 0.6, 0.4, 0.2):
            fn(x, torch.tensor([t]))
            g.step_done()
    blocks = [r for r in rec.graphs if r.runtime is not None]
    assert len(blocks) == 1 and blocks[0].report.timestep_input is None
    assert replay_all(rec)["reused"] > 0
    # outside such a context the same graph is refused, with the way to cache it
    torch._dynamo.reset()
    oc2 = OmniCache(**STATIC)
    with torch.no_grad():
        torch.compile(model, backend=oc2)(x, torch.tensor([1.0]))
    codes = {g.fallback.code for g in oc2.report().graphs if g.fallback is not None}
    assert "no_timestep" in codes


def test_lumina2_breaks_before_its_blocks_and_is_cached_in_a_pipeline_like_context():
    from diffusers import Lumina2Transformer2DModel

    torch.manual_seed(0)
    m = Lumina2Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=3,
                                  num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1, multiple_of=16,
                                  norm_eps=1e-5, axes_dim_rope=(4, 6, 6), axes_lens=(64, 16, 16),
                                  cap_feat_dim=16).eval()
    kw = dict(encoder_hidden_states=torch.randn(1, 6, 16), encoder_attention_mask=torch.ones(1, 6, dtype=torch.bool))
    sched = FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(6)
    oc = OmniCache(**STATIC)
    rec = Recorder(oc)
    fn = torch.compile(m, backend=rec)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), omnicompile.generation(scheduler=sched):
        for t in sched.timesteps:
            v = fn(hidden_states=x, timestep=(t / 1000).reshape(1), **kw)[0]
            x = sched.step(v, t, x).prev_sample
    cached = [r for r in rec.graphs if r.runtime is not None]
    assert len(rec.graphs) > 1 and len(cached) == 1          # a graph break, then the blocks' graph
    assert cached[0].report.timestep_input is None
    assert replay_all(rec)["reused"] > 0


# ----------------------------------------------------------------------------- bare loops


def test_bare_restart_below_a_known_schedule_is_uncertain():
    """After a complete generation, a run that leaves its schedule (an interrupted run followed
    by one starting lower, as img2img would) is uncertain: it computes, and says why."""
    model, kw = tiny_flux()
    oc = OmniCache(policy="static", interval=2, warmup=1, inner_backend="eager")
    rec = Recorder(oc)
    fn = torch.compile(model, backend=rec, fullgraph=True)
    ts = timesteps(8)
    loop(fn, kw, ts)                              # a complete generation: its schedule is known
    loop(fn, kw, ts[:3])                          # interrupted after 3 steps
    lower = [t * 0.93 for t in ts[4:]]            # a new run starting lower: looks like a continuation
    loop(fn, kw, lower, seed=1)
    g = oc.report().graphs[0]
    tail = g.steps[-len(lower):]
    assert all(r.uncertain and set(r.decisions.values()) == {"computed"} for r in tail)
    assert "leaves the schedule" in tail[0].uncertain
    replay_all(rec)


def test_bare_step_count_is_known_only_from_a_matching_schedule():
    """static with cooldown protects the last steps only when the step count is known: the first
    bare generation reuses nothing; one that follows its schedule knows it."""
    model, kw = tiny_flux()
    oc = OmniCache(policy="static", interval=2, warmup=1, cooldown=2, inner_backend="eager")
    fn = torch.compile(model, backend=oc, fullgraph=True)
    ts = timesteps(8)
    loop(fn, kw, ts)
    loop(fn, kw, ts)
    g = oc.report().graphs[0]
    first = [r for r in g.steps if r.generation == 0]
    second = [r for r in g.steps if r.generation == 1]
    assert all(set(r.decisions.values()) == {"computed"} for r in first)
    assert [r.step for r in second if "reused" in r.decisions.values()] == [1, 3, 5]
    assert [x.num_steps for x in g.generation_log] == [None, 8]


def test_probe_without_a_step_count_never_reuses_what_may_be_the_last_step():
    model, kw = tiny_flux()
    oc = OmniCache(policy="probe", threshold=10.0, inner_backend="eager")
    fn = torch.compile(model, backend=oc, fullgraph=True)
    ts = timesteps(8)
    loop(fn, kw, ts)                              # unknown count: every step computed
    with omnicompile.generation(timesteps=ts):
        loop(fn, kw, ts)                          # known: reuses, never the last step
    g = oc.report().graphs[0]
    first = [r for r in g.steps if r.generation == 0]
    second = [r for r in g.steps if r.generation == 1]
    assert all(set(r.decisions.values()) == {"computed"} for r in first)
    assert any("reused" in r.decisions.values() for r in second)
    assert set(second[-1].decisions.values()) == {"computed"}


# ----------------------------------------------------------------------------- calibrations per step count


@pytest.mark.parametrize("policy", ["trajectory", "layered"])
def test_calibrations_are_kept_per_step_count_and_abandoned_ones_redone(policy):
    model, kw = tiny_flux()
    opts = dict(policy=policy, inner_backend="eager")
    if policy == "trajectory":
        opts.update(budget=0.3)
    oc = OmniCache(**opts)
    fn = torch.compile(model, backend=oc, fullgraph=True)

    def run(n, stop=None):
        ts = timesteps(n)
        with omnicompile.generation(timesteps=ts):
            loop(fn, kw, ts[:stop] if stop else ts)

    for n, stop in ((12, None), (12, None), (10, 4), (10, None), (10, None), (12, None)):
        run(n, stop)
    (g,) = oc.report().graphs
    plans = [(x.num_steps, x.plan.split(" (")[0].split(",")[0]) for x in g.generation_log]
    kind = "calibration generation"
    assert plans[0] == (12, kind) and plans[2] == (10, kind) and plans[3] == (10, kind)   # abandoned: redone
    assert not plans[1][1].startswith(kind) and not plans[4][1].startswith(kind)
    assert not plans[5][1].startswith(kind) and plans[5][1] == plans[1][1]     # 12 steps: its own
    cal = oc.runtimes[0].calibrator
    assert cal.abandoned == 1 and cal.step_counts() == [10, 12]


def test_a_new_thread_never_continues_a_finished_threads_generation():
    """Thread ids are reused by the system: a thread that starts after another ended, with the
    next timestep of its schedule, must not inherit its cache."""
    model, kw = tiny_flux()
    oc = OmniCache(policy="static", reuse_steps=[1, 2], inner_backend="eager")
    fn = torch.compile(model, backend=oc, fullgraph=True)
    ts = timesteps(4)

    def run(part):
        with torch.no_grad():
            for t in part:
                fn(**with_timestep(kw, t))

    for part in (ts[:2], ts[2:3]):
        th = threading.Thread(target=run, args=(part,))
        th.start()
        th.join()
    g = oc.report().graphs[0]
    assert [(r.generation, r.step) for r in g.steps] == [(0, 0), (0, 1), (1, 0)]
    assert set(g.steps[2].decisions.values()) == {"computed"}
