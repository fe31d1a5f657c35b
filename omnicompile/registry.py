"""The policy registry: policy name -> policy class.

It imports nothing of omnicompile's, so that the config (which checks a name against it),
the policy protocol and the policies themselves can all import it without a cycle.  The
built-in policies register themselves when :mod:`omnicompile.policies` is imported (which
``import omnicompile`` does); a plugin registers with the decorator::

    @omnicompile.register_policy("my-policy")
    class MyPolicy(omnicompile.SchedulePolicy): ...
"""
from __future__ import annotations

from typing import Callable

__all__ = ["POLICIES", "register_policy", "policy_class", "make_policy"]

#: name -> policy class (see :class:`omnicompile.policy.Policy` for the protocol)
POLICIES: dict[str, type] = {}


def register_policy(name: str) -> Callable[[type], type]:
    """Class decorator: register the policy class under ``name`` (sets ``cls.name``).

    A name can be registered once; registering another class under a taken name raises
    ``ValueError`` (``POLICIES.pop(name)`` removes a registration)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a policy name must be a non-empty string, got {name!r}")

    def deco(cls: type) -> type:
        if name in POLICIES and POLICIES[name] is not cls:
            raise ValueError(f"policy {name!r} is already registered by {POLICIES[name].__name__}")
        POLICIES[name] = cls
        cls.name = name
        return cls
    return deco


def policy_class(name: str) -> type:
    """The class registered under ``name`` (``KeyError`` naming the registered ones)."""
    try:
        return POLICIES[name]
    except KeyError:
        raise KeyError(f"no policy {name!r} is registered (registered: {', '.join(sorted(POLICIES))})") from None


def make_policy(config):
    """The policy object of ``config`` (``config.policy`` is checked when the config is built)."""
    return policy_class(config.policy)(config)
