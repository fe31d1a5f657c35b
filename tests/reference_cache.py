"""Plain-PyTorch reference of the static residual cache, for diffusers Flux.

Written independently of the compiler: it swaps each block list of the model for a
runner that, on a computed step, runs the list's blocks and stores ``out - in`` of every
stream (hidden_states, encoder_hidden_states) per CFG slot; on a reused step it returns
``in + stored residual`` and runs no block.  The sampling loop tells it the step, the slot
and whether to reuse.
"""
import torch


class _Runner(torch.nn.Module):
    def __init__(self, owner, key, blocks):
        super().__init__()
        self.owner, self.key, self.blocks = owner, key, list(blocks)

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs=None):
        store = self.owner.cache.setdefault(self.owner.slot, {})
        reuse = self.owner.reuse.get(self.key, False) if isinstance(self.owner.reuse, dict) else self.owner.reuse
        if reuse and self.key in store:
            r_enc, r_hs = store[self.key]
            return encoder_hidden_states + r_enc, hidden_states + r_hs
        enc, hs = encoder_hidden_states, hidden_states
        for b in self.blocks:
            enc, hs = b(hidden_states=hs, encoder_hidden_states=enc, temb=temb,
                        image_rotary_emb=image_rotary_emb, joint_attention_kwargs=joint_attention_kwargs)
        store[self.key] = (enc - encoder_hidden_states, hs - hidden_states)
        return enc, hs


class _Pass(torch.nn.Module):
    def forward(self, hidden_states, encoder_hidden_states, temb=None, image_rotary_emb=None,
                joint_attention_kwargs=None):
        return encoder_hidden_states, hidden_states


class FluxResidualCache:
    def __init__(self, model):
        self.model = model
        self.cache = {}
        self.slot, self.reuse = 0, False

    def begin(self, step, slot, reuse):
        """``reuse``: a bool for every block list, or ``{list name: bool}``."""
        self.step, self.slot, self.reuse = step, slot, reuse

    def __enter__(self):
        self._saved = {}
        for name in ("transformer_blocks", "single_transformer_blocks"):
            ml = getattr(self.model, name)
            self._saved[name] = list(ml)
            runner = _Runner(self, name, self._saved[name])
            setattr(self.model, name, torch.nn.ModuleList([runner] + [_Pass() for _ in ml][1:]))
        return self

    def __exit__(self, *exc):
        for name, blocks in self._saved.items():
            setattr(self.model, name, torch.nn.ModuleList(blocks))
        return False


class _ProbeStart(torch.nn.Module):
    """Runs the probe blocks and remembers the probe's input x and output p."""

    def __init__(self, owner, blocks):
        super().__init__()
        self.owner, self.blocks = owner, list(blocks)

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs=None):
        self.owner.x = hidden_states
        enc, hs = encoder_hidden_states, hidden_states
        for b in self.blocks:
            enc, hs = b(hidden_states=hs, encoder_hidden_states=enc, temb=temb,
                        image_rotary_emb=image_rotary_emb, joint_attention_kwargs=joint_attention_kwargs)
        self.owner.p = hs
        self.owner.decided = False
        return enc, hs


class _ProbeRest(torch.nn.Module):
    """Skips or runs the rest of one block list; the first of them decides for the step."""

    def __init__(self, owner, key, blocks):
        super().__init__()
        self.owner, self.key, self.blocks = owner, key, list(blocks)

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs=None):
        o = self.owner
        if not o.decided:
            o.decide()
        st = o.slot_state()
        win = st["res"].setdefault(self.key, [])
        if o.reuse_now:
            if len(win) >= 2 and o.align:
                (pe, ph), (le, lh) = win[-2], win[-1]
                g = o.gamma
                r_enc, r_hs = (1 - g) * pe + g * le, (1 - g) * ph + g * lh
            else:
                r_enc, r_hs = win[-1]
            return encoder_hidden_states + r_enc, hidden_states + r_hs
        enc, hs = encoder_hidden_states, hidden_states
        for b in self.blocks:
            enc, hs = b(hidden_states=hs, encoder_hidden_states=enc, temb=temb,
                        image_rotary_emb=image_rotary_emb, joint_attention_kwargs=joint_attention_kwargs)
        win.append((enc - encoder_hidden_states, hs - hidden_states))
        del win[:-2]
        return enc, hs


class FluxProbeCache:
    """Plain-PyTorch reference of the probe policy (DiCache logic) for diffusers Flux.

    Per CFG slot: x_prev, p_prev (previous probe input/output), the accumulated error,
    the probe-residual window q (p - x at computed steps) and, per block list, the window
    of the last two residuals of the skipped part.  ``begin(step, slot, force)`` is called
    by the sampling loop before each model call.
    """

    def __init__(self, model, probe_depth=1, threshold=0.4, error="delta_y", align=True, clip=(1.0, 1.5)):
        self.model, self.depth, self.threshold = model, probe_depth, threshold
        self.error, self.align, self.clip = error, align, clip
        self.states = {}
        self.decisions = []

    def begin(self, step, slot, force):
        self.step, self.slot, self.force = step, slot, force

    def slot_state(self):
        return self.states.setdefault(self.slot, {"res": {}, "acc": 0.0, "q": [], "x_prev": None, "p_prev": None})

    @staticmethod
    def _rel(a, b):
        return float((a.float() - b.float()).abs().mean() / b.float().abs().mean())

    def decide(self):
        st = self.slot_state()
        x, p = self.x, self.p
        reuse = False
        if not self.force and st["x_prev"] is not None:
            dy = self._rel(p, st["p_prev"])
            err = dy if self.error == "delta_y" else abs(dy - self._rel(x, st["x_prev"]))
            cand = st["acc"] + err
            reuse = cand < self.threshold and len(st["q"]) >= 1
        if reuse:
            st["acc"] = cand
            if len(st["q"]) >= 2:
                q_prev, q_last = st["q"][-2], st["q"][-1]
                g = float(((p - x) - q_prev).abs().mean() / (q_last - q_prev).abs().mean())
                self.gamma = min(max(g, self.clip[0]), self.clip[1])
        else:
            st["acc"] = 0.0
            st["q"] = (st["q"] + [p - x])[-2:]
        st["x_prev"], st["p_prev"] = x, p
        self.reuse_now = reuse
        self.decided = True
        self.decisions.append((self.step, self.slot, reuse))

    def __enter__(self):
        m = self.model
        self._saved = {n: list(getattr(m, n)) for n in ("transformer_blocks", "single_transformer_blocks")}
        dual, single = self._saved["transformer_blocks"], self._saved["single_transformer_blocks"]
        new_dual = [_ProbeStart(self, dual[:self.depth])] + [_Pass() for _ in range(self.depth - 1)]
        if self.depth < len(dual):
            new_dual += [_ProbeRest(self, "dual", dual[self.depth:])] + [_Pass() for _ in dual[self.depth + 1:]]
        new_single = [_ProbeRest(self, "single", single)] + [_Pass() for _ in single[1:]]
        m.transformer_blocks = torch.nn.ModuleList(new_dual)
        m.single_transformer_blocks = torch.nn.ModuleList(new_single)
        return self

    def __exit__(self, *exc):
        for name, blocks in self._saved.items():
            setattr(self.model, name, torch.nn.ModuleList(blocks))
        return False
