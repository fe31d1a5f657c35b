"""Every ConfigError: unknown keys, wrong types, out-of-range values — by all three routes."""
import pytest
import torch

import omnicompile
from omnicompile import ConfigError, OmniCache, OmniCacheConfig


def test_defaults_and_roundtrip():
    c = OmniCacheConfig()
    assert c.policy == "static" and c.interval == 2 and c.guard == "auto"
    assert OmniCacheConfig.from_options(c.to_dict()) == c
    with pytest.raises(Exception):
        c.interval = 3  # frozen


def test_same_names_for_object_and_options():
    a = OmniCache(policy="static", interval=3, warmup=1).config
    b = OmniCacheConfig.from_options({"policy": "static", "interval": 3, "warmup": 1})
    assert a == b


@pytest.mark.parametrize("fields, field, words", [
    ({"polcy": "static"}, "polcy", "did you mean 'policy'"),
    ({"policy": "magic"}, "policy", "layered, none, probe, static"),
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
