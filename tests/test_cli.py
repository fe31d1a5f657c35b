"""The ``omnicache`` command and the dump writer.

Subcommands run in subprocesses (exit codes, stdout/stderr, files written and parsed back)
on a pure-torch toy DiT written into a temporary folder (no diffusers import: each process
starts in seconds) and once on ``omnicompile.testing:tiny_flux``.  The dump's graphs are
re-loaded and run in-process against the graphs they were written from.
"""
import csv
import json
import os
import re
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from omnicompile import OmniCache, OmniCacheConfig
from omnicompile.dump import dot_available, load_graph, write_graph_dump
from omnicompile.report import Report

EAGER = json.dumps({"inner_backend": "eager"})

TOY_SOURCE = textwrap.dedent('''
    import math

    import torch
    from torch import nn


    class Block(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.norm = nn.LayerNorm(d)
            self.mod = nn.Linear(d, 2 * d)
            self.fc1 = nn.Linear(d, 2 * d)
            self.fc2 = nn.Linear(2 * d, d)

        def forward(self, x, temb):
            scale, shift = self.mod(temb).unsqueeze(1).chunk(2, dim=-1)
            h = self.norm(x) * (1 + scale) + shift
            return x + self.fc2(torch.nn.functional.gelu(self.fc1(h)))


    class Toy(nn.Module):
        """A DiT in miniature: sinusoidal timestep embedding, three modulated blocks."""

        def __init__(self, d=16, depth=3, graph_break=False):
            super().__init__()
            self.d, self.graph_break = d, graph_break
            self.proj_in = nn.Linear(4, d)
            self.t_embed = nn.Linear(d, d)
            self.blocks = nn.ModuleList([Block(d) for _ in range(depth)])
            self.proj_out = nn.Linear(d, 4)

        def forward(self, hidden_states, timestep):
            half = self.d // 2
            freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
            args = timestep[:, None].float() * freqs[None]
            temb = self.t_embed(torch.cat([torch.sin(args), torch.cos(args)], -1))
            if self.graph_break:
                torch._dynamo.graph_break()
            x = self.proj_in(hidden_states)
            for b in self.blocks:
                x = b(x, temb)
            return (self.proj_out(x),)


    def toy(depth=3, graph_break=False):
        torch.manual_seed(0)
        kw = {"hidden_states": torch.randn(1, 8, 4), "timestep": torch.tensor([1.0])}
        return Toy(depth=depth, graph_break=graph_break).eval(), kw


    def toy_with_break():
        return toy(graph_break=True)


    def toy_float_timestep():
        model, kw = toy()
        return model, {**kw, "timestep": 1.0}


    def wrong_return():
        return 42


    def wrong_model():
        return "a model", {}


    def wrong_kwargs():
        return torch.nn.Linear(2, 2), [1, 2]


    def raises():
        raise RuntimeError("weights not found\\nsecond line")


    not_callable = 3
''')


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("spec")
    (d / "toy_spec.py").write_text(TOY_SOURCE)
    return d


def _env():
    env = dict(os.environ)
    env.pop("OMNICACHE_DUMP_DIR", None)
    env.pop("OMNICACHE_BENCH_DIR", None)
    env["PYTHONWARNINGS"] = "ignore"
    return env


def omnicache(*args, cwd=None, timeout=300):
    """Run the installed console script (``python -m omnicompile`` when it is not on disk)."""
    exe = Path(sys.executable).with_name("omnicache")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "omnicompile"]
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, cwd=cwd,
                          env=_env(), timeout=timeout)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# ----------------------------------------------------------------------------- explain


def test_explain_json(toy_dir):
    r = omnicache("explain", "toy_spec:toy", "--options", EAGER, "--steps", 8, "--json", cwd=toy_dir)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["dynamo"] == {**d["dynamo"], "graphs": 1, "graph_breaks": 0}
    (g,) = d["graphs"]
    assert g["cached"] and g["fallback"] is None
    assert g["timestep_input"] == "l_timestep_"
    (bl,) = g["block_lists"]
    assert (bl["name"], bl["count"], bl["method"]) == ("blocks", 3, "module_path")
    assert len({b["nodes"] for b in bl["blocks"]}) == 1 and all(b["flops"] > 0 for b in bl["blocks"])
    (grp,) = g["groups"]
    assert len(grp["units"]) == 3
    (span,) = g["spans"]
    assert span["name"] == "blocks[0:3]"
    assert [s["name"] for s in span["streams"]] == ["x"] and span["streams"][0]["shape"] == [1, 8, 16]
    assert [s["name"] for s in span["side_inputs"]] == ["temb"]
    # default static policy: warmup 2, then reuse every other step
    plan = g["plan"]
    assert plan["marks"] == {"blocks[0:3]": "CCRCRCRC"}
    total = g["flops_per_call"] * 8
    assert plan["ideal_speedup"] == pytest.approx(total / (total - 3 * span["flops"]))
    assert d["ideal_speedup"] == pytest.approx(plan["ideal_speedup"])
    assert sorted(g["variants"]) == ["variant_C", "variant_R"]
    assert [u["flops"] for u in g["unit_costs"]] == [b["flops"] for b in bl["blocks"]]


def test_explain_text_graph_breaks_and_reasons(toy_dir):
    r = omnicache("explain", "toy_spec:toy_with_break", "--options", EAGER, "--steps", 6, cwd=toy_dir)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "Dynamo: 2 graph(s), 1 graph break(s)" in out
    assert re.search(r"break: .*graph_break.* at .*toy_spec\.py:\d+", out)
    # the first graph has no blocks, the second no timestep: each says why, with its code
    assert "compiled unchanged [no_blocks]" in out
    assert "compiled unchanged [no_timestep]" in out
    assert "block lists:\n    blocks  3 blocks" in out
    assert "ideal speedup of the whole model over 6 steps: 1.00x" in out


# ----------------------------------------------------------------------------- dump


def test_dump_writes_everything(toy_dir, tmp_path):
    out = tmp_path / "dump"
    r = omnicache("dump", "toy_spec:toy", "--out", out, "--options", EAGER, "--steps", 8,
                  "--render", "matplotlib", cwd=toy_dir)
    assert r.returncode == 0, r.stderr
    assert f"open {out / 'index.html'}" in r.stdout
    (man_path,) = out.glob("graph*_manifest.json")
    m = json.loads(man_path.read_text())
    assert m["errors"] == [] and m["cached"] is True
    p = f"graph{m['graph_id']}_"
    expected = {"before.py", "before.txt", "after_variant_C.py", "after_variant_R.py", "blocks.json", "costs.csv",
                "units.dot", "units.png", "plan.json", "plan.png", "report.md", "report.json", "index.html"}
    assert {p + e for e in expected} <= {f.name for f in out.iterdir()}
    # every link of both pages resolves
    for page in (out / "index.html", out / f"{p}index.html"):
        links = re.findall(r'(?:href|src)="?\'?([^"\'> ]+)', page.read_text())
        assert links
        for link in links:
            assert (out / link).is_file(), f"{page.name} links to missing {link}"
    page = (out / f"{p}index.html").read_text()
    for e in ("before.py", "after_variant_R.py", "blocks.json", "costs.csv", "units.dot", "units.png", "plan.png"):
        assert p + e in page
    # images are real, non-empty PNGs
    for img in ("units.png", "plan.png"):
        w, h = _png_size(out / f"{p}{img}")
        assert w > 100 and h > 100 and (out / f"{p}{img}").stat().st_size > 2000
    # block / stream map
    bm = json.loads((out / f"{p}blocks.json").read_text())
    assert bm["block_lists"][0]["count"] == 3 and bm["spans"][0]["streams"][0]["name"] == "x"
    assert bm["timestep_input"] == "l_timestep_"
    assert [i["name"] for i in bm["inputs"] if i["timestep"]] == ["l_timestep_"]
    # per-unit costs
    rows = list(csv.DictReader((out / f"{p}costs.csv").open()))
    assert [r["name"] for r in rows] == ["blocks#0", "blocks#1", "blocks#2"]
    assert all(int(r["flops"]) > 0 and r["span"] == "blocks[0:3]" for r in rows)
    # unit graph: DOT text with the span as a cluster, stream edges between units
    dot = (out / f"{p}units.dot").read_text()
    assert dot.startswith("digraph") and "cluster_span0" in dot
    assert '"unit:blocks#0" -> "unit:blocks#1"' in dot and '"prologue" -> "unit:blocks#0"' in dot
    # plan and report
    plan = json.loads((out / f"{p}plan.json").read_text())
    assert plan["marks"] == {"blocks[0:3]": "CCRCRCRC"} and len(plan["decisions"]) == 8
    rep = Report.from_json((out / f"{p}report.json").read_text())
    assert rep.graphs[0].cached and rep.graphs[0].spans[0].name == "blocks[0:3]"
    # code files are Python that compiles, with the graph's code inside
    for f in out.glob(f"{p}*.py"):
        compile(f.read_text(), str(f), "exec")
    assert "class Graph(torch.nn.Module)" in (out / f"{p}after_variant_R.py").read_text()


def test_dump_tiny_flux_with_python_m(tmp_path):
    """The realistic path: a diffusers Flux, ``python -m omnicompile``, default renderer."""
    out = tmp_path / "flux"
    r = subprocess.run([sys.executable, "-m", "omnicompile", "dump", "omnicompile.testing:tiny_flux",
                        "--out", str(out), "--options", json.dumps({"inner_backend": "eager", "guard": "cond"})],
                       capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "graph0_manifest.json").read_text())
    assert m["errors"] == []
    assert set(m["code"]) == {"before", "after_cond"} and all(e["reloadable"] for e in m["code"].values())
    assert m["spans"] == ["transformer_blocks[0:2]", "single_transformer_blocks[0:2]"]
    image = out / m["files"]["units_image"]
    if image.suffix == ".png":
        _png_size(image)
    else:
        assert "<svg" in image.read_text()
    _png_size(out / m["files"]["plan_image"])
    assert m["plan"]["ideal_speedup"] > 1.5


def _capture(model, kw):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(**kw)
    (g,) = graphs
    return g


def _assert_same(a, b):
    a = a if isinstance(a, (tuple, list)) else (a,)
    b = b if isinstance(b, (tuple, list)) else (b,)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("guard", ["variants", "cond"])
def test_dumped_graphs_reload_and_compute_the_same(tmp_path, guard):
    """The dump writes the rewritten graphs the runtime compiled (``runtime.graphs``, with
    ``runtime.signatures``); re-loaded, each computes what the runtime's graph computes and
    what the rewrite passes build from Dynamo's graph."""
    from omnicompile.passes.rewrite import build_cond, build_variant
    from omnicompile.testing import tiny_flux

    model, kw = tiny_flux()
    oc = OmniCache(inner_backend="eager", guard=guard)
    captured = []

    def backend(gm, example_inputs):
        captured.append((gm, list(example_inputs)))
        return oc(gm, example_inputs)

    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(**kw)
    ((gm, ex),) = captured
    ((rep, rt),) = oc.graphs
    assert rep.cached and rt is not None
    m = write_graph_dump(tmp_path, 7, gm, rep, rt, config=oc.config, renderer="none", images=False)
    assert m["errors"] == []
    names = set(m["code"])
    assert names == ({"before", "after_variant_CC", "after_variant_RR"} if guard == "variants"
                     else {"before", "after_cond"})
    assert names == {"before"} | {f"after_{n}" for n in rt.graphs}
    for n, sig in rt.signatures.items():
        assert f"# signature: {sig}" in (tmp_path / f"graph7_after_{n}.py").read_text()
    with torch.no_grad():
        _assert_same(load_graph(tmp_path / "graph7_before.py")(*ex), gm(*ex))
        spans = rt.spans
        res = [torch.randn(s.shape) for sp in spans for s in sp.live_streams]
        if guard == "variants":      # extrapolate (the default): per span r_last..., r_prev..., a scalar
            window = [t for sp in spans for t in ([torch.randn(s.shape) for s in sp.live_streams] * 2
                                                  + [torch.tensor(0.5)])]
            for dec in ((False, False), (True, True)):
                name = "variant_" + "".join("R" if d else "C" for d in dec)
                got = load_graph(tmp_path / f"graph7_after_{name}.py")(*ex, *window)
                _assert_same(got, rt.graphs[name](*ex, *window))
                _assert_same(got, build_variant(gm, spans, dec, finite=True, extrapolate=True)(*ex, *window))
        else:
            g = build_cond(gm, spans, finite=True)       # the runtime's: with the finiteness flags
            loaded = load_graph(tmp_path / "graph7_after_cond.py")
            for pred in (False, True):
                args = [*ex, *[torch.tensor(pred)] * len(spans), *res, *[torch.tensor(True)] * len(spans)]
                got = loaded(*args)
                _assert_same(got, rt.graphs["cond"](*args))
                _assert_same(got, g(*args))


def test_dump_without_a_runtime_has_no_rewritten_graphs(tmp_path):
    """Dynamo's graph alone: analysed and previewed, every step computed, nothing rewritten
    (the dump never rebuilds what a runtime would compile)."""
    ns = {}
    exec(TOY_SOURCE, ns)
    gm, _ = _capture(*ns["toy"]())
    m = write_graph_dump(tmp_path, 0, gm, config=OmniCacheConfig(inner_backend="eager", num_steps=6),
                         renderer="none", images=False)
    assert m["errors"] == [] and set(m["code"]) == {"before"}
    assert m["plan"]["marks"] == {"blocks[0:3]": "C" * 6} and m["plan"]["ideal_speedup"] == 1.0
    assert "no runtime" in m["plan"]["note"] and m["policy"] is None
    plan = json.loads((tmp_path / "graph0_plan.json").read_text())
    assert "error" not in plan and plan["note"] == m["plan"]["note"]
    assert plan["decisions"] == [["computed"]] * 6


def test_strict_dump_raises_and_lenient_dump_lists_the_error(tmp_path, monkeypatch):
    import omnicompile.dump.write as write

    def broken(info):
        raise RuntimeError("cost table broke")

    monkeypatch.setattr(write, "unit_costs", broken)
    ns = {}
    exec(TOY_SOURCE, ns)
    gm, _ = _capture(*ns["toy"]())
    m = write_graph_dump(tmp_path / "lenient", 0, gm, renderer="none")
    assert m["errors"] == ["unit costs: RuntimeError: cost table broke"]
    assert "costs" not in m["files"] and "blocks" in m["files"]
    with pytest.raises(RuntimeError, match="cost table broke"):
        write_graph_dump(tmp_path / "strict", 0, gm, renderer="none", strict=True)
    with pytest.raises(Exception, match="cannot create"):
        blocker = tmp_path / "file"
        blocker.write_text("not a folder")
        write_graph_dump(blocker / "sub", 0, gm, strict=True)


def test_dump_of_a_fallback_graph(tmp_path):
    """policy none: the graph is compiled unchanged — the dump says why and holds no
    rewritten graph, but still maps the blocks."""
    ns = {}
    exec(TOY_SOURCE, ns)
    model, kw = ns["toy"]()
    oc = OmniCache(policy="none", inner_backend="eager")
    captured = []

    def backend(gm, example_inputs):
        captured.append(gm)
        return oc(gm, example_inputs)

    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(**kw)
    rep = oc.report().graphs[0]
    m = write_graph_dump(tmp_path, rep.graph_id, captured[0], rep, None, config=oc.config, renderer="matplotlib")
    assert m["errors"] == [] and m["cached"] is False and m["fallback"]["code"] == "policy_none"
    assert set(m["code"]) == {"before"}
    assert set(m["plan"]["marks"].values()) == {"C" * 28}
    assert "policy_none" in m["plan"]["note"]
    page = (tmp_path / f"graph{rep.graph_id}_index.html").read_text()
    assert "compiled unchanged" in page and "policy_none" in page
    assert "policy_none" in (tmp_path / "index.html").read_text()


def test_dump_with_the_backends_own_analysis(tmp_path):
    """What the backend passes when ``dump_dir`` is set: its runtime and analysis objects
    (no re-analysis) — the same files as a dump that analyses a copy."""
    from omnicompile.passes.blocks import find_blocks
    from omnicompile.passes.spans import find_spans

    ns = {}
    exec(TOY_SOURCE, ns)
    model, kw = ns["toy"]()
    oc = OmniCache(inner_backend="eager")
    captured = []

    def backend(gm, example_inputs):
        captured.append(gm)
        return oc(gm, example_inputs)

    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(**kw)
    oc.report()
    gm, ((rep, rt),) = captured[0], oc.graphs
    blocks = find_blocks(gm)
    a = write_graph_dump(tmp_path / "a", rep.graph_id, gm, rep, rt, config=oc.config, blocks=blocks,
                         analysis=find_spans(gm, blocks), renderer="none")
    b = write_graph_dump(tmp_path / "b", rep.graph_id, gm, rep, rt, config=oc.config, renderer="none")
    assert a["errors"] == b["errors"] == []
    assert a["files"] == b["files"] and a["code"] == b["code"] and a["plan"] == b["plan"]
    names = sorted(f.name for f in (tmp_path / "a").iterdir())
    assert names == sorted(f.name for f in (tmp_path / "b").iterdir())
    for f in ("blocks.json", "costs.csv", "units.dot", "after_variant_R.py"):
        name = f"graph{rep.graph_id}_{f}"
        strip = lambda t: re.sub(r"# written .*\n", "", t)
        assert strip((tmp_path / "a" / name).read_text()) == strip((tmp_path / "b" / name).read_text())


@pytest.mark.skipif(not dot_available(), reason="Graphviz dot is not installed")
def test_dot_renders_svg(tmp_path):
    ns = {}
    exec(TOY_SOURCE, ns)
    gm, _ = _capture(*ns["toy"]())
    m = write_graph_dump(tmp_path, 0, gm, config=OmniCacheConfig(inner_backend="eager"), renderer="dot")
    assert m["errors"] == [] and m["files"]["units_image"] == "graph0_units.svg"
    assert "<svg" in (tmp_path / "graph0_units.svg").read_text()


def test_auto_renderer_falls_back_to_matplotlib_without_dot(tmp_path, monkeypatch, toy_dir, capsys):
    import omnicompile.dump as dump
    import omnicompile.dump.draw as draw

    monkeypatch.setattr(draw.shutil, "which", lambda name: None)
    assert not dump.dot_available()
    ns = {}
    exec(TOY_SOURCE, ns)
    gm, _ = _capture(*ns["toy"]())
    m = write_graph_dump(tmp_path, 0, gm, config=OmniCacheConfig(inner_backend="eager"), renderer="auto")
    assert m["errors"] == [] and m["files"]["units_image"] == "graph0_units.png"
    _png_size(tmp_path / "graph0_units.png")

    from omnicompile.cli import main

    monkeypatch.chdir(toy_dir)
    assert main(["dump", "toy_spec:toy", "--out", str(tmp_path / "x"), "--render", "dot"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "needs Graphviz's dot" in line


def test_without_matplotlib(tmp_path, monkeypatch, toy_dir, capsys):
    """No matplotlib: the CLI says how to get it (exit 2); the backend's dump still
    writes everything but the images and says why."""
    from omnicompile.cli import main
    from omnicompile.dump import VizUnavailable, require_matplotlib

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(VizUnavailable, match=r"omnicompile\[viz\]"):
        require_matplotlib()
    monkeypatch.chdir(toy_dir)
    assert main(["dump", "toy_spec:toy", "--out", str(tmp_path / "x"), "--render", "matplotlib"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "pip install 'omnicompile[viz]'" in line
    ns = {}
    exec(TOY_SOURCE, ns)
    gm, _ = _capture(*ns["toy"]())
    m = write_graph_dump(tmp_path / "d", 0, gm, config=OmniCacheConfig(inner_backend="eager"), renderer="matplotlib")
    assert len(m["errors"]) == 2 and all("matplotlib" in e for e in m["errors"])
    assert {"blocks", "costs", "units_dot", "plan"} <= set(m["files"]) and "plan_image" not in m["files"]
    assert "omnicompile[viz]" in (tmp_path / "d" / "graph0_index.html").read_text()


def test_write_graph_dump_never_raises(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    ns = {}
    exec(TOY_SOURCE, ns)
    gm, _ = _capture(*ns["toy"]())
    m = write_graph_dump(blocker / "sub", 0, gm)
    assert m["errors"] and "cannot create" in m["errors"][0]


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("spec, message", [
    ("no_colon", "must look like module:callable"),
    ("no_such_module_xyz:fn", "no module named 'no_such_module_xyz'"),
    ("toy_spec:wrong_return", "must return (model, example_kwargs)"),
    ("toy_spec:raises", "raised RuntimeError: weights not found"),
])
def test_bad_spec_is_one_line_and_exit_2(toy_dir, spec, message):
    r = omnicache("explain", spec, cwd=toy_dir)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("omnicache explain: error:") and message in lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""


@pytest.mark.parametrize("argv, message", [
    (["explain", "toy_spec:nothing"], "has no attribute 'nothing'"),
    (["explain", "toy_spec:not_callable"], "not a callable"),
    (["explain", "toy_spec:wrong_model"], "its model is a str"),
    (["explain", "toy_spec:wrong_kwargs"], "its example_kwargs is a list"),
    (["dump", "missing_dir/file.py:fn", "--out", "x"], "no such file"),
    (["explain", "toy_spec:toy", "--options", "{bad json"], "--options is not valid JSON"),
    (["explain", "toy_spec:toy", "--options", "[1]"], "must be a JSON object"),
    (["explain", "toy_spec:toy", "--options", '{"polcy": "static"}'], "did you mean 'policy'"),
    (["explain", "toy_spec:toy", "--spec-kwargs", '{"depth": "x"}'], "calling toy() raised"),
    (["explain", "toy_spec:toy", "--steps", "0"], "--steps must be a positive integer"),
])
def test_usage_errors_in_process(toy_dir, monkeypatch, capsys, argv, message):
    from omnicompile.cli import main

    monkeypatch.chdir(toy_dir)
    monkeypatch.syspath_prepend(str(toy_dir))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_spec_as_file_path(toy_dir, tmp_path):
    r = omnicache("explain", toy_dir / "toy_spec.py:toy", "--options", EAGER, "--json", "--spec-kwargs",
                  '{"depth": 2}', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["graphs"][0]["block_lists"][0]["count"] == 2


# ----------------------------------------------------------------------------- calibrate, bench


def test_calibrate_rejects_a_policy_without_calibration(toy_dir):
    r = omnicache("calibrate", "toy_spec:toy", "--options", EAGER, cwd=toy_dir)
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()
    assert "policy 'static' has no calibration; choose one of" in line


def test_calibrate_when_no_policy_is_calibratable(toy_dir, monkeypatch, capsys):
    from omnicompile.cli import main
    from omnicompile.registry import POLICIES

    for cls in POLICIES.values():
        monkeypatch.setattr(cls, "calibratable", False, raising=False)
    monkeypatch.chdir(toy_dir)
    assert main(["calibrate", "toy_spec:toy"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "no policy with calibration is registered yet" in line


def test_calibrate_trajectory(toy_dir, tmp_path):
    """``calibrate`` wraps ``OmniCache.calibrate``: one generation of the default sampler."""
    out = tmp_path / "cal.json"
    r = omnicache("calibrate", "toy_spec:toy", "--options", '{"policy": "trajectory", "inner_backend": "eager"}',
                  "--steps", 10, "--out", out, cwd=toy_dir)
    assert r.returncode == 0, r.stderr
    assert f"wrote 1 calibration(s) of policy 'trajectory': {out}" in r.stdout
    cal = json.loads(out.read_text())
    assert cal["num_steps"] == 10 and cal["shape"] == [1, 8, 4]
    assert '"calibrate": "%s"' % out in r.stdout
    # the reuse steps are the runtime's own preview of a 10-step generation
    assert re.search(r"^  graph 0: reuse steps \[[\d, ]*\] of 10 \(ideal speedup [\d.]+x\)", r.stdout, re.M)


def test_default_sampler_that_cannot_drive_the_model_is_a_usage_error(toy_dir, monkeypatch, capsys):
    from omnicompile.cli import main

    monkeypatch.chdir(toy_dir)
    monkeypatch.syspath_prepend(str(toy_dir))
    assert main(["calibrate", "toy_spec:toy_float_timestep", "--options",
                 '{"policy": "trajectory", "inner_backend": "eager"}', "--out", "unused.json"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "no tensor 'timestep'" in line and "--sampler module:callable" in line


def test_profile_options_are_validated_like_the_backend(toy_dir, monkeypatch, capsys):
    """``profile --options`` builds its config with OmniCacheConfig.from_options: a bad field
    is the ConfigError's message, one line, exit 2."""
    from omnicompile.cli import main

    monkeypatch.chdir(toy_dir)
    for opts, words in (('{"target_speedup": "fast"}', "omnicache option 'target_speedup'"),
                        ('{"cache_intervl": 3}', "did you mean 'cache_interval'")):
        assert main(["profile", "toy_spec:toy", "--out", "p.json", "--options", opts]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("omnicache profile: error:") and words in line


def test_euler_sampler_drives_a_generation():
    from omnicompile.sampling import SamplerError, euler_sampler

    seen = []

    def model(hidden_states, timestep):
        seen.append(float(timestep))
        return (torch.ones_like(hidden_states),)

    x = euler_sampler(model, {"hidden_states": torch.zeros(1, 2, 3), "timestep": torch.tensor([1.0])}, 4)
    assert seen == pytest.approx([1.0, 0.75, 0.5, 0.25])
    torch.testing.assert_close(x, torch.full((1, 2, 3), -1.0))   # sigma 1 -> 0 along v = 1
    seen.clear()
    euler_sampler(model, {"hidden_states": torch.zeros(1, 2), "timestep": torch.tensor([999])}, 3)
    assert seen == [999.0, 666.0, 333.0]
    with pytest.raises(SamplerError, match="too small"):
        euler_sampler(model, {"hidden_states": torch.zeros(1, 2), "timestep": torch.tensor([2])}, 3)
    with pytest.raises(SamplerError, match="no tensor 'timestep'"):
        euler_sampler(model, {"hidden_states": torch.zeros(1, 2)}, 3)


FAKE_SPEED = textwrap.dedent('''
    """A stand-in for bench/speed.py: compiles the toy with two OmniCache objects."""
    import argparse
    import torch
    import omnicompile
    from toy_spec import toy


    def main(argv=None):
        p = argparse.ArgumentParser()
        p.add_argument("--steps", type=int, default=4)
        args = p.parse_args(argv)
        for opts in ({"interval": 2, "warmup": 1}, {"policy": "none"}):
            torch._dynamo.reset()
            model, kw = toy()
            oc = omnicompile.OmniCache(inner_backend="eager", **opts)
            fn = torch.compile(model, backend=oc, fullgraph=True)
            with torch.no_grad():
                for i in range(args.steps):
                    fn(**{**kw, "timestep": torch.tensor([1.0 - i / 10])})
        print("fake speed done", args.steps)
        return []
''')


def test_bench_runs_speed_main_and_prints_reports(toy_dir, tmp_path):
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "speed.py").write_text(FAKE_SPEED)
    (bench / "toy_spec.py").write_text(TOY_SOURCE)
    report = tmp_path / "report.json"
    r = omnicache("bench", "--bench-dir", bench, "--report-out", report, "--steps", 5,
                  cwd=toy_dir)
    assert r.returncode == 0, r.stderr
    assert "fake speed done 5" in r.stdout
    md = r.stdout.split("fake speed done 5", 1)[1]
    assert "# omnicache report" in md and "| graph | nodes | status |" in md
    assert "unchanged: `policy_none`" in md and "timeline" in md
    rep = Report.from_json(report.read_text())
    assert [g.cached for g in rep.graphs] == [True, False]
    assert rep.graphs[0].calls == 5 and [s.step for s in rep.graphs[0].steps] == [0, 1, 2, 3, 4]
    assert rep.graphs[0].hit_rate == pytest.approx(2 / 5)   # warmup 1, interval 2: C R C R C


def test_bench_without_bench_folder(tmp_path):
    r = omnicache("bench", "--bench-dir", tmp_path / "nowhere", cwd=tmp_path)
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()
    assert "bench/speed.py not found" in line


def test_console_script_and_help():
    exe = Path(sys.executable).with_name("omnicache")
    if not exe.exists():
        pytest.skip("package not installed with its console script in this interpreter's folder")
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 0
    for cmd in ("explain", "dump", "calibrate", "bench"):
        assert cmd in r.stdout


# ----------------------------------------------------------------------------- user errors: exit 2, one line


def _tiny_profile(path):
    """A layered profile of a two-unit chain (no model needed to plan it)."""
    from omnicompile.graphs.dag import make_dag
    from omnicompile.policies.layered import Profile, dag_to_json

    dag = make_dag(["b#0", "b#1"], [("b#0", "b#1")], chains={"b#0": ("b", 0), "b#1": ("b", 1)})
    delta = [[None] + [0.01 * (1 + t % 3) for t in range(1, 8)] for _ in range(2)]
    Profile("fp", 8, ["b#0", "b#1"], "final", delta, dag_to_json(dag)).save(str(path))
    return path


def _one_error_line(capsys, command):
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"omnicache {command}: error: "), out.err
    assert "Traceback" not in out.err
    return lines[0]


def test_bad_files_and_paths_are_usage_errors(toy_dir, tmp_path, monkeypatch, capsys):
    """Non-UTF-8 / deeply nested / folder inputs, an --out that cannot be written, a NaN
    target: exit 2 and one line naming the flag or file and the problem, no traceback."""
    from omnicompile.cli import main

    monkeypatch.chdir(toy_dir)
    monkeypatch.syspath_prepend(str(toy_dir))
    latin = tmp_path / "opts.json"
    latin.write_bytes(b'{"policy": "st\xe4tic"}')
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 50_000 + "]" * 50_000)
    prof = _tiny_profile(tmp_path / "profile.json")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    unwritable = str(blocker / "out.json")            # its "folder" is a file: no user can write there
    cases = [
        (["explain", "toy_spec:toy", "--options", f"@{latin}"], "is not UTF-8 text: byte 0xe4"),
        (["explain", "toy_spec:toy", "--options", f"@{deep}"], "deeper than 64 levels"),
        (["explain", "toy_spec:toy", "--spec-kwargs", f"@{tmp_path}"], "is a directory"),
        (["plan", str(latin)], "is not UTF-8 text"),
        (["plan", str(deep)], "deeper than 64 levels"),
        (["plan", str(tmp_path)], "is a directory"),
        (["plan", str(prof), "--target-speedup", "nan"], "--target-speedup nan: must be a finite number"),
        (["plan", str(prof), "--target-speedup", "inf"], "--target-speedup inf: must be a finite number"),
        (["plan", str(prof), "--out", unwritable], f"--out {unwritable}: cannot create its folder"),
        (["plan", str(prof), "--out", str(tmp_path)], "is a folder"),
        (["calibrate", "toy_spec:toy", "--options", '{"policy": "trajectory", "inner_backend": "eager"}',
          "--out", unwritable], "cannot create its folder"),
        (["profile", "toy_spec:toy", "--out", unwritable], "cannot create its folder"),
        (["calibrate", "toy_spec:toy", "--options",
          json.dumps({"policy": "trajectory", "inner_backend": "eager", "calibrate": str(latin)})],
         "is not UTF-8 text"),
        (["explain", "toy_spec:toy", "--options",
          json.dumps({"policy": "trajectory", "inner_backend": "eager", "calibrate": str(deep)})],
         "deeper than 64 levels"),
    ]
    for argv, words in cases:
        assert main(argv) == 2, argv
        line = _one_error_line(capsys, argv[0])
        assert words in line, (argv, line)
    assert main(["plan", str(prof), "--out", str(tmp_path / "new" / "schedule.json")]) == 0
    assert json.loads((tmp_path / "new" / "schedule.json").read_text())["format"] == "omnicompile-layered-schedule"


def test_profile_unknown_option_names_the_field(toy_dir, monkeypatch, capsys):
    from omnicompile.cli import main

    monkeypatch.chdir(toy_dir)
    assert main(["profile", "toy_spec:toy", "--out", "p.json", "--options", '{"bogus": 1}']) == 2
    line = _one_error_line(capsys, "profile")
    assert "omnicache option 'bogus'" in line and "unknown option; known options: policy" in line
