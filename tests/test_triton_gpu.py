"""The Triton kernels on a GPU against a float64 oracle, in fp16 / bf16 / fp32, with the tiles the
dispatcher picks (the fp16/bf16 tensor-core branch, ``UPCAST=False``, runs only here: the interpreter
always upcasts).

- ``capture_from_lse`` with the lse of torch's own SDPA (the path a default trace takes);
- ``capture_self_normalising`` (the kernel computes the lse itself);
- ``fused_attention_capture``: both the attention output and the captured columns.

Skipped without a CUDA device or without Triton.
"""

from __future__ import annotations

import pytest
import torch
from gpu_inputs import DEV, qkv, start

from daam_fast.kernels import reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

triton_capture = pytest.importorskip("daam_fast.kernels.triton_capture")
if triton_capture.TRITON_IMPORT_ERROR is not None:  # pragma: no cover - depends on the install
    pytest.skip(f"triton unavailable: {triton_capture.TRITON_IMPORT_ERROR}", allow_module_level=True)
from daam_fast.kernels import triton_fused  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEAD_DIMS = [40, 64, 128, 160]
# Captured probabilities: fp32 accumulation of exactly representable products (fp16/bf16 inputs on
# tensor cores, fp32 with IEEE dots), so one tolerance for every input dtype, as for the CUDA kernel.
CAPTURE_TOL = {torch.float32: (2e-5, 1e-4), torch.float16: (2e-5, 1e-4), torch.bfloat16: (2e-5, 1e-4)}
# Attention output: the probabilities are rounded to the input dtype for the PV product and the output
# is stored in it, as flash SDPA does: a few units in the last place of that dtype.
OUTPUT_TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 4e-3), torch.bfloat16: (1.6e-2, 3.2e-2)}


def _oracle_probs(q, k, idx, bias=None, per_head=False):
    p = reference.naive_attention_probs(q, k, bias=bias)[..., idx]  # [B, H, L, T] float64
    p = p.transpose(-1, -2)  # [B, H, T, L]
    return p if per_head else p.sum(1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("LT", [(1029, 7), (4096, 77), (333, 1)], ids=str)
def test_capture_from_lse(LT, D, dtype):
    L, T = LT
    B, H, S = 2, 3, 77
    q, k, _ = qkv(B, H, L, S, D, dtype)
    idx = torch.arange(S - T, S, device=DEV)
    # The exact lse, rounded to fp32 as attention kernels return it.
    lse = torch.logsumexp(torch.matmul(q.double(), k.double().transpose(-1, -2)) * D**-0.5, -1).float()
    out = start((B, T, L))
    expected = out.double() + _oracle_probs(q, k, idx)
    triton_capture.capture_from_lse(q, k[:, :, idx], lse, D**-0.5, out)
    torch.testing.assert_close(out.double(), expected, atol=CAPTURE_TOL[dtype][0], rtol=CAPTURE_TOL[dtype][1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("LST", [(1029, 77, 7), (4096, 77, 77), (333, 300, 1)], ids=str)
def test_capture_self_normalising(LST, D, dtype):
    L, S, T = LST
    B, H = 2, 3
    q, k, _ = qkv(B, H, L, S, D, dtype)
    idx = torch.arange(0, S, max(1, S // T))[:T]
    out = start((B, T, L))
    expected = out.double() + _oracle_probs(q, k, idx.to(DEV))
    triton_fused.capture_self_normalising(q, k, idx, D**-0.5, out)
    torch.testing.assert_close(out.double(), expected, atol=CAPTURE_TOL[dtype][0], rtol=CAPTURE_TOL[dtype][1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("LST", [(1029, 77, 7), (4096, 77, 77), (1024, 154, 77)], ids=str)
def test_fused_attention_capture(LST, D, dtype):
    L, S, T = LST
    B, H = 2, 3
    q, k, v = qkv(B, H, L, S, D, dtype)
    idx = torch.arange(T, device=DEV)
    out = start((B, T, L))
    expected = out.double() + _oracle_probs(q, k, idx)
    o = triton_fused.fused_attention_capture(q, k, v, idx, None, out)
    torch.testing.assert_close(out.double(), expected, atol=CAPTURE_TOL[dtype][0], rtol=CAPTURE_TOL[dtype][1])
    o_expected = torch.matmul(reference.naive_attention_probs(q, k), v.double())
    assert o.dtype == dtype and o.shape == q.shape
    atol, rtol = OUTPUT_TOL[dtype]
    torch.testing.assert_close(o.double(), o_expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fused_per_head_and_bias(dtype):
    B, H, L, S, D, T = 2, 4, 1029, 77, 64, 9
    q, k, v = qkv(B, H, L, S, D, dtype)
    bias = torch.randn(B, 1, L, S, device=DEV, generator=torch.Generator(device=DEV).manual_seed(3))
    idx = torch.arange(1, 1 + T, device=DEV)
    out = start((B, H, T, L))
    expected = out.double() + _oracle_probs(q, k, idx, bias=bias, per_head=True)
    o = triton_fused.fused_attention_capture(q, k, v, idx, None, out, bias=bias)
    torch.testing.assert_close(out.double(), expected, atol=CAPTURE_TOL[dtype][0], rtol=CAPTURE_TOL[dtype][1])
    o_expected = torch.matmul(reference.naive_attention_probs(q, k, bias=bias), v.double())
    atol, rtol = OUTPUT_TOL[dtype]
    torch.testing.assert_close(o.double(), o_expected, atol=atol, rtol=rtol)
