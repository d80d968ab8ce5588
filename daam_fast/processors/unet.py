"""Capture processor for UNet cross-attention (``attn2``): SD 1.x/2.x, SDXL and pipelines built on them.

The processor that was installed decides the attention kernel. For diffusers' ``AttnProcessor2_0``
(and ``FusedAttnProcessor2_0``, installed by ``pipe.fuse_qkv_projections()``) the capture processor
computes exactly what it computes, through the SDPA kernel that SDPA itself
would pick (so the output is bit-identical); for ``XFormersAttnProcessor`` (what
``pipe.enable_xformers_memory_efficient_attention()`` installs) it makes the same xformers call, in
the lse-returning form (on the diffusers releases whose bodies were checked, see
:mod:`.versions`). Either way it keeps that kernel's log-sum-exp and hands ``q``, ``k`` and
``lse`` to the capture sink. Any other wrapped processor (custom ones, IP-Adapter, ...) still
produces the output itself; the capture then recomputes ``q``/``k`` and normalises on its own, so
the image is unchanged in every case.

Under ``torch.compile`` the sink is reached through the opaque ``daam_fast::sink_attention`` op
(:func:`daam_fast.kernels.ops.emit_attention`), so the attention code traces without graph breaks.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from diffusers.models.attention_processor import (
    Attention,
    AttnProcessor2_0,
    FusedAttnProcessor2_0,
    XFormersAttnProcessor,
)

from ..kernels.ops import emit_attention, register_sink
from .attention import attention_with_lse, mask_to_bias
from .forwarding import Forward, mirror_signature
from .lse_sources import xformers_with_lse
from .versions import reproduces_bodies

__all__ = ["CaptureSink", "UNetCrossAttnCaptureProcessor"]


class CaptureSink(Protocol):
    """Receives every cross-attention call of a traced model (the tracer's accumulator)."""

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

    def fused_attention(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor | None:
        """Attention output ``[B, H, L, D]`` in ``q``'s dtype with this call's capture done in the same kernel,
        or None (nothing done: the processor computes attention itself and calls :meth:`on_attention`).
        ``q [B, H, L, D]``, ``k``/``v`` ``[B, H, S, D]``; called only without a mask and outside torch.compile."""


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
        # Only these stock processors are reproduced in place (exact class: subclasses may change the
        # computation), and only on diffusers releases whose bodies were checked; anything else keeps
        # computing the output itself.
        self.kind = {
            AttnProcessor2_0: "sdpa",
            FusedAttnProcessor2_0: "sdpa_fused",
            XFormersAttnProcessor: "xformers",
        }.get(type(original))
        if self.kind is not None and not reproduces_bodies():
            self.kind = None
        self.reproduces_original = self.kind is not None
        # The attention module passes on only the keywords the wrapped processor names (SlicedAttnProcessor takes
        # no temb; a custom processor may take its own options), and the wrapper forwards exactly those.
        self._forward = Forward(original)
        mirror_signature(self, original)
        # For the compiled path: the sink as an int, and a call counter the op mutates (keeps it alive).
        self._sink_id = register_sink(sink)
        self._calls = torch.zeros((), dtype=torch.int64)

    def _emit(self, q, k, lse, bias, scale) -> None:
        emit_attention(self.sink, self._sink_id, self._calls, self.layer_idx, q, k, lse, bias, scale)

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
        if self.kind == "xformers":
            return self._xformers_call(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

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

        if self.kind == "sdpa_fused":  # FusedAttnProcessor2_0 (pipe.fuse_qkv_projections()): fused linears
            query, key, value = self._fused_projections(attn, hidden_states, encoder_hidden_states)
        else:
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

        hidden_states = None
        if attention_mask is None and not torch.compiler.is_compiling():
            hidden_states = self.sink.fused_attention(self.layer_idx, query, key, value, head_dim**-0.5)
        if hidden_states is None:
            hidden_states, lse = attention_with_lse(query, key, value, attn_mask=attention_mask)
            self._emit(query, key, lse, mask_to_bias(attention_mask, torch.float32), head_dim**-0.5)

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

    @staticmethod
    def _fused_projections(attn, hidden_states, encoder_hidden_states):
        # As FusedAttnProcessor2_0.__call__ computes them (same linears, same split).
        if encoder_hidden_states is None:
            qkv = attn.to_qkv(hidden_states)
            return torch.split(qkv, qkv.shape[-1] // 3, dim=-1)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query = attn.to_q(hidden_states)
        kv = attn.to_kv(encoder_hidden_states)
        key, value = torch.split(kv, kv.shape[-1] // 2, dim=-1)
        return query, key, value

    def _wrapped_call(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs):
        if args:  # called positionally beyond temb (diffusers never does): pass everything on as given
            out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        else:
            out = self._forward(
                attn,
                hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                attention_mask=attention_mask,
                temb=temb,
                **kwargs,
            )
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
            self._emit(query, key, None, mask_to_bias(mask, torch.float32), head_dim**-0.5)
        return out

    def _xformers_call(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb):
        # diffusers' XFormersAttnProcessor.__call__ step by step, with the lse-returning xformers call.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, key_tokens, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, key_tokens, batch_size)
        if attention_mask is not None:
            # [B·H, 1, S] -> [B·H, L, S]: xformers does not broadcast the query dim of a tensor bias.
            attention_mask = attention_mask.expand(-1, hidden_states.shape[1], -1)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        query = attn.head_to_batch_dim(query).contiguous()  # [B·H, L, D], heads of one image adjacent
        key = attn.head_to_batch_dim(key).contiguous()
        value = attn.head_to_batch_dim(value).contiguous()

        hidden_states, lse = xformers_with_lse(
            query, key, value, attn_bias=attention_mask, op=self.original.attention_op, scale=attn.scale
        )
        B, H = batch_size, attn.heads
        bias = None if attention_mask is None else mask_to_bias(attention_mask, torch.float32).unflatten(0, (B, H))
        self._emit(query.unflatten(0, (B, H)), key.unflatten(0, (B, H)), lse.reshape(B, H, -1), bias, float(attn.scale))

        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states
