"""Reference capture kernels against a materialised float64 softmax."""

import pytest
import torch

from daam_fast.kernels import dispatch, reference

# (dtype, atol, rtol): fp32 ~ 1e-6 relative; half types round q and k to 8/11 mantissa bits, which moves
# probabilities by ~1e-2 relative, and the float64 oracle sees the same rounded inputs, so only the
# fp32 accumulation error remains.
DTYPES = [(torch.float32, 1e-6, 1e-5), (torch.float16, 1e-5, 1e-4), (torch.bfloat16, 1e-5, 1e-4)]
# (B, H, L, T, S, D): what each shape exercises
SHAPES = [
    (1, 2, 100, 77, 77, 40),  # all 77 columns, L not a multiple of any chunk
    (2, 3, 257, 7, 77, 64),  # a few columns, odd L
    (1, 1, 33, 1, 77, 80),  # T = 1
    (2, 2, 64, 5, 20, 160),  # large head dim
]


def _inputs(B, H, L, S, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # q as diffusers makes it: a transposed view of [B, L, H*D] (non-contiguous).
    q = torch.randn(B, L, H * D, generator=g).view(B, L, H, D).transpose(1, 2).to(dtype)
    k = torch.randn(B, S, H * D, generator=g).view(B, S, H, D).transpose(1, 2).to(dtype)
    return q, k


def _oracle(q, k, idx, scale, bias=None):
    p = reference.naive_attention_probs(q, k, scale, bias)  # [B, H, L, S] float64
    return p[..., idx].transpose(-1, -2)  # [B, H, T, L]


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("B,H,L,T,S,D", SHAPES)
@pytest.mark.parametrize("chunk", [reference.DEFAULT_CHUNK_BYTES, 20_000])  # one chunk / many uneven chunks
def test_capture_from_lse_matches_float64(B, H, L, T, S, D, dtype, atol, rtol, chunk):
    q, k = _inputs(B, H, L, S, D, dtype)
    idx = torch.randperm(S, generator=torch.Generator().manual_seed(1))[:T]
    scale = D**-0.5
    v = torch.randn_like(k)
    _, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False)  # non-contiguous lse
    assert H == 1 or not lse.is_contiguous()
    expected = _oracle(q, k, idx, scale)
    out = torch.full((B, T, L), 0.5)  # captures add, never overwrite
    reference.capture_from_lse(q, k[:, :, idx], lse, scale, out, max_chunk_bytes=chunk)
    torch.testing.assert_close(out.double(), expected.sum(1) + 0.5, atol=atol * H, rtol=rtol)
    per_head = torch.zeros(B, H, T, L)
    reference.capture_from_lse(q, k[:, :, idx], lse, scale, per_head, max_chunk_bytes=chunk)
    torch.testing.assert_close(per_head.double(), expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("B,H,L,T,S,D", SHAPES)
def test_self_normalising_matches_float64(B, H, L, T, S, D, dtype, atol, rtol):
    q, k = _inputs(B, H, L, S, D, dtype, seed=2)
    idx = torch.arange(S)[-T:]
    out = torch.zeros(B, T, L)
    reference.capture_self_normalising(q, k, idx, D**-0.5, out, max_chunk_bytes=30_000)
    torch.testing.assert_close(out.double(), _oracle(q, k, idx, D**-0.5).sum(1), atol=atol * H, rtol=rtol)


def test_attention_mask_bias_matches_float64():
    q, k = _inputs(2, 2, 50, 77, 40, torch.float32)
    bias = torch.zeros(2, 1, 1, 77)
    bias[0, ..., 60:] = -10000.0  # an encoder attention mask as diffusers builds it
    v = torch.randn_like(k)
    _, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=bias)
    idx = torch.tensor([0, 5, 70])
    expected = _oracle(q, k, idx, 40**-0.5, bias).sum(1)
    out = torch.zeros(2, 3, 50)
    reference.capture_from_lse(q, k[:, :, idx], lse, 40**-0.5, out, bias=bias[..., idx])
    torch.testing.assert_close(out.double(), expected, atol=1e-6, rtol=1e-5)
    out2 = torch.zeros(2, 3, 50)
    reference.capture_self_normalising(q, k, idx, 40**-0.5, out2, bias=bias)
    torch.testing.assert_close(out2.double(), expected, atol=1e-6, rtol=1e-5)
    assert out[0, 2].abs().max() < 1e-6  # masked column gets (numerically) nothing


def test_memory_stays_under_chunk_bound():
    # SD-1.5's largest cross-attention call: 4096 queries, 77 tokens, 8 heads x 2 (CFG) -> here 20 heads.
    B, H, L, S, D = 1, 20, 4096, 77, 64
    q, k = _inputs(B, H, L, S, D, torch.float32)
    lse = torch.randn(B, H, L)
    out = torch.zeros(B, S, L)
    bound = 8 * 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        reference.capture_from_lse(q, k, lse, D**-0.5, out, max_chunk_bytes=bound)
    peak = _peak_bytes(prof)
    full = B * H * L * S * 4  # the probability tensor an unfused capture would build: 25 MB
    assert 0 < peak <= bound + 2**20, (peak, bound)
    assert peak < full / 2


def _peak_bytes(prof) -> int:
    # Replay allocations (each op's own) and frees ("[memory]" events) in time order: the peak of live
    # temporary memory.
    live = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def test_validation_errors_name_the_bad_value():
    q, k = _inputs(1, 2, 10, 77, 40, torch.float32)
    with pytest.raises(ValueError, match=r"out must be \[B, T, L\]"):
        reference.capture_from_lse(q, k, torch.zeros(1, 2, 10), 1.0, torch.zeros(1, 76, 10))
    with pytest.raises(ValueError, match="lse must be"):
        reference.capture_from_lse(q, k, torch.zeros(1, 2, 9), 1.0, torch.zeros(1, 77, 10))
    with pytest.raises(TypeError, match="k_sel dtype"):
        reference.capture_from_lse(q, k.half(), torch.zeros(1, 2, 10), 1.0, torch.zeros(1, 77, 10))
    with pytest.raises(IndexError, match=r"\[0, 76\]"):
        reference.capture_self_normalising(q, k, torch.tensor([77]), 1.0, torch.zeros(1, 1, 10))


def test_dispatch_forced_and_unknown_backends(monkeypatch):
    q, k = _inputs(1, 1, 8, 77, 40, torch.float32)
    out = torch.zeros(1, 77, 8)
    assert dispatch.select_backend(q, out).name in {b.name for b in dispatch.backends()}
    assert dispatch.select_backend(q, out, backend="torch").name == "torch"
    with pytest.raises(ValueError, match="unknown capture backend 'nope'"):
        dispatch.select_backend(q, out, backend="nope")
    monkeypatch.setenv("DAAM_FAST_BACKEND", "nope")
    with pytest.raises(ValueError, match="valid:"):
        dispatch.select_backend(q, out)
    monkeypatch.setenv("DAAM_FAST_BACKEND", "torch")
    assert dispatch.select_backend(q, out).name == "torch"
