"""Token, frame and block caches (passes/merge/, omnicompile/merging.py).

Outputs are compared with ``tests/reference_tokens.py``, an eager hook-based implementation
of the same algorithm on the diffusers blocks (whole blocks merged: ``merge_ffn=True``).
"""
import dataclasses

import pytest
import torch

import omnicompile
from omnicompile import kernels as K
from omnicompile import testing
from omnicompile.config import OmniCacheConfig
from omnicompile.errors import ConfigError
from omnicompile.passes import merge as M
from omnicompile.passes.blocks import find_blocks
from omnicompile.passes.common import module_paths
from omnicompile.passes.errors import OptionError
from omnicompile.report import Report

from conftest import trace
from reference_tokens import (DiTTokens, FluxTokens, LatteSpatialBlocks, LatteSpatialFrames, LatteTemporalBlocks,
                              LatteTemporalFrames, TokenCacheReference, WanTokens)

torch.set_num_threads(1)
STEPS = (1000.0, 750.0, 500.0, 250.0)


def _cells(h, w, patch=None, rotate=True):
    """The token / block splits the compiler uses: one dst per 2x2 cell, rotated over the cell
    (offsets 0, 3, 1, 2, i.e. diagonal first) with ``merge_rotate``."""
    return [K.token_split(h, w, offset=o, patch=patch) for o in ((0, 3, 1, 2) if rotate else (0,))]


def _frames(n, stride=2, rotate=True):
    """The frame split (every other frame dst, parity alternating) or the packed 1-D split
    (stride 4, offsets 0, 2, 1, 3)."""
    offs = {2: (0, 1), 4: (0, 2, 1, 3)}[stride] if rotate else (0,)
    return [K.frame_split(n, stride=stride, offset=o) for o in offs]


def _compiled(model, kw, steps=STEPS, **opts):
    opts.setdefault("merge_rotate", True)        # the tests name the splits they compare with
    opts.setdefault("merge_fill", "output")      # the reference's default; "auto" is tested below
    oc = omnicompile.OmniCache(inner_backend="eager", **opts)
    cm = torch.compile(model, backend=oc, fullgraph=True)
    outs = []
    with torch.no_grad():
        for t in steps:
            outs.append(cm(**testing.with_timestep(kw, t))[0])
    return outs, oc


def _reference(model, kw, blocks, adapter, r, split, steps=STEPS, fill="output", refresh=None):
    ref = TokenCacheReference(blocks, adapter, r, split, fill, refresh)
    outs = []
    try:
        with torch.no_grad():
            for t in steps:
                outs.append(model(**testing.with_timestep(kw, t))[0])
    finally:
        ref.remove()
    return outs, ref


def _maxdiff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


# ----------------------------------------------------------------------------- kernels round trip


def test_round_trip_ratio_zero_is_identity_and_skipped_rows_are_cached_rows():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 8, generator=g)
    split = K.token_split(4, 4)
    skip, keep = K.similarity_topk(x, 0, *split)
    assert skip.shape == (2, 0) and torch.equal(keep, torch.arange(16).expand(2, 16))
    assert torch.equal(K.merge(x, keep), x)
    cache = torch.randn(2, 16, 8, generator=g)
    assert torch.equal(K.unmerge(x, keep, cache), x)
    skip, keep = K.similarity_topk(x, 6, *split)
    y = K.unmerge(K.merge(x, keep) * 2, keep, cache)
    rows = torch.arange(2)[:, None]
    assert torch.equal(y[rows, skip], cache[rows, skip])
    assert torch.equal(y[rows, keep], 2 * x[rows, keep])


# ----------------------------------------------------------------------------- tracer refusals


class _Toy(torch.nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.blocks = torch.nn.ModuleList([_ToyBlock(kind) for _ in range(3)])

    def forward(self, hidden_states, timestep):
        h = hidden_states * timestep.sin()[:, None, None]
        for b in self.blocks:
            h = b(h)
        return (h,)


class _ToyBlock(torch.nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.q = torch.nn.Linear(8, 8)
        self.k = torch.nn.Linear(8, 8)

    def forward(self, h):
        b, n, c = h.shape
        q = self.q(h).view(b, n, 2, 4).transpose(1, 2)
        a = torch.nn.functional.scaled_dot_product_attention(q, q, q).transpose(1, 2).reshape(b, n, c)
        if self.kind == "split_axis":        # a view that splits the token rows in two
            a = a.reshape(b, 2, n // 2, c).flip(1).reshape(b, n, c)
        elif self.kind == "slice_axis":      # a slice inside the token rows
            a = torch.cat([a[:, : n // 2] * 2, a[:, n // 2:]], dim=1)
        elif self.kind == "table":           # a position table (built outside the region): gathered
            a = a + torch.arange(n, dtype=a.dtype)[None, :, None]
        elif self.kind == "sized":           # a tensor sized by the token count inside the region
            a = a * a.new_ones(b, n, 1)
        elif self.kind == "positional":      # an op that depends on where rows sit
            a = a.cumsum(1)
        return h + self.k(a)


@pytest.mark.parametrize("kind,code", [("split_axis", "merge_view"), ("slice_axis", "merge_split_axis"),
                                       ("sized", "merge_ambiguous_int"), ("positional", "merge_positional"),
                                       ("table", None), ("ok", None)])
def test_tracer_refuses_what_it_cannot_re_specialise(kind, code):
    gm, _ = trace(_Toy(kind).eval(), dict(hidden_states=torch.randn(1, 16, 8), timestep=torch.ones(1)))
    plan = M.plan_merge(gm, find_blocks(gm), M.MergeOptions(token_ratio=0.5, merge_ffn=True, merge_fill="output",
                                                            merge_rotate=False))
    assert plan.geometry.kind == "packed"
    if code is None:
        assert [w.block for w in plan.wraps] == ["blocks.1"]
        tagged = {t.name for t in plan.wraps[0].inputs}
        assert len(tagged) == (2 if kind == "table" else 1)     # the hidden states (+ the table)
    else:
        assert not plan.wraps
        assert code in {r.code for r in plan.refused if r.subject.startswith("blocks.1")}


# ----------------------------------------------------------------------------- placement


# ----------------------------------------------------------------------------- against the reference


def test_dit_token_cache_matches_reference():
    model, kw = testing.tiny_dit(num_layers=4)
    outs, oc = _compiled(model, kw, policy="none", token_ratio=0.5, merge_ffn=True)
    blocks = [(f"b{i}", model.transformer_blocks[i]) for i in (1, 2)]
    ref, r = _reference(model, kw, blocks, DiTTokens(), 8, _cells(4, 4))
    assert r.merged_calls == 6
    assert _maxdiff(outs, ref) < 1e-5
    eager = model(**testing.with_timestep(kw, STEPS[1]))[0]
    assert (outs[1] - eager).abs().max() > 1e-3          # merging changed something
    g = oc.report().graphs[0]
    assert g.token_cache["full_calls"] == 1 and g.token_cache["merged_calls"] == 3
    assert 0 < g.flops_saved_fraction < 0.5


def test_dit_residual_fill_matches_reference():
    model, kw = testing.tiny_dit(num_layers=3)
    outs, _ = _compiled(model, kw, policy="none", token_ratio=0.25, merge_ffn=True, merge_fill="residual")
    ref, _ = _reference(model, kw, [("b1", model.transformer_blocks[1])], DiTTokens(), 4, _cells(4, 4),
                        fill="residual")
    assert _maxdiff(outs, ref) < 1e-5


def test_latte_frame_and_block_caches_match_reference():
    model, kw = testing.tiny_latte(num_layers=3, frames=4, batch=2)
    outs, oc = _compiled(model, kw, policy="none", frame_ratio=0.5, block_ratio=0.5, merge_ffn=True)
    g = oc.report().graphs[0]
    assert {w["block"]: w["axis"] for w in g.token_cache["wrapped"]} == {
        "transformer_blocks.1": "frame", "temporal_transformer_blocks.1": "block"}
    # frames: r = 2 of 4, every other frame dst; positions: r = 8 of 16 on the 4x4 grid
    refs = [TokenCacheReference([("s1", model.transformer_blocks[1])], LatteSpatialFrames(2, 4), 2, _frames(4)),
            TokenCacheReference([("t1", model.temporal_transformer_blocks[1])], LatteTemporalBlocks(2, 16), 8,
                                _cells(4, 4))]
    outs_ref = []
    try:
        with torch.no_grad():
            for t in STEPS:
                outs_ref.append(model(**testing.with_timestep(kw, t))[0])
    finally:
        for x in refs:
            x.remove()
    assert refs[0].merged_calls == 3 and refs[1].merged_calls == 3
    assert _maxdiff(outs, outs_ref) < 1e-5


def test_flux_and_wan_token_cache_match_reference():
    model, kw = testing.tiny_flux(num_layers=3, num_single_layers=3)
    outs, oc = _compiled(model, kw, policy="none", token_ratio=0.5, merge_ffn=True)
    wrapped = oc.report().graphs[0].token_cache["wrapped"]
    assert [w["block"] for w in wrapped] == ["transformer_blocks.1", "single_transformer_blocks.1"]
    # rotary tables [T + N, D]: the 5 text rows are kept whole, the image rows gathered
    tables = [i for i in wrapped[0]["inputs"] if i.startswith(("cos", "sin"))]
    assert len(tables) == 4 and all(i.endswith("=5 + token") for i in tables)
    blocks = [("d1", model.transformer_blocks[1]), ("s1", model.single_transformer_blocks[1])]
    ref, r = _reference(model, kw, blocks, FluxTokens(5), 8, _frames(16, stride=4))
    assert r.merged_calls == 6
    assert _maxdiff(outs, ref) < 1e-5
    torch._dynamo.reset()
    model, kw = testing.tiny_wan(num_layers=3)
    outs, oc = _compiled(model, kw, policy="none", token_ratio=0.5, frame_ratio=0.5, merge_ffn=True)
    g = oc.report().graphs[0]
    assert [(w["block"], w["axis"], w["rows"]) for w in g.token_cache["wrapped"]] == [("blocks.1", "token", 32)]
    assert {r.subject: r.code for r in g.refused}["frame"] == "merge_placement"    # joint attention
    ref, r = _reference(model, kw, [("b1", model.blocks[1])], WanTokens(), 16, _cells(8, 4))
    assert r.merged_calls == 3
    assert _maxdiff(outs, ref) < 1e-5


def _run_refs(model, kw, refs, steps=STEPS):
    outs = []
    try:
        with torch.no_grad():
            for t in steps:
                outs.append(model(**testing.with_timestep(kw, t))[0])
    finally:
        for x in refs:
            x.remove()
    return outs


@pytest.mark.parametrize("fill", ["output", "interpolate"])
def test_latte_swapped_placement_matches_reference(fill):
    """merge_placement="swapped" (the paper's S2S/T2T ablation): the block cache skips spatial
    positions in the spatial layers, the frame cache skips frames in the temporal layers, each
    scored per sample on whole positions / frames; the token cache is refused."""
    model, kw = testing.tiny_latte(num_layers=3, frames=4, batch=2)
    outs, oc = _compiled(model, kw, policy="none", token_ratio=0.5, frame_ratio=0.5, block_ratio=0.5,
                         merge_ffn=True, merge_placement="swapped", merge_fill=fill)
    g = oc.report().graphs[0]
    assert {w["block"]: (w["axis"], w["placement"], w["selections"]) for w in g.token_cache["wrapped"]} == {
        "transformer_blocks.1": ("block", "swapped", 2), "temporal_transformer_blocks.1": ("frame", "swapped", 2)}
    assert {r.subject: r.code for r in g.refused}["token"] == "merge_placement"
    assert g.token_cache["full_calls"] == 1 and g.token_cache["merged_calls"] == 3
    refs = [TokenCacheReference([("s1", model.transformer_blocks[1])], LatteSpatialBlocks(2, 4), 8,
                                _cells(4, 4), fill),
            TokenCacheReference([("t1", model.temporal_transformer_blocks[1])], LatteTemporalFrames(2, 16), 2,
                                _frames(4), fill)]
    outs_ref = _run_refs(model, kw, refs)
    assert refs[0].merged_calls == 3 and refs[1].merged_calls == 3
    assert _maxdiff(outs, outs_ref) < 1e-5


def test_interpolate_fill_matches_reference():
    """merge_fill="interpolate": a skipped row copies this step's output of its matched dst row
    (within its patch with ``patch``); no state is held; the paper placement on Latte too."""
    model, kw = testing.tiny_dit(num_layers=3)
    outs, oc = _compiled(model, kw, policy="none", token_ratio=0.5, patch=2, merge_ffn=True, merge_fill="interpolate")
    ref, r = _reference(model, kw, [("b1", model.transformer_blocks[1])], DiTTokens(), 8,
                        _cells(4, 4, patch=2), fill="interpolate")
    assert r.merged_calls == 3
    assert _maxdiff(outs, ref) < 1e-5
    g = oc.report().graphs[0]
    assert (g.token_cache["full_calls"], g.token_cache["merged_calls"]) == (1, 3) and g.cache_bytes == 0
    torch._dynamo.reset()
    model, kw = testing.tiny_latte(num_layers=3, frames=4, batch=2)
    outs, _ = _compiled(model, kw, policy="none", frame_ratio=0.5, block_ratio=0.5, merge_ffn=True,
                        merge_fill="interpolate")
    refs = [TokenCacheReference([("s1", model.transformer_blocks[1])], LatteSpatialFrames(2, 4), 2, _frames(4),
                                "interpolate"),
            TokenCacheReference([("t1", model.temporal_transformer_blocks[1])], LatteTemporalBlocks(2, 16), 8,
                                _cells(4, 4), "interpolate")]
    assert _maxdiff(outs, _run_refs(model, kw, refs)) < 1e-5


# ----------------------------------------------------------------------------- graph-level properties


def test_latte_placement_and_frame_cache_exact_with_this_steps_cache():
    """Placement on Latte: frame cache on the spatial layers, block cache on the temporal ones,
    the token cache refused on temporal layers.  And since spatial attention never mixes
    frames (temporal attention never mixes positions), computing the kept rows and taking the
    skipped ones from this very step's full output reproduces the full output bit for bit."""
    model, kw = testing.tiny_latte(num_layers=3, frames=4)
    gm, ex = trace(model, kw)
    plan = M.plan_merge(gm, find_blocks(gm), M.MergeOptions(token_ratio=0.5, frame_ratio=0.5, block_ratio=0.5,
                                                            merge_fill="output", merge_rotate=False))
    assert plan.geometry.kind == "video" and (plan.geometry.frames, plan.geometry.h, plan.geometry.w) == (4, 4, 4)
    assert {w.block: w.axis for w in plan.wraps} == {"transformer_blocks.1": "frame",
                                                     "temporal_transformer_blocks.1": "block"}
    codes = {r.subject: r.code for r in plan.refused}
    assert codes["transformer_blocks.1:block"] == "merge_placement"
    assert codes["temporal_transformer_blocks.1:frame"] == "merge_placement"
    assert codes["temporal_transformer_blocks.1:token"] == "merge_placement"
    assert codes["transformer_blocks.1:token"] == "merge_combined"     # the frame cache took it
    assert codes["transformer_blocks"] == "merge_excluded"
    frame = next(w for w in plan.wraps if w.axis == "frame")
    # the per-frame tables (AdaLN from the timestep, text keys/values) are gathered with the frames
    assert {t.dim for t in frame.inputs} == {0} and len(frame.inputs) >= 4
    assert frame.flops_merged * 2 == frame.flops_full
    full, present, _ = M.apply_merge(gm, plan, merged=False)
    merged, _, consts = M.apply_merge(gm, plan, merged=True)
    with torch.no_grad():
        f = full(*ex)
        n = len(f) - len(M.state_specs(present))
        assert torch.equal(f[0], gm(*ex)[0])
        m = merged(*ex, *f[n:], *consts)
    assert torch.equal(m[0], f[0])
    targets = {str(x.target) for x in merged.graph.nodes}
    assert {"omnicompile.similarity_topk.default", "omnicompile.merge.default",
            "omnicompile.unmerge.default"} <= targets
    assert not any("omnicompile" in str(x.target) for x in full.graph.nodes)


def test_swapped_placement_graph_properties():
    """Swapped on Latte (merge_ffn=False): no longer exact with this step's cache (spatial
    attention mixes the positions it skips, temporal attention the frames); interpolate holds
    no state and every skipped row is a copy of a computed row.  Swapped on an image model:
    every cache refused with merge_placement."""
    model, kw = testing.tiny_latte(num_layers=3, frames=4)
    gm, ex = trace(model, kw)
    plan = M.plan_merge(gm, find_blocks(gm), M.MergeOptions(frame_ratio=0.5, block_ratio=0.5, merge_placement="swapped",
                                                            merge_fill="output", merge_rotate=False))
    assert {w.block: (w.axis, w.groups) for w in plan.wraps} == {"transformer_blocks.1": ("block", 4),
                                                                 "temporal_transformer_blocks.1": ("frame", 16)}
    codes = {r.subject: r.code for r in plan.refused}
    assert codes["transformer_blocks.1:frame"] == "merge_placement"       # B = 1: dim 0 is the frames
    full, present, _ = M.apply_merge(gm, plan, merged=False)
    merged, _, consts = M.apply_merge(gm, plan, merged=True)
    with torch.no_grad():
        f = full(*ex)
        n = len(f) - len(M.state_specs(present))
        m = merged(*ex, *f[n:], *consts)
    assert (m[0] - f[0]).abs().max() > 1e-4
    plan_i = M.plan_merge(gm, find_blocks(gm), M.MergeOptions(block_ratio=0.5, merge_placement="swapped",
                                                              merge_fill="interpolate", merge_rotate=False))
    w, = plan_i.wraps
    assert M.state_specs(plan_i.wraps) == []
    full, present, _ = M.apply_merge(gm, plan_i, merged=False)
    merged, _, consts = M.apply_merge(gm, plan_i, merged=True)
    assert sum(x.target is M.interpolation_index for x in merged.graph.nodes) == 1
    with torch.no_grad():
        f, m = full(*ex), merged(*ex, *consts)          # no state in, none out
    assert len(f) == len(m) == len(gm(*ex)) and (m[0] - f[0]).abs().max() > 1e-4
    dit, dkw = testing.tiny_dit(num_layers=3)
    gm, _ = trace(dit, dkw)
    plan = M.plan_merge(gm, find_blocks(gm), M.MergeOptions(token_ratio=0.5, frame_ratio=0.5, merge_placement="swapped",
                                                            merge_fill="output", merge_rotate=False))
    codes = {r.subject: r.code for r in plan.refused}
    assert not plan.wraps and codes["token"] == codes["frame"] == "merge_placement"


def test_merge_ffn_false_runs_the_feed_forward_on_every_row():
    model, kw = testing.tiny_dit(num_layers=3)
    gm, ex = trace(model, kw)
    plan = M.plan_merge(gm, find_blocks(gm), M.MergeOptions(token_ratio=0.5, merge_fill="output",
                                                            merge_rotate=False))      # merge_ffn=False
    w, = plan.wraps
    assert not any("ff" in name for name in w.region)
    merged, _, consts = M.apply_merge(gm, plan, merged=True)
    ff = [x for x in merged.graph.nodes if any(p.startswith("transformer_blocks.1.ff") for p in module_paths(x))
          and x.op == "call_function" and getattr(x.target, "__name__", "") == "linear"]
    assert ff and all(x.meta["example_value"].shape[1] == 16 for x in ff)
    # the skipped rows of the new state are the cached rows
    full, present, _ = M.apply_merge(gm, plan, merged=False)
    with torch.no_grad():
        f = full(*ex)
        cache = torch.randn_like(f[-1])
        m = merged(*ex, cache, *consts)
    new = m[-1]
    same = (new == cache).all(dim=-1)[0]
    assert int(same.sum()) == 8          # r = 8 rows kept last step's values


def test_static_policy_merges_computed_steps_only_and_reset_computes_fully():
    model, kw = testing.tiny_dit(num_layers=3)
    steps = (1000.0, 800.0, 600.0, 400.0, 200.0)
    outs, oc = _compiled(model, kw, steps, policy="static", interval=2, warmup=2, token_ratio=0.5)
    g = oc.report().graphs[0]
    # steps 0 C(full), 1 C(merged), 2 R, 3 C(merged), 4 R
    assert (g.token_cache["full_calls"], g.token_cache["merged_calls"]) == (1, 2)
    assert [r.decisions[next(iter(r.decisions))] for r in g.steps] == ["computed", "computed", "reused",
                                                                        "computed", "reused"]
    oc.reset()
    cm = torch.compile(model, backend=oc, fullgraph=True)
    with torch.no_grad():
        again = cm(**testing.with_timestep(kw, steps[0]))[0]
    assert torch.equal(again, outs[0])
    assert g.token_cache["full_calls"] == 2
    back = Report.from_json(oc.report().to_json())
    assert back.graphs[0].token_cache["wrapped"][0]["axis"] == "token"
    assert any(r.code == "merge_excluded" for r in back.graphs[0].refused)


def test_not_a_video_model_and_nothing_wrapped_fall_back_with_reasons():
    model, kw = testing.tiny_dit(num_layers=2)      # 2 blocks: both excluded
    outs, oc = _compiled(model, kw, STEPS[:2], policy="none", token_ratio=0.5, frame_ratio=0.5)
    g = oc.report().graphs[0]
    assert not g.cached and g.fallback.code.startswith("merge_")
    codes = {r.code for r in g.refused}
    assert {"merge_excluded", "merge_placement"} <= codes
    assert torch.equal(outs[0], model(**testing.with_timestep(kw, STEPS[0]))[0])


@pytest.mark.parametrize("field,value", [("token_ratio", 1.0), ("frame_ratio", -0.1), ("block_ratio", "x"),
                                         ("patch", 0), ("merge_ffn", 1), ("merge_exclude", -1),
                                         ("merge_fill", "average"), ("merge_placement", "s2s"),
                                         ("merge_placement", None), ("merge_rotate", 1), ("merge_rotate", "yes"),
                                         ("merge_rotate", None), ("merge_refresh", 0), ("merge_refresh", -2),
                                         ("merge_refresh", 1.5), ("merge_refresh", True), ("merge_refresh", "2")])
def test_config_validation(field, value):
    with pytest.raises(ConfigError) as e:
        omnicompile.OmniCache(**{field: value})
    assert field in str(e.value)


@pytest.mark.parametrize("field,value", [("token_ratio", 1.0), ("frame_ratio", -0.1), ("block_ratio", "x"),
                                         ("block_ratio", True), ("token_ratio", float("inf")), ("patch", 0),
                                         ("patch", 2.0), ("merge_ffn", 1), ("merge_exclude", -1),
                                         ("merge_exclude", True), ("merge_fill", "average"),
                                         ("merge_placement", None), ("merge_rotate", "yes"), ("merge_refresh", 0),
                                         ("merge_refresh", 1.5), ("merge_refresh", True)])
def test_merge_options_validate_like_the_config(field, value):
    """MergeOptions has the config's names and defaults, and refuses what it refuses with the
    same message (an OptionError, a ValueError)."""
    cfg = OmniCacheConfig()
    names = [f.name for f in dataclasses.fields(M.MergeOptions)]
    assert {n: getattr(cfg, n) for n in names} == dataclasses.asdict(M.MergeOptions())
    with pytest.raises(OptionError) as got:
        M.MergeOptions(**{field: value})
    with pytest.raises(ConfigError) as want:
        omnicompile.OmniCache(**{field: value})
    assert got.value.field == want.value.field == field
    assert got.value.allowed == want.value.allowed


def test_merge_options_reject_nan_and_say_when_enabled():
    with pytest.raises(OptionError, match="token_ratio"):
        M.MergeOptions(token_ratio=float("nan"))
    assert not M.MergeOptions().enabled and M.MergeOptions(block_ratio=0.25).enabled
    with pytest.raises(dataclasses.FrozenInstanceError):
        M.MergeOptions().token_ratio = 0.5


def test_config_accepts_the_ablation_values():
    cfg = omnicompile.OmniCache(merge_placement="swapped", merge_fill="interpolate", frame_ratio=0.3).config
    assert (cfg.merge_placement, cfg.merge_fill) == ("swapped", "interpolate")
    assert omnicompile.OmniCache().config.merge_placement == "paper"
    cfg = omnicompile.OmniCache(merge_rotate=False, merge_refresh=1).config
    assert (cfg.merge_rotate, cfg.merge_refresh) == (False, 1)
    assert omnicompile.OmniCache(merge_refresh=None).config.merge_refresh is None


def test_report_markdown_lists_wrapped_blocks():
    model, kw = testing.tiny_dit(num_layers=3)
    _, oc = _compiled(model, kw, STEPS[:2], policy="none", token_ratio=0.5)
    md = oc.report().to_markdown()
    assert "token / frame / block caches: 1 merged calls, 1 full" in md
    assert "| `transformer_blocks.1` | token | 8 of 16 |" in md
    assert "wraps transformer_blocks.1 along token" in str(oc.report())


# ----------------------------------------------------------------------------- rotation and refresh

STEPS6 = (1000.0, 850.0, 700.0, 550.0, 400.0, 250.0)


@pytest.mark.parametrize("rotate,refresh,fill", [(True, 3, "output"), (False, 2, "residual")])
def test_rotation_and_refresh_match_reference(rotate, refresh, fill):
    """merge_rotate: call k of a generation uses split k % phases (the dst of each 2x2 cell at
    offsets 0, 3, 1, 2); merge_refresh=N: calls with k % N == 0 run in full (every row refreshed)."""
    model, kw = testing.tiny_dit(num_layers=3)
    outs, oc = _compiled(model, kw, STEPS6, policy="none", token_ratio=0.5, merge_ffn=True, merge_fill=fill,
                         merge_rotate=rotate, merge_refresh=refresh)
    ref, r = _reference(model, kw, [("b1", model.transformer_blocks[1])], DiTTokens(), 8,
                        _cells(4, 4, rotate=rotate), STEPS6, fill=fill, refresh=refresh)
    assert _maxdiff(outs, ref) < 1e-5
    tc = oc.report().graphs[0].token_cache
    fulls = len(range(0, 6, refresh))
    assert (tc["full_calls"], tc["merged_calls"], tc["refresh_calls"]) == (fulls, 6 - fulls, fulls - 1)
    assert r.full_calls == fulls and r.merged_calls == 6 - fulls
    # the other rotation setting is a different computation (the test can tell them apart)
    other, _ = _reference(model, kw, [("b1", model.transformer_blocks[1])], DiTTokens(), 8,
                          _cells(4, 4, rotate=not rotate), STEPS6, fill=fill, refresh=refresh)
    assert _maxdiff(outs, other) > 1e-4


def test_rotated_splits_cover_every_row_and_fit_one_graph():
    """Every row is dst in some phase (no row is src at every step); all phases of a wrap have
    the same sizes, so one merged graph serves them (the host picks the index tensors);
    phases whose sizes differ (odd frame counts) are left out; a static policy's reused steps
    do not advance the phase or the refresh count."""
    model, kw = testing.tiny_latte(num_layers=3, frames=4)
    gm, ex = trace(model, kw)
    plan = M.plan_merge(gm, find_blocks(gm), M.MergeOptions(frame_ratio=0.5, block_ratio=0.5, merge_rotate=True,
                                                            merge_fill="output"))
    assert {w.axis: len(w.splits) for w in plan.wraps} == {"frame": 2, "block": 4}
    for w in plan.wraps:
        assert sorted(d for sp in w.splits for d in sp[1]) == list(range(w.rows))
        assert w.splits[0] == w.split and w.describe()["phases"] == len(w.splits)
    phases = []
    merged, _, consts = M.apply_merge(gm, plan, merged=True, phases=phases)
    assert len(phases) == 4 and phases[0] == consts
    assert all([t.shape for t in p] == [t.shape for t in consts] for p in phases)
    assert not torch.equal(phases[1][0], phases[0][0])
    full, present, _ = M.apply_merge(gm, plan, merged=False)
    with torch.no_grad():
        f = full(*ex)
        n = len(f) - len(M.state_specs(present))
        for p in phases:           # the frame cache stays exact with this step's cache in every phase
            assert torch.equal(merged(*ex, *f[n:], *p)[0], f[0])
    geo = plan.geometry
    assert len(M.split_for("frame", geo, 5, None, rotate=True)[0]) == 1         # 3 dst vs 2: dropped
    assert len(M.split_for("frame", geo, 6, None, rotate=True)[0]) == 2
    fixed = M.MergeOptions(block_ratio=0.5, merge_fill="output", merge_rotate=False)
    assert len(M.plan_merge(gm, find_blocks(gm), fixed).wraps[0].splits) == 1
    torch._dynamo.reset()
    dit, dkw = testing.tiny_dit(num_layers=3)
    steps = (1000.0, 800.0, 600.0, 400.0, 200.0)
    _, oc = _compiled(dit, dkw, steps, policy="static", interval=2, warmup=2, token_ratio=0.5, merge_refresh=2)
    tc = oc.report().graphs[0].token_cache
    # computed steps 0, 1, 3 are calls k = 0 (full), 1 (merged), 2 (full: refresh)
    assert (tc["full_calls"], tc["merged_calls"], tc["refresh_calls"]) == (2, 1, 1)


def test_auto_fill_takes_residual_where_the_output_is_a_residual_stream():
    """merge_fill="auto": residual for the blocks whose region output is a residual stream of
    its input (DiT: the region ends on the stream), the same as asking for residual."""
    model, kw = testing.tiny_dit(num_layers=4)
    gm, _ = trace(model, kw)
    auto = M.plan_merge(gm, find_blocks(gm), M.MergeOptions(token_ratio=0.5, merge_ffn=True, merge_fill="auto",
                                                            merge_rotate=False))
    res = M.plan_merge(gm, find_blocks(gm), M.MergeOptions(token_ratio=0.5, merge_ffn=True, merge_fill="residual",
                                                           merge_rotate=False))
    assert auto.wraps and [w.fill for w in auto.wraps] == [w.fill for w in res.wraps] == ["residual"] * len(res.wraps)
    assert omnicompile.OmniCache().config.merge_fill == "auto"


def test_dynamic_shapes_are_refused_not_crashed():
    """``dynamic=True`` on DiT: Dynamo captures the class label's ``.item()`` as a data-dependent
    size, so the graph cannot be specialised per shape (test_dynamic covers the graphs that can):
    the token cache is refused with a reason, the output is right."""
    model, kw = testing.tiny_dit(num_layers=4)
    oc = omnicompile.OmniCache(inner_backend="eager", policy="none", token_ratio=0.5)
    cm = torch.compile(model, backend=oc, fullgraph=True, dynamic=True)
    with torch.no_grad():
        out = cm(**kw)[0]
    torch.testing.assert_close(out, model(**kw)[0])
    codes = {r.code for g in oc.report().graphs for r in list(g.refused) + ([g.fallback] if g.fallback else [])}
    assert "merge_dynamic_shape" in codes
