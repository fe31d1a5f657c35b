"""Differential fuzzer: random tiny diffusers denoisers x policies x step counts x CFG modes x
guards x shapes, every call of every compiled graph checked against a plain-PyTorch reference of
the decisions the backend reports (``reference_executor.replay`` for static / explicit
``reuse_steps`` / layered, ``fuzz_reference`` for trajectory and probe), policy ``none`` against
eager.  Beyond the outputs it checks what the reports claim: each call's step and CFG slot (where
the placement is certain) against the loop's own count, the static schedule against its rule, the
probe's decisions against its signal, the trajectory's correction against a recomputed noise.

``make test`` runs 200 derandomized cases (a fixed sequence); ``make fuzz`` runs
``OMNICACHE_FUZZ_EXAMPLES`` (2,000) with a random seed it prints (``OMNICACHE_FUZZ_SEED=<n>``
replays one).  Cases share traced models (``fuzz_models``: one Dynamo trace per model config and
shape) and run with ``inner_backend="eager"``.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import random
import sys
import time
from typing import Optional

import pytest
import torch
from hypothesis import HealthCheck, Phase, event, given, seed, settings
from hypothesis import strategies as st

import omnicompile
from fuzz_models import CONFIGS, DISPATCH, FAMILIES, RESOLUTIONS, Shape, compiled, get_model, run_generation
from fuzz_reference import Mismatch, compare, replay_probe, replay_trajectory
from reference_executor import Recorder, replay

# ----------------------------------------------------------------------------- profile

FUZZ_EXAMPLES = int(os.environ.get("OMNICACHE_FUZZ_EXAMPLES", "0") or 0)
CI_EXAMPLES = int(os.environ.get("OMNICACHE_FUZZ_CI_EXAMPLES", "200"))   # make test
if FUZZ_EXAMPLES:
    FUZZ_SEED = int(os.environ.get("OMNICACHE_FUZZ_SEED") or random.SystemRandom().randrange(2 ** 32))
    print(f"\nomnicompile fuzz: {FUZZ_EXAMPLES} cases, seed {FUZZ_SEED} "
          f"(replay: OMNICACHE_FUZZ_EXAMPLES={FUZZ_EXAMPLES} OMNICACHE_FUZZ_SEED={FUZZ_SEED})", file=sys.stderr)
    # no shrinking: a case takes seconds (minutes when it traces); the failing case is printed in full
    PROFILE = settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=False,
                       suppress_health_check=list(HealthCheck), print_blob=True,
                       phases=(Phase.explicit, Phase.reuse, Phase.generate))
    SEED = seed(FUZZ_SEED)
else:
    FUZZ_SEED = None
    PROFILE = settings(max_examples=CI_EXAMPLES, deadline=None, database=None, derandomize=True,
                       suppress_health_check=list(HealthCheck), print_blob=True,
                       phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink))
    SEED = lambda f: f   # noqa: E731  (derandomize: the sequence is fixed by the test itself)

POLICIES = ("none", "static", "reuse_steps", "trajectory", "probe", "layered")
GUARDS = {"static": ("auto", "variants", "cond"), "reuse_steps": ("auto", "variants", "cond"),
          "layered": ("auto", "variants", "cond"), "trajectory": ("auto", "variants"), "probe": ("auto", "cond"),
          "none": ("auto",)}
#: refusals a case may meet, deliberately (anything else uncached is a failure)
ALLOWED_REFUSALS = {"none": {"policy_none"}, "probe": {"probe_too_deep", "nothing_after_probe"}}


@dataclasses.dataclass(frozen=True)
class Gen:
    steps: int
    shape: Shape
    seed: int


@dataclasses.dataclass(frozen=True)
class Case:
    family: str
    config: object
    policy: str
    options: tuple          # sorted (name, value) pairs for OmniCache
    cfg: str                # off | split | batched
    context: str            # timesteps | num_steps | bare
    dynamic: bool
    int_timesteps: bool
    gens: tuple             # Gen per generation, in order

    def oc_options(self) -> dict:
        d = dict(self.options)
        d["policy"] = "static" if self.policy == "reuse_steps" else self.policy
        d["inner_backend"] = "eager"
        return d

    def __str__(self):
        gens = ", ".join(f"{g.steps} steps b{g.shape.batch} {g.shape.res[0]}x{g.shape.res[1]} seed {g.seed}"
                         for g in self.gens)
        return (f"{self.family}{self.config} policy {self.policy} {self.oc_options()} cfg {self.cfg} "
                f"context {self.context} dynamic {self.dynamic} int_t {self.int_timesteps}: [{gens}]")


@st.composite
def options(draw, policy: str, steps: int) -> dict:
    o: dict = {}
    if policy == "static":
        o.update(interval=draw(st.integers(1, 4)), warmup=draw(st.integers(0, 3)), cooldown=draw(st.integers(0, 2)))
    elif policy == "reuse_steps":
        o["reuse_steps"] = sorted(draw(st.sets(st.integers(1, steps - 1), min_size=1, max_size=steps - 1)))
    elif policy == "trajectory":
        o.update(budget=draw(st.sampled_from([0.2, 0.4, 0.5, 0.7])), max_run=draw(st.sampled_from([1, 2, 3, None])),
                 min_gap=draw(st.integers(1, 3)), correction=draw(st.booleans()),
                 run_correction=draw(st.sampled_from(["scaled", "chain", "hold", "first"])),
                 curvature=draw(st.sampled_from(["angle", "output"])))
        if draw(st.booleans()):
            o["reuse_steps"] = sorted(draw(st.sets(st.integers(1, steps - 1), min_size=1, max_size=steps - 1)))
    elif policy == "probe":
        o.update(threshold=draw(st.sampled_from([0.05, 0.2, 0.4, 1.0, 3.0])), probe_depth=draw(st.integers(1, 2)),
                 ret_ratio=draw(st.sampled_from([0.0, 0.1, 0.2, 0.5])),
                 error=draw(st.sampled_from(["delta_y", "delta_minus"])), align=draw(st.booleans()),
                 align_clip=draw(st.sampled_from([(1.0, 1.5), (0.0, 2.0), (0.5, 1.0)])))
    elif policy == "layered":
        o.update(target_speedup=draw(st.sampled_from([1.2, 1.5, 2.0, 3.0])), cache_interval=draw(st.integers(2, 6)))
    if policy != "none":
        guard = draw(st.sampled_from(GUARDS[policy]))
        if guard != "auto":
            o["guard"] = guard
        if draw(st.integers(0, 3)) == 0:
            o["num_steps"] = steps
    return o


#: ``make test`` draws from one config per family and, for static shapes, the base resolution
#: (each distinct model config and shape costs a Dynamo trace of a few seconds); ``make fuzz``
#: from every config and resolution
FULL = bool(FUZZ_EXAMPLES)
#: ``OMNICACHE_FUZZ_FAMILIES=sd3,latte`` fuzzes those model families only (a change to one of them)
ONLY_FAMILIES = tuple(f for f in os.environ.get("OMNICACHE_FUZZ_FAMILIES", "").split(",") if f.strip()) or FAMILIES
if set(ONLY_FAMILIES) - set(FAMILIES):
    raise ValueError(f"OMNICACHE_FUZZ_FAMILIES: unknown {sorted(set(ONLY_FAMILIES) - set(FAMILIES))}; "
                     f"known: {', '.join(FAMILIES)}")


def _steps(policy: str):
    """3-30 steps, weighted to short generations; calibrated policies cache only above 8 steps."""
    if policy == "trajectory":
        return st.one_of(st.integers(9, 14), st.integers(9, 14), st.integers(3, 30))
    return st.one_of(st.integers(3, 10), st.integers(3, 10), st.integers(3, 30))


@st.composite
def cases(draw) -> Case:
    family = draw(st.sampled_from(ONLY_FAMILIES))
    config = draw(st.sampled_from(CONFIGS[family] if FULL else CONFIGS[family][:1]))
    policy = draw(st.sampled_from(POLICIES))
    steps = draw(_steps(policy))
    dynamic = draw(st.booleans())
    resolutions = RESOLUTIONS[family] if FULL or dynamic else RESOLUTIONS[family][:1]

    def shape():
        return Shape(draw(st.sampled_from([1, 2])), draw(st.sampled_from(resolutions)))
    first = shape()
    # calibrated policies reuse from their second generation of a step count on
    n_gens = draw(st.integers(2, 3) if policy in ("trajectory", "layered") else st.integers(1, 2))
    gens = [Gen(steps, first, draw(st.integers(0, 3)))]
    for _ in range(n_gens - 1):
        g_steps = steps if draw(st.integers(0, 2)) else draw(_steps(policy))
        g_shape = shape() if draw(st.integers(0, 3)) == 0 else first      # a new batch or resolution
        gens.append(Gen(g_steps, g_shape, draw(st.integers(0, 3))))
    opts = draw(options(policy, steps))
    if "num_steps" in opts and any(g.steps != steps for g in gens):
        del opts["num_steps"]            # a fixed step count is a promise about every generation
    return Case(family, config, policy, tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                                                      for k, v in opts.items())),
                draw(st.sampled_from(["off", "split", "batched"])),
                draw(st.sampled_from(["timesteps", "num_steps", "bare"])), dynamic,
                family != "flux" and draw(st.booleans()), tuple(gens))


# ----------------------------------------------------------------------------- one case


@dataclasses.dataclass
class Result:
    case: Case
    oc: object
    recorder: Recorder
    outputs: list            # per generation: the model outputs
    served: list             # per generation: [(graph index, (step, slot))] of its calls, in order
    eager: Optional[list] = None


def run_case(case: Case) -> Result:
    oc = omnicompile.OmniCache(**case.oc_options())
    rec = Recorder(oc)
    fn = compiled(case.family, case.config, case.dynamic)
    outputs, served = [], []
    with DISPATCH[case.dynamic].serving(rec) as log:
        for g in case.gens:
            start = len(log)
            outs, places = run_generation(fn, case.family, g.shape, g.steps, case.cfg, case.context, g.seed,
                                          case.int_timesteps)
            graphs = log[start:]
            assert len(graphs) == len(places), f"{case}: {len(places)} model calls, {len(graphs)} reached a graph"
            outputs.append(outs)
            served.append(list(zip(graphs, places)))
    # (Dynamo may split one generation over two graphs: a guard it fails to evaluate recompiles)
    res = Result(case, oc, rec, outputs, served)
    if case.policy == "none":
        model = get_model(case.family, case.config)
        res.eager = [run_generation(model, case.family, g.shape, g.steps, case.cfg, case.context, g.seed,
                                    case.int_timesteps)[0] for g in case.gens]
    return res


def check(res: Result) -> dict:
    """Every check of a case; :class:`fuzz_reference.Mismatch` (or AssertionError) on the first failure."""
    case = res.case
    counts = {"calls": 0, "reused": 0}
    for grec in res.recorder.graphs:
        r = grec.report
        if grec.runtime is None:
            code = r.fallback.code if r.fallback is not None else None
            if code not in ALLOWED_REFUSALS.get(case.policy, ()):
                raise Mismatch(f"graph {r.graph_id} compiled uncached: {r.fallback}")
    if case.policy == "none":
        for k, (got, want) in enumerate(zip(res.outputs, res.eager)):
            for i, (o, w) in enumerate(zip(got, want)):
                compare([o], [w], f"policy none vs eager: generation {k}, call {i}", 1e-5, 1e-5)
        counts["calls"] = sum(len(o) for o in res.outputs)
        return counts
    _check_places(res)
    for grec in res.recorder.graphs:
        if grec.runtime is None:
            continue
        name = case.oc_options()["policy"]
        if name == "trajectory":
            got = replay_trajectory(grec)
        elif name == "probe":
            got = replay_probe(grec)
        else:
            try:
                got = replay(grec)
            except AssertionError as e:
                raise Mismatch(str(e)) from None
            if case.policy in ("static", "reuse_steps"):
                _check_static(res, grec)
        counts["calls"] += got["calls"]
        counts["reused"] += got["reused"]
    return counts


def _check_places(res: Result) -> None:
    """Each call's recorded (step, slot) is the loop's, where the call was placed with certainty;
    uncertain calls compute every span."""
    case = res.case
    per_graph: dict = {}
    for served in res.served:
        for gi, place in served:     # a generation may be split over graphs Dynamo recompiled
            per_graph.setdefault(gi, []).append(place)
    for gi, places in per_graph.items():
        grec = res.recorder.graphs[gi]
        if grec.runtime is None:
            continue
        grec.runtime.flush()
        steps = grec.report.steps
        if len(steps) != len(places):
            raise Mismatch(f"graph {gi}: {len(places)} calls, {len(steps)} step records")
        for i, (rec, place) in enumerate(zip(steps, places)):
            step, slot = place
            if rec.uncertain:
                if "reused" in rec.decisions.values():
                    raise Mismatch(f"graph {gi} call {i}: uncertain ({rec.uncertain}) but reused {rec.decisions}")
                if case.context != "bare":
                    raise Mismatch(f"graph {gi} call {i}: uncertain ({rec.uncertain}) inside a generation context")
                continue
            if (rec.step, rec.slot) != (step, slot):
                raise Mismatch(f"graph {gi} call {i}: placed at step {rec.step} slot {rec.slot}, the loop is at "
                               f"step {step} slot {slot} ({rec.decisions})")


def _static_rule(opts: dict, step: int, n: Optional[int]) -> bool:
    """The static schedule, written out independently of the policy."""
    if opts.get("reuse_steps") is not None:
        return step in opts["reuse_steps"]
    interval, warmup, cooldown = opts.get("interval", 2), opts.get("warmup", 2), opts.get("cooldown", 0)
    if step < warmup or interval <= 1:
        return False
    if cooldown and (n is None or step >= n - cooldown):
        return False
    return (step - warmup) % interval != interval - 1


def _check_static(res: Result, grec) -> None:
    opts = dict(res.case.options)
    n_of = {(g.model, g.generation): g.num_steps for g in grec.report.generation_log}
    for i, rec in enumerate(grec.report.steps):
        if rec.uncertain:
            continue
        want = _static_rule(opts, rec.step, n_of.get((rec.model, rec.generation)))
        for span, d in rec.decisions.items():
            expect = "reused" if want and span not in rec.forced else "computed"
            if d != expect or (span in rec.forced and not want):
                raise Mismatch(f"call {i} step {rec.step} of {n_of.get((rec.model, rec.generation))}: span {span} "
                               f"{d}, the static rule says {expect} (forced {rec.forced})")


# ----------------------------------------------------------------------------- the tests


@pytest.fixture(autouse=True)
def _fuzz_env():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # one code object serves every config and shape: 64 cache entries hold make test's cases; a
    # make fuzz shard of 1,000 cases needs more (it hit 64 after ~400)
    with torch._dynamo.config.patch(recompile_limit=4096 if FUZZ_EXAMPLES else 64,
                                    accumulated_recompile_limit=16384 if FUZZ_EXAMPLES else 256):
        yield
    torch.set_num_threads(threads)


STATS: dict = {"cases": 0, "calls": 0, "reused": 0}


@PROFILE
@SEED
@given(case=cases())
def test_fuzz_differential(case):
    start = time.perf_counter()
    res = run_case(case)
    try:
        got = check(res)
    except AssertionError as e:
        if FUZZ_SEED is not None:
            print(f"fuzz case {STATS['cases'] + 1}: MISMATCH {case}", file=sys.stderr, flush=True)
        raise Mismatch(f"{case}\n  {e}" + (f"\n  (fuzz seed {FUZZ_SEED})" if FUZZ_SEED is not None else "")) from None
    if FUZZ_SEED is not None or os.environ.get("OMNICACHE_FUZZ_PROGRESS"):   # for runs cut short by a timeout
        print(f"fuzz case {STATS['cases'] + 1}: ok {time.perf_counter() - start:.1f}s, {got['calls']} calls, "
              f"{got['reused']} reused: {case}", file=sys.stderr, flush=True)
    if any(len({gi for gi, _ in served}) > 1 for served in res.served):
        event("a generation split over recompiled graphs")
    STATS["cases"] += 1
    STATS["calls"] += got["calls"]
    STATS["reused"] += got["reused"]
    event(f"policy {case.policy}: {'reused' if got['reused'] else 'nothing reused'}")


# ----------------------------------------------------------------------------- the fuzzer can fail


MUTANT_CASES = {
    "static": Case("flux", (2, 2), "static", (("interval", 2), ("warmup", 1)), "split", "timesteps", False, False,
                   (Gen(6, Shape(1, (4, 4)), 0),)),
    "layered": Case("sd3", 3, "layered", (("target_speedup", 2.0),), "batched", "num_steps", False, False,
                    (Gen(8, Shape(1, (8, 8)), 0), Gen(8, Shape(1, (8, 8)), 1))),
    "trajectory": Case("wan", 2, "trajectory", (("budget", 0.4), ("correction", True)), "off", "timesteps",
                       False, False, (Gen(12, Shape(1, (8, 8)), 0), Gen(12, Shape(1, (8, 8)), 1))),
    "probe": Case("latte", 2, "probe", (("threshold", 3.0), ("ret_ratio", 0.0)), "off", "timesteps", False,
                  True, (Gen(8, Shape(1, (8, 8)), 0),)),
    "none": Case("flux", (1, 3), "none", (), "batched", "bare", False, False, (Gen(4, Shape(1, (4, 4)), 0),)),
}


def _records(res):
    (grec,) = [g for g in res.recorder.graphs if g.runtime is not None]
    grec.runtime.flush()
    return grec.report.steps


def _flip_reuse(res):
    """One reused span of one call becomes 'computed' in the report."""
    for rec in _records(res):
        for span, d in rec.decisions.items():
            if d == "reused":
                rec.decisions[span] = "computed"
                return f"step {rec.step} slot {rec.slot} span {span}: reused -> computed"
    raise AssertionError("nothing reused to flip")


def _flip_compute(res):
    """One computed call after the first of its slot becomes 'reused' in the report."""
    seen = set()
    for rec in _records(res):
        key = (rec.generation, rec.slot)
        if key in seen and "computed" in rec.decisions.values() and not rec.uncertain:
            for span in rec.decisions:
                rec.decisions[span] = "reused"
            rec.forced = []
            return f"step {rec.step} slot {rec.slot}: computed -> reused"
        seen.add(key)
    raise AssertionError("nothing computed to flip")


def _scale_gamma(res):
    for rec in _records(res):
        if rec.signals.get("gamma"):
            rec.signals["gamma"] *= 1.5
            return f"step {rec.step}: correction coefficient x1.5"
    raise AssertionError("no corrected reuse")


def _perturb_output(res):
    o = res.outputs[0][2]
    o.add_(1e-3 * o.abs().max())
    return "generation 0 call 2 perturbed by 1e-3 of its largest value"


MUTATIONS = {"static": (_flip_reuse, _flip_compute), "layered": (_flip_reuse, _flip_compute),
             "trajectory": (_flip_reuse, _flip_compute, _scale_gamma), "probe": (_flip_reuse, _flip_compute),
             "none": (_perturb_output,)}


@pytest.mark.parametrize("policy", list(MUTATIONS))
def test_fuzz_comparison_catches_one_flipped_decision(policy):
    """The fuzzer's checks pass on an honest run and fail once one recorded decision (or one
    correction coefficient, or one output) is changed: the comparison cannot pass silently."""
    res = run_case(MUTANT_CASES[policy])
    got = check(res)
    if policy != "none":
        assert got["reused"] > 0, "the case must reuse for the mutation to matter"
    for mutate in MUTATIONS[policy]:
        saved = copy.deepcopy(_records(res)) if policy != "none" else None
        outputs = [[o.clone() for o in gen] for gen in res.outputs]
        what = mutate(res)
        with pytest.raises(Mismatch):
            check(res)
        if saved is not None:                       # undo: the next mutation starts from the honest run
            _records(res)[:] = saved
        res.outputs = outputs
        check(res)
        assert what


# ----------------------------------------------------------------------------- found by the fuzzer


class _Recompiled:
    """A backend standing in for a Dynamo recompile inside a generation: the first call of the
    traced graph runs on one OmniCache graph, every later call on a second one built from the same
    Dynamo graph (Dynamo compiles a new graph for a frame when a guard fails: with
    ``dynamic=True`` and batch 2, diffusers' Flux and Latte fail a guard on the second call —
    "'NoneType' object has no attribute 'size'" — torch 2.13)."""

    def __init__(self, oc):
        self.rec = Recorder(oc)
        self.__name__ = "recompiled"

    def __call__(self, gm, example_inputs):
        first = self.rec(gm, example_inputs)
        state = {"calls": 0, "second": None}

        def run(*args):
            state["calls"] += 1
            if state["calls"] == 1:
                return first(*args)
            if state["second"] is None:
                state["second"] = self.rec(gm, example_inputs)
            return state["second"](*args)
        return run


@pytest.mark.parametrize("context", ["timesteps", "bare"])
def test_generation_split_over_recompiled_graphs_keeps_its_places(context):
    """Found by the fuzzer: Dynamo recompiled inside a generation (a guard failed on the
    second call) and each graph counted its own steps and CFG slots — step 0's uncond call
    became slot 0 of the second graph, and at step 1 the cond call reused the uncond residual.
    The step / slot counts are now the model's (per generation context, or per thread and
    input signature without one), shared by its graphs; caches stay per graph."""
    model = get_model("flux", (2, 2))
    oc = omnicompile.OmniCache(policy="static", reuse_steps=[1, 2, 3], inner_backend="eager")
    backend = _Recompiled(oc)
    fn = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    outs, places = run_generation(fn, "flux", Shape(1, (4, 4)), 4, "split", context, 0)
    first, second = backend.rec.graphs
    got = [(r.step, r.slot) for g in (first, second) for r in g.report.steps]
    assert got == places, f"recorded {got}, the loop's {places}"
    assert sum(replay(g)["reused"] for g in (first, second)) > 0     # every call equals the reference


def test_cond_guard_with_dynamic_true_caches_the_graph():
    """Found by the fuzzer: with ``dynamic=True`` Dynamo passes float module attributes
    (LayerNorm eps) as 0-d tensors read with ``.item()``; a span reading such a SymFloat was
    refused for ``torch.cond`` (``non_tensor_operand``).  The scalar is now recomputed inside
    the compute branch."""
    model = get_model("flux", (2, 2))
    oc = omnicompile.OmniCache(policy="static", guard="cond", interval=2, warmup=1, inner_backend="eager")
    rec = Recorder(oc)
    fn = torch.compile(model, backend=rec, fullgraph=True, dynamic=True)
    run_generation(fn, "flux", Shape(1, (4, 4)), 4, "off", "timesteps", 0)
    (graph,) = oc.report().graphs
    assert graph.cached, graph.fallback
    assert replay(rec.graphs[-1])["reused"] > 0          # every call equals the reference


def test_probe_with_dynamic_true_caches_the_graph():
    """The same for the probe's guarded spans (``torch.cond`` too)."""
    model = get_model("flux", (2, 2))
    oc = omnicompile.OmniCache(policy="probe", threshold=0.5, ret_ratio=0.0, inner_backend="eager")
    rec = Recorder(oc)
    fn = torch.compile(model, backend=rec, fullgraph=True, dynamic=True)
    run_generation(fn, "flux", Shape(1, (4, 4)), 6, "off", "timesteps", 0)
    (graph,) = oc.report().graphs
    assert graph.cached, graph.fallback
    assert replay(rec.graphs[-1])["reused"] > 0


def test_cond_guard_with_dynamic_true_under_inductor_is_a_deliberate_refusal():
    """Inductor traces the ``torch.cond`` branches, and a scalar read inside one is an unbacked
    symbol ``layer_norm`` cannot take: the graph goes to Inductor unchanged with the reason (in
    strict mode, so it is a refusal and not an exception) and the output equals the model's."""
    model = get_model("flux", (2, 2))
    oc = omnicompile.OmniCache(policy="static", guard="cond", interval=2, warmup=1, strict=True)
    fn = torch.compile(model, backend=oc, fullgraph=True, dynamic=True)
    outs, _ = run_generation(fn, "flux", Shape(1, (4, 4)), 3, "off", "timesteps", 0)
    graphs = oc.report().graphs
    # (Dynamo may recompile once with the floats specialised: that graph has no scalar and caches)
    assert not graphs[0].cached and graphs[0].fallback.code == "non_tensor_operand", graphs[0].fallback
    assert "guard='variants'" in graphs[0].fallback.message
    assert all(g.cached or g.fallback.code == "non_tensor_operand" for g in graphs), [g.fallback for g in graphs]


def test_fuzz_case_20261204_456_recompiled_split_cfg_places_every_call():
    """Found by ``make fuzz`` (seed 20261204, case 456): Latte, layered under ``guard="cond"``,
    split CFG, no generation context, ``dynamic=True``, integer timesteps, two generations.  The
    uncond call's expanded (stride-0) embeddings make Dynamo compile a second graph, whose call
    signature held the symbolic sizes it lifted as inputs: its calls were counted as a stream of
    their own and step 0's uncond call was placed at slot 0 — certain, and wrong."""
    case = Case("latte", 2, "layered", (("cache_interval", 2), ("guard", "cond"), ("target_speedup", 1.5)),
                "split", "bare", True, True, (Gen(8, Shape(2, (8, 8)), 0), Gen(8, Shape(2, (8, 8)), 2)))
    check(run_case(case))
