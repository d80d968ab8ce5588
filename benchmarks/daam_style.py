"""A re-implementation of the capture method of daam 0.2.0 (castorini/daam), for benchmarking only.

NOT the daam package (it pins diffusers 0.21.2, so it is not installed here) and not used by
daam_fast: it reproduces the *method* daam 0.2.0 uses, so its cost can be measured beside vanilla
attention and daam_fast in the same run:

- the cross-attention modules of the UNet's down and up blocks (``attn2``; mid block off, as daam's
  default) get a processor that computes attention **unfused**: ``baddbmm`` scores, a materialised
  ``softmax`` over all keys (``Attention.get_attention_scores``), then ``bmm`` with the values;
- for every call whose grid is not at 1/8 of the latent, the probabilities are unravelled with a
  Python loop over the key tokens into per-head maps ``[tokens, h, w]`` (conditional half of the CFG
  batch) and added to a running map per ``(factor, layer, head)``, in fp32;
- aggregation (``compute_global_heat_map``) up-samples **every** (layer, head) map bicubically to the
  latent size, clamps it at 0, stacks them all and averages, then keeps the prompt's tokens.

One deliberate difference: maps are up-sampled to the real latent size, where daam 0.2.0 assumes a
64×64 latent (the same for SD 1.x at 512²; for SDXL at 1024² this aggregation works on 128² maps, 4× daam's).

Written from daam 0.2.0's ``trace.py`` / ``heatmap.py`` (``UNetCrossAttentionHooker``,
``RawHeatMapCollection``, ``compute_global_heat_map``) as this project reads them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["DaamStyleProcessor", "DaamStyleTrace", "accumulate", "daam_style_attention", "unravel"]


def daam_style_attention(attn, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask=None):
    """daam 0.2.0's unfused attention on ``[B·H, L, D]`` inputs (diffusers' head-to-batch layout).

    Returns ``(out [B·H, L, D], probs [B·H, L, S])``; ``probs`` is materialised in the input dtype
    (upcast to fp32 inside when the module asks for it), as ``get_attention_scores`` does.
    """
    probs = attn.get_attention_scores(query, key, mask)
    return torch.bmm(probs, value), probs


def unravel(probs: torch.Tensor, heads: int, h: int, w: int) -> torch.Tensor:
    """daam's ``_unravel_attn``: ``[B·H, h·w, S]`` → per-head maps ``[H_cond, S, h, w]`` (fp32) of the
    conditional half of the batch, built with daam's Python loop over the ``S`` key tokens."""
    maps = []
    for map_ in probs.permute(2, 0, 1):  # one [B·H, h·w] slice per token, as daam iterates
        map_ = map_.reshape(map_.size(0), h, w)
        maps.append(map_[map_.size(0) // 2 :].float())  # drop the unconditional half
    return torch.stack(maps, 0).permute(1, 0, 2, 3).contiguous()


def accumulate(maps: dict, factor: int, layer_idx: int, probs: torch.Tensor, heads: int, h: int, w: int) -> None:
    """daam's ``RawHeatMapCollection.update`` for every head of one call: ``maps[(factor, layer, head)]``
    += that head's fp32 ``[S, h, w]`` map (a new tensor per addition, as daam's ``x = x + map``)."""
    for head_idx, heat_map in enumerate(unravel(probs, heads, h, w)):
        key = (factor, layer_idx, head_idx)
        maps[key] = maps[key] + heat_map if key in maps else heat_map


class DaamStyleProcessor:
    """daam 0.2.0's ``UNetCrossAttentionHooker`` method as a diffusers attention processor."""

    def __init__(self, store: DaamStyleTrace, layer_idx: int):
        self.store = store
        self.layer_idx = layer_idx

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        batch_size, sequence_length, _ = hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query, key, value = (attn.head_to_batch_dim(t) for t in (query, key, value))

        out, probs = daam_style_attention(attn, query, key, value, attention_mask)
        self.store.record(self.layer_idx, probs, attn.heads)

        out = attn.batch_to_head_dim(out)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        return out


class DaamStyleTrace:
    """Context manager installing :class:`DaamStyleProcessor` on the UNet's down/up ``attn2`` modules.

    ``maps[(factor, layer, head)]`` holds fp32 ``[tokens, h, w]`` sums over steps (conditional half).
    Assumes classifier-free guidance (batch = unconditional + conditional), as daam 0.2.0 does.
    """

    def __init__(self, pipe):
        self.pipe = pipe
        self.unet = pipe.unet
        self.modules = []
        for blocks in (self.unet.up_blocks, self.unet.down_blocks):  # daam's layer order: up, then down
            for block in blocks:
                for spatial in getattr(block, "attentions", None) or []:
                    for tb in spatial.transformer_blocks:
                        self.modules.append(tb.attn2)
        self.maps: dict[tuple[int, int, int], torch.Tensor] = {}
        self.latent_hw: tuple[int, int] | None = None
        self._saved = []
        self._hook = None

    def __enter__(self) -> DaamStyleTrace:
        self._saved = [m.processor for m in self.modules]
        for i, m in enumerate(self.modules):
            m.set_processor(DaamStyleProcessor(self, i))
        self._hook = self.unet.register_forward_pre_hook(self._on_unet, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        for m, p in zip(self.modules, self._saved, strict=True):
            m.set_processor(p)
        if self._hook is not None:
            self._hook.remove()

    def _on_unet(self, module, args, kwargs) -> None:
        sample = args[0] if args else kwargs["sample"]
        self.latent_hw = (int(sample.shape[-2]), int(sample.shape[-1]))

    def record(self, layer_idx: int, probs: torch.Tensor, heads: int) -> None:
        """Add one call's per-head maps (``probs`` ``[B·H, h·w, S]``) into ``maps``."""
        H, W = self.latent_hw
        factor = int(math.sqrt(H * W // probs.shape[1]))
        if factor == 8:  # daam skips the coarsest grid
            return
        accumulate(self.maps, factor, layer_idx, probs, heads, H // factor, W // factor)

    def compute_global_heat_map(self, n_prompt_tokens: int | None = None) -> torch.Tensor:
        """daam's aggregation: every (layer, head) map bicubically up-sampled to the latent size and
        clamped at 0, stacked, averaged; the first ``n_prompt_tokens + 2`` tokens kept (start, prompt,
        end). Returns fp32 ``[tokens, H_latent, W_latent]``."""
        H, W = self.latent_hw
        merged = [F.interpolate(m.unsqueeze(1), size=(H, W), mode="bicubic").clamp_(min=0) for m in self.maps.values()]
        maps = torch.stack(merged, 0).mean(0)[:, 0]
        return maps if n_prompt_tokens is None else maps[: n_prompt_tokens + 2]
