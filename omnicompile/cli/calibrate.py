"""``omnicache calibrate``, ``omnicache profile`` and ``omnicache plan``: policies that learn
from a first run.

``calibrate`` is the entry point for every calibratable policy (a policy class opts in with
``calibratable = True``: ``trajectory`` and its presets, ``layered``).  It compiles SPEC with
an :class:`~omnicompile.OmniCache` of the options (Inductor unless ``inner_backend`` says
otherwise), runs one generation as ``OmniCache.calibrate(fn, path=--out)`` and prints, per
graph, the steps its runtime now reuses (``runtime.preview(steps)``).  The generation is
:func:`omnicompile.sampling.euler_sampler` or ``--sampler module:callable`` called as
``f(model, example_kwargs, steps)``.  A policy without calibration is a usage error (exit 2).

``profile`` and ``plan`` serve the ``layered`` policy (:mod:`omnicompile.policies.layered`):
``profile`` compiles SPEC with ``policy="layered"`` and runs
:func:`omnicompile.policies.layered.profile` — for every (block, step), the quality cost of
reusing it (``--method final``: one generation per pair, the deviation of the final sample;
``residual``: the one-generation proxy) — writes the profile JSON and prints the plan the
options' ``target_speedup`` / ``cache_interval`` give; ``plan`` plans a schedule from a
profile without the model (``--out`` writes it as schedule JSON).  Either file is then used as
``{"policy": "layered", "calibrate": FILE}``.
"""
from __future__ import annotations

import math
import time

from omnicompile.cli.common import (
    EXIT_OK, Failure, Progress, UsageError, config_from_args, config_from_options, first_line, load_spec,
    no_env_dump_dir, output_path, parse_json_arg, resolve, save_results, steps_from_args, users_error,
)

__all__ = ["calibratable_policies", "cmd_calibrate", "cmd_profile", "cmd_plan"]


def calibratable_policies() -> list[str]:
    """The registered policies whose class says ``calibratable = True``."""
    from omnicompile.registry import POLICIES

    return sorted(name for name, cls in POLICIES.items() if cls.calibratable)


def _generation(args, config, progress: Progress, bar=None) -> tuple:
    """SPEC compiled with an :class:`~omnicompile.OmniCache` of ``config`` and one generation of
    it (``--sampler`` or the Euler sampler, returning the final sample): ``(oc, fn, steps)``."""
    import torch

    from omnicompile.backend import OmniCache
    from omnicompile.sampling import SamplerError, euler_sampler

    steps = steps_from_args(args, config)
    spec_kwargs = parse_json_arg(args.spec_kwargs, "--spec-kwargs")
    sampler = resolve(args.sampler, "--sampler") if args.sampler else None
    progress(f"loading {args.spec}")
    model, ex = load_spec(args.spec, spec_kwargs)
    with no_env_dump_dir():
        oc = OmniCache(config)
    compiled = torch.compile(model, backend=oc, dynamic=False)

    def generation():
        if sampler is not None:
            return sampler(compiled, ex, steps)
        try:
            return euler_sampler(compiled, ex, steps, bar)
        except SamplerError as e:
            raise UsageError(f"the default sampler: {e}; pass --sampler module:callable", e) from None

    return oc, generation, steps


def _reuse_lines(oc, steps: int) -> list[str]:
    """Per calibrated graph, the steps its runtime reuses over ``steps`` steps."""
    lines = []
    for g in oc.graphs:
        rt = g.runtime
        if rt is None or rt.calibrator is None:
            continue
        p = rt.preview(steps)
        reused = [s for s, row in enumerate(p.decisions) if any(d == "reused" for d in row)]
        line = (f"  graph {g.report.graph_id}: reuse steps {reused} of {steps} "
                f"(ideal speedup {p.ideal_speedup:.2f}x)")
        if p.note:
            line += f"; note: {p.note}"
        lines.append(line)
        rows = {p.marks(k) for k in range(len(p.spans))}
        if len(rows) > 1:                       # spans with schedules of their own (layered)
            w = max(len(s) for s in p.spans)
            lines += [f"    {s:<{w}}  {p.marks(k)}" for k, s in enumerate(p.spans)]
    return lines


def cmd_calibrate(args, extra, progress: Progress) -> int:
    import torch

    from omnicompile.registry import POLICIES

    config = config_from_args(args)
    names = calibratable_policies()
    if not names:
        raise UsageError(f"no policy with calibration is registered yet (registered policies: "
                         f"{', '.join(sorted(POLICIES))}); a policy opts in with calibratable = True")
    if config.policy not in names:
        raise UsageError(f"policy {config.policy!r} has no calibration; choose one of {', '.join(names)} "
                         f"with --options '{{\"policy\": \"{names[0]}\"}}'")
    out = output_path(args.out or f"omnicache-calibration-{config.policy}.json")
    oc, generation, steps = _generation(args, config, progress, progress.bar)
    progress(f"calibrating policy {config.policy} over {steps} steps (inner backend {config.inner_backend})")
    try:
        cals = oc.calibrate(generation)
    except UsageError:
        raise
    except Exception as e:
        user = users_error(e)           # options, a calibration file, a sampler running nothing: the user's
        if user is not None:
            raise UsageError(f"calibration of policy {config.policy!r} failed: {user}", e) from None
        raise Failure(f"calibration of policy {config.policy!r} failed: {first_line(e)}") from e
    finally:
        torch._dynamo.reset()
    paths = save_results(cals, out)
    print(f"wrote {len(cals)} calibration(s) of policy {config.policy!r}: {', '.join(paths)}")
    for line in _reuse_lines(oc, steps):
        print(line)
    print(f"use it with --options '{{\"policy\": \"{config.policy}\", \"calibrate\": \"{paths[0]}\"}}'")
    return EXIT_OK


def cmd_profile(args, extra, progress: Progress) -> int:
    import torch

    from omnicompile.policies.layered import dag_from_json, plan_profile, plan_text, profile

    opts = parse_json_arg(args.options, "--options")
    if opts.get("policy", "layered") != "layered":
        raise UsageError(f"profile is for policy 'layered'; --options names policy {opts['policy']!r}")
    opts.update(policy="layered", calibrate=None)
    opts.setdefault("inner_backend", "eager")
    with no_env_dump_dir():
        config = config_from_options(opts)
    out = output_path(args.out)
    oc, generation, steps = _generation(args, config, progress)
    progress(f"profiling ({args.method}) over {steps} steps (inner backend {config.inner_backend})")
    t0 = time.perf_counter()
    try:
        profs = profile(oc, generation, None, method=args.method, progress=progress.enabled)
    except UsageError:
        raise
    except Exception as e:
        user = users_error(e)
        if user is None:
            raise
        raise UsageError(f"profiling failed: {user}", e) from None
    finally:
        torch._dynamo.reset()
    save_results(profs, out)
    for prof in profs:
        dag = dag_from_json(prof.dag)
        extra_text = "".join(f", {m} proxy rank correlation {v:.2f}" for m, v in prof.correlation.items()
                             if v is not None)
        print(f"profile ({prof.method}) of {len(prof.units)} units x {prof.num_steps} steps in "
              f"{time.perf_counter() - t0:.0f}s{extra_text}")
        print(plan_text(plan_profile(prof, config.target_speedup, config.cache_interval, dag), dag))
    print(f"wrote {out}; use it with --options '{{\"policy\": \"layered\", \"calibrate\": \"{out}\"}}'")
    return EXIT_OK


def cmd_plan(args, extra, progress: Progress) -> int:
    from omnicompile.errors import CalibrationError
    from omnicompile.graphs.dag import PlanError
    from omnicompile.policies.layered import Profile, Schedule, dag_from_json, load_file, plan_profile, plan_text

    if not (math.isfinite(args.target_speedup) and args.target_speedup >= 1.0):
        raise UsageError(f"--target-speedup {args.target_speedup}: must be a finite number >= 1.0")
    if args.cache_interval < 1:
        raise UsageError(f"--cache-interval {args.cache_interval}: must be an integer >= 1")
    try:
        prof = load_file(args.profile)
        if not isinstance(prof, Profile):
            raise UsageError(f"{args.profile} is a schedule, not a profile (plan needs a profile written by "
                             f"`omnicache profile`)")
        dag = dag_from_json(prof.dag)
        plan = plan_profile(prof, args.target_speedup, args.cache_interval, dag)
    except (CalibrationError, PlanError) as e:
        raise UsageError(str(e), e) from e
    out = output_path(args.out) if args.out else None
    print(plan_text(plan, dag))
    if out is not None:
        save_results([Schedule.from_plan(plan, dag, prof.fingerprint, args.cache_interval, args.profile)], out)
        print(f"wrote {args.out}; use it with --options '{{\"policy\": \"layered\", \"calibrate\": \"{args.out}\"}}'")
    return EXIT_OK
