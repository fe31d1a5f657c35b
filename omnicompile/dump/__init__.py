"""Graph dumps: what the backend saw, what it found, what it will do, what it compiled.

One function writes the dump of one compiled graph, :func:`write_graph_dump`.  Two callers:

* the backend, when ``dump_dir=`` (or ``OMNICACHE_DUMP_DIR``) is set — from inside a user's
  own pipeline, once per graph Dynamo hands over, with its analysis, report and runtime;
* ``omnicache dump SPEC --out DIR`` (:mod:`omnicompile.cli.inspect`), which traces a model
  through an :class:`~omnicompile.OmniCache` and dumps each of ``oc.graphs``.

Files, flat in the dump folder and prefixed ``graph{id}_`` so that several graphs (graph
breaks, recompilations) share one folder; graph ids count from 0 per ``OmniCache``::

    index.html                     every graph of the folder, with links (rewritten each time)
    graph0_index.html              one page per graph: summary, images, tables, links
    graph0_before.py / .txt        Dynamo's graph: re-loadable module / print_readable (shapes, source lines)
    graph0_after_NAME.py / .txt    each rewritten graph the runtime compiled, by its name
                                   (``variant_CR``, ``cond``, ``probe``, ``measure`` ...), same forms
    graph0_blocks.json             block lists, groups, units, stream links, spans, refusals, inputs
    graph0_costs.csv               per unit: nodes, matmul ops, FLOPs, parameter and stream bytes
    graph0_units.dot               the unit dependency graph (Graphviz text)
    graph0_units.svg | .png        its rendering: ``dot`` when installed, else a matplotlib drawing
    graph0_plan.json / .png        the runtime's preview over N steps (step x unit heatmap)
    graph0_report.md / .json       the backend's report of the graph, when there is one
    graph0_manifest.json           what was written, and what could not be (errors)

**Nothing is simulated or rebuilt.**  The dump shows the backend's own objects: the rewritten
graphs are the runtime's ``graphs`` (what it handed the inner backend), each with its
``signatures`` entry (the inputs and outputs it appends); the plan is
``runtime.preview(steps)``, a :class:`~omnicompile.preview.Preview` from the same rules the
runtime's calls follow (``graph*_plan.json`` is ``Preview.to_dict()``); the policy and guard
come from the graph's report.  A graph compiled unchanged — or a dump written without its
runtime — has no rewritten graphs and previews every step computed
(:meth:`Preview.computed <omnicompile.preview.Preview.computed>`, its ``note`` says why).
Only the analysis passes run again, on a copy of the graph, when the caller does not pass the
backend's results (:func:`analyze_graph`).

**The plan.**  Per span and step: ``C`` computed, ``R`` reused, ``F`` forced (reuse asked for,
but the span has no cache yet: the runtime computes it), ``?`` decided at run time on the
device (the probe).  The *ideal speedup* divides the estimated FLOPs of the generation by the
FLOPs left after skipping the reused spans — an upper bound that ignores elementwise work,
the residual adds and dispatch overhead (with ``?`` steps counted as reused, "at most").

Modules, one concept each: :mod:`.info` (the analysis of a graph, the preview),
:mod:`.tables` (block map, unit costs, unit dependency graph), :mod:`.draw` (DOT text,
Graphviz / matplotlib rendering, plan heatmap), :mod:`.code` (re-loadable graph code,
:func:`load_graph`), :mod:`.html` (the pages), :mod:`.write` (:func:`write_graph_dump` and
its manifest), :mod:`.errors`.

Dumping never breaks compilation: every step that fails is logged, recorded in the manifest
and on the graph's page, and the others still run — except with ``strict=True`` (the
backend passes ``OmniCacheConfig.strict``, ``OMNICACHE_STRICT=1``), where the exception
propagates.  matplotlib draws the PNGs (the ``viz`` extra); without it the images are skipped
with that message in either mode.  Graphviz ``dot`` renders the SVG when it is on ``PATH``.
"""
from omnicompile.dump.code import graph_module_source, load_graph
from omnicompile.dump.draw import RENDERERS, dot_available, draw_plan, render_unit_graph, require_matplotlib, to_dot
from omnicompile.dump.errors import DumpError, VizUnavailable
from omnicompile.dump.html import write_index
from omnicompile.dump.info import (
    DEFAULT_STEPS, GraphInfo, analyze_graph, graph_preview, merged_reasons, policy_text, preview_steps,
)
from omnicompile.dump.tables import Edge, Region, block_map, unit_costs, unit_graph
from omnicompile.dump.write import write_graph_dump

__all__ = ["DEFAULT_STEPS", "RENDERERS", "DumpError", "VizUnavailable", "GraphInfo", "Region", "Edge",
           "analyze_graph", "graph_preview", "preview_steps", "merged_reasons", "policy_text", "block_map",
           "unit_costs", "unit_graph", "to_dot", "render_unit_graph", "draw_plan", "graph_module_source",
           "load_graph", "write_graph_dump", "write_index", "require_matplotlib", "dot_available"]
