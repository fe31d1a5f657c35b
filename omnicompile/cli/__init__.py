"""The ``omnicache`` command (console script; also ``python -m omnicompile``).

A compiler that rewrites someone's model must show its work.  Subcommands::

    omnicache explain SPEC [--options JSON] [--steps N] [--json]
    omnicache dump SPEC --out DIR [--options JSON] [--steps N] [--render auto|dot|matplotlib|none]
    omnicache calibrate SPEC --options '{"policy": NAME}' [--out FILE] [--steps N] [--sampler M:F]
    omnicache profile SPEC --out FILE [--method final|residual] [--options JSON] [--steps N] [--sampler M:F]
    omnicache plan PROFILE [--target-speedup S] [--cache-interval N] [--out FILE]
    omnicache bench [--report-format markdown|text|json] [--report-out FILE] [bench/speed.py options]

``SPEC`` is ``module:callable`` (or ``path/to/file.py:callable``) naming a function that
returns ``(model, example_kwargs)``: ``omnicompile.testing:tiny_flux`` and the other tiny
configurations, or ``bench.models:reference_spec`` from a source checkout (the current
directory is importable, as with ``python -m``).  ``--spec-kwargs JSON`` passes keyword
arguments to it.  ``--options`` takes the option names of
:class:`~omnicompile.config.OmniCacheConfig`, as JSON text or ``@file.json``.

Modules, one per subcommand group:

* :mod:`.common` — errors and exit codes, SPEC loading, options, progress, and tracing a
  model through an :class:`~omnicompile.OmniCache` (``explain`` and ``dump`` read each graph's
  report and runtime from ``oc.graphs``; graph ids count from 0 per ``OmniCache``);
* :mod:`.inspect` — ``explain`` and ``dump`` (the tables and files of
  :mod:`omnicompile.dump`; the plan is the runtime's ``preview(steps)``);
* :mod:`.calibrate` — ``calibrate`` (any policy with ``calibratable = True``; the default
  generation is :func:`omnicompile.sampling.euler_sampler`), ``profile`` and ``plan`` (policy
  ``layered``);
* :mod:`.bench` — ``bench`` (``bench/speed.py``, then the reports of every backend it
  created, collected with :func:`omnicompile.backend.recording`).

Exit codes: 0 success; 2 a usage error — bad SPEC, a module that cannot be imported, a
callable that returns the wrong thing, bad options (``--options``/``--spec-kwargs`` text or
``@file``: not a regular UTF-8 file, too large or too deeply nested, not JSON), a bad
calibration / profile / schedule file (any :class:`~omnicompile.errors.OmniCacheError`),
an ``--out`` that cannot be written (checked before the work starts), nothing to calibrate —
reported as one line on stderr (``omnicache COMMAND: error: ...``), no traceback; 1 anything
else (``--traceback`` shows it).  ``print`` happens
here and in the subcommand modules only; the library logs.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, Optional

from omnicompile.cli.bench import cmd_bench
from omnicompile.cli.calibrate import calibratable_policies, cmd_calibrate, cmd_plan, cmd_profile
from omnicompile.cli.common import (
    EXIT_FAILURE, EXIT_OK, EXIT_USAGE, Failure, Progress, UsageError, load_spec, users_error,
)
from omnicompile.cli.inspect import cmd_dump, cmd_explain

__all__ = ["main", "load_spec", "UsageError", "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE", "calibratable_policies"]

log = logging.getLogger("omnicompile")


def _spec_args(sp, opts_help="omnicache options as JSON (or @file.json)"):
    sp.add_argument("spec", metavar="SPEC", help="module:callable returning (model, example_kwargs), "
                    "e.g. omnicompile.testing:tiny_flux")
    sp.add_argument("--options", metavar="JSON", help=opts_help)
    sp.add_argument("--spec-kwargs", metavar="JSON", help="keyword arguments for the SPEC callable")
    sp.add_argument("--steps", type=int, default=None,
                    help="denoising steps of one generation (default: num_steps or 28)")


def _parser() -> argparse.ArgumentParser:
    def common(parser, default):
        parser.add_argument("-v", "--verbose", action="store_true", default=default(False),
                            help="log the backend's messages (INFO)")
        parser.add_argument("--traceback", action="store_true", default=default(False),
                            help="show the traceback of a failure")
        parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=default(None),
                            help="progress lines on stderr (default: when stderr is a terminal)")

    p = argparse.ArgumentParser(prog="omnicache", description="Inspect, dump, calibrate and benchmark the "
                                "omnicache torch.compile backend.", epilog="docs: omnicompile/cli/__init__.py")
    common(p, lambda v: v)
    # the same options after the subcommand; SUPPRESS keeps a subparser from resetting them
    shared = argparse.ArgumentParser(add_help=False)
    common(shared, lambda v: argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    sp = sub.add_parser("explain", parents=[shared], help="what the backend finds and plans in a model",
                        description="Trace SPEC and print its graphs, graph breaks, block lists, streams, side "
                        "inputs, timestep input, cached spans and the reasons for the others, FLOPs per block, "
                        "the runtime's plan over --steps and its ideal speedup.")
    _spec_args(sp)
    sp.add_argument("--json", action="store_true", help="print JSON instead of text")
    sp.set_defaults(func=cmd_explain)

    sp = sub.add_parser("dump", parents=[shared],
                        help="write graphs, maps, plans and images of a model to a folder",
                        description="Trace SPEC and write, per graph, the FX graph before and after the rewrite, "
                        "the block/stream map, the unit dependency graph (DOT + image), the plan heatmap, per-unit "
                        "costs and an index.html linking them.")
    _spec_args(sp)
    sp.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    sp.add_argument("--render", choices=("auto", "dot", "matplotlib", "none"), default="auto",
                    help="unit graph image: Graphviz dot (SVG), matplotlib (PNG), auto (dot when installed), "
                    "none (no images at all)")
    sp.set_defaults(func=cmd_dump)

    sp = sub.add_parser("calibrate", parents=[shared], help="calibrate a policy that learns from a first run",
                        description="Run one generation of SPEC through the backend as the calibration of a "
                        "calibratable policy (OmniCache.calibrate) and write it as JSON.")
    _spec_args(sp, "omnicache options as JSON (or @file.json); 'policy' names the policy to calibrate")
    sp.add_argument("--out", metavar="FILE", help="where to write the calibration "
                    "(default omnicache-calibration-POLICY.json)")
    sp.add_argument("--sampler", metavar="MODULE:CALLABLE", help="runs one generation: f(model, example_kwargs, "
                    "steps); default: omnicompile.sampling.euler_sampler (timestep counted down linearly from the "
                    "example's, Euler flow-matching updates of hidden_states)")
    sp.set_defaults(func=cmd_calibrate)

    sp = sub.add_parser("profile", parents=[shared], help="profile the (block, step) reuse costs for policy layered",
                        description="Compile SPEC with policy layered and measure, for every (block, step), the "
                        "quality cost of reusing that block at that step; write the profile JSON and print the plan.")
    _spec_args(sp, "omnicache options as JSON (or @file.json); policy is layered, target_speedup / cache_interval "
               "shape the printed plan")
    sp.add_argument("--out", required=True, metavar="FILE", help="where to write the profile JSON")
    sp.add_argument("--method", choices=("final", "residual"), default="final",
                    help="final: one generation per (block, step), deviation of the final sample (default); "
                    "residual: one generation, the change of each block's residual (cheap proxy)")
    sp.add_argument("--sampler", metavar="MODULE:CALLABLE", help="runs one generation and returns the final "
                    "sample: f(model, example_kwargs, steps); default: the Euler flow sampler of calibrate")
    sp.set_defaults(func=cmd_profile)

    sp = sub.add_parser("plan", parents=[shared], help="plan a layered schedule from a profile (no model needed)",
                        description="Run Algorithms 1-3 (proposal, refinement, coalescing) on a layered profile.")
    sp.add_argument("profile", metavar="PROFILE", help="a profile JSON written by `omnicache profile`")
    sp.add_argument("--target-speedup", type=float, default=2.0, help="target speedup s_r (default 2.0)")
    sp.add_argument("--cache-interval", type=int, default=5, help="caching interval N (default 5)")
    sp.add_argument("--out", metavar="FILE", help="write the schedule JSON here")
    sp.set_defaults(func=cmd_plan)

    sp = sub.add_parser("bench", parents=[shared], allow_abbrev=False,
                        help="run bench/speed.py and print the omnicache reports",
                        description="Run bench/speed.py from the source checkout; every option not listed here "
                        "goes to it (see python bench/speed.py --help). Prints the reports afterwards.")
    sp.add_argument("--report-format", choices=("markdown", "text", "json"), default="markdown")
    sp.add_argument("--report-out", metavar="FILE", help="also write the reports as JSON here")
    sp.add_argument("--bench-dir", metavar="DIR", help="folder with speed.py (default: the checkout's bench/)")
    sp.set_defaults(func=cmd_bench)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("omnicache: %(levelname)s: %(message)s"))
    if not log.handlers:
        log.addHandler(handler)
    old_level = log.level
    if args.verbose:
        log.setLevel(logging.INFO)
    progress = Progress(sys.stderr.isatty() if args.progress is None else args.progress)
    func: Callable = args.func
    try:
        return func(args, extra, progress)
    except UsageError as e:
        if args.traceback and e.original is not None:
            import traceback
            traceback.print_exception(e.original)
        print(f"omnicache {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Failure as e:
        if args.traceback:
            raise
        print(f"omnicache {args.command}: {e} (--traceback shows where)", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"omnicache {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:   # e.g. `omnicache explain ... | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE
    except Exception as e:
        user = users_error(e)         # a configuration / calibration / file error: the user's to fix
        if user is None:
            raise
        if args.traceback:
            import traceback
            traceback.print_exception(e)
        msg = (str(user).strip().splitlines() or [type(user).__name__])[0]
        print(f"omnicache {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        log.setLevel(old_level)
        if handler in log.handlers:
            log.removeHandler(handler)
