"""Stand-ins for optional attention packages (xformers, flash-attn 2/3, SageAttention), for CPU tests.

Each fake has the documented signature of the real function and returns what the real one returns,
in its own conventions, so a convention mistake in :mod:`daam_fast.processors.lse_sources` fails:

- xformers ``memory_efficient_attention_forward_requires_grad``: ``q`` ``[B, M, H, K]`` or ``[B, M, K]``
  -> ``(out like q, lse [B, H, M'])`` natural log, ``M'`` = ``M`` rounded up to 32 (CUTLASS pads the
  query dim) with garbage in the padding;
- flash-attn 2 ``flash_attn_func(..., return_attn_probs=True)``: ``[B, L, H, D]`` ->
  ``(out, softmax_lse [B, H, L] fp32 natural log, S_dmask)``;
- flash-attn 3 ``flash_attn_interface.flash_attn_func(..., return_attn_probs=True)``: same as FA2;
- SageAttention ``sageattn(..., tensor_layout="NHD", return_lse=True)``: ``(out, lse [B, H, L])``.

Outputs are computed in float64 and cast to the input dtype; the lse stays float32 as the kernels give it.
"""

from __future__ import annotations

import math
import sys
import types

import torch


def _attend_bhld(q, k, v, scale, bias=None):
    """float64 attention on [B, H, L, D] -> (out [B, H, L, D] in q's dtype, lse [B, H, L] float32)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q.double(), k.double().transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.double()
    lse = torch.logsumexp(s, -1)
    out = torch.matmul(torch.exp(s - lse[..., None]), v.double())
    return out.to(q.dtype), lse.float()


def _blhd(fn, q, k, v, scale, bias=None):
    out, lse = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale, bias)
    return out.transpose(1, 2), lse


def _xformers_forward(query, key, value, attn_bias=None, p=0.0, scale=None, *, op=None):
    bmk = query.dim() == 3
    q, k, v = (x.unsqueeze(2) if bmk else x for x in (query, key, value))  # BMK is BMHK with H = 1
    bias = None
    if attn_bias is not None:
        bias = attn_bias.unsqueeze(1) if bmk else attn_bias
    out, lse = _blhd(_attend_bhld, q, k, v, scale, bias)
    M = q.shape[1]
    padded = torch.full((*lse.shape[:2], 32 * math.ceil(M / 32)), 123.0)  # garbage past M
    padded[:, :, :M] = lse
    return (out.squeeze(2) if bmk else out), padded


def fake_xformers_modules() -> dict[str, types.ModuleType]:
    """``xformers``, ``xformers.ops``, ``xformers.ops.fmha`` modules with the functions diffusers and
    daam_fast call."""
    calls = {"forward_requires_grad": 0, "memory_efficient_attention": 0}

    def memory_efficient_attention_forward_requires_grad(
        query, key, value, attn_bias=None, p=0.0, scale=None, *, op=None
    ):
        calls["forward_requires_grad"] += 1
        return _xformers_forward(query, key, value, attn_bias, p, scale, op=op)

    def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None, *, op=None):
        calls["memory_efficient_attention"] += 1
        return _xformers_forward(query, key, value, attn_bias, p, scale, op=op)[0]

    root, ops, fmha = (types.ModuleType(n) for n in ("xformers", "xformers.ops", "xformers.ops.fmha"))
    fmha.memory_efficient_attention_forward_requires_grad = memory_efficient_attention_forward_requires_grad
    fmha.memory_efficient_attention = memory_efficient_attention
    ops.fmha = fmha
    ops.memory_efficient_attention = memory_efficient_attention
    ops.memory_efficient_attention_forward_requires_grad = memory_efficient_attention_forward_requires_grad
    root.ops = ops
    root.calls = calls
    return {"xformers": root, "xformers.ops": ops, "xformers.ops.fmha": fmha}


def fake_flash_attn_modules() -> dict[str, types.ModuleType]:
    """``flash_attn`` (FA2) and ``flash_attn_interface`` (FA3)."""

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                        softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):  # fmt: skip
        assert dropout_p == 0.0 and not causal and tuple(window_size) == (-1, -1)
        out, lse = _blhd(_attend_bhld, q, k, v, softmax_scale)
        return (out, lse, None) if return_attn_probs else out

    def flash_attn_3_func(q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None,
                          v_descale=None, window_size=(-1, -1), return_attn_probs=False, **kw):  # fmt: skip
        assert not causal
        out, lse = _blhd(_attend_bhld, q, k, v, softmax_scale)
        return (out, lse) if return_attn_probs else out

    fa2, fa3 = types.ModuleType("flash_attn"), types.ModuleType("flash_attn_interface")
    fa2.flash_attn_func = flash_attn_func
    fa3.flash_attn_func = flash_attn_3_func
    return {"flash_attn": fa2, "flash_attn_interface": fa3}


def fake_sage_modules() -> dict[str, types.ModuleType]:
    """``sageattention`` with ``sageattn`` (exact here; the real kernel quantises QKᵀ to int8)."""

    def sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, return_lse=False, **kw):
        assert not is_causal
        fn = _blhd if tensor_layout == "NHD" else (lambda f, *a: f(*a))
        out, lse = fn(_attend_bhld, q, k, v, sm_scale)
        return (out, lse) if return_lse else out

    mod = types.ModuleType("sageattention")
    mod.sageattn = sageattn
    return {"sageattention": mod}


def install(monkeypatch, modules: dict[str, types.ModuleType]) -> None:
    """Put fake modules into ``sys.modules`` for one test (monkeypatch undoes it)."""
    for name, mod in modules.items():
        monkeypatch.setitem(sys.modules, name, mod)
