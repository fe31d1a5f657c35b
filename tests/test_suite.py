"""The validation suite's bookkeeping (bench/suite.py): PSNR at equal measured speed and the
frontier table, and one tiny end-to-end run with a peer (subprocess, eager, 3 steps)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

pytest.importorskip("skimage")
suite = pytest.importorskip("bench.suite")


def _row(model, method, speed, db, target=2.0):
    return {"model": model, "method": method, "target": target, "predicted": speed, "speedup": speed,
            "psnr": db, "ssim": 1.0, "reused": 1, "calls": 2, "notes": []}


def test_at_speed_interpolates_between_measured_points_only():
    rows = [_row("m", "uniform", 2.4, 30.0), _row("m", "uniform", 1.6, 38.0)]
    assert suite.at_speed(rows, 2.0) == pytest.approx(34.0)
    assert suite.at_speed(rows, 1.6) == pytest.approx(38.0)
    assert suite.at_speed(rows, 3.0) is None          # no extrapolation
    assert suite.at_speed(rows, 1.2) is None
    assert suite.at_speed(rows, 2.45) == pytest.approx(30.0)   # within 3% of a measured point
    assert suite.at_speed([{"speedup": None, "psnr": None}], 2.0) is None


def test_frontier_compares_seed_policies_and_default_with_uniform_and_peers():
    rows = [_row("m", "uniform", 1.5, 40.0, 1.5), _row("m", "uniform", 2.5, 30.0, 2.5),
            _row("m", "trajectory", 1.5, 44.0, 1.5), _row("m", "trajectory", 2.5, 36.0, 2.5),
            _row("m", "probe", 1.5, 41.0, 1.5), _row("m", "probe", 2.5, 31.0, 2.5),
            _row("m", "default-target", 1.5, 39.0), _row("m", "default-target", 2.5, 31.0),   # 35.0 at 2x
            _row("m", "default", 1.8, 36.0, None),
            _row("m", "diffusers-fbc t=0.1", 1.5, 37.0, None), _row("m", "diffusers-fbc t=0.3", 2.5, 29.0, None),
            _row("m", "cachedit-dbcache t=0.2", 2.0, 34.5, None)]
    text = suite.frontier(rows, speeds=(2.0,))
    line = next(l for l in text.splitlines() if l.startswith("| m | 2x |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    # uniform 35.0, best seed policy trajectory 40.0 (+5.0), the default policy at its targets 35.0,
    # best peer cache-dit 34.5 (+0.5)
    assert cells[2] == "35.0" and cells[3] == "trajectory 40.0" and cells[4] == "+5.0"
    assert cells[5] == "35.0" and cells[6] == "cachedit-dbcache 34.5" and cells[7] == "+0.5"
    assert "| m | diffusers-fbc | 33.0 |" in text


def test_suite_runs_a_policy_a_default_and_a_peer_end_to_end(tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text("# Benchmark results\n\nkept\n")
    cmd = [sys.executable, str(ROOT / "bench" / "suite.py"), "--models", "digits", "--methods", "uniform,default",
           "--targets", "2", "--steps", "4", "--prepare", "1", "--repeats", "1", "--peers",
           "--peer-thresholds", "diffusers-fbc=0.2", "--json", str(tmp_path / "s.json"), "--results-md", str(md)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["uniform", "default", "diffusers-fbc t=0.2"]
    for r in rows:
        assert r["speedup"] > 0 and (math.isinf(r["psnr"]) or r["psnr"] > 10), r
    assert rows[0]["target"] == 2.0 and rows[1]["target"] is None and rows[2]["peer"]
    body = md.read_text()
    assert "kept" in body and suite.BEGIN in body and "Frontier" in body and "diffusers-fbc t=0.2" in body
