"""A short smoke run of the quality harness (bench/quality.py) on the shipped reference model.

Two methods besides the baselines — omnicompile's ``static`` policy and diffusers' FirstBlockCache
(one setting) — with 4 steps, one sample per digit, one timed repeat, and Dynamo without Inductor
(``--inner-backend eager``), in a subprocess so the harness's global settings (threads, Dynamo
caches) stay out of the test process.  Checks the JSON, the table and the plot it writes.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("sklearn")
pytest.importorskip("skimage")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")


def _num(v):
    return float(v)   # the JSON writes non-finite floats as "inf" / "nan"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    results = out / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## Some other section\n\nkept\n")
    cmd = [sys.executable, str(ROOT / "bench" / "quality.py"),
           "--methods", "static,diffusers-fbc", "--max-settings", "1", "--static-intervals", "2",
           "--steps", "4", "--samples-per-class", "1", "--repeats", "1", "--warmup", "1",
           "--inner-backend", "eager", "--no-progress",
           "--json", str(out / "q.json"), "--plot", str(out / "q.png"), "--results-md", str(results)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc, results


def test_json(run):
    out, _, _ = run
    data = json.loads((out / "q.json").read_text())
    assert data["config"]["steps"] == 4 and data["config"]["images"] == 10
    assert data["info"]["versions"]["torch"]
    rows = {r["name"]: r for r in data["methods"]}
    assert list(rows)[:2] == ["eager", "compiled"]
    assert "static i=2" in rows
    fbc = [r for r in rows.values() if r["family"] == "diffusers FirstBlockCache"]
    assert len(fbc) == 1
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["median_s"] > 0 and r["times_s"]
        if r["name"] != "compiled":   # timed against interleaved runs of the compiled baseline
            assert r["baseline_compiled_times_s"]
        assert 0 < r["speedup_vs_compiled"] < 100 and 0 < r["speedup_vs_eager"] < 100
        assert 0 < r["flops_ratio"] <= 1.0 + 1e-9
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["frechet_distance"] >= 0.0
        assert -1.0 <= r["ssim"] <= 1.0
        assert r["deterministic"] is True
    assert rows["compiled"]["psnr"] == "inf" and rows["compiled"]["ssim"] == 1.0
    assert len(static_times := rows["static i=2"]["times_s"]) == 1 and static_times[0] > 0
    assert rows["compiled"]["graphs"] == 1 and rows["compiled"]["graph_breaks"] == 0
    static = rows["static i=2"]
    assert static["graphs"] == 1 and static["graph_breaks"] == 0
    assert static["flops_source"].startswith("omnicompile")
    assert static["reused_steps"] == [2]          # warm-up 2, interval 2: C C R C over 4 steps
    assert static["flops_ratio"] < 1.0
    assert math.isfinite(_num(static["psnr"]))
    assert fbc[0]["compiled"] and fbc[0]["graph_breaks"] > 0 and fbc[0]["graphs"] > 1


def test_outputs(run):
    out, proc, results = run
    assert (out / "q.png").stat().st_size > 1000
    assert "| method | speedup vs compiled |" in proc.stdout
    text = results.read_text()
    assert "## Some other section\n\nkept" in text
    assert "## Quality harness (reference model)" in text
    assert text.count("quality.py: generated block, begin") == 1
    assert "| static i=2 |" in text
