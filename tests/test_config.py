"""Every ConfigError: unknown keys, wrong types, out-of-range values — by all three routes."""
import pytest
import torch

import omnicompile
from omnicompile import ConfigError, OmniCache, OmniCacheConfig


def test_defaults_and_roundtrip():
    c = OmniCacheConfig()
    assert c.policy == "static" and c.interval == 2 and c.guard == "auto"
    assert OmniCacheConfig(**c.to_options()) == c and c.to_options() == {}
    p = OmniCacheConfig(policy="probe", threshold=0.2, align_clip=[1, 2], strict=False)
    assert p.to_options() == {"policy": "probe", "threshold": 0.2, "align_clip": [1.0, 2.0], "strict": False}
    assert OmniCacheConfig.from_options(p.to_options()) == p
    assert OmniCacheConfig.from_options(p) == p and OmniCache(p).config == p
    # to_dict has every field: fed back, it sets options the policy never reads
    with pytest.raises(ConfigError, match="'budget' is not used by policy 'static'"):
        OmniCacheConfig.from_options(c.to_dict())
    with pytest.raises(Exception):
        c.interval = 3  # frozen


def test_same_names_for_object_and_options():
    a = OmniCache(policy="static", interval=3, warmup=1).config
    b = OmniCacheConfig.from_options({"policy": "static", "interval": 3, "warmup": 1})
    assert a == b


@pytest.mark.parametrize("fields, field, words", [
    ({"polcy": "static"}, "polcy", "did you mean 'policy'"),
    ({"policy": "magic"}, "policy", "fast, layered, none, probe, quality, static"),
    ({"policy": 3}, "policy", "type str"),
    ({"interval": 0}, "interval", ">= 1"),
    ({"interval": 2.5}, "interval", "type int"),
    ({"interval": True}, "interval", "type int"),
    ({"warmup": -1}, "warmup", ">= 0"),
    ({"cooldown": "2"}, "cooldown", "type int"),
    ({"num_steps": 0}, "num_steps", "positive"),
    ({"reuse_steps": "4,6"}, "reuse_steps", "list"),
    ({"reuse_steps": [2, -1]}, "reuse_steps", "non-negative"),
    ({"reuse_steps": [0, 2]}, "reuse_steps", "step 0"),
    ({"guard": "maybe"}, "guard", "auto, variants, cond"),
    ({"inner_backend": "tvm"}, "inner_backend", "inductor, eager"),
    ({"dump_dir": 5}, "dump_dir", "type"),
])
def test_config_errors_name_field_value_and_allowed(fields, field, words):
    with pytest.raises(ConfigError) as e:
        OmniCache(**fields)
    msg = str(e.value)
    assert repr(field) in msg and words in msg
    assert e.value.field == field
    with pytest.raises(ConfigError):
        OmniCacheConfig.from_options(fields)


def test_options_dict_must_be_dict():
    with pytest.raises(ConfigError, match="options"):
        OmniCacheConfig.from_options(["policy"])


def test_reuse_steps_normalised():
    c = OmniCacheConfig(reuse_steps=[8, 4, 4, 6])
    assert c.reuse_steps == (4, 6, 8)


def test_bad_options_through_torch_compile_name_the_field():
    lin = torch.nn.Linear(2, 2)
    c = torch.compile(lin, backend="omnicache", options={"interval": -3})
    with pytest.raises(Exception) as e:
        c(torch.randn(1, 2))
    assert "interval" in str(e.value) and "-3" in str(e.value)


def test_env_dump_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("OMNICACHE_DUMP_DIR", str(tmp_path))
    assert OmniCacheConfig.from_options({}).dump_dir == str(tmp_path)


def test_policy_registry_is_extensible():
    from omnicompile.policy import SchedulePolicy

    @omnicompile.register_policy("test_every_other")
    class EveryOther(SchedulePolicy):
        def decide(self, step, num_steps, n_spans):
            return (step % 2 == 1,) * n_spans

    try:
        assert OmniCache(policy="test_every_other").config.policy == "test_every_other"
    finally:
        omnicompile.POLICIES.pop("test_every_other")


@pytest.mark.parametrize("fields, field", [
    ({"budget": float("nan")}, "budget"), ({"threshold": float("nan")}, "threshold"),
    ({"threshold": float("inf")}, "threshold"), ({"ret_ratio": float("nan")}, "ret_ratio"),
    ({"target_speedup": float("nan")}, "target_speedup"), ({"target_speedup": float("inf")}, "target_speedup"),
    ({"token_ratio": float("nan")}, "token_ratio"), ({"block_ratio": float("nan")}, "block_ratio"),
    ({"align_clip": (1.0, float("inf"))}, "align_clip"), ({"reuse_steps": {1: 2}}, "reuse_steps"),
    ({"dump_dir": ""}, "dump_dir"),
])
def test_non_finite_numbers_dicts_and_empty_paths_are_refused_at_construction(fields, field):
    """NaN passed every range check (comparisons with NaN are false) and failed only generations
    later; a dict of reuse steps iterated its keys; an empty dump folder was accepted."""
    with pytest.raises(ConfigError) as e:
        OmniCacheConfig(**fields)
    assert e.value.field == field


# ----------------------------------------------------------------------------- options a policy never reads


@pytest.mark.parametrize("fields, users", [
    ({"policy": "static", "threshold": 0.1}, "probe"),
    ({"policy": "probe", "budget": 0.5}, "trajectory, trajectory-fast, trajectory-slow"),
    ({"policy": "none", "interval": 3}, "static"),
    ({"policy": "none", "target_speedup": 2.0}, "layered, probe, static, trajectory"),  # the default value, set
    ({"policy": "balanced", "interval": 3}, "static"),                 # a preset sets the schedule itself
    ({"policy": "static", "cache_interval": 3}, "layered"),
    ({"policy": "probe", "min_gap": 3}, "trajectory, trajectory-fast, trajectory-slow"),
    ({"policy": "probe", "warmup": 3}, "static, trajectory, trajectory-fast, trajectory-slow"),
    ({"policy": "layered", "interval": 3}, "static"),
    ({"policy": "layered", "correction": False}, "trajectory, trajectory-fast, trajectory-slow"),
    ({"policy": "static", "calibrate": "cal.json"}, "layered, trajectory, trajectory-fast, trajectory-slow"),
    ({"policy": "trajectory", "cache_interval": 3}, "layered"),
    ({"threshold": 0.1}, "probe"),                                       # policy left to its default: static
])
def test_an_option_the_policy_never_reads_is_refused_by_every_route(fields, users):
    """``policy="static", threshold=0.1`` ran a static schedule and ignored the threshold
    (``target_speedup`` was once refused here for trajectory and probe: every step policy reads
    it now, ``tests/test_targets.py``)."""
    from omnicompile.cli.common import UsageError, config_from_options
    (name, value), = [(k, v) for k, v in fields.items() if k != "policy"]
    policy = fields.get("policy", "static")
    with pytest.raises(ConfigError) as e:
        OmniCacheConfig(**fields)
    assert e.value.field == name and e.value.value == value
    head = f"option {name!r} is not used by policy {policy!r}; it is used by: "
    assert head in str(e.value)
    listed = str(e.value).split(head)[1].split(", ")
    # the built-in users, and any plugin registered in this process (tests/toy_policy.py reads warmup)
    assert set(users.split(", ")) <= set(listed) and listed == sorted(listed)
    assert all(name in omnicompile.POLICIES[p].options for p in listed)
    with pytest.raises(ConfigError, match=f"not used by policy {policy!r}"):
        OmniCache(**fields)
    with pytest.raises(ConfigError, match=f"not used by policy {policy!r}"):
        OmniCacheConfig.from_options(fields)
    with pytest.raises(UsageError, match=f"option {name!r} is not used by policy {policy!r}"):
        config_from_options(dict(fields))                # the CLI's --options


def test_unread_option_through_torch_compile_names_it():
    lin = torch.nn.Linear(2, 2)
    c = torch.compile(lin, backend="omnicache", options={"policy": "static", "threshold": 0.1})
    with pytest.raises(Exception) as e:
        c(torch.randn(1, 2))
    assert "option 'threshold' is not used by policy 'static'; it is used by: probe" in str(e.value)


def test_defaults_never_count_as_set_and_common_options_go_with_every_policy():
    common = dict(num_steps=10, guard="auto", inner_backend="eager", strict=True, dump_dir="d", token_ratio=0.2,
                  frame_ratio=0.1, block_ratio=0.1, patch=2, merge_ffn=True, merge_exclude=1, merge_fill="output",
                  merge_placement="paper", merge_rotate=False, merge_refresh=2)
    for policy in ("none", "static", "probe", "trajectory", "trajectory-slow", "trajectory-fast", "layered"):
        c = OmniCacheConfig(policy=policy, **common)
        assert c.threshold == 0.4 and c.interval == 2 and not c.is_set("threshold") and c.is_set("num_steps")
    # replace() keeps what was set, so switching policy under a set option is refused too
    c = OmniCacheConfig(policy="static", interval=3)
    assert c.replace(warmup=1).is_set("interval") and not c.replace(warmup=1).is_set("budget")
    with pytest.raises(ConfigError, match="option 'interval' is not used by policy 'probe'"):
        c.replace(policy="probe")
    assert OmniCacheConfig(policy="static").replace(policy="probe").policy == "probe"


def test_which_policy_reads_an_option_comes_from_the_policies_declarations():
    """A plugin declares the options it reads (``Policy.options``): they are accepted with it and
    named as its own in the error of a policy that does not read them; one it does not declare
    is refused."""
    from omnicompile.policy import SchedulePolicy

    @omnicompile.register_policy("test_thresholded")
    class Thresholded(SchedulePolicy):
        options = ("threshold", "warmup")

        def decide(self, step, num_steps, n_spans):
            return (step >= self.config.warmup,) * n_spans

    try:
        assert OmniCache(policy="test_thresholded", threshold=0.2, warmup=1).config.threshold == 0.2
        with pytest.raises(ConfigError, match="it is used by: probe, test_thresholded"):
            OmniCacheConfig(policy="static", threshold=0.2)
        with pytest.raises(ConfigError, match="option 'interval' is not used by policy 'test_thresholded'"):
            OmniCacheConfig(policy="test_thresholded", interval=3)
    finally:
        omnicompile.POLICIES.pop("test_thresholded")


def test_trajectory_presets_take_an_explicit_budget_even_at_the_default_value():
    """A preset's own budget / max_run apply when the option is not set; ``budget=0.4`` (the
    field's default) set on ``trajectory-slow`` was taken for "not set" and gave 0.5."""
    from omnicompile.registry import make_policy
    assert make_policy(OmniCacheConfig(policy="trajectory-slow")).budget == 0.5
    assert make_policy(OmniCacheConfig(policy="trajectory-slow", budget=0.4)).budget == 0.4
    assert make_policy(OmniCacheConfig(policy="trajectory-fast", max_run=1)).max_run == 1
    assert make_policy(OmniCacheConfig(policy="trajectory-fast")).max_run == 3
