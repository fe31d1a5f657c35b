"""What the subcommands share: errors and exit codes, SPEC loading, ``--options`` and
``--steps`` parsing, progress lines, and tracing a model through the backend.

**SPEC** is ``module:callable`` (or ``path/to/file.py:callable``) naming a function that
returns ``(model, example_kwargs)``; the current directory is importable, as with
``python -m``.  Every mistake in it is a :class:`UsageError`: one line, exit code 2.

**Tracing** (:func:`trace`, for ``explain`` and ``dump``): the model is compiled with
``torch.compile`` (no ``fullgraph``, ``dynamic=False``) through Dynamo's
``ExplainWithBackend``, which counts graphs and graph breaks, wrapped around a backend that
records each graph and hands it to an :class:`~omnicompile.OmniCache` with
``inner_backend="eager"``; the model then runs once on the example kwargs.  The reports and
runtimes are the backend's own (``oc.graphs``); only Inductor is skipped — the rewrite does
not depend on it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

__all__ = ["UsageError", "Failure", "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE", "Progress", "first_line", "users_error",
           "parse_json_arg", "output_path", "save_results", "config_from_args", "config_from_options", "steps_from_args", "no_env_dump_dir",
           "resolve", "load_spec", "Traced", "TracedGraph", "trace"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

log = logging.getLogger("omnicompile")


class UsageError(Exception):
    """A mistake of the caller's: printed as one line, exit code 2.  ``original`` is the
    exception behind it (shown with ``--traceback``)."""

    def __init__(self, message: str, original: Optional[BaseException] = None):
        super().__init__(message)
        self.original = original


class Failure(Exception):
    """A run that failed for a reason worth one line (exit code 1)."""


def users_error(e: BaseException):
    """The :class:`~omnicompile.errors.OmniCacheError` behind ``e`` — ``e`` itself, or what
    Dynamo wrapped in ``BackendCompilerFailed`` when the backend raised it while compiling —
    or None: a configuration or file error is the user's (exit 2), anything else a failure."""
    from omnicompile.errors import OmniCacheError

    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OmniCacheError):
            return e
        e = getattr(e, "inner_exception", None) or e.__cause__
        seen += 1
    return None


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


class Progress:
    """Progress lines on stderr, shown when stderr is a terminal (or ``--progress``)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(f"[omnicache {time.perf_counter() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    def iterate(self, items: list, desc: str):
        if self.enabled and len(items) > 1:
            try:
                from tqdm import tqdm
                return tqdm(items, desc=desc, file=sys.stderr, leave=False)
            except ImportError:
                pass
        return items

    def bar(self, done: int, total: int, message: str = "") -> None:
        """A callback ``progress(done, total, message)`` for long loops (calibration)."""
        if self.enabled:
            width = 30
            fill = int(width * done / total) if total else width
            print(f"\r[{'#' * fill}{'.' * (width - fill)}] {done}/{total} {message}", end="",
                  file=sys.stderr, flush=True)
            if done >= total:
                print(file=sys.stderr, flush=True)


# ============================================================================ options


def parse_json_arg(text: Optional[str], what: str) -> dict:
    """A JSON object given as text or ``@file.json`` ({} for None), read by
    :mod:`omnicompile.jsonfile` (a regular UTF-8 file, bounded in size and depth): every
    problem is a :class:`UsageError` naming ``what`` (and the file)."""
    from omnicompile.jsonfile import parse_json, read_json

    if text is None:
        return {}
    if text.startswith("@"):
        value = read_json(text[1:], f"{what} file", UsageError)
        src = text
    else:
        value = parse_json(text, what, UsageError)
        src = text if len(text) <= 80 else text[:77] + "..."
    if not isinstance(value, dict):
        raise UsageError(f"{what} must be a JSON object like '{{\"policy\": \"static\"}}', got {src!r}")
    return value


def output_path(value: str, flag: str = "--out") -> Path:
    """``--out FILE`` checked before any work is done (a calibration or a profile takes
    minutes): not a folder, its folder exists or can be created, and it can be written — else
    a :class:`UsageError` naming the flag, the path and the problem."""
    path = Path(value)
    if path.is_dir():
        raise UsageError(f"{flag} {value}: is a folder; give a file name")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{flag} {value}: cannot create its folder {parent}: {e.strerror or e}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {value}: its folder {parent} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"{flag} {value}: exists and is not writable")
    return path


def save_results(results: list, out: Path, flag: str = "--out") -> list[str]:
    """Save each result (``.save(path)``) as ``out`` (one) or ``out`` with ``.N`` before its
    suffix (several, as ``OmniCache.calibrate(path=...)`` names them); a file that cannot be
    written is a :class:`UsageError`.  Returns the paths written."""
    paths = [str(out)] if len(results) == 1 else [f"{out.with_suffix('')}.{i}{out.suffix}" for i in range(len(results))]
    for r, p in zip(results, paths):
        try:
            r.save(p)
        except OSError as e:
            raise UsageError(f"{flag} {out}: cannot write {p}: {e.strerror or e}", e) from None
    return paths


def config_from_options(options: dict):
    """``OmniCacheConfig.from_options(options)``; a bad field is a UsageError with the
    ConfigError's message."""
    from omnicompile.config import OmniCacheConfig
    from omnicompile.errors import ConfigError

    try:
        return OmniCacheConfig.from_options(options)
    except ConfigError as e:
        raise UsageError(str(e)) from None


def config_from_args(args):
    return config_from_options(parse_json_arg(args.options, "--options"))


def steps_from_args(args, config) -> int:
    """``--steps``, else the config's ``num_steps``, else the dump's default (28)."""
    from omnicompile.dump import preview_steps

    steps = args.steps if args.steps is not None else preview_steps(None, config)
    if steps < 1:
        raise UsageError(f"--steps must be a positive integer, got {steps}")
    return steps


@contextlib.contextmanager
def no_env_dump_dir():
    """The CLI writes its own dumps: keep OMNICACHE_DUMP_DIR from reaching the backend."""
    old = os.environ.pop("OMNICACHE_DUMP_DIR", None)
    try:
        yield
    finally:
        if old is not None:
            os.environ["OMNICACHE_DUMP_DIR"] = old


# ============================================================================ SPEC


def _import_file(path: Path, spec: str, what: str) -> Any:
    name = "omnicache_spec_" + "".join(c if c.isalnum() else "_" for c in path.stem)
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise UsageError(f"{what} {spec!r}: {path} is not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, str(path.resolve().parent))   # its sibling modules import
    try:
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise UsageError(f"{what} {spec!r}: importing {path} failed: {first_line(e)}", e) from None
    return module


def _import_module(mod_name: str, spec: str, what: str) -> Any:
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())   # like python -m: the current directory is importable
    try:
        return importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and (mod_name == e.name or mod_name.startswith(e.name + ".")):
            raise UsageError(f"{what} {spec!r}: no module named {e.name!r} (run from the directory that "
                             "contains it, or give a path: file.py:callable)") from None
        raise UsageError(f"{what} {spec!r}: importing {mod_name} failed: {first_line(e)}", e) from None
    except Exception as e:
        raise UsageError(f"{what} {spec!r}: importing {mod_name} failed: {first_line(e)}", e) from None


def resolve(spec: str, what: str = "SPEC") -> Any:
    """The callable named by ``module:attr`` or ``file.py:attr`` (UsageError otherwise)."""
    form = f"{what} {spec!r} must look like module:callable (e.g. omnicompile.testing:tiny_flux)"
    if ":" not in spec:
        raise UsageError(form)
    mod_name, _, attr = spec.rpartition(":")
    if not mod_name or not attr:
        raise UsageError(form)
    if mod_name.endswith(".py") or os.sep in mod_name or "/" in mod_name:
        path = Path(mod_name)
        if not path.is_file():
            raise UsageError(f"{what} {spec!r}: no such file {mod_name}")
        module = _import_file(path, spec, what)
    else:
        module = _import_module(mod_name, spec, what)
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(f"{what} {spec!r}: module {mod_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise UsageError(f"{what} {spec!r}: {attr} is a {type(obj).__name__}, not a callable")
    return obj


def load_spec(spec: str, kwargs: Optional[dict] = None):
    """Resolve ``module:callable`` (or ``file.py:callable``), call it, check the result.

    Returns ``(model, example_kwargs)``; raises :class:`UsageError` with one line saying
    what is wrong."""
    import torch

    obj = resolve(spec, "SPEC")
    attr = spec.rpartition(":")[2]
    try:
        result = obj(**(kwargs or {}))
    except Exception as e:
        raise UsageError(f"SPEC {spec!r}: calling {attr}() raised {first_line(e)}", e) from None
    expect = "must return (model, example_kwargs): a torch.nn.Module and a dict of its forward's keyword arguments"
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        got = type(result).__name__ + (f" of length {len(result)}" if isinstance(result, (tuple, list)) else "")
        raise UsageError(f"SPEC {spec!r}: {attr}() {expect}; got {got}")
    model, ex = result
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"SPEC {spec!r}: {attr}() {expect}; its model is a {type(model).__name__}")
    if not isinstance(ex, dict) or not all(isinstance(k, str) for k in ex):
        raise UsageError(f"SPEC {spec!r}: {attr}() {expect}; its example_kwargs is a {type(ex).__name__}")
    return model, ex


# ============================================================================ tracing


@dataclasses.dataclass
class TracedGraph:
    gm: Any                                    # Dynamo's GraphModule, as the backend received it
    example_inputs: list
    report: Any                                # its GraphReport
    runtime: Any                               # its Runtime, or None (compiled unchanged)


@dataclasses.dataclass
class Traced:
    oc: Any                                    # the OmniCache that compiled every graph
    config: Any                                # the config it ran with (inner_backend eager, no dump_dir)
    graphs: list[TracedGraph]
    break_reasons: list[dict]                  # {"summary", "where", "reason"}
    seconds: float


def _break_reasons(explainer) -> list[dict]:
    reasons = []
    for r in explainer.break_reasons:      # Dynamo's GraphCompileReason objects
        stack = r.user_stack or []
        where = f"{stack[-1].filename}:{stack[-1].lineno}" if stack else ""
        text = str(r.reason).strip()
        reasons.append({"summary": text.splitlines()[0] if text else "", "where": where, "reason": text})
    return reasons


def trace(model, example_kwargs: dict, config, progress: Progress) -> Traced:
    """Compile and run ``model`` once through an OmniCache of ``config`` (inner backend
    eager, no dump_dir) under Dynamo's explainer: see the module docstring."""
    import torch
    from torch._dynamo.backends.debugging import ExplainWithBackend

    from omnicompile.backend import OmniCache

    torch._dynamo.reset()
    with no_env_dump_dir():
        used = config.replace(inner_backend="eager", dump_dir=None)
    oc = OmniCache(used)
    graphs: list[TracedGraph] = []

    def capture(gm, example_inputs):
        fn = oc(gm, example_inputs)
        compiled = oc.graphs[-1]           # the graph just compiled: its report and runtime
        graphs.append(TracedGraph(gm, list(example_inputs), compiled.report, compiled.runtime))
        return fn

    explainer = ExplainWithBackend(capture)
    progress(f"tracing {type(model).__name__} with Dynamo")
    t0 = time.perf_counter()
    quiet = log.getEffectiveLevel() > logging.INFO
    old_level = log.level
    if quiet:
        log.setLevel(logging.ERROR)   # fallbacks are reported by the commands, with their reason
    try:
        with no_env_dump_dir(), torch.no_grad():
            torch.compile(model, backend=explainer, dynamic=False)(**example_kwargs)
    except Exception as e:
        user = users_error(e)       # e.g. a bad calibration file in --options: the user's
        if user is not None:
            raise UsageError(str(user), e) from None
        raise Failure(f"running the model on its example kwargs under torch.compile failed: {first_line(e)}") from e
    finally:
        log.setLevel(old_level)
        torch._dynamo.reset()
    seconds = time.perf_counter() - t0
    oc.report()                        # brings every runtime's report up to date (flush)
    progress(f"traced {len(graphs)} graph(s) in {seconds:.1f}s")
    return Traced(oc, used, graphs, _break_reasons(explainer), seconds)
