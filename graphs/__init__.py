"""Graph-level planning of omnicompile (installed as ``omnicompile.graphs``): structural
matching with networkx (:mod:`.structure`), the cost model — FLOPs and bytes, concrete and as
sympy expressions in the data sizes (:mod:`.cost`) —, the trajectory schedule (:mod:`.schedule`),
the unit dependency DAG (:mod:`.dag`) and the layered planner — OmniCache's Algorithms 1-3 on it (:mod:`.plan`).
The only package of the project that imports networkx; it imports nothing else of ours."""
