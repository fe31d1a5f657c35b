"""Token, frame and block caches: run a block on the less redundant rows of one axis only, and
fill the skipped rows from the block's output of the previous step (OmniCache, ``002_…``
§3.2–3.3 and Appendix A: reuse, not ToMe's averaging, so row order and positions stay exact).

Axes (the *roles* come from the graph, see "Placement" below):

* ``token`` — tokens of a frame (image models; the spatial layers of video models; all tokens of
  a joint spatio-temporal model such as Wan), split by :func:`~omnicompile.kernels.token_split`
  (one dst per 2x2 cell of the patch grid; ``patch=k`` matches within k x k patches);
* ``frame`` — the frames of a video, in its *spatial* layers (rows ``B*F`` of ``[B*F, N, C]``),
  split by :func:`~omnicompile.kernels.frame_split` (every other frame is dst);
* ``block`` — the spatial positions of a video, in its *temporal* layers (rows ``B*N`` of
  ``[B*N, F, C]``), split like tokens on the patch grid.

A wrapped *region* is the part of a block that depends on its main stream input (the rest —
AdaLN tables from the timestep, text key/value projections — does not see the merged rows and
runs in full), cut before the feed-forward sub-layer when ``merge_ffn=False`` (at the point where
only the residual stream carries merged rows on).  With ``N`` rows on the axis and
``r = floor(ratio * N)`` rows to skip (at most the src rows):

1. ``similarity_topk`` scores the region's main input (viewed ``[P, N, Q]``: ``P`` selections,
   e.g. one per frame for the token axis) and returns ``keep_idx [P, N - r]``;
2. ``merge`` gathers every region input indexed by the axis with the same indices — the main
   stream, and side inputs whose rows line up with it (AdaLN tables repeated per frame, text
   states repeated per frame, rotary tables ``[T + N, D]`` whose text rows are kept whole);
3. the region runs on ``N - r`` rows: a copy of its nodes whose integer size arguments
   (``view``/``reshape``/``expand``/``unflatten`` sizes, split sizes, slice bounds) are
   re-specialised to the reduced size;
4. ``unmerge`` writes the computed rows of each output indexed by the axis into that output's
   value from the previous step (a state tensor), which becomes the new state.  Outputs not
   indexed by the axis (Flux's text stream) pass through.  With ``merge_fill="residual"`` the state
   is ``output - input`` per row and a skipped row gets this step's input plus it (ToMeSD-style
   reuse of the sub-layer's contribution; needs the output to be the input's residual stream).

The first call of a generation (or after ``reset``) runs the *full* variant: nothing merged,
the state tensors are the region outputs themselves.

Staleness: rotation and refresh.  With a fixed split a src row similar to its dst (background)
is skipped at every step and keeps its value from the full first call — pure-noise features —
for the whole generation.  With ``merge_rotate`` a wrap holds one split per phase
(``Wrap.splits``): the dst position in each 2x2 cell cycles through offsets 0, 3, 1, 2
(``ROTATION``; the frame axis alternates the dst parity, the packed 1-D axis cycles 0, 2, 1, 3),
so every row is dst — computed — at least once every 4 (frames: 2) calls.  All phases have one
shape (phases whose lists differ in length, e.g. the odd parity of an odd frame count, are
dropped), so one merged graph serves them: the split index tensors are graph inputs and the
host passes the phase's set (``apply_merge(..., phases=[])``), no host sync.  The runtime
counts the calls of a slot in a generation (``k``, 0 = the full first call: the step index with
no step policy, computed steps with one) and uses phase ``k % lcm(phases)``; with
``merge_refresh=N`` the calls with ``k % N == 0`` run the full variant and re-seed every row.
Measured on the shipped Latte model (``bench/video_bench.py``, 20 steps, batched CFG, PSNR vs
uncached, fixed split -> rotated -> rotated + refresh 2, fill output / residual): token 0.25
17.5 -> 24.4 -> 29.8 / 21.1 -> 24.5 -> 30.1 dB; frame 0.3 19.5 -> 36.2 -> 38.8 / 22.5 -> 40.2
-> 43.3 dB; block 0.4 15.6 -> 30.4 -> 39.3 / 28.0 -> 41.5 -> 46.9 dB; the fixed split also
loses frame accuracy (0.86 / 0.97 / 0.69 with fill output), every rotated row keeps 1.00.
Hence ``merge_rotate=True`` by default.  A refresh every N calls gives back 1/N of the savings,
and at equal FLOPs a lower ratio does better (all three caches, fill residual: 0.25 41.2 dB vs
0.5 + refresh 2 40.5 dB, both 0.95 of the FLOPs), so ``merge_refresh`` defaults to None.

Re-specialisation and its proof.  Dynamo's graph bakes concrete sizes into its arguments.
The tracer interprets the region under a ``FakeTensorMode`` with a ``ShapeEnv`` in which the
axis size is a symbol (hint: the reduced size), so every node's shape is a sympy expression.
Each symbolic dim carries a *layout*: a list of segments, each a row-major product of factors
(integers, or the axis symbol) — ``[B, n]`` is the ``B*N`` rows of a temporal layer (batch
outer), ``[[T], [n]]`` the text-then-image rows of Flux's joint attention.  Layouts change only
through views (rows regroup in row-major order: a view may split or merge constant factors but
never split the axis), ``cat`` along the dim (segments concatenate) and slices/splits (which must
cut at segment boundaries); every other op must produce dims whose expression already has a
layout (one layout per expression in a region, else it is ambiguous).  Integer arguments of
ops the tracer does not know are refused when they equal the original size of a symbolic dim,
and ops whose result depends on where a row sits (``flip``, ``roll``, ``cumsum``, ``triu``,
``gather``, convolutions, ...) are refused along a merged dim.
The rewrite is then *proved*: every node's symbolic shape evaluated at the original size equals
the shape Dynamo recorded, the re-specialised arguments evaluated there equal the original
arguments, and a concrete fake run of the rewritten region at the reduced size gives every node
the symbolic shape evaluated at that size.  Anything else — an unknown layout, a view that
splits the axis, a slice inside the axis, a side input that could line up in two ways — refuses
the region with a :class:`~omnicompile.passes.common.Reason` and it stays unwrapped.

Side inputs are tagged only when needed: the tracer first runs with the main input tagged
alone; where a broadcast then fails, the side inputs that feed the failing node are tried with
their candidate layouts (the main input's layout on a dim of the same size; ``[[c], [n]]`` or
``[[n], [c]]`` on a longer dim), the one that lets the trace get furthest is kept, and two
candidates that both succeed make the region ambiguous.  The first wrappable block of a list is
traced; the next ones, when they match it node for node (same ops and constants), reuse its
symbolic shapes and templates and are proved again on their own nodes.

Placement (S2T/T2S): the geometry comes from the patch embedding (``conv2d`` output
``[B*F, C, h, w]`` with a 5-D latent input ``[B, C, F, H, W]``: video; ``conv2d`` alone: image;
``conv3d`` ``[B, C, f, h, w]``: joint video; a 3-D latent input ``[B, N, C]`` and no conv:
packed tokens without a grid, split 1-D).  A region's role is read from where the traced axis
lands in its self-attention: the token and frame axes must be a spatial layer's sequence /
batch, the block axis a temporal layer's batch; otherwise the region is refused
(``merge_placement``).  The first and last ``merge_exclude`` blocks of every list are never
wrapped (the paper excludes them: most sensitive to caching).

Ablations (the paper's §4 / Figs. 9-10, for ``bench/``):

* ``merge_placement="swapped"`` — S2S/T2T, read from the paper's own description: "swapping the
  positions of frame caching and block caching" (Fig. 9: r_t = 0, "Token Merge is not included
  since it can only be applied in the spatial layer").  Each cache keeps its rows, its features
  for the similarity and its split; only the layer type changes.  The *frame* cache wraps the
  temporal layers: frames are scored whole per sample (``[B, F, N*C]``, every other frame dst)
  and the same ``r_f`` frames leave every position's temporal sequence (``[B*N, F, C] ->
  [B*N, F - r_f, C]``: T2T, temporal attention sees a lower frame rate).  The *block* cache
  wraps the spatial layers: spatial positions (blocks, ``1 x 1 x F``) are scored whole per
  sample (``[B, N, F*C]``, one dst per 2x2 cell) and the same ``r_b`` positions leave every
  frame's token sequence (``[B*F, N, C] -> [B*F, N - r_b, C]``: S2S).  In both the merged
  axis is the layer's attention *sequence*, and one choice per sample is repeated over its
  ``G`` rows (``Wrap.groups``: ``G = N`` positions for frames, ``F`` frames for blocks), which
  needs the rows before the axis proved ``[B, G]`` batch-outer (traced glue, as for the
  paper's frame / block caches; else ``merge_batch_layout``).  The token cache has no swapped
  placement (a temporal layer does not hold a frame's tokens as rows): refused
  (``merge_placement``, subject ``token``); so are the frame / block caches of models without
  separate spatial and temporal layers (images, Wan's joint attention).
* ``merge_fill="interpolate"`` — the paper's interpolation baselines (FI/BI/TI): no cache, a
  skipped row takes *this* step's output of the dst row it matches best (highest cosine similarity
  on the scored view, within its patch with ``patch``; first dst on ties) — ToMe's
  unmerge-by-copy, of the whole region output like ``merge_fill="output"``.  Computed in the graph
  by :func:`interpolation_index` (torch ops; the kernels return no match) and applied with
  ``merge``.  No state is held; the first call of a generation still runs in full, so the
  schedule and FLOPs equal the cached fills' and only the fill differs.

Facts written: none on Dynamo's graph; :func:`plan_merge` returns a :class:`MergePlan`
and :func:`apply_merge` rewrites any graph that still holds the planned regions (the
step policies' variants keep node names), appending the state inputs and outputs and, as
inputs after the state, the split index tensors (Inductor's AOT path takes only Dynamo's
parameters as module attributes).

Options: :class:`MergeOptions` (``options.py``) holds every option of the three caches, with the
names, defaults and validation of the user-facing options (``token_ratio``, ``frame_ratio``,
``block_ratio``, ``patch``, ``merge_ffn``, ``merge_exclude``, ``merge_fill``,
``merge_placement``, ``merge_rotate``, ``merge_refresh``); ``plan_merge(gm, blocks, options)``
takes one and the plan keeps it (``MergePlan.refresh`` is ``options.merge_refresh``).

Modules, in dependency order:

* ``options`` — :class:`MergeOptions`, the choice lists (:data:`AXES`, :data:`FILLS`,
  :data:`PLACEMENTS`) and the layer each cache wraps per placement (:data:`LAYERS`);
* ``layout`` — :class:`Layout` (the rows of one dim), the template vocabulary (``Size``,
  ``Ref``, ``materialize``), :class:`Refuse` (a region given up on) and op names;
* ``prove`` — the proof of a re-specialised region and its transfer to identical blocks;
* ``trace`` — the symbolic tracer (:class:`Tracer`, :func:`trace_region`);
* ``geometry`` — :class:`Geometry`, :func:`find_geometry`, the src/dst splits
  (:func:`split_for`, :data:`ROTATION`);
* ``rewrite`` — :func:`apply_merge`, :func:`state_specs`, :func:`present_wraps` and the op
  :func:`interpolation_index`;
* ``analyze`` — per-block analysis: main input, side inputs, placement, the feed-forward cut;
* ``plan`` — :func:`plan_merge` and its records (:class:`MergePlan`, :class:`Wrap`,
  :class:`TaggedInput`, :class:`TaggedOutput`).
"""
from .options import AUTO_RATIOS, AXES, FILLS, LAYERS, PLACEMENTS, MergeOptions
from .layout import Layout, Refuse
from .prove import prove_region
from .trace import Tracer, trace_region
from .geometry import ROTATION, Geometry, find_geometry, split_for
from .rewrite import apply_merge, interpolation_index, present_wraps, state_specs
from .plan import MergePlan, TaggedInput, TaggedOutput, Wrap, plan_merge

__all__ = ["MergeOptions", "MergePlan", "plan_merge", "apply_merge", "state_specs", "present_wraps",
           "interpolation_index", "Geometry", "find_geometry", "split_for", "ROTATION", "Wrap", "TaggedInput",
           "TaggedOutput", "Layout", "Refuse", "Tracer", "trace_region", "prove_region", "AXES", "AUTO_RATIOS", "FILLS",
           "PLACEMENTS", "LAYERS"]
