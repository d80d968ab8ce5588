"""Triton capture kernels in the interpreter against the float64 reference and against SDPA.

Run only through tests/test_triton_kernels.py (needs TRITON_INTERPRET=1 before triton is imported).
Shapes stay tiny (the interpreter costs ~0.1 s per program); default tiles are the interpreter's
large ones, and the ``*_multiblock`` tests pass small tiles to get several blocks with ragged tails.
"""

import pytest
import torch
import torch.nn.functional as F
from triton_interp_helpers import DTYPES, flash_lse, make_inputs, start_buffer, token_idx

from daam_fast.kernels import reference, triton_capture, triton_fused
from daam_fast.kernels.triton_capture import Blocks

assert triton_capture.INTERPRET, "kernels were defined for the compiler, not the interpreter"

B, H, L, S = 2, 2, 37, 77  # L = 37: a ragged tail in every query tiling (128, 16)
# 3 query blocks of L = 37, ⌈T/16⌉ token blocks, 3 key blocks of S = 77 (all ragged)
SMALL = Blocks(queries=16, tokens=16, dim=64, keys=32)


def _ref_from_lse(q, k_sel, lse, scale, out, bias=None):
    return reference.capture_from_lse(
        q.double(), k_sel.double(), lse.double(), scale, out.double(), bias=None if bias is None else bias.double()
    )


def _ref_self_normalising(q, k, idx, scale, out, bias=None):
    return reference.capture_self_normalising(
        q.double(), k.double(), idx, scale, out.double(), bias=None if bias is None else bias.double()
    )


def _selected_keys(k, idx):
    # k_sel as a strided view ([B, T, H·D] memory seen as [B, H, T, D]), as a gather from diffusers' layout gives.
    Bk, Hk, _, Dk = k.shape
    flat = k.transpose(1, 2).reshape(Bk, -1, Hk * Dk)[:, idx]
    return flat.view(Bk, len(idx), Hk, Dk).transpose(1, 2)


def assert_attention_close(o, q, k, v, scale, bias=None):
    """flash-attention's criterion: error vs float64 ≤ 2 × SDPA's error in the same dtype + ``floor``.

    ``floor`` is flash-attention's ``fwd_atol``: twice the rounding error of ``o + 0.3 − 0.3`` in the
    output dtype, i.e. about one output ulp. SDPA can be lucky and land within half an ulp everywhere
    on a small tensor; a correct kernel with another summation order may round the other way.
    """
    s = torch.matmul(q.double(), k.double().transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.double()
    ref = torch.matmul(torch.softmax(s, -1), v.double())
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype), scale=scale)
    ref_lo = ref.to(q.dtype)
    floor = 2 * (ref_lo + 0.3 - 0.3 - ref_lo).abs().max().item()
    err = (o.double() - ref).abs().max().item()
    sdpa_err = (sdpa.double() - ref).abs().max().item()
    assert o.dtype == q.dtype and o.shape == q.shape
    assert err <= 2 * sdpa_err + floor, f"max error {err:.3g} > 2 × SDPA's {sdpa_err:.3g} + {floor:.3g}"


# --- capture from lse ---


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("D", [40, 64])  # 40: padded to 64 with masks
@pytest.mark.parametrize("T", [1, 7, 77])  # one token, a few, all 77 keys
def test_capture_from_lse(dtype, atol, rtol, D, T):
    q, k, v = make_inputs(B, H, L, S, D, dtype)
    idx = token_idx(S, T)
    k_sel = _selected_keys(k, idx)
    lse = flash_lse(q, k, v, D**-0.5)
    assert not q.is_contiguous() and not lse.is_contiguous() and (T == 1 or not k_sel.is_contiguous())
    out = start_buffer((B, T, L))
    expected = _ref_from_lse(q, k_sel, lse, D**-0.5, out)
    got = triton_capture.capture_from_lse(q, k_sel, lse, D**-0.5, out)
    assert got is out
    torch.testing.assert_close(out.double(), expected, atol=atol * H, rtol=rtol)


@pytest.mark.parametrize("dtype,atol,rtol", [DTYPES[0], DTYPES[2]])
def test_capture_from_lse_multiblock(dtype, atol, rtol):
    D, T = 40, 77  # 3 × 5 programs per image, ragged in queries (37 = 2·16 + 5) and tokens (77 = 4·16 + 13)
    q, k, v = make_inputs(1, 3, L, S, D, dtype)
    idx = token_idx(S, T)
    lse = flash_lse(q, k, v, D**-0.5)
    out = start_buffer((1, T, L))
    expected = _ref_from_lse(q, k[:, :, idx], lse, D**-0.5, out)
    triton_capture.capture_from_lse(q, k[:, :, idx], lse, D**-0.5, out, blocks=SMALL)
    torch.testing.assert_close(out.double(), expected, atol=atol * 3, rtol=rtol)


@pytest.mark.parametrize("D", [80, 96, 128, 160])  # the other SD/SDXL/SD3/Flux head dims (80, 160 padded)
def test_capture_from_lse_head_dims(D):
    dtype, atol, rtol = DTYPES[1]
    q, k, v = make_inputs(1, H, 21, 20, D, dtype)
    idx = token_idx(20, 7)
    lse = flash_lse(q, k, v, D**-0.5)
    out = start_buffer((1, 7, 21))
    expected = _ref_from_lse(q, k[:, :, idx], lse, D**-0.5, out)
    triton_capture.capture_from_lse(q, k[:, :, idx], lse, D**-0.5, out)
    torch.testing.assert_close(out.double(), expected, atol=atol * H, rtol=rtol)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_capture_from_lse_per_head_and_bias(dtype, atol, rtol):
    D, T = 64, 7
    q, k, v = make_inputs(B, H, L, S, D, dtype)
    idx = token_idx(S, T)
    g = torch.Generator().manual_seed(5)
    bias = torch.randn(1, H, 1, T, generator=g)  # per-head, per-token: broadcast over images and queries
    lse = flash_lse(q, k, v, D**-0.5)
    out = start_buffer((B, H, T, L)).transpose(0, 1).contiguous().transpose(0, 1)  # per head, non-contiguous
    expected = _ref_from_lse(q, k[:, :, idx], lse, D**-0.5, out, bias)
    triton_capture.capture_from_lse(q, k[:, :, idx], lse, D**-0.5, out, bias=bias)
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=rtol)


def test_capture_from_flash_lse_is_the_softmax():
    # End to end with the lse the attention op produced: the captured cells are softmax columns.
    D, T = 64, 77
    q, k, v = make_inputs(B, H, L, S, D, torch.float32)
    idx = token_idx(S, T)
    out = torch.zeros(B, T, L)
    triton_capture.capture_from_lse(q, k[:, :, idx], flash_lse(q, k, v, D**-0.5), D**-0.5, out)
    probs = reference.naive_attention_probs(q, k, D**-0.5)[..., idx].sum(1).transpose(-1, -2)
    torch.testing.assert_close(out.double(), probs, atol=1e-5, rtol=1e-4)  # flash lse is fp32 (~1e-6)


# --- self-normalising capture ---


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("D", [40, 64])
@pytest.mark.parametrize("T", [1, 7, 77])
def test_self_normalising(dtype, atol, rtol, D, T):
    q, k, _ = make_inputs(B, H, L, S, D, dtype)
    idx = token_idx(S, T)
    out = start_buffer((B, T, L))
    expected = _ref_self_normalising(q, k, idx, D**-0.5, out)
    assert triton_fused.capture_self_normalising(q, k, idx, D**-0.5, out) is out
    torch.testing.assert_close(out.double(), expected, atol=atol * H, rtol=rtol)


@pytest.mark.parametrize("dtype,atol,rtol", [DTYPES[0], DTYPES[1]])
def test_self_normalising_multiblock_masked_per_head(dtype, atol, rtol):
    # 150 keys in 5 blocks of 32 (ragged last block), keys masked with -inf, per-head output, 3 × 1 programs.
    D, S_long, T = 40, 150, 7
    q, k, _ = make_inputs(1, H, L, S_long, D, dtype)
    idx = torch.tensor([0, 149, 5, 100, 31, 32, 7])  # block edges; 7 and 100 are masked below
    bias = torch.randn(1, 1, 1, S_long, generator=torch.Generator().manual_seed(6))
    bias[..., [7, 100, 148]] = float("-inf")
    out = start_buffer((1, H, T, L))
    expected = _ref_self_normalising(q, k, idx, D**-0.5, out, bias)
    triton_fused.capture_self_normalising(q, k, idx, D**-0.5, out, bias=bias, blocks=SMALL)
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=rtol)
    assert torch.equal(out[:, :, [3, 6]], start_buffer((1, H, T, L))[:, :, [3, 6]])  # masked columns add 0


@pytest.mark.parametrize("D", [80, 160])
def test_self_normalising_head_dims(D):
    dtype, atol, rtol = DTYPES[2]
    q, k, _ = make_inputs(1, H, 21, 20, D, dtype)
    idx = torch.arange(20)[::4]  # a strided index tensor: the kernel must not read it as dense memory
    out = start_buffer((1, 5, 21))
    expected = _ref_self_normalising(q, k, idx, D**-0.5, out)
    triton_fused.capture_self_normalising(q, k, idx, D**-0.5, out)
    torch.testing.assert_close(out.double(), expected, atol=atol * H, rtol=rtol)


# --- fused attention + capture ---


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("D", [40, 64])
@pytest.mark.parametrize("T", [1, 7, 77])
def test_fused_attention_capture(dtype, atol, rtol, D, T):
    q, k, v = make_inputs(B, H, L, S, D, dtype)
    idx = token_idx(S, T)
    out = start_buffer((B, T, L))
    expected = _ref_self_normalising(q, k, idx, D**-0.5, out)
    o = triton_fused.fused_attention_capture(q, k, v, idx, None, out)  # None: SDPA's default D ** -0.5
    torch.testing.assert_close(out.double(), expected, atol=atol * H, rtol=rtol)
    assert_attention_close(o, q, k, v, D**-0.5)
    # Stored as [B, L, H, D] memory, so diffusers' transpose(1, 2).reshape(B, L, H·D) is a view.
    assert o.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("dtype,atol,rtol", [DTYPES[0], DTYPES[2]])
def test_fused_multiblock_with_bias(dtype, atol, rtol):
    # 3 query × 2 token programs per image (37 = 2·16 + 5, 20 = 16 + 4), 3 key blocks (77 = 2·32 + 13):
    # o is written by token block 0 only and must still be complete; the bias is SDPA's float mask,
    # with padding keys at -inf in the second image.
    D, T = 40, 20
    q, k, v = make_inputs(B, H, L, S, D, dtype)
    idx = token_idx(S, T)
    bias = torch.randn(B, 1, L, S, generator=torch.Generator().manual_seed(7))
    bias[1, ..., 60:] = float("-inf")
    out = start_buffer((B, T, L))
    expected = _ref_self_normalising(q, k, idx, D**-0.5, out, bias)
    o = triton_fused.fused_attention_capture(q, k, v, idx, D**-0.5, out, bias=bias, blocks=SMALL)
    torch.testing.assert_close(out.double(), expected, atol=atol * H, rtol=rtol)
    assert_attention_close(o, q, k, v, D**-0.5, bias)


@pytest.mark.parametrize("D", [80, 128, 160])
def test_fused_head_dims(D):
    dtype, atol, rtol = DTYPES[1]
    q, k, v = make_inputs(1, H, 21, 20, D, dtype)
    idx = token_idx(20, 7)
    out = start_buffer((1, 7, 21))
    expected = _ref_self_normalising(q, k, idx, D**-0.5, out)
    o = triton_fused.fused_attention_capture(q, k, v, idx, D**-0.5, out)
    torch.testing.assert_close(out.double(), expected, atol=atol * H, rtol=rtol)
    assert_attention_close(o, q, k, v, D**-0.5)


def test_fused_rejects_bad_calls():
    q, k, v = make_inputs(1, 1, 8, 513, 16, torch.float32)
    with pytest.raises(ValueError, match="at most 512 keys"):
        triton_fused.fused_attention_capture(q, k, v, torch.tensor([0]), None, torch.zeros(1, 1, 8))
    q, k, v = make_inputs(1, 1, 8, 20, 16, torch.float32)
    with pytest.raises(IndexError, match=r"\[0, 19\]"):
        triton_fused.fused_attention_capture(q, k, v, torch.tensor([20]), None, torch.zeros(1, 1, 8))
    with pytest.raises(TypeError, match="float32"):
        triton_fused.fused_attention_capture(
            q, k, v, torch.tensor([1]), None, torch.zeros(1, 1, 8, dtype=torch.float64)
        )
    with pytest.raises(ValueError, match="out must be"):
        triton_fused.fused_attention_capture(q, k, v, torch.tensor([1]), None, torch.zeros(1, 2, 8))
    with pytest.raises(ValueError, match="v must match k"):
        triton_fused.fused_attention_capture(q, k, v[:, :, :10], torch.tensor([1]), None, torch.zeros(1, 1, 8))
    with pytest.raises(ValueError, match="lse must be"):
        triton_capture.capture_from_lse(q, k[:, :, :1], torch.zeros(1, 1, 7), 0.25, torch.zeros(1, 1, 8))
