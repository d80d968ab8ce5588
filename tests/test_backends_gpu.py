"""The real kernels on a GPU: SDPA's flash / efficient / cuDNN ops, xformers, flash-attn 2/3 and
FlexAttention (eager and compiled), against float64. Skipped without CUDA; kernels whose package is
missing are skipped with the reason ``LseSource.available()`` gives."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from daam_fast.kernels.reference import capture_from_lse
from daam_fast.processors.lse_sources import SOURCES

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# L = 1000 queries (not a multiple of any block), S = 77 text keys, head dims of SD/SDXL (40, 64, 80, 160).
HEAD_DIMS = [40, 64, 80, 160]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _qkv(dtype, D, B=2, H=5, L=1000, S=77, layout="BHLD"):
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(B, H, L, D), (B, H, S, D), (B, H, S, D)]
    q, k, v = (torch.randn(s, generator=g, device="cuda").to(dtype) for s in shapes)
    if layout == "BLHD":
        q, k, v = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    return q, k, v


def _bhld(x, layout):
    return x if layout == "BHLD" else x.transpose(1, 2)


def _check_lse_and_maps(q, k, lse, scale, layout):
    """lse within 2x plain PyTorch's error in q's dtype (fp32: 1e-5) of float64; maps from it sum to 1."""
    qh, kh = _bhld(q, layout), _bhld(k, layout)
    s64 = torch.matmul(qh.double(), kh.double().transpose(-1, -2)) * scale
    ref = torch.logsumexp(s64, -1)
    assert lse.dtype == torch.float32 and lse.shape == ref.shape
    err = (lse.double() - ref).abs().max().item()
    if q.dtype == torch.float32:
        assert err <= 1e-4  # TF32 may be on for matmuls in fp32 kernels
    else:
        plain = torch.logsumexp(torch.matmul(qh, kh.transpose(-1, -2)) * scale, -1)
        assert err <= 2 * (plain.double() - ref).abs().max().item() + 1e-6
    # All S columns captured from this lse: per query, heads summed, they must add up to H.
    B, H, L, _ = qh.shape
    out = torch.zeros(B, kh.shape[2], L, device="cuda")
    capture_from_lse(qh, kh, lse, scale, out)
    torch.testing.assert_close(out.sum(1), torch.full((B, L), float(H), device="cuda"), rtol=2e-2, atol=0)


def _skip_unless(name, q):
    reasons = SOURCES[name].not_supported_reasons(q)
    if reasons:
        pytest.skip(f"{name}: " + "; ".join(reasons))


@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "name,sdp",
    [
        ("sdpa_flash", "FLASH_ATTENTION"),
        ("sdpa_efficient", "EFFICIENT_ATTENTION"),
        ("sdpa_cudnn", "CUDNN_ATTENTION"),
    ],
)
def test_sdpa_kernels_output_equals_sdpa_and_lse_is_exact(name, sdp, dtype, D):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = _qkv(dtype, D)
    _skip_unless(name, q)
    try:
        with sdpa_kernel(getattr(SDPBackend, sdp)):
            expected = F.scaled_dot_product_attention(q, k, v)
    except RuntimeError as exc:
        pytest.skip(f"SDPA has no {sdp} kernel for {dtype}, D={D} here: {exc}")
    out, lse = SOURCES[name].fn(q, k, v)
    assert torch.equal(out, expected)
    _check_lse_and_maps(q, k, lse, D**-0.5, "BHLD")


@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sdpa_auto_pick_equals_sdpa(dtype, D):
    q, k, v = _qkv(dtype, D)
    out, lse = SOURCES["sdpa"].fn(q, k, v)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))
    if lse is not None:
        _check_lse_and_maps(q, k, lse, D**-0.5, "BHLD")


@pytest.mark.parametrize("bmk", [False, True], ids=["BMHK", "BMK"])
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_xformers_output_and_lse(dtype, D, bmk):
    q, k, v = _qkv(dtype, D, layout="BLHD")
    _skip_unless("xformers", q)
    import xformers.ops as xops

    if bmk:  # diffusers' XFormersAttnProcessor layout [B·H, L, D]
        q, k, v = (x.transpose(1, 2).reshape(-1, x.shape[1], D).contiguous() for x in (q, k, v))
    out, lse = SOURCES["xformers"].fn(q, k, v, scale=0.125)
    assert torch.equal(out, xops.memory_efficient_attention(q, k, v, scale=0.125))
    if bmk:
        B, H = 2, 5
        q4, k4 = (x.reshape(B, H, -1, D) for x in (q, k))
        _check_lse_and_maps(q4, k4, lse.reshape(B, H, -1), 0.125, "BHLD")
    else:
        _check_lse_and_maps(q, k, lse, 0.125, "BLHD")


@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["flash_attn", "flash_attn_3"])
def test_flash_attn_output_and_lse(name, dtype, D):
    q, k, v = _qkv(dtype, D, layout="BLHD")
    _skip_unless(name, q)
    module = __import__("flash_attn" if name == "flash_attn" else "flash_attn_interface")
    out, lse = SOURCES[name].fn(q, k, v, scale=D**-0.5)
    expected = module.flash_attn_func(q, k, v, softmax_scale=D**-0.5)
    expected = expected[0] if isinstance(expected, tuple) else expected
    assert torch.equal(out, expected)
    _check_lse_and_maps(q, k, lse, D**-0.5, "BLHD")


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("D", [64, 80])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_flex_lse_is_natural_log(dtype, D, compiled):
    """The fused (compiled) kernel works in base 2 internally; what it returns must be natural log."""
    q, k, v = _qkv(dtype, D)
    fn = SOURCES["flex"].fn
    if compiled:
        fn = torch.compile(fn, fullgraph=True)
    out, lse = fn(q, k, v)
    torch.testing.assert_close(out.float(), F.scaled_dot_product_attention(q, k, v).float(), rtol=2e-2, atol=2e-2)
    _check_lse_and_maps(q, k, lse, D**-0.5, "BHLD")


def test_traced_sd_on_cuda_image_unchanged_and_compiles_without_breaks():
    from torch._dynamo.utils import counters

    from daam_fast import trace
    from tests.fixtures.pipelines import tiny_sd_pipeline

    pipe = tiny_sd_pipeline().to("cuda", torch.float16)

    def run():
        return pipe("a red circle", num_inference_steps=3, height=64, width=64,
                    generator=torch.Generator("cuda").manual_seed(0), output_type="pt").images  # fmt: skip

    plain = run()
    with trace(pipe) as tc:
        traced = run()
        eager = tc.compute_global_heat_map().heat_maps
    assert torch.equal(plain, traced)
    torch._dynamo.reset()
    counters.clear()
    pipe.unet = torch.compile(pipe.unet)
    with trace(pipe) as tc:
        run()
        maps = tc.compute_global_heat_map().heat_maps
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(maps, eager, rtol=2e-2, atol=1e-3)  # fp16 UNet, fused differently by inductor


@pytest.mark.parametrize("first", ["CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "FLASH_ATTENTION"])
def test_sdpa_auto_pick_follows_priority_order(first):
    """sdpa_kernel(..., set_priority=True) reorders SDPA's choice; tracing must run the same kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from daam_fast.processors.attention import attention_with_lse

    q, k, v = _qkv(torch.float16, 64)
    order = [getattr(SDPBackend, first)] + [
        b for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)
        if b != getattr(SDPBackend, first)
    ]  # fmt: skip
    with sdpa_kernel(order, set_priority=True):
        out, lse = attention_with_lse(q, k, v)
        expected = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(out, expected)
    assert lse is not None
    _check_lse_and_maps(q, k, lse, 64**-0.5, "BHLD")
