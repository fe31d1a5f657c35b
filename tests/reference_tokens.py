"""Plain-PyTorch reference of the token / frame / block caches, on diffusers modules.

Written independently of the compiler: each wrapped block's ``forward`` is replaced by a hook
that, when it holds last step's output of the block, scores the block's hidden states with
``similarity_topk_reference``, gathers the kept rows of the hidden states and of every argument
indexed by the same rows (``merge_reference``: text/timestep rows repeated per frame, rotary
tables), runs the original block on them and writes its output rows into last step's output
(``unmerge_reference``); without a held output (first call, after ``reset``) it runs the block
in full.  ``fill="residual"`` keeps ``output - input`` instead and returns ``input + that``.
``fill="interpolate"`` keeps nothing: a skipped row gets this step's output of the dst row it
matches best (cosine similarity, within its patch; ToMe's unmerge-by-copy), the first call of a
generation still running in full.  The whole block is wrapped (the compiler's ``merge_ffn=True``).

Rotation (``merge_rotate``): ``split`` may be a list of splits; the ``k``-th call of a block
(counted per slot, from 0, the full first call included; cleared by ``reset``) uses split
``k % len(split)``.  Refresh (``merge_refresh=N``): a call with ``k % N == 0`` runs the block
in full and re-seeds what it holds, like the first call.

An *adapter* says, per model, how a block's rows are laid out:

* ``rows(hidden) -> (P, N, Q)``: the view of the hidden states whose dim 1 is the merged axis;
* optionally ``score(hidden) -> [Ps, N, Q']``: the rows scored, when one choice of rows serves
  ``P / Ps`` consecutive rows of the ``(P, N, Q)`` view (the swapped placement: a sample's frames
  in a spatial layer, its positions in a temporal one); default: the ``(P, N, Q)`` view;
* ``gather(args, kwargs, take) -> (args, kwargs)``: the other arguments, gathered with
  ``take(tensor, dim, pre_rows, post_rows)`` which gathers ``tensor``'s dim ``dim`` laid out
  ``[pre_rows | P x N | post_rows]`` (``pre_rows`` text rows first, kept whole);
* ``split(result) -> (hidden, rebuild)``: the block's hidden-state output and how to put a new
  one back into the result.
"""
import torch

from omnicompile.kernels import merge_reference, similarity_topk_reference, unmerge_reference


class TokenCacheReference:
    def __init__(self, blocks, adapter, r: int, split, fill: str = "output", refresh=None):
        self.adapter = adapter
        self.r = r
        self.splits = list(split) if isinstance(split, list) else [split]
        self.fill = fill
        self.refresh = refresh
        self.cache = {}
        self.calls = {}
        self.full_calls = 0
        self.slot = 0
        self.merged_calls = 0
        self.originals = []
        for name, block in blocks:
            orig = block.forward
            self.originals.append((block, orig))
            block.forward = self._hook(name, orig)

    def reset(self):
        self.cache.clear()
        self.calls.clear()

    def remove(self):
        for block, orig in self.originals:
            block.forward = orig

    def _hook(self, name, orig):
        def forward(*args, **kwargs):
            key = (self.slot, name)
            hidden, args, kwargs = _take_hidden(args, kwargs)
            p, n, q = self.adapter.rows(hidden)
            held = self.cache.get(key)
            k = self.calls.get(key, 0)
            self.calls[key] = k + 1
            split = self.splits[k % len(self.splits)]
            if self.refresh is not None and k % self.refresh == 0:
                held = None
            if held is None:
                self.full_calls += 1
                a, kw = _put_hidden(args, kwargs, hidden)
                result = orig(*a, **kw)
                out, _ = self.adapter.split(result)
                self.cache[key] = out - hidden if self.fill == "residual" else out
                if self.fill == "interpolate":
                    self.cache[key] = True        # nothing held: only "this slot has run"
                return result
            x3 = hidden.reshape(p, n, q)
            xs = self.adapter.score(hidden) if hasattr(self.adapter, "score") else x3
            skip, keep_s = similarity_topk_reference(xs, self.r, *split)
            share = p // xs.shape[0]                          # rows of the view per choice
            keep = keep_s.repeat_interleave(share, dim=0)     # sample outer, its rows inner
            k = keep.shape[1]

            def take(t, dim, pre=0, post=0):
                shape = list(t.shape)
                rows = shape[dim]
                before = 1
                for s in shape[:dim]:
                    before *= s
                after = 1
                for s in shape[dim + 1:]:
                    after *= s
                if pre or post:
                    assert p == 1
                    idx = torch.cat([torch.arange(pre), keep[0] + pre, torch.arange(post) + pre + n])
                    g = merge_reference(t.reshape(before, rows, after), idx, 1)
                    shape[dim] = pre + k + post
                    return g.reshape(shape)
                groups = rows // n                       # rows = groups x n, groups = p / before
                g = merge_reference(t.reshape(before * groups, n, after), keep, 1)
                shape[dim] = groups * k
                return g.reshape(shape)

            hm = merge_reference(x3, keep, 1).reshape(_reduced(hidden.shape, p, n, k))
            args2, kwargs2 = self.adapter.gather(args, kwargs, take)
            a, kw = _put_hidden(args2, kwargs2, hm)
            result = orig(*a, **kw)
            out_m, rebuild = self.adapter.split(result)
            if self.fill == "interpolate":
                match = _matched_dst(xs, skip, *split)
                source = torch.arange(n).repeat(xs.shape[0], 1)
                for b in range(skip.shape[0]):
                    source[b, skip[b]] = match[b]
                source = source.repeat_interleave(share, dim=0)
                full = unmerge_reference(out_m.reshape(p, k, q), keep, torch.zeros(p, n, q, dtype=out_m.dtype))
                out = torch.stack([full[i, source[i]] for i in range(p)]).reshape(hidden.shape)
            elif self.fill == "residual":
                delta = unmerge_reference((out_m - hm).reshape(p, k, q), keep, held.reshape(p, n, q))
                delta = delta.reshape(hidden.shape)
                self.cache[key] = delta
                out = hidden + delta
            else:
                out = unmerge_reference(out_m.reshape(p, k, q), keep, held.reshape(p, n, q)).reshape(hidden.shape)
                self.cache[key] = out
            self.merged_calls += 1
            return rebuild(out)
        return forward


def _matched_dst(xs, skip, src_idx, dst_idx, src_group=None, dst_group=None):
    """For each skipped row ``skip[b, j]``: the dst row of highest cosine similarity in sample
    ``b`` of ``xs [Ps, N, Q]`` (only dst rows of its patch with groups; first in dst order on ties)."""
    xn = torch.nn.functional.normalize(xs.float(), dim=-1, eps=1e-6)
    match = torch.empty_like(skip)
    for b in range(skip.shape[0]):
        for j, row in enumerate(skip[b].tolist()):
            cand = dst_idx
            if src_group is not None:
                g = src_group[(src_idx == row).nonzero()[0, 0]]
                cand = dst_idx[dst_group == g]
            match[b, j] = cand[int(torch.argmax(xn[b, cand] @ xn[b, row]))]
    return match


def _reduced(shape, p, n, k):
    """``shape`` with the rows of the (P, N, Q) view reduced to K per group: the dim that holds
    the merged rows shrinks by n / k."""
    shape = list(shape)
    prod = 1
    for i, s in enumerate(shape):
        if prod * s >= p * n and (prod * s) % n == 0 and prod < p * n:
            shape[i] = s // n * k
            return shape
        prod *= s
    raise AssertionError("no dim holds the merged rows")


def _take_hidden(args, kwargs):
    kwargs = dict(kwargs)
    if "hidden_states" in kwargs:
        return kwargs.pop("hidden_states"), args, kwargs
    return args[0], args[1:], kwargs


def _put_hidden(args, kwargs, hidden):
    return (hidden, *args), kwargs


# ----------------------------------------------------------------------------- adapters


class DiTTokens:
    """DiT / PixArt BasicTransformerBlock, token axis: hidden [B, N, C]; timestep per sample."""

    def rows(self, h):
        return h.shape[0], h.shape[1], h.shape[2]

    def gather(self, args, kwargs, take):
        return args, kwargs

    def split(self, result):
        return result, lambda out: out


class LatteSpatialFrames:
    """Latte spatial block, frame axis: hidden [B*F, N, C] viewed [B, F, N*C]; the text states
    (arg 2, [B*F, T, C]) and the timestep table (arg 4, [B*F, 6C]) are repeated per frame."""

    def __init__(self, batch, frames):
        self.b, self.f = batch, frames

    def rows(self, h):
        return self.b, self.f, h.shape[1] * h.shape[2]

    def gather(self, args, kwargs, take):
        args = list(args)
        args[1] = take(args[1], 0)        # encoder_hidden_states (after the hidden states)
        args[3] = take(args[3], 0)        # timestep
        return tuple(args), kwargs

    def split(self, result):
        return result, lambda out: out


class LatteTemporalBlocks:
    """Latte temporal block, block axis: hidden [B*N, F, C] viewed [B, N, F*C]; the timestep
    table (arg 4, [B*N, 6C]) is repeated per position."""

    def __init__(self, batch, positions):
        self.b, self.n = batch, positions

    def rows(self, h):
        return self.b, self.n, h.shape[1] * h.shape[2]

    def gather(self, args, kwargs, take):
        args = list(args)
        args[3] = take(args[3], 0)
        return tuple(args), kwargs

    def split(self, result):
        return result, lambda out: out


class LatteSpatialBlocks:
    """Latte spatial block, block axis (``merge_placement="swapped"``, S2S): hidden [B*F, N, C];
    positions scored whole over the sample's frames ([B, N, F*C]), the same positions skipped in
    every frame; text states and the timestep table are per frame, not indexed by positions."""

    def __init__(self, batch, frames):
        self.b, self.f = batch, frames

    def rows(self, h):
        return h.shape[0], h.shape[1], h.shape[2]

    def score(self, h):
        n, c = h.shape[1], h.shape[2]
        return h.reshape(self.b, self.f, n, c).transpose(1, 2).reshape(self.b, n, self.f * c)

    def gather(self, args, kwargs, take):
        return args, kwargs

    def split(self, result):
        return result, lambda out: out


class LatteTemporalFrames:
    """Latte temporal block, frame axis (``merge_placement="swapped"``, T2T): hidden [B*N, F, C];
    frames scored whole over the sample's positions ([B, F, N*C]), the same frames skipped at
    every position; the timestep table is per position, not indexed by frames."""

    def __init__(self, batch, positions):
        self.b, self.n = batch, positions

    def rows(self, h):
        return h.shape[0], h.shape[1], h.shape[2]

    def score(self, h):
        f, c = h.shape[1], h.shape[2]
        return h.reshape(self.b, self.n, f, c).transpose(1, 2).reshape(self.b, f, self.n * c)

    def gather(self, args, kwargs, take):
        return args, kwargs

    def split(self, result):
        return result, lambda out: out


class FluxTokens:
    """Flux double / single blocks, token axis: hidden [B, N, C] (image rows); the rotary
    tables ``image_rotary_emb = (cos, sin)`` are ``[T + N, D]`` (text rows first, kept whole);
    the block returns ``(encoder_hidden_states, hidden_states)``."""

    def __init__(self, text_tokens):
        self.t = text_tokens

    def rows(self, h):
        return h.shape[0], h.shape[1], h.shape[2]

    def gather(self, args, kwargs, take):
        kwargs = dict(kwargs)
        cos, sin = kwargs["image_rotary_emb"]
        kwargs["image_rotary_emb"] = (take(cos, 0, pre=self.t), take(sin, 0, pre=self.t))
        return args, kwargs

    def split(self, result):
        enc, hid = result
        return hid, lambda out: (enc, out)


class WanTokens:
    """Wan block, token axis over the whole clip: hidden [B, F*H*W, C]; the rotary tables
    ``(cos, sin)`` are ``[1, N, 1, D]``."""

    def rows(self, h):
        return h.shape[0], h.shape[1], h.shape[2]

    def gather(self, args, kwargs, take):
        args = list(args)
        cos, sin = args[2]
        args[2] = (take(cos, 1), take(sin, 1))
        return tuple(args), kwargs

    def split(self, result):
        return result, lambda out: out
