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
        if self.owner.reuse and self.key in store:
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
