"""FX passes of omnicompile (installed as ``omnicompile.passes``).

Analysis passes are pure functions over a GraphModule that record facts in
``node.meta["omni.*"]``: :func:`~omnicompile.passes.blocks.find_blocks`,
:func:`~omnicompile.passes.spans.find_spans`, :func:`~omnicompile.passes.spans.find_timestep`.
Rewrite passes (:mod:`omnicompile.passes.rewrite`) build new GraphModules from a copy.
``README.md`` in this folder states the invariants every pass keeps.
"""
