"""The built-in policies; importing this package registers them (``import omnicompile``
does).

=================  ==========================================================================
``none``           the graph unchanged (:mod:`.static`)
``static``         a fixed schedule: interval / warm-up / cool-down, or explicit reuse steps
``probe``          DiCache: an online probe decides inside the graph (:mod:`.probe`)
``trajectory``     OmniCache: a calibrated, curvature-guided global schedule with noise
                   correction; presets ``trajectory-slow`` / ``trajectory-fast`` (:mod:`.trajectory`)
``layered``        OmniCache's Layered Cache: a budgeted (block, step) plan (:mod:`.layered`)
=================  ==========================================================================

The protocol they implement is :mod:`omnicompile.policy`; the registry is
:mod:`omnicompile.registry`.
"""
from omnicompile.policies.static import NonePolicy, StaticPolicy
from omnicompile.policies.probe import ProbePolicy
from omnicompile.policies.trajectory import TrajectoryFast, TrajectoryPolicy, TrajectorySlow
from omnicompile.policies.layered import LayeredPolicy

__all__ = ["NonePolicy", "StaticPolicy", "ProbePolicy", "TrajectoryPolicy", "TrajectorySlow", "TrajectoryFast",
           "LayeredPolicy"]
