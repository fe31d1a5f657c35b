"""``omnicache bench``: run ``bench/speed.py`` and print the reports of the backends it used.

``bench/speed.py`` ships with the source checkout, not the package: it is found in
``--bench-dir``, ``$OMNICACHE_BENCH_DIR``, the ``bench/`` next to the installed package, or
``./bench``.  Its ``main(argv)`` gets every option ``bench`` does not know itself.  The
reports are those of every :class:`~omnicompile.OmniCache` created while it runs — its own
objects and the ones behind ``backend="omnicache"`` — collected with
:func:`omnicompile.backend.recording`, printed as Markdown, text or JSON
(``--report-format``; ``--report-out FILE`` also writes the JSON).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Optional

from omnicompile.cli.common import EXIT_OK, Failure, Progress, UsageError, first_line

__all__ = ["find_bench_dir", "cmd_bench"]


def find_bench_dir(explicit: Optional[str] = None) -> Path:
    """The folder holding ``speed.py``: ``explicit``, ``$OMNICACHE_BENCH_DIR``, the
    ``bench/`` of the source checkout the package runs from, or ``./bench``."""
    import omnicompile

    cands = []
    if explicit:
        cands.append(Path(explicit))
    elif os.environ.get("OMNICACHE_BENCH_DIR"):
        cands.append(Path(os.environ["OMNICACHE_BENCH_DIR"]))
    else:
        cands.append(Path(omnicompile.__file__).resolve().parent.parent / "bench")
        cands.append(Path.cwd() / "bench")
    for c in cands:
        if (c / "speed.py").is_file():
            return c
    raise UsageError(f"bench/speed.py not found (looked in {', '.join(map(str, cands))}); the benchmarks ship "
                     "with the source checkout, not the package: run from the repository or set --bench-dir / "
                     "OMNICACHE_BENCH_DIR")


def _load_speed(bench_dir: Path):
    """``bench_dir/speed.py`` as a module (its folder importable while it loads)."""
    path = bench_dir / "speed.py"
    spec = importlib.util.spec_from_file_location("omnicache_bench_speed", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(bench_dir))
    try:
        spec.loader.exec_module(module)
    except ImportError as e:
        raise UsageError(f"{path} needs {e.name or e}: install the benchmark extra "
                         "(pip install -e '.[bench]')") from None
    except Exception as e:
        raise Failure(f"importing {path} failed: {first_line(e)}") from e
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(bench_dir))
    main = vars(module).get("main")
    if not callable(main):
        raise UsageError(f"{path} has no main(argv) function")
    return main


def cmd_bench(args, extra, progress: Progress) -> int:
    from omnicompile.backend import recording
    from omnicompile.report import Report

    bench_dir = find_bench_dir(args.bench_dir)
    if extra and extra[0] == "--":
        extra = extra[1:]
    main = _load_speed(bench_dir)
    progress(f"running {bench_dir / 'speed.py'} {' '.join(extra)}")
    with recording() as created:
        main(list(extra))
    report = Report([g for oc in created for g in oc.report().graphs])
    text = {"markdown": report.to_markdown, "text": lambda: str(report), "json": report.to_json}[args.report_format]()
    print()
    print(text)
    if args.report_out:
        Path(args.report_out).write_text(report.to_json() + "\n")
        print(f"wrote the report as JSON to {args.report_out}")
    return EXIT_OK
