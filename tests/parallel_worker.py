"""Test helper (not a test file): one rank of a 2-process context-parallel run on gloo (CPU).

``run(family, policy, options, steps, generations, out_dir, port)`` spawns two processes; each
builds the same tiny random model (same seed), enables diffusers' context parallelism (Ulysses
degree 2), compiles it with ``OmniCache(policy, inner_backend="eager", strict=True, **options)``
and runs ``generations`` generations of ``steps`` steps.  After every step the ranks all-gather
their decision and the step's signals and check them equal (a split would otherwise hang or pair
unrelated collectives).  Rank 0 also runs the same policy on an unparallelised copy (the
single-process reference) and writes ``result.pt``: both outputs, the decisions, and the graphs
the runtime compiled (collective and attention counts per variant).

On CPU: diffusers' ``enable_parallelism`` takes ``rank % torch.accelerator.device_count()``, 0 on
a CPU-only build — patched to 1; ``init_process_group`` gets a short timeout so that a split fails
fast instead of hanging.
"""
from __future__ import annotations

import os
import traceback
from collections import Counter
from datetime import timedelta

import torch

TIMEOUT_S = 45


def _model(family: str):
    from omnicompile import testing
    if family == "flux":
        return testing.tiny_flux(text_tokens=4, tokens=16)
    if family == "ltx":
        from diffusers import LTXVideoTransformer3DModel
        torch.manual_seed(0)
        model = LTXVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=24,
                                           cross_attention_dim=48, num_layers=3, caption_channels=16).eval()
        g = torch.Generator().manual_seed(0)
        kw = dict(hidden_states=torch.randn(1, 2 * 4 * 4, 4, generator=g),
                  encoder_hidden_states=torch.randn(1, 8, 16, generator=g), timestep=torch.full((1,), 1000.0),
                  encoder_attention_mask=torch.ones(1, 8), num_frames=2, height=4, width=4, return_dict=False)
        return model, kw
    if family == "wan":
        # per-token timesteps (Wan 2.2's form, (B, tokens)): diffusers' CP plan expects 2-D
        # timesteps and, for a 1-D one, logs a warning Dynamo cannot trace under fullgraph=True
        model, kw = testing.tiny_wan()
        kw["timestep"] = torch.full((1, 2 * 4 * 4), 1000.0)
        return model, kw
    raise ValueError(family)


def _timesteps(family: str, steps: int):
    return [1.0 - i / steps for i in range(steps)] if family == "flux" else [1000.0 * (1 - i / steps) for i in range(steps)]



def _generation(fn, kw, ts, log=None):
    import omnicompile
    outs = []
    g = torch.Generator().manual_seed(3)
    x = kw["hidden_states"].clone()
    with torch.no_grad(), omnicompile.generation(timesteps=ts):
        for i, t in enumerate(ts):
            args = dict(kw, hidden_states=x, timestep=torch.full_like(kw["timestep"], t))
            o = fn(**args)[0]
            outs.append(o.clone())
            x = x - 0.1 * o + 0.01 * torch.randn(x.shape, generator=g)
            if log is not None:
                log(i)
    return outs


def _counts(gm) -> dict:
    c = Counter()
    for n in gm.graph.nodes:
        s = str(n.target)
        if "_c10d_functional" in s and "wait" not in s:
            c["collectives"] += 1
        if "attention" in s or "scaled_dot_product" in s:
            c["attention"] += 1
    return dict(c)


def _worker(rank, world, family, policy, options, steps, generations, out_dir, port):
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        import torch.distributed as dist
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=TIMEOUT_S))
        torch.set_num_threads(1)
        torch.accelerator.device_count = lambda: 1       # diffusers: rank % device_count (0 on CPU)
        import omnicompile
        from diffusers import ContextParallelConfig

        ts = _timesteps(family, steps)
        model, kw = _model(family)
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
        if family == "wan":
            # diffusers' CP hooks on inner blocks (Wan's blocks.0) find their argument by
            # inspect.signature, which Dynamo cannot trace; the hook caches the result, so one
            # eager call first (diffusers' limitation, not omnicompile's)
            with torch.no_grad():
                model(**kw)
        opts = {"inner_backend": "eager", "strict": True, **options}
        oc = omnicompile.OmniCache(policy=policy, **opts)
        fn = torch.compile(model, backend=oc, fullgraph=True)

        def check_step(i):     # decisions and signals identical on every rank, after every step
            g = oc.report().graphs[0]
            r = g.steps[-1] if g.steps else None
            mine = None if r is None else (r.step, sorted(r.decisions.items()),
                                           {k: round(float(v), 5) for k, v in (r.signals or {}).items()})
            got = [None] * world
            dist.all_gather_object(got, mine)
            if any(x != got[0] for x in got):
                raise AssertionError(f"step {i}: ranks disagree: {got}")

        outs = []
        for _ in range(generations):
            log = check_step if policy != "probe" else None    # probe records are read per generation
            outs = _generation(fn, kw, ts, log)
            if policy == "probe":
                g = oc.report().graphs[0]
                mine = [(r.step, sorted(r.decisions.items()), {k: round(float(v), 5) for k, v in r.signals.items()})
                        for r in g.steps[-steps:]]
                got = [None] * world
                dist.all_gather_object(got, mine)
                if any(x != got[0] for x in got):
                    raise AssertionError(f"probe: ranks disagree: {got}")
        rep = oc.report().graphs[0]
        decisions = [sorted(r.decisions.items()) for r in rep.steps[-steps:]]
        signals = [{k: float(v) for k, v in (r.signals or {}).items()} for r in rep.steps[-steps:]]
        graphs = {}
        rt = oc.graphs[0].runtime
        for key, f in (getattr(rt, "compiled", {}) or {}).items():
            gm = getattr(f, "__self__", None)
            if isinstance(gm, torch.fx.GraphModule):
                graphs[key] = _counts(gm)
        if rank == 0:
            torch._dynamo.reset()
            ref_model, _ = _model(family)
            ref_oc = omnicompile.OmniCache(policy=policy, **opts)
            ref_fn = torch.compile(ref_model, backend=ref_oc, fullgraph=True)
            for _ in range(generations):
                ref_outs = _generation(ref_fn, kw, ts)
            ref = ref_oc.report().graphs[0]
            torch.save({"outs": outs, "ref_outs": ref_outs, "decisions": decisions,
                        "ref_decisions": [sorted(r.decisions.items()) for r in ref.steps[-steps:]],
                        "signals": signals,
                        "ref_signals": [{k: float(v) for k, v in (r.signals or {}).items()} for r in ref.steps[-steps:]],
                        "graphs": graphs, "cached": rep.cached, "fallback": str(rep.fallback),
                        "refused": [r.code for r in rep.refused]}, os.path.join(out_dir, "result.pt"))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise


def run(family: str, policy: str, options: dict, steps: int, generations: int, out_dir: str, port: int) -> dict:
    """Run both ranks; returns rank 0's ``result.pt`` (raises with the ranks' tracebacks)."""
    import torch.multiprocessing as mp
    try:
        mp.spawn(_worker, args=(2, family, policy, options, steps, generations, out_dir, port), nprocs=2)
    except Exception as e:
        errs = [open(os.path.join(out_dir, f)).read() for f in sorted(os.listdir(out_dir)) if f.startswith("error")]
        raise AssertionError(f"context-parallel run failed: {e}\n" + "\n".join(errs)) from None
    return torch.load(os.path.join(out_dir, "result.pt"), weights_only=False)
