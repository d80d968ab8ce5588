"""Capture processor for UNet cross-attention (``attn2``): SD 1.x/2.x, SDXL and pipelines built on them.

The processor computes exactly what diffusers' ``AttnProcessor2_0`` computes, through the SDPA kernel
that SDPA itself would pick (so the output is bit-identical), keeps that kernel's log-sum-exp, and
hands ``q``, ``k`` and ``lse`` to the capture sink. Any other wrapped processor (LoRA-free custom
ones, IP-Adapter, ...) still produces the output itself; the capture then recomputes ``q``/``k`` and
normalises on its own, so the image is unchanged in every case.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from .attention import attention_with_lse, mask_to_bias

__all__ = ["CaptureSink", "UNetCrossAttnCaptureProcessor"]


class CaptureSink(Protocol):
    """Receives every cross-attention call of a traced model (implemented by the tracer)."""

    def on_attention(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        lse: torch.Tensor | None,
        bias: torch.Tensor | None,
        scale: float,
    ) -> None:
        """``q [B, H, L, D]``, ``k [B, H, S, D]``, ``lse [B, H, L]`` fp32 or None, ``bias`` broadcastable
        to ``[B, H, L, S]`` or None."""


def _prepare_mask(attn: Attention, attention_mask, sequence_length: int, batch_size: int):
    if attention_mask is None:
        return None
    attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
    return attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])


class UNetCrossAttnCaptureProcessor:
    """Wraps the processor of one cross-attention module; stateless beyond the sink reference.

    Args:
        original: the processor that was installed (restored by the tracer on exit).
        sink: where ``q``, ``k`` and ``lse`` of each call go.
        layer_idx: this module's index in the tracer's layer list.
    """

    def __init__(self, original: Any, sink: CaptureSink, layer_idx: int):
        self.original = original
        self.sink = sink
        self.layer_idx = layer_idx
        # Only the stock SDPA processor is reproduced in place; anything else keeps computing the output.
        self.reproduces_original = type(original) is AttnProcessor2_0

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if not self.reproduces_original:
            return self._wrapped_call(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

        # The lines below follow diffusers' AttnProcessor2_0.__call__ step by step, so the output is the same.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = _prepare_mask(attn, attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states, lse = attention_with_lse(query, key, value, attn_mask=attention_mask)
        self.sink.on_attention(
            self.layer_idx, query, key, lse, mask_to_bias(attention_mask, torch.float32), head_dim**-0.5
        )

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states

    def _wrapped_call(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs):
        out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        # Recompute q and k as the standard path builds them; normalise over all keys ourselves.
        with torch.no_grad():
            x = hidden_states
            if attn.spatial_norm is not None:
                x = attn.spatial_norm(x, temb)
            if x.ndim == 4:
                x = x.flatten(2).transpose(1, 2)
            ctx = x if encoder_hidden_states is None else encoder_hidden_states
            if encoder_hidden_states is not None and attn.norm_cross:
                ctx = attn.norm_encoder_hidden_states(ctx)
            mask = _prepare_mask(attn, attention_mask, ctx.shape[1], ctx.shape[0])
            if attn.group_norm is not None:
                x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
            query, key = attn.to_q(x), attn.to_k(ctx)
            head_dim = key.shape[-1] // attn.heads
            query = query.view(x.shape[0], -1, attn.heads, head_dim).transpose(1, 2)
            key = key.view(x.shape[0], -1, attn.heads, head_dim).transpose(1, 2)
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            self.sink.on_attention(self.layer_idx, query, key, None, mask_to_bias(mask, torch.float32), head_dim**-0.5)
        return out
