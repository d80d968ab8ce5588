"""A naive DAAM for joint-attention transformers (tests only): materialises the whole joint softmax per block
and head in float64, from q/k rebuilt from the module's weights (RoPE applied here in float64, independently of
diffusers' helper), and keeps its image-query × text-key block, per transformer pass (cond / uncond)."""

from __future__ import annotations

import math

import torch
from diffusers.models.attention_processor import JointAttnProcessor2_0

try:
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
except ImportError:  # diffusers < 0.35: no Flux tracing (tests/test_joint.py skips it)
    FluxAttnProcessor = None


def _rope64(x: torch.Tensor, emb) -> torch.Tensor:
    """Flux's rotary embedding on ``x [B, S, H, D]`` (pairs (2i, 2i+1) rotate by the angle in cos/sin)."""
    cos, sin = (e.double()[None, :, None, :] for e in emb)
    x = x.double()
    re, im = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-im, re], dim=-1).flatten(3)
    return x * cos + rotated * sin


class NaiveJointRecorder:
    """Installs recording processors on every joint-attention module of ``pipe.transformer``; the output still
    comes from the stock processor. ``sums[(name, pass)]`` is float64 ``[B, H, N_image, N_text]``."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.model = pipe.transformer
        self.sums: dict[tuple[str, str], torch.Tensor] = {}
        self.flux = type(self.model).__name__ == "FluxTransformer2DModel"

    def names(self) -> list[str]:
        """Joint-attention modules, in block order (Flux: double-stream, then single-stream blocks)."""
        out = []
        for name, mod in self.model.named_modules():
            proc = getattr(mod, "processor", None)
            if self.flux and isinstance(proc, FluxAttnProcessor):
                out.append(name)
            elif not self.flux and isinstance(proc, JointAttnProcessor2_0) and mod.add_k_proj is not None:
                out.append(name)
        return out

    def __enter__(self):
        mods = dict(self.model.named_modules())
        self._orig = {}
        for name in self.names():
            self._orig[name] = mods[name].processor
            mods[name].set_processor(self._flux(name) if self.flux else self._sd3(name))
        self._last_t = None
        self._hook = self.model.register_forward_pre_hook(self._on_call, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        mods = dict(self.model.named_modules())
        for name, proc in self._orig.items():
            mods[name].set_processor(proc)
        self._hook.remove()

    def _on_call(self, module, args, kwargs):
        t = kwargs["timestep"]
        if kwargs.get("skip_layers") is not None:  # SD3.5 skip-layer guidance: not part of DAAM
            self.pass_ = "skip"
            return
        self.pass_ = "uncond" if self._last_t is not None and torch.equal(t, self._last_t) else "cond"
        self._last_t = t.clone()
        self.txt_len = kwargs["encoder_hidden_states"].shape[1]

    def _add(self, name, p):
        key = (name, self.pass_)
        self.sums[key] = self.sums.get(key, 0) + p

    def _sd3(self, name):
        stock = JointAttnProcessor2_0()

        def proc(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *a, **kw):
            out = stock(attn, hidden_states, encoder_hidden_states, attention_mask)
            B, N = hidden_states.shape[:2]
            d = attn.to_k.out_features // attn.heads

            def heads(x, norm):
                x = x.view(B, -1, attn.heads, d).transpose(1, 2)
                return norm(x) if norm is not None else x

            q = torch.cat(
                [
                    heads(attn.to_q(hidden_states), attn.norm_q),
                    heads(attn.add_q_proj(encoder_hidden_states), attn.norm_added_q),
                ],
                2,
            )
            k = torch.cat(
                [
                    heads(attn.to_k(hidden_states), attn.norm_k),
                    heads(attn.add_k_proj(encoder_hidden_states), attn.norm_added_k),
                ],
                2,
            )
            p = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(d), dim=-1)
            self._add(name, p[:, :, :N, N:])  # SD3: [image, text]
            return out

        return proc

    def _flux(self, name):
        stock = FluxAttnProcessor()

        def proc(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
            out = stock(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
            d = attn.head_dim
            q = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, (-1, d)))
            k = attn.norm_k(attn.to_k(hidden_states).unflatten(-1, (-1, d)))
            if encoder_hidden_states is not None:
                cq = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, d)))
                ck = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, d)))
                q, k = torch.cat([cq, q], 1), torch.cat([ck, k], 1)
            q, k = _rope64(q, image_rotary_emb).transpose(1, 2), _rope64(k, image_rotary_emb).transpose(1, 2)
            p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
            T = self.txt_len  # Flux: [text, image], also in single-stream blocks
            self._add(name, p[:, :, T:, :T])
            return out

        return proc

    def aggregate(self, grid, rows=slice(None), pass_="cond", names=None, head=None) -> torch.Tensor:
        """Mean over (block, head) of the summed maps: float64 ``[len(rows), N_text, grid_h, grid_w]``."""
        total, count = 0, 0
        for name in names or self.names():
            p = self.sums[(name, pass_)][rows]  # [R, H, N, T]
            if head is not None:
                p = p[:, head : head + 1]
            total = total + p.sum(1)
            count += p.shape[1]
        m = (total / count).transpose(1, 2)  # [R, T, N]
        return m.reshape(m.shape[0], m.shape[1], *grid)
