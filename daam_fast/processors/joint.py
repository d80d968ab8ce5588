"""Capture processors for joint-attention transformers: SD3 / SD3.5 (``SD3Transformer2DModel``) and Flux
(``FluxTransformer2DModel``, double- and single-stream blocks).

In these models image and text tokens attend jointly: one softmax runs over ``[image, text]`` keys (SD3's
``JointAttnProcessor2_0`` concatenates image first) or ``[text, image]`` keys (Flux's ``FluxAttnProcessor``;
a single-stream block gets the already joined ``[text, image]`` sequence). The DAAM map is the
image-query × text-key block of that softmax, normalised over ALL joint keys, so the processors keep the
attention call's row log-sum-exp and hand the full joint ``q``/``k`` with the image and text spans to the sink.

Each processor repeats the stock processor of diffusers 0.42.1 (checked on the releases :mod:`.versions` lists)
step by step, so the output is the same bit for bit: SD3's ``JointAttnProcessor2_0`` with the attention op SDPA
would run; Flux's ``FluxAttnProcessor`` with its diffusers attention-dispatcher backend, whatever it is, called
through :func:`.lse_sources.diffusers_attention_with_lse` (the backend's own kernel, with its lse where daam_fast
knows the backend's lse-returning twin; otherwise the backend's output and a self-normalising capture from the
same ``q``/``k``). Any other processor (or Flux with context parallelism) keeps computing the output itself; the
capture then recomputes ``q``/``k`` (RoPE included) and normalises on its own.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb

from .attention import attention_with_lse, mask_to_bias
from .lse_sources import diffusers_attention_with_lse
from .versions import FLUX_MIN, reproduces_bodies, require_diffusers

try:
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections
except ImportError:  # diffusers < 0.35: FluxCaptureProcessor refuses with the minimum version
    FluxAttnProcessor = _get_qkv_projections = None
from .forwarding import Forward, mirror_signature

__all__ = ["FluxCaptureProcessor", "JointCaptureSink", "SD3JointCaptureProcessor"]


class JointCaptureSink(Protocol):
    """Receives every joint-attention call of a traced transformer (the tracer's accumulator)."""

    def on_joint_attention(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        lse: torch.Tensor | None,
        image: slice,
        text: slice,
        scale: float,
        bias: torch.Tensor | None = None,
    ) -> None:
        """``q``, ``k`` ``[B, H, S, D]`` over the whole joint sequence (after norms and RoPE); ``lse [B, H, S]``
        fp32 (over all ``S`` keys) or None; ``image``/``text`` the spans of the sequence; ``bias`` broadcastable
        to ``[B, H, S, S]`` or None."""

    def current_text_len(self) -> int:
        """Text length of the running transformer call (single-stream blocks see no separate text input)."""


def _attention_call(query, key, value, attn_mask):
    # SDPA on the given (possibly permuted) views: exactly what the stock processors' attention call runs.
    return attention_with_lse(query, key, value, attn_mask=attn_mask)


class SD3JointCaptureProcessor:
    """Wraps the processor of one SD3 joint-attention module (``JointTransformerBlock.attn``).

    Args:
        original: the installed processor (restored by the tracer on exit).
        sink: the capture sink (the tracer's accumulator).
        layer_idx: this module's index in the tracer's layer list.
    """

    def __init__(self, original: Any, sink: JointCaptureSink, layer_idx: int):
        self.original = original
        self.sink = sink
        self.layer_idx = layer_idx
        self.reproduces_original = type(original) is JointAttnProcessor2_0 and reproduces_bodies()
        self._forward = Forward(original)
        mirror_signature(self, original)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if not self.reproduces_original or encoder_hidden_states is None:
            out = self._forward(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
            if encoder_hidden_states is not None:
                self._recompute_capture(attn, hidden_states, encoder_hidden_states)
            return out

        # The lines below follow diffusers' JointAttnProcessor2_0.__call__ step by step.
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        ctx_q = attn.add_q_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        ctx_k = attn.add_k_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        ctx_v = attn.add_v_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_added_q is not None:
            ctx_q = attn.norm_added_q(ctx_q)
        if attn.norm_added_k is not None:
            ctx_k = attn.norm_added_k(ctx_k)
        # SD3 joins [image, text].
        n_img = residual.shape[1]
        query = torch.cat([query, ctx_q], dim=2)
        key = torch.cat([key, ctx_k], dim=2)
        value = torch.cat([value, ctx_v], dim=2)

        hidden_states, lse = _attention_call(query, key, value, None)
        self.sink.on_joint_attention(
            self.layer_idx, query, key, lse, slice(0, n_img), slice(n_img, key.shape[2]), head_dim**-0.5
        )

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states, encoder_hidden_states = hidden_states[:, :n_img], hidden_states[:, n_img:]
        if not attn.context_pre_only:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states, encoder_hidden_states

    @torch.no_grad()
    def _recompute_capture(self, attn, hidden_states, encoder_hidden_states) -> None:
        B = hidden_states.shape[0]

        def heads(x, d):
            return x.view(B, -1, attn.heads, d).transpose(1, 2)

        if getattr(attn, "to_q", None) is not None:
            q, k = attn.to_q(hidden_states), attn.to_k(hidden_states)
        else:  # fused projections
            q, k, _ = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        if getattr(attn, "add_q_proj", None) is not None:
            cq, ck = attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states)
        else:
            cq, ck, _ = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        d = k.shape[-1] // attn.heads
        q, k, cq, ck = heads(q, d), heads(k, d), heads(cq, d), heads(ck, d)
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        if attn.norm_added_q is not None:
            cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
        n_img = q.shape[2]
        q, k = torch.cat([q, cq], dim=2), torch.cat([k, ck], dim=2)
        self.sink.on_joint_attention(self.layer_idx, q, k, None, slice(0, n_img), slice(n_img, k.shape[2]), d**-0.5)


def _flux_stock(processor) -> bool:
    """True for a stock ``FluxAttnProcessor`` without context parallelism (whatever its attention backend): its body
    is repeated here, with the attention call made through :func:`.lse_sources.diffusers_attention_with_lse`."""
    return type(processor) is FluxAttnProcessor and processor._parallel_config is None


def _flux_mask(attention_mask, query, key):
    # As diffusers' native backend: a 2-D [B, S_k] mask becomes [B, 1, 1, S_k].
    if (
        attention_mask is not None
        and attention_mask.ndim == 2
        and attention_mask.shape[0] == query.shape[0]
        and attention_mask.shape[1] == key.shape[1]
    ):
        attention_mask = attention_mask.unsqueeze(1).unsqueeze(1)
    return attention_mask


class FluxCaptureProcessor:
    """Wraps the processor of one Flux attention module (double-stream ``transformer_blocks.i.attn`` or
    single-stream ``single_transformer_blocks.i.attn``; the sequence is ``[text, image]`` in both).

    Args:
        original: the installed processor (restored by the tracer on exit).
        sink: the capture sink (the tracer's accumulator).
        layer_idx: this module's index in the tracer's layer list.
    """

    def __init__(self, original: Any, sink: JointCaptureSink, layer_idx: int):
        require_diffusers("tracing Flux (FluxTransformer2DModel)", FLUX_MIN)
        self.original = original
        self.sink = sink
        self.layer_idx = layer_idx
        # Whether this diffusers' FluxAttnProcessor body is the one repeated below (the backend is checked per call).
        self.body_checked = reproduces_bodies()
        self._forward = Forward(original)
        mirror_signature(self, original)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb=None,
        **kwargs,
    ):
        if not (self.body_checked and _flux_stock(self.original)):
            out = self._forward(
                attn,
                hidden_states,
                encoder_hidden_states,
                attention_mask,
                image_rotary_emb=image_rotary_emb,
                **kwargs,
            )
            self._recompute_capture(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
            return out

        # The lines below follow diffusers' FluxAttnProcessor.__call__ step by step. Its attention call runs the
        # processor's dispatcher backend through diffusers_attention_with_lse: the same kernel, with its lse where
        # daam_fast knows that backend's lse-returning twin (native SDPA, flash, flex, sage, xformers, ...); else
        # the backend's own output and lse None, and the capture normalises on its own, from these same q and k.
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
            encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            encoder_query = attn.norm_added_q(encoder_query)
            encoder_key = attn.norm_added_k(encoder_key)
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        hidden_states, lse = diffusers_attention_with_lse(
            query, key, value, attn_mask=attention_mask, backend=self.original._attention_backend
        )
        mask = _flux_mask(attention_mask, query, key)
        self._capture(query.permute(0, 2, 1, 3), key.permute(0, 2, 1, 3), lse, encoder_hidden_states, mask,
                      attn.head_dim)  # fmt: skip

        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)
        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states

    def _capture(self, q, k, lse, encoder_hidden_states, mask, head_dim) -> None:
        # Flux joins [text, image]; a single-stream block's text length comes from the running transformer call.
        n_txt = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else self.sink.current_text_len()
        S = k.shape[2]
        bias = mask_to_bias(mask, torch.float32)
        self.sink.on_joint_attention(
            self.layer_idx, q, k, lse, slice(n_txt, S), slice(0, n_txt), head_dim**-0.5, bias=bias
        )

    @torch.no_grad()
    def _recompute_capture(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb):
        query, key, _, encoder_query, encoder_key, _ = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        mask = _flux_mask(attention_mask, query, key)
        q, k = query.permute(0, 2, 1, 3), key.permute(0, 2, 1, 3)
        self._capture(q, k, None, encoder_hidden_states, mask, attn.head_dim)
