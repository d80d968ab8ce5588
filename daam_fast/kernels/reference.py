"""Plain-PyTorch capture kernels: the CPU path, the fallback on any device, and the test oracle.

Both kernels add ``Σ_heads softmax(scale·q·kᵀ + bias)[..., selected columns]`` into a running fp32
heat buffer without ever building the ``heads × queries × keys`` probability tensor: work is chunked
over queries so the extra memory stays under ``max_chunk_bytes`` whatever the image size.
"""

from __future__ import annotations

import torch

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "capture_from_lse",
    "capture_self_normalising",
    "naive_attention_probs",
    "query_chunk",
    "row_logsumexp",
]

#: Upper bound on the temporary memory one reference call allocates (fp32 scores + fp32 query copy).
DEFAULT_CHUNK_BYTES = 64 * 2**20


def query_chunk(n_rows: int, n_cols: int, head_dim: int, n_queries: int, max_chunk_bytes: int) -> int:
    """Queries per chunk so that ``n_rows`` (= B·H) fp32 score rows of ``n_cols`` columns, plus the
    fp32 copy of the query chunk and the exp/bias temporaries, fit in ``max_chunk_bytes``."""
    # scores, exp(scores) and one broadcast temporary (3 · n_cols), the fp32 query copy (head_dim).
    per_query = 4 * n_rows * (3 * n_cols + head_dim)
    return max(1, min(n_queries, max_chunk_bytes // max(per_query, 1)))


def _check_common(q: torch.Tensor, k: torch.Tensor, out: torch.Tensor, name_k: str) -> tuple[int, int, int, int]:
    if q.dim() != 4:
        raise ValueError(f"q must be [B, H, L, D], got shape {tuple(q.shape)}")
    if k.dim() != 4 or k.shape[0] != q.shape[0] or k.shape[1] != q.shape[1] or k.shape[3] != q.shape[3]:
        raise ValueError(f"{name_k} must be [B, H, *, D] matching q {tuple(q.shape)}, got {tuple(k.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"q dtype must be float16, bfloat16, float32 or float64, got {q.dtype}")
    if k.dtype != q.dtype:
        raise TypeError(f"{name_k} dtype {k.dtype} differs from q dtype {q.dtype}")
    if out.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"out must be float32 (or float64 for references), got {out.dtype}")
    if out.device != q.device or k.device != q.device:
        raise ValueError(f"q, keys and out must share one device, got {q.device}, {k.device}, {out.device}")
    return q.shape[0], q.shape[1], q.shape[2], q.shape[3]


def _check_out(out: torch.Tensor, B: int, H: int, T: int, L: int) -> bool:
    """True when ``out`` keeps heads apart ([B, H, T, L]); False for the head-summed [B, T, L]."""
    if tuple(out.shape) == (B, T, L):
        return False
    if tuple(out.shape) == (B, H, T, L):
        return True
    raise ValueError(f"out must be [B, T, L] = {(B, T, L)} or [B, H, T, L] = {(B, H, T, L)}, got {tuple(out.shape)}")


def _accumulate(out: torch.Tensor, probs: torch.Tensor, per_head: bool, start: int, stop: int) -> None:
    # probs: [B, H, l, T] -> out[..., T, start:stop]
    if per_head:
        out[..., start:stop].add_(probs.transpose(-1, -2).to(out.dtype))
    else:
        out[..., start:stop].add_(probs.sum(1).transpose(-1, -2).to(out.dtype))


def _bias_chunk(bias: torch.Tensor | None, start: int, stop: int, cols=None) -> torch.Tensor | None:
    if bias is None:
        return None
    b = bias if bias.shape[-2] == 1 else bias[..., start:stop, :]
    if cols is not None and b.shape[-1] != 1:
        b = b.index_select(-1, cols)
    return b.float() if b.dtype != torch.float64 else b


def _work_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.no_grad()
def capture_from_lse(
    q: torch.Tensor,
    k_sel: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:
    """Add ``Σ_h exp(scale·q·k_selᵀ + bias − lse)`` into ``out`` in place and return ``out``.

    Args:
        q: ``[B, H, L, D]`` queries, float16 / bfloat16 / float32 (float64 for references), any strides.
        k_sel: ``[B, H, T, D]`` the keys of the ``T`` selected tokens, same dtype as ``q``.
        lse: ``[B, H, L]`` float32 natural-log logsumexp of each query row over **all** keys (as the
            attention call computed it, bias included), any strides.
        scale: the softmax scale the attention used (usually ``D ** -0.5``).
        out: float32 heat buffer, ``[B, T, L]`` (summed over heads) or ``[B, H, T, L]`` (per head).
        bias: optional additive score bias of the selected columns (an attention mask), broadcastable
            to ``[B, H, L, T]``.
        max_chunk_bytes: bound on the temporary memory.
    """
    B, H, L, D = _check_common(q, k_sel, out, "k_sel")
    T = k_sel.shape[2]
    per_head = _check_out(out, B, H, T, L)
    if tuple(lse.shape) != (B, H, L):
        raise ValueError(f"lse must be [B, H, L] = {(B, H, L)}, got {tuple(lse.shape)}")
    wd = _work_dtype(q)
    k = k_sel.to(wd) * scale
    step = query_chunk(B * H, T, D, L, max_chunk_bytes)
    for start in range(0, L, step):
        stop = min(L, start + step)
        s = torch.matmul(q[:, :, start:stop].to(wd), k.transpose(-1, -2))
        b = _bias_chunk(bias, start, stop)
        if b is not None:
            s += b
        s -= lse[:, :, start:stop, None].to(wd)
        _accumulate(out, s.exp_(), per_head, start, stop)
    return out


@torch.no_grad()
def row_logsumexp(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    *,
    bias: torch.Tensor | None = None,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:
    """``logsumexp_j(scale·q·k_jᵀ + bias)`` over all ``S`` keys: ``[B, H, L]`` float32 (float64 for
    float64 inputs). ``q`` ``[B, H, L, D]``, ``k`` ``[B, H, S, D]``, ``bias`` broadcastable to
    ``[B, H, L, S]``."""
    B, H, L, D = q.shape
    S = k.shape[2]
    wd = _work_dtype(q)
    kk = k.to(wd) * scale
    lse = torch.empty(B, H, L, dtype=wd, device=q.device)
    step = query_chunk(B * H, S, D, L, max_chunk_bytes)
    for start in range(0, L, step):
        stop = min(L, start + step)
        s = torch.matmul(q[:, :, start:stop].to(wd), kk.transpose(-1, -2))
        b = _bias_chunk(bias, start, stop)
        if b is not None:
            s += b
        lse[:, :, start:stop] = torch.logsumexp(s, dim=-1)
    return lse


@torch.no_grad()
def capture_self_normalising(
    q: torch.Tensor,
    k: torch.Tensor,
    token_idx: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:
    """Like :func:`capture_from_lse`, for attention calls that give no lse: computes each row's
    logsumexp over all keys itself, then adds the selected columns into ``out``.

    Args:
        q: ``[B, H, L, D]`` queries.
        k: ``[B, H, S, D]`` all keys, same dtype.
        token_idx: ``[T]`` int64 positions in ``0..S-1`` of the columns to capture.
        scale: softmax scale.
        out: float32 ``[B, T, L]`` or ``[B, H, T, L]``, added to in place.
        bias: optional additive bias broadcastable to ``[B, H, L, S]`` (attention mask).
    """
    B, H, L, D = _check_common(q, k, out, "k")
    S = k.shape[2]
    token_idx = _check_token_idx(token_idx, S, q.device)
    lse = row_logsumexp(q, k, scale, bias=bias, max_chunk_bytes=max_chunk_bytes)
    k_sel = k.index_select(2, token_idx)
    bias_sel = None
    if bias is not None:
        bias_sel = bias if bias.shape[-1] == 1 else bias.index_select(-1, token_idx)
    return capture_from_lse(q, k_sel, lse, scale, out, bias=bias_sel, max_chunk_bytes=max_chunk_bytes)


def _check_token_idx(token_idx: torch.Tensor, S: int, device: torch.device) -> torch.Tensor:
    token_idx = torch.as_tensor(token_idx, dtype=torch.long, device=device).reshape(-1)
    if token_idx.numel() == 0:
        raise ValueError("token_idx is empty: select at least one key column")
    lo, hi = int(token_idx.min()), int(token_idx.max())
    if lo < 0 or hi >= S:
        raise IndexError(f"token_idx must lie in [0, {S - 1}] (S = {S} keys), got values in [{lo}, {hi}]")
    return token_idx


def naive_attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float | None = None, bias=None) -> torch.Tensor:
    """Materialised float64 ``softmax(scale·q·kᵀ + bias)``: ``[B, H, L, S]``. For tests only."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q.double(), k.double().transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.double()
    return torch.softmax(s, dim=-1)
