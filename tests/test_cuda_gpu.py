"""The CUDA extension on a GPU: against the float64 reference (and the Triton backend when present) for every
input dtype, head dims 40/64/80/160, query counts that are not a multiple of the block, T = 1/7/77,
non-contiguous q and lse (the lse taken from torch's own flash / efficient SDPA ops), per-head output, bias,
determinism, the current stream, and torch.library.opcheck on both ops.

Skipped, with the reason, without a CUDA device or without the built extension.
"""

from __future__ import annotations

import pytest
import torch
from gpu_inputs import DEV, qkv, start

from daam_fast.kernels import cuda, dispatch, reference

pytestmark = pytest.mark.gpu


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    return cuda.load_extension()


@pytest.fixture(scope="module", autouse=True)
def _require_extension():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEAD_DIMS = [40, 64, 80, 160]
# fp32 FMA arithmetic on the same (fp16/bf16-rounded) inputs the float64 oracle upcasts: one tolerance for all.
TOL = {torch.float32: (2e-5, 1e-4), torch.float16: (2e-5, 1e-4), torch.bfloat16: (2e-5, 1e-4)}
_qk, _start = qkv, start


def _check(got, expected, dtype):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.double(), expected, atol=atol, rtol=rtol)


def _triton_backend():
    b = next((b for b in dispatch.backends() if b.name == "triton"), None)
    return b if b is not None and b.available() is None else None


def _check_against_triton(got, expected, run_triton, dtype):
    """STYLE: the CUDA error against float64 is at most 2× Triton's (or within the fixed tolerance)."""
    if _triton_backend() is None:
        return
    tri = run_triton()
    err_cuda = (got.double() - expected).abs().max().item()
    err_triton = (tri.double() - expected).abs().max().item()
    assert err_cuda <= max(2 * err_triton, TOL[dtype][0]), (err_cuda, err_triton)


# (L, T): L = 77 (one tile + tail), 333 (5 tiles + 13), 1029 (16 tiles + 5); T = 1, 7, 77 (≤ one 80-wide tile),
# 100 (two token tiles)
LT = [(77, 1), (333, 7), (1029, 77), (77, 100)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("LT", LT, ids=str)
def test_capture_from_lse(LT, D, dtype):
    L, T = LT
    B, H, S = 2, 3, max(T, 77) + 3
    q, k, _ = _qk(B, H, L, S, D, dtype)
    k_sel = k[:, :, 2 : 2 + T]  # non-contiguous too
    scale = D**-0.5
    lse = reference.row_logsumexp(q.double(), k.double(), scale).float()
    out = _start((B, T, L))
    expected = reference.capture_from_lse(q.double(), k_sel.double(), lse.double(), scale, out.double())
    cuda.capture_from_lse(q, k_sel, lse, scale, out)
    _check(out, expected, dtype)
    _check_against_triton(
        out,
        expected,
        lambda: dispatch.capture_from_lse(q, k_sel, lse, scale, _start((B, T, L)), backend="triton"),
        dtype,
    )


def _sdpa_lse(kind, q, k, v, scale):
    """(lse [B, H, L] float32, possibly a strided view) from torch's own attention op of that kind."""
    L = q.shape[2]
    try:
        if kind == "flash":
            res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
            lse = res[1]
        else:
            res = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False, scale=scale)
            lse = res[1][..., :L]  # padded to a multiple of 32 along L: the slice is non-contiguous
    except RuntimeError as exc:  # e.g. flash not built for this GPU / head dim
        pytest.skip(f"{kind} SDPA unavailable here: {exc}")
    assert lse.dtype == torch.float32 and tuple(lse.shape) == tuple(q.shape[:3])
    return lse


@pytest.mark.parametrize("kind", ["flash", "efficient"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_capture_from_sdpa_lse(kind, D, dtype):
    """lse as the model's attention produced it: the capture equals the float64 oracle given that lse, and the
    softmax columns themselves (so lse is the natural-log logsumexp the kernel assumes)."""
    if kind == "flash" and dtype == torch.float32:
        pytest.skip("flash attention takes fp16/bf16 only")
    B, H, L, S = 2, 5, 333, 77
    q, k, v = _qk(B, H, L, S, D, dtype)
    scale = D**-0.5
    lse = _sdpa_lse(kind, q, k, v, scale)
    idx = torch.tensor([0, 1, 5, 40, 76], device=DEV)
    k_sel = k.index_select(2, idx)
    out = _start((B, len(idx), L))
    start = out.double().clone()
    expected = reference.capture_from_lse(q.double(), k_sel.double(), lse.double(), scale, out.double())
    cuda.capture_from_lse(q, k_sel, lse, scale, out)
    _check(out, expected, dtype)
    probs = reference.naive_attention_probs(q, k, scale)[..., idx].sum(1).transpose(-1, -2)  # [B, T, L]
    # The attention kernels may multiply in TF32 for fp32 inputs (10-bit mantissa): their lse is then good to
    # ~1e-3 of a score, so 2e-3 relative on probabilities. A log2-based or misaligned lse is off by far more.
    torch.testing.assert_close(out.double() - start, probs, atol=1e-4, rtol=2e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("LST", [(77, 77, 7), (333, 200, 1), (1029, 1029, 77)], ids=str)
def test_capture_self_normalising(LST, D, dtype):
    L, S, T = LST
    B, H = 2, 3
    q, k, _ = _qk(B, H, L, S, D, dtype)
    token_idx = torch.randperm(S, generator=torch.Generator().manual_seed(3))[:T]
    scale = D**-0.5
    out = _start((B, T, L))
    expected = reference.capture_self_normalising(q.double(), k.double(), token_idx, scale, out.double())
    cuda.capture_self_normalising(q, k, token_idx, scale, out)
    _check(out, expected, dtype)
    _check_against_triton(
        out,
        expected,
        lambda: dispatch.capture_self_normalising(q, k, token_idx, scale, _start((B, T, L)), backend="triton"),
        dtype,
    )


def test_per_head_output_and_bias():
    B, H, L, D, S, T = 2, 4, 100, 64, 120, 6
    q, k, _ = _qk(B, H, L, S, D, torch.float16)
    mask = torch.zeros(B, 1, 1, S, device=DEV)
    mask[0, ..., 90:] = float("-inf")  # key padding
    token_idx = torch.tensor([0, 3, 50, 89, 95, 119])
    out = _start((B, H, T, L))
    expected = reference.capture_self_normalising(q.double(), k.double(), token_idx, 0.1, out.double(), bias=mask)
    cuda.capture_self_normalising(q, k, token_idx, 0.1, out, bias=mask)
    _check(out, expected, torch.float16)

    lse = reference.row_logsumexp(q.double(), k.double(), 0.1, bias=mask).float()
    k_sel = k.index_select(2, token_idx.to(DEV))
    bias_sel = mask.index_select(-1, token_idx.to(DEV))
    out = _start((B, H, T, L))
    expected = reference.capture_from_lse(q.double(), k_sel.double(), lse.double(), 0.1, out.double(), bias=bias_sel)
    cuda.capture_from_lse(q, k_sel, lse, 0.1, out, bias=bias_sel)
    _check(out, expected, torch.float16)


def test_deterministic_and_on_current_stream():
    B, H, L, D, S, T = 2, 10, 4096, 64, 77, 77  # SDXL's 64² grid
    q, k, _ = _qk(B, H, L, S, D, torch.float16)
    lse = reference.row_logsumexp(q, k, D**-0.5)
    k_sel = k.contiguous()
    a, b = torch.zeros(B, T, L, device=DEV), torch.zeros(B, T, L, device=DEV)
    cuda.capture_from_lse(q, k_sel, lse, D**-0.5, a)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        cuda.capture_from_lse(q, k_sel, lse, D**-0.5, b)
    stream.synchronize()
    assert torch.equal(a, b)  # bitwise: no atomics, fixed summation order
    torch.cuda.synchronize()


def test_dispatch_picks_cuda():
    q, _, _ = _qk(1, 2, 64, 77, 64, torch.bfloat16)
    assert dispatch.select_backend(q, torch.zeros(1, 3, 64, device=DEV)).name == "cuda"


def test_cpp_checks_reject_bad_arguments():
    """Called directly, the op's TORCH_CHECKs catch what the Python wrapper would."""
    q, k, _ = _qk(1, 2, 64, 10, 64, torch.float16)
    lse = torch.zeros(1, 2, 64, device=DEV)
    out = torch.zeros(1, 10, 64, device=DEV)
    with pytest.raises(RuntimeError, match="lse must have dtype"):
        torch.ops.daam_fast.cuda_capture_from_lse(q, k, lse.half(), 0.1, out, None)
    with pytest.raises(RuntimeError, match="out must have shape"):
        torch.ops.daam_fast.cuda_capture_from_lse(q, k, lse, 0.1, out[:, :5], None)
    with pytest.raises(RuntimeError, match="overlapping"):
        torch.ops.daam_fast.cuda_capture_from_lse(
            q, k, lse, 0.1, torch.zeros(1, 1, 64, device=DEV).expand(1, 10, 64), None
        )
    with pytest.raises(RuntimeError, match="bias must have shape"):
        torch.ops.daam_fast.cuda_capture_from_lse(q, k, lse, 0.1, out, torch.zeros(1, 2, 64, 9, device=DEV))
    with pytest.raises(RuntimeError, match="per-head|out must have shape"):
        torch.ops.daam_fast.cuda_capture_from_lse(q, k, lse, 0.1, torch.zeros(1, 3, 10, 64, device=DEV), None)
    idx = torch.arange(3, device=DEV)
    with pytest.raises(RuntimeError, match="token_idx must have dtype"):
        torch.ops.daam_fast.cuda_capture_self_normalising(q, k, idx.int(), 0.1, out[:, :3], None)
    with pytest.raises(RuntimeError, match="no keys"):
        torch.ops.daam_fast.cuda_capture_self_normalising(q, k[:, :, :0], idx, 0.1, out[:, :3], None)


def test_opcheck():
    B, H, L, D, S = 1, 2, 70, 40, 77
    q, k, _ = _qk(B, H, L, S, D, torch.float16)
    lse = reference.row_logsumexp(q, k, 0.15)
    k_sel = k[:, :, :7].contiguous()
    bias = torch.zeros(B, H, L, 7, device=DEV)
    torch.library.opcheck(
        torch.ops.daam_fast.cuda_capture_from_lse.default, (q, k_sel, lse, 0.15, torch.zeros(B, 7, L, device=DEV), bias)
    )
    idx = torch.tensor([0, 7, 76], device=DEV)
    args = (q, k, idx, 0.15, torch.zeros(B, H, 3, L, device=DEV), None)
    torch.library.opcheck(torch.ops.daam_fast.cuda_capture_self_normalising.default, args)
