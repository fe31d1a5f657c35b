"""Wall time of each policy under context parallelism (issue 17), against plain Inductor under the
same parallelism, in one run.

Two processes (gloo on CPU; NCCL with ``--backend nccl`` on a machine with two GPUs), diffusers'
Ulysses attention of degree 2, one Flux-architecture transformer (random weights, the same on both
ranks) compiled with ``fullgraph=True``: plain Inductor, then ``OmniCache(policy=...)`` per policy
(Inductor inside).  Per method: ``--prepare`` untimed generations (compilation, calibration), then
``--repeats`` timed generations interleaved with the baseline's; the ratio of the medians is the
speedup.  Rank 0 prints a markdown table.

    python bench/parallel.py                                  # CPU, gloo, tiny size
    python bench/parallel.py --backend nccl --tokens 4096 --layers 8 --single 16 --heads 8
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

POLICIES = {"static": dict(policy="static", interval=2, warmup=2), "probe": dict(policy="probe", threshold=0.3),
            "trajectory": dict(policy="trajectory", target_speedup=2.0),
            "layered": dict(policy="layered", target_speedup=2.0)}


def _model(args, device):
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    hd = args.head_dim
    m = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=args.layers, num_single_layers=args.single,
                               attention_head_dim=hd, num_attention_heads=args.heads, joint_attention_dim=64,
                               pooled_projection_dim=64, axes_dims_rope=[hd // 4, hd // 4, hd // 2]).eval().to(device)
    side = int(args.tokens ** 0.5)
    g = torch.Generator().manual_seed(0)
    ids = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
    kw = dict(hidden_states=torch.randn(1, side * side, 16, generator=g).to(device),
              encoder_hidden_states=torch.randn(1, 16, 64, generator=g).to(device),
              pooled_projections=torch.randn(1, 64, generator=g).to(device), timestep=torch.ones(1, device=device),
              img_ids=torch.cat([torch.zeros(ids.shape[0], 1), ids.float()], 1).to(device),
              txt_ids=torch.zeros(16, 3, device=device), return_dict=False)
    return m, kw


def _generation(fn, kw, steps, sync):
    import omnicompile
    x = kw["hidden_states"]
    ts = [1.0 - i / steps for i in range(steps)]
    t0 = time.perf_counter()
    with torch.no_grad(), omnicompile.generation(timesteps=ts):
        for t in ts:
            v = fn(**dict(kw, hidden_states=x, timestep=torch.full_like(kw["timestep"], t)))[0]
            x = x - v / steps
    sync()
    return time.perf_counter() - t0


def _worker(rank, world, args, port):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(args.backend, rank=rank, world_size=world, timeout=timedelta(seconds=600))
    torch.set_num_threads(args.threads)
    if args.backend == "gloo":
        torch.accelerator.device_count = lambda: 1
        device, sync = torch.device("cpu"), lambda: None
    else:
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        sync = torch.cuda.synchronize
    import omnicompile
    from diffusers import ContextParallelConfig

    base_model, kw = _model(args, device)
    base_model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    base = torch.compile(base_model, fullgraph=True)
    for _ in range(args.prepare):
        _generation(base, kw, args.steps, sync)
    rows = []
    for name in args.policies.split(","):
        model, _ = _model(args, device)
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
        oc = omnicompile.OmniCache(**POLICIES[name])
        fn = torch.compile(model, backend=oc, fullgraph=True)
        t0 = time.perf_counter()
        for _ in range(args.prepare):
            _generation(fn, kw, args.steps, sync)
        prep = time.perf_counter() - t0
        mine, theirs = [], []
        for _ in range(args.repeats):
            theirs.append(_generation(base, kw, args.steps, sync))
            mine.append(_generation(fn, kw, args.steps, sync))
        g = oc.report().graphs[0]
        last = [r for r in g.steps if r.generation == g.steps[-1].generation]
        reused = sum(1 for r in last if "reused" in r.decisions.values())
        rows.append((name, statistics.median(theirs), statistics.median(mine), reused, len(last), prep, g.cached))
        dist.barrier()
    if rank == 0:
        print(f"{world} ranks ({args.backend}), Ulysses {world}; Flux-class {args.layers}+{args.single} blocks, "
              f"{args.heads}x{args.head_dim}, {args.tokens} image tokens; {args.steps} steps; "
              f"median of {args.repeats} interleaved generations; torch {torch.__version__}\n")
        print("| policy | Inductor s | omnicache s | speedup | reused / calls | prepare s | cached |")
        print("|---|---:|---:|---:|---:|---:|---|")
        for name, b, m, r, n, prep, cached in rows:
            print(f"| {name} | {b:.3f} | {m:.3f} | {b / m:.2f}x | {r} / {n} | {prep:.0f} | {cached} |")
    dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="gloo", choices=("gloo", "nccl"))
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--single", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prepare", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import torch.multiprocessing as mp
    mp.spawn(_worker, args=(2, args, port), nprocs=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
