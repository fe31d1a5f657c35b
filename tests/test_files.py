"""Every JSON file omnicompile reads goes through one loader (:mod:`omnicompile.jsonfile`):
regular UTF-8 files, bounded in size and nesting, strict JSON — then each format's schema.
A bad file is a typed error at load time naming the path and the problem, in strict and
non-strict mode alike: never a raw ``UnicodeDecodeError``/``RecursionError``, never a graph
silently compiled uncached."""
import json
import os

import pytest
import torch

from omnicompile import CalibrationError, OmniCache, ReportError, ScheduleError
from omnicompile.cli.common import UsageError, parse_json_arg
from omnicompile.jsonfile import MAX_DEPTH, parse_json, read_json
from omnicompile.policies.layered import load_file
from omnicompile.policies.trajectory import Calibration
from omnicompile.report import Report
from omnicompile.testing import tiny_flux


class Bad(ValueError):
    pass


def _bad_files(tmp_path):
    """name -> (path, words the error must contain)."""
    (tmp_path / "latin1.json").write_bytes(b'{"format": "caf\xe9"}')
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "folder.json").mkdir()
    (tmp_path / "nan.json").write_text('{"a": NaN}')
    (tmp_path / "huge.json").write_text('{"a": 1e999}')
    (tmp_path / "bom.json").write_bytes(b'\xef\xbb\xbf{"a": 1}')
    return {
        "non-UTF-8": (tmp_path / "latin1.json", "not UTF-8 text: byte 0xe9 at offset 15"),
        "deep": (tmp_path / "deep.json", f"deeper than {MAX_DEPTH} levels"),
        "directory": (tmp_path / "folder.json", "is a directory"),
        "missing": (tmp_path / "none.json", "does not exist"),
        "NaN": (tmp_path / "nan.json", "the literal NaN"),
        "overflow": (tmp_path / "huge.json", "overflows a float"),
        "BOM": (tmp_path / "bom.json", "not valid JSON"),
    }


CASES = ["non-UTF-8", "deep", "directory", "missing", "NaN", "overflow", "BOM"]


@pytest.mark.parametrize("case", CASES)
def test_loader_names_the_path_and_the_problem(tmp_path, case):
    path, words = _bad_files(tmp_path)[case]
    with pytest.raises(Bad) as e:
        read_json(path, "test file", Bad)
    assert words in str(e.value) and str(path) in str(e.value)


def test_loader_bounds_and_special_files(tmp_path):
    p = tmp_path / "big.json"
    p.write_text(json.dumps({"a": [0] * 1000}))
    assert read_json(p, "f", Bad)["a"] == [0] * 1000
    with pytest.raises(Bad, match="at most 100 are read"):
        read_json(p, "f", Bad, max_bytes=100)
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)                       # reading it would block: refused on stat
    with pytest.raises(Bad, match="not a regular file"):
        read_json(fifo, "f", Bad)
    # nesting: exactly the limit is fine, one more is not; brackets inside strings do not count
    assert parse_json("[" * MAX_DEPTH + "]" * MAX_DEPTH, "t", Bad) is not None
    with pytest.raises(Bad, match="deeper than"):
        parse_json("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), "t", Bad)
    assert parse_json('{"a": "' + "[" * 500 + '\\"{"}', "t", Bad) == {"a": "[" * 500 + '"{'}
    with pytest.raises(Bad, match="1 column 1"):
        parse_json("", "t", Bad)


# ----------------------------------------------------------------------------- every format


@pytest.mark.parametrize("case", ["non-UTF-8", "deep", "directory", "NaN"])
@pytest.mark.parametrize("reader, error", [
    (lambda p: Calibration.load(str(p)), CalibrationError),
    (lambda p: load_file(str(p)), ScheduleError),
    (lambda p: parse_json_arg(f"@{p}", "--options"), UsageError),
])
def test_every_file_reader_raises_its_typed_error(tmp_path, case, reader, error):
    path, words = _bad_files(tmp_path)[case]
    with pytest.raises(error) as e:
        reader(path)
    assert words in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize("case", ["non-UTF-8", "deep", "NaN"])
def test_report_from_json_text_errors_are_typed(tmp_path, case):
    path, words = _bad_files(tmp_path)[case]
    with pytest.raises(ReportError, match=words):
        Report.from_json(path.read_bytes())
    assert issubclass(ReportError, ValueError)


# ----------------------------------------------------------------------------- through the backend


@pytest.mark.parametrize("policy, case, error", [
    ("trajectory", "non-UTF-8", CalibrationError),
    ("trajectory", "directory", CalibrationError),
    ("layered", "deep", ScheduleError),
])
def test_a_bad_file_is_an_error_at_compile_time_in_lenient_mode_too(tmp_path, monkeypatch, policy, case, error):
    """Not ``internal_error`` (the graph compiled uncached, a log line): the user's file is
    the user's to fix, whatever ``strict`` says."""
    monkeypatch.delenv("OMNICACHE_STRICT", raising=False)
    path, words = _bad_files(tmp_path)[case]
    model, kw = tiny_flux(num_layers=2, num_single_layers=2)
    oc = OmniCache(policy=policy, calibrate=str(path), inner_backend="eager", strict=False)
    assert not oc.config.strict
    with pytest.raises(Exception) as e, torch.no_grad():
        torch.compile(model, backend=oc, fullgraph=True)(**kw)
    raised = getattr(e.value, "inner_exception", e.value)     # Dynamo wraps what a backend raises
    assert isinstance(raised, error) and words in str(raised), repr(raised)
    assert not any(g.report.fallback is not None for g in oc.graphs)
