"""A naive DAAM for tests: materialises softmax(QKᵀ) per layer and head in float64 and aggregates it
as daam 0.2.0 does (bicubic up-sampling of every per-(layer, head) map, optional clamp, mean)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0


class NaiveRecorder:
    """Installs recording processors on every attn2 module; the output still comes from AttnProcessor2_0."""

    def __init__(self, pipe, layer_names):
        self.pipe = pipe
        self.names = list(layer_names)
        self.sums: dict[str, torch.Tensor] = {}

    def __enter__(self):
        mods = dict(self.pipe.unet.named_modules())
        self._orig = {}
        for name in self.names:
            mod = mods[name]
            self._orig[name] = mod.processor
            mod.set_processor(self._make(name))
        return self

    def __exit__(self, *exc):
        mods = dict(self.pipe.unet.named_modules())
        for name, proc in self._orig.items():
            mods[name].set_processor(proc)

    def _make(self, name):
        stock = AttnProcessor2_0()

        def proc(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *a, **kw):
            out = stock(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
            B = hidden_states.shape[0]
            q = attn.to_q(hidden_states)
            k = attn.to_k(encoder_hidden_states)
            d = k.shape[-1] // attn.heads
            q = q.view(B, -1, attn.heads, d).transpose(1, 2).double()
            k = k.view(B, -1, attn.heads, d).transpose(1, 2).double()
            p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)  # [B, H, L, S]
            self.sums[name] = self.sums.get(name, 0) + p
            return out

        return proc

    def aggregate(self, latent_hw, rows, clamp: bool, skip_factors=(8,)) -> torch.Tensor:
        """daam's aggregation over the recorded layers: ``[len(rows), S, H_lat, W_lat]`` float64."""
        H, W = latent_hw
        maps, count = 0, 0
        for name in self.names:
            p = self.sums[name][rows]  # [R, heads, L, S]
            L = p.shape[2]
            h, w, f = H, W, 1
            while h * w > L:
                h, w, f = (h + 1) // 2, (w + 1) // 2, f * 2
            if f in skip_factors:
                continue
            for head in range(p.shape[1]):
                m = p[:, head].transpose(1, 2).reshape(p.shape[0], p.shape[3], h, w)
                m = F.interpolate(m, size=(H, W), mode="bicubic")
                if clamp:
                    m = m.clamp(min=0)
                maps = maps + m
                count += 1
        return maps / count
