"""Attention kernels that also hand back their row log-sum-exp, one per attention backend.

Tracing must not swap the model's attention for a slower one: whichever kernel the model was set
up to run (SDPA, xformers, flash-attn 2/3, FlexAttention, SageAttention, ...), the capture processor
calls that same kernel for the output and takes the lse it computes anyway. :data:`SOURCES`
declares, per kernel, what it supports and what it returns, because the conventions differ:

- layout of q/k/v: ``[B, H, L, D]`` (SDPA, FlexAttention) or ``[B, L, H, D]`` (xformers, flash-attn,
  sage, diffusers' ``dispatch_attention_fn``);
- layout of lse: ``[B, H, L]`` for all of them, but xformers pads ``L`` (the CUTLASS kernel rounds
  the query dim up to its block size) and PyTorch's efficient SDPA kernel pads it too;
- lse base: every kernel here returns the natural log (FlexAttention's CPU/eager path checked
  against ``torch.logsumexp``); kernels that work in base 2 internally convert before returning.

Optional packages are imported only when their kernel is called, so ``import daam_fast`` works
without them and a missing one shows up as ``LseSource.available()`` reason.

All ``*_with_lse`` functions return ``(out, lse)`` with ``out`` in the layout and dtype the kernel
returns it and ``lse`` normalised to float32 ``[B, H, L]`` natural log (``None`` when the kernel gives
none).
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..kernels.registry import input_reasons
from .attention import _cuda_cudnn, attention_with_lse
from .versions import DISPATCH_MIN, require_diffusers

__all__ = [
    "DIFFUSERS_BACKENDS",
    "SOURCES",
    "LseSource",
    "diffusers_attention_with_lse",
    "flash_attn_3_with_lse",
    "flash_attn_with_lse",
    "flex_with_lse",
    "sage_with_lse",
    "sdpa_with_lse",
    "xformers_with_lse",
]

logger = logging.getLogger(__name__)
_logged: set[str] = set()

_HALF = (torch.float16, torch.bfloat16)
_FLOAT = (torch.float16, torch.bfloat16, torch.float32)


def _log_once(key: str, msg: str) -> None:
    # Logging inside a compiled region is a graph break, so while torch.compile traces the message is
    # skipped (eager calls give it; docs/BACKENDS.md lists which backends fall back).
    if key not in _logged and not torch.compiler.is_compiling():
        _logged.add(key)
        logger.warning(msg)


_IMPORT_FAILURES: dict[str, str] = {}


def _module_missing(name: str) -> Callable[[], str | None]:
    def check() -> str | None:
        # sys.modules first: importlib cannot be traced by torch.compile, a dict lookup can. diffusers
        # imports the kernels it can use when it is imported, so they are usually there already.
        if sys.modules.get(name) is not None:
            return None
        if name in _IMPORT_FAILURES:
            return _IMPORT_FAILURES[name]
        try:
            importlib.import_module(name)
        except ImportError as exc:  # ModuleNotFoundError, or a broken build (ABI mismatch)
            _IMPORT_FAILURES[name] = f"{name} is not importable ({exc})"
            return _IMPORT_FAILURES[name]
        return None

    return check


@dataclass(frozen=True)
class LseSource:
    """One attention kernel that gives its row log-sum-exp.

    ``qkv_layout``: ``"BHLD"`` or ``"BLHD"``. ``lse_raw``: what the kernel itself returns, before
    :mod:`lse_sources` normalises it to float32 ``[B, H, L]`` natural log. ``exact``: False when the
    lse belongs to an approximated softmax (quantised scores), so the captured columns sum to 1 only
    approximately.
    """

    name: str
    kernel: str
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    max_head_dim: int | None
    qkv_layout: str
    lse_raw: str
    fn: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
    available: Callable[[], str | None] = lambda: None
    exact: bool = True

    def not_supported_reasons(self, q: torch.Tensor) -> list[str]:
        """Why this kernel cannot run on ``q`` (empty: it can)."""
        why = self.available()
        if why:
            return [why]
        return input_reasons(q, self.devices, self.dtypes, self.max_head_dim)


def _lse_bhl(lse: torch.Tensor, B: int, H: int, L: int) -> torch.Tensor:
    """Kernel lse ``[B, H, L']`` (``L' >= L``: padded kernels) -> float32 ``[B, H, L]``."""
    if lse.dim() == 4 and lse.shape[-1] == 1:  # cuDNN on torch >= 2.9 keeps a trailing 1
        lse = lse.squeeze(-1)
    if lse.dim() != 3 or lse.shape[0] != B or lse.shape[1] != H or lse.shape[2] < L:
        raise RuntimeError(f"attention kernel returned lse {tuple(lse.shape)}, expected [B, H, >= L] = [{B}, {H}, {L}]")
    return lse[:, :, :L].float()


# -- PyTorch SDPA ---------------------------------------------------------------------------------


def sdpa_with_lse(q, k, v, attn_mask=None, scale=None):
    """SDPA through the kernel SDPA itself would pick (see :func:`.attention.attention_with_lse`).

    ``q`` ``[B, H, L, D]``, ``k``/``v`` ``[B, H, S, D]`` -> ``(out [B, H, L, D], lse [B, H, L] fp32 or None)``.
    """
    return attention_with_lse(q, k, v, attn_mask=attn_mask, scale=scale)


def sdpa_cudnn_with_lse(q, k, v, attn_mask=None, scale=None):
    """PyTorch's cuDNN attention (CUDA, fp16/bf16), as ``sdpa_kernel(CUDNN_ATTENTION)`` runs it.

    ``q`` ``[B, H, L, D]`` -> ``(out [B, H, L, D], lse [B, H, L] fp32)``; the op returns lse ``[B, H, L]``
    (``[B, H, L, 1]`` on torch >= 2.9), natural log.
    """
    out, lse = _cuda_cudnn(q, k, v, attn_mask, scale)
    return out, _lse_bhl(lse, q.shape[0], q.shape[1], q.shape[2])


def _sdpa_forced(which: str):
    def run(q, k, v, attn_mask=None, scale=None):
        if which == "flash":
            if q.device.type == "cpu":
                out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    q, k, v, 0.0, False, attn_mask=attn_mask, scale=scale
                )
            else:
                res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
                out, lse = res[0], res[1]
        else:
            res = torch.ops.aten._scaled_dot_product_efficient_attention(
                q, k, v, attn_mask, True, 0.0, False, scale=scale
            )
            out, lse = res[0], res[1]  # lse's query dim is padded to the kernel's block size
        return out, _lse_bhl(lse, q.shape[0], q.shape[1], q.shape[2])

    run.__doc__ = f"PyTorch's {which} SDPA op: ``q`` ``[B, H, L, D]`` -> ``(out, lse [B, H, L] fp32)``."
    return run


# -- xformers -------------------------------------------------------------------------------------


def xformers_with_lse(q, k, v, attn_bias=None, scale=None, op=None):
    """xformers ``memory_efficient_attention`` with its lse.

    Args:
        q: ``[B, M, H, K]`` (BMHK) or ``[B, M, K]`` (BMK, one head, as diffusers'
            ``XFormersAttnProcessor`` calls it after ``head_to_batch_dim``); k, v likewise.
        attn_bias: a tensor bias (``[B, H, M, S]`` / ``[B, M, S]``) or an xformers ``AttentionBias``.
        op: what ``memory_efficient_attention(op=...)`` takes: an ``(fw, bw)`` pair or a forward op.

    Returns:
        ``(out, lse)``: ``out`` shaped like ``q``; lse float32 ``[B, H, M]`` (``H = 1`` for BMK). The
        kernel returns lse ``[B, H, M']`` with ``M' >= M`` (CUTLASS pads the query dim): cut to ``M``.
    """
    from xformers.ops.fmha import memory_efficient_attention_forward_requires_grad

    fw = op[0] if isinstance(op, tuple | list) else op
    out, lse = memory_efficient_attention_forward_requires_grad(q, k, v, attn_bias=attn_bias, scale=scale, op=fw)
    B, M = q.shape[0], q.shape[1]
    H = 1 if q.dim() == 3 else q.shape[2]
    return out, _lse_bhl(lse, B, H, M)


# -- flash-attn 2 / 3 -----------------------------------------------------------------------------


def flash_attn_with_lse(q, k, v, scale=None, window_size=(-1, -1)):
    """flash-attn 2 ``flash_attn_func(..., return_attn_probs=True)``, as diffusers' ``flash`` backend calls it.

    ``q`` ``[B, L, H, D]`` fp16/bf16 CUDA -> ``(out [B, L, H, D], lse [B, H, L] fp32)``; flash-attn returns
    ``(out, softmax_lse [B, H, L] fp32 natural log, S_dmask)``.
    """
    from flash_attn import flash_attn_func

    out, lse, *_ = flash_attn_func(
        q, k, v, dropout_p=0.0, softmax_scale=scale, causal=False, window_size=window_size, return_attn_probs=True
    )
    return out, _lse_bhl(lse, q.shape[0], q.shape[2], q.shape[1])


def flash_attn_3_with_lse(q, k, v, scale=None):
    """flash-attn 3 (Hopper, ``flash_attn_interface``), as diffusers' ``_flash_3`` backend calls it.

    ``q`` ``[B, L, H, D]`` -> ``(out [B, L, H, D], lse [B, H, L] fp32)``. FA3 returns
    ``(out, softmax_lse [B, H, L], ...)`` with ``return_attn_probs=True`` (older builds always
    returned ``(out, softmax_lse)``).
    """
    from flash_attn_interface import flash_attn_func

    res = flash_attn_func(q, k, v, softmax_scale=scale, causal=False, return_attn_probs=True)
    out, lse = res[0], res[1]
    return out, _lse_bhl(lse, q.shape[0], q.shape[2], q.shape[1])


# -- FlexAttention --------------------------------------------------------------------------------


def flex_with_lse(q, k, v, score_mod=None, block_mask=None, scale=None, enable_gqa=False, kernel_options=None):
    """``torch.nn.attention.flex_attention`` with its lse.

    ``q`` ``[B, H, L, D]`` -> ``(out [B, H, L, D], lse [B, H, L] fp32 natural log)``. Uses
    ``return_aux=AuxRequest(lse=True)`` where torch has it (``return_lse`` is deprecated there).
    Eager mode materialises the scores (torch warns); under ``torch.compile`` it is the fused kernel.
    """
    from torch.nn.attention import flex_attention as fa

    kw = dict(score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)
    if kernel_options is not None:
        kw["kernel_options"] = kernel_options
    if hasattr(fa, "AuxRequest"):
        out, aux = fa.flex_attention(q, k, v, return_aux=fa.AuxRequest(lse=True), **kw)
        lse = aux.lse
    else:
        out, lse = fa.flex_attention(q, k, v, return_lse=True, **kw)
    return out, _lse_bhl(lse, q.shape[0], q.shape[1], q.shape[2])


# -- SageAttention --------------------------------------------------------------------------------


def sage_with_lse(q, k, v, scale=None):
    """SageAttention ``sageattn(..., tensor_layout="NHD", return_lse=True)`` (int8 QKᵀ).

    ``q`` ``[B, L, H, D]`` -> ``(out [B, L, H, D], lse [B, H, L] fp32)``. The lse is that of the
    quantised scores, so the captured maps are approximate to the same degree as the output.
    """
    from sageattention import sageattn

    out, lse, *_ = sageattn(q, k, v, tensor_layout="NHD", is_causal=False, sm_scale=scale, return_lse=True)
    return out, _lse_bhl(lse, q.shape[0], q.shape[2], q.shape[1])


SOURCES: dict[str, LseSource] = {
    s.name: s
    for s in [
        LseSource(
            "sdpa", "SDPA's own pick: CPU flash, CUDA flash / efficient (else SDPA, no lse)",
            ("cpu", "cuda"), _FLOAT, None, "BHLD", "[B, H, L] natural (efficient: L padded)", sdpa_with_lse,
        ),
        LseSource(
            "sdpa_flash", "aten._scaled_dot_product_flash_attention(_for_cpu)",
            ("cpu", "cuda"), _FLOAT, 256, "BHLD", "[B, H, L] natural", _sdpa_forced("flash"),
        ),
        LseSource(
            "sdpa_efficient", "aten._scaled_dot_product_efficient_attention",
            ("cuda",), _FLOAT, None, "BHLD", "[B, H, L'] natural, L' = L padded", _sdpa_forced("efficient"),
        ),
        LseSource(
            "sdpa_cudnn", "aten._scaled_dot_product_cudnn_attention",
            ("cuda",), _HALF, 128, "BHLD", "[B, H, L] or [B, H, L, 1] natural", sdpa_cudnn_with_lse,
        ),
        LseSource(
            "xformers", "xformers.ops.fmha.memory_efficient_attention_forward_requires_grad",
            ("cuda",), _FLOAT, None, "BLHD", "[B, H, L'] natural, L' >= L padded", xformers_with_lse,
            _module_missing("xformers.ops"),
        ),
        LseSource(
            "flash_attn", "flash_attn.flash_attn_func(return_attn_probs=True)",
            ("cuda",), _HALF, 256, "BLHD", "[B, H, L] fp32 natural", flash_attn_with_lse,
            _module_missing("flash_attn"),
        ),
        LseSource(
            "flash_attn_3", "flash_attn_interface.flash_attn_func(return_attn_probs=True)",
            ("cuda",), _HALF, 256, "BLHD", "[B, H, L] fp32 natural", flash_attn_3_with_lse,
            _module_missing("flash_attn_interface"),
        ),
        LseSource(
            "flex", "torch.nn.attention.flex_attention(return_aux=AuxRequest(lse=True))",
            ("cpu", "cuda"), _FLOAT, None, "BHLD", "[B, H, L] fp32 natural", flex_with_lse,
            _module_missing("torch.nn.attention.flex_attention"),
        ),
        LseSource(
            "sage", "sageattention.sageattn(return_lse=True)",
            ("cuda",), _HALF, 128, "BLHD", "[B, H, L] fp32 natural (quantised scores)", sage_with_lse,
            _module_missing("sageattention"), exact=False,
        ),
    ]
}  # fmt: skip

#: diffusers ``AttentionBackendName`` value -> the source that runs the same kernel with lse. Backends
#: not listed (hub kernels, varlen, NPU, XLA, math, aiter, sage fp8 variants) keep producing the
#: output through ``dispatch_attention_fn``; their maps are then normalised by the capture kernel.
DIFFUSERS_BACKENDS: dict[str, str] = {
    "native": "sdpa",
    "_native_flash": "sdpa_flash",
    "_native_efficient": "sdpa_efficient",
    "_native_cudnn": "sdpa_cudnn",
    "xformers": "xformers",
    "flash": "flash_attn",
    "_flash_3": "flash_attn_3",
    "flex": "flex",
    "sage": "sage",
}


def _active_diffusers_backend() -> str:
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    name, _ = _AttentionBackendRegistry.get_active_backend()
    return getattr(name, "value", name)


def _native_mask(attn_mask, query, key):
    # diffusers' native backend turns a [B, S] key mask into [B, 1, 1, S] before SDPA.
    if attn_mask is not None and attn_mask.ndim == 2 and attn_mask.shape == (query.shape[0], key.shape[1]):
        return attn_mask[:, None, None, :]
    return attn_mask


def _run_source(backend: str, query, key, value, attn_mask, scale):
    """Run ``backend``'s kernel with lse on ``[B, L, H, D]`` inputs; None when it cannot take this call."""
    src = SOURCES[DIFFUSERS_BACKENDS[backend]]
    if src.not_supported_reasons(query):
        return None
    if src.qkv_layout == "BHLD":
        q, k, v = (x.permute(0, 2, 1, 3) for x in (query, key, value))
        if src.name == "flex":
            if attn_mask is not None:  # diffusers builds block masks / score mods from it
                return None
            out, lse = src.fn(q, k, v, scale=scale)
        elif src.name == "sdpa":
            out, lse = src.fn(q, k, v, attn_mask=_native_mask(attn_mask, query, key), scale=scale)
        else:
            if attn_mask is not None and src.name in ("sdpa_flash", "sdpa_cudnn"):
                return None
            out, lse = src.fn(q, k, v, attn_mask=attn_mask, scale=scale)
        return out.permute(0, 2, 1, 3), lse
    if attn_mask is not None:
        return None
    return src.fn(query, key, value, scale=scale)


def diffusers_attention_with_lse(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    attention_kwargs: dict | None = None,
    *,
    backend=None,
    parallel_config=None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``diffusers.models.attention_dispatch.dispatch_attention_fn`` that also returns the lse.

    Same arguments as ``dispatch_attention_fn`` (``query`` ``[B, L, H, D]``, ``key``/``value``
    ``[B, S, H, D]``; ``backend`` ``None`` = diffusers' active backend). The backend's own kernel
    produces the output; ``lse`` is float32 ``[B, H, L]`` natural log from that kernel, or ``None``
    where the backend has no lse-returning counterpart in :data:`DIFFUSERS_BACKENDS` (or this call
    uses a feature it does not cover: masks for flex / flash, dropout, causal, GQA, context
    parallelism). In that case the output still comes from ``dispatch_attention_fn`` with the same
    backend, and the capture normalises over all keys itself; this is logged once per backend. Needs
    diffusers >= 0.35 (else :class:`~.versions.DiffusersVersionError`).
    """
    require_diffusers("diffusers' attention dispatcher backends (dispatch_attention_fn)", DISPATCH_MIN)
    name = _active_diffusers_backend() if backend is None else getattr(backend, "value", backend)
    plain = (
        dropout_p == 0.0
        and not is_causal
        and not enable_gqa
        and not attention_kwargs
        and parallel_config is None
        and not query.requires_grad
    )
    if plain and name in DIFFUSERS_BACKENDS:
        res = _run_source(name, query, key, value, attn_mask, scale)
        if res is not None:
            return res
    why = (
        f"attention backend {name!r} has no lse-returning kernel in daam_fast"
        if name not in DIFFUSERS_BACKENDS
        else f"this call to attention backend {name!r} uses options its lse kernel does not cover "
        f"(mask / dropout / causal / GQA / parallel / device / dtype)"
    )
    _log_once(f"diffusers-{name}", f"{why}: the output still comes from {name!r}; the capture computes its own lse")
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    out = dispatch_attention_fn(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, attention_kwargs,
        backend=backend, parallel_config=parallel_config,
    )  # fmt: skip
    return out, None
