"""Graph-level planning of omnicompile (installed as ``omnicompile.graphs``): structural
matching with networkx (:mod:`.structure`) and the cost model (:mod:`.cost`).  The only
package of the project that imports networkx; it imports nothing else of ours."""
