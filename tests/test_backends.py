"""lse sources per attention backend: conventions (layout, padding, log base) against float64, diffusers'
dispatcher backends, optional packages imported lazily, the xformers processor kept by tracing."""

from __future__ import annotations

import dataclasses
import logging
import sys
import warnings

import pytest
import torch
from fake_kernels import fake_flash_attn_modules, fake_sage_modules, fake_xformers_modules, install

from daam_fast import trace
from daam_fast.processors import lse_sources
from daam_fast.processors.lse_sources import SOURCES, diffusers_attention_with_lse
from daam_fast.processors.versions import DISPATCH_MIN, DiffusersVersionError, diffusers_version

DISPATCH_TOO_OLD = diffusers_version()[:2] < DISPATCH_MIN
needs_dispatch = pytest.mark.skipif(
    DISPATCH_TOO_OLD, reason="diffusers' attention dispatcher (attention_dispatch) arrived in diffusers 0.35"
)

OPTIONAL = {"xformers": "xformers", "flash_attn": "flash_attn", "flash_attn_3": "flash_attn_interface",
            "sage": "sageattention"}  # fmt: skip


def _qkv(B=2, L=50, S=77, H=3, D=40, dtype=torch.float32, layout="BLHD", seed=0):
    # L = 50: not a multiple of any kernel block (xformers pads lse to 32); H != L so a transposed lse fails.
    g = torch.Generator().manual_seed(seed)
    shape_q, shape_k = ((B, L, H, D), (B, S, H, D)) if layout == "BLHD" else ((B, H, L, D), (B, H, S, D))
    return tuple(torch.randn(s, generator=g).to(dtype) for s in (shape_q, shape_k, shape_k))


def _ref_lse(q, k, scale=None, bias=None, layout="BLHD"):
    """float64 natural-log logsumexp over all keys: [B, H, L]."""
    if layout == "BLHD":
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q.double(), k.double().transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.double()
    return torch.logsumexp(s, -1)


def _assert_lse_close(lse, q, k, scale=None, bias=None):
    """fp32 inputs: within 1e-5 of float64. fp16 / bf16: error at most 2x that of plain PyTorch
    (scores and logsumexp in the input dtype), as flash-attention's tests bound it."""
    ref = _ref_lse(q, k, scale=scale, bias=bias)
    if q.dtype == torch.float32:
        torch.testing.assert_close(lse.double(), ref, atol=1e-5, rtol=1e-6)
        return
    qt, kt = q.transpose(1, 2), k.transpose(1, 2)
    s = torch.matmul(qt, kt.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if bias is not None:
        s = s + bias.to(q.dtype)
    plain_err = (torch.logsumexp(s, -1).double() - ref).abs().max().item()
    assert (lse.double() - ref).abs().max().item() <= 2 * plain_err + 1e-6


# -- optional packages ------------------------------------------------------------------------------


@needs_dispatch
def test_optional_kernels_are_imported_lazily():
    import diffusers.models.attention_dispatch  # noqa: F401  (imports the optional kernels that are installed)

    import daam_fast.kernels.ops  # noqa: F401
    import daam_fast.processors.unet  # noqa: F401

    for name, module in OPTIONAL.items():
        if module in sys.modules and SOURCES[name].available() is not None:
            pytest.fail(f"{module} was imported although it is not usable")
    installed = {m for n, m in OPTIONAL.items() if SOURCES[n].available() is None}
    assert not {m for m in OPTIONAL.values() if m in sys.modules} - installed


@pytest.mark.parametrize("name", sorted(OPTIONAL))
def test_missing_optional_kernel_is_skipped_with_reason(name):
    try:
        __import__(OPTIONAL[name])
    except ImportError:
        pass
    else:
        pytest.skip(f"{OPTIONAL[name]} is installed here")
    q = _qkv()[0].cuda() if torch.cuda.is_available() else _qkv()[0]
    reasons = SOURCES[name].not_supported_reasons(q)
    assert reasons and "not importable" in reasons[0]
    assert OPTIONAL[name] not in sys.modules


# -- kernel conventions against stand-ins -----------------------------------------------------------


@pytest.mark.parametrize("bmk", [False, True], ids=["BMHK", "BMK"])
@pytest.mark.parametrize("masked", [False, True])
def test_xformers_lse_contract(monkeypatch, bmk, masked):
    install(monkeypatch, fake_xformers_modules())
    q, k, v = _qkv()
    B, L, H, D = q.shape
    S = k.shape[1]
    bias = None
    if masked:  # additive key mask, as XFormersAttnProcessor passes it: [B·H, L, S] (BMK) / [B, H, L, S]
        bias = torch.zeros(B, H, L, S)
        bias[..., 60:] = float("-inf")
    if bmk:  # diffusers' head_to_batch_dim layout: [B·H, L, D]
        q, k, v = (x.transpose(1, 2).reshape(B * H, -1, D) for x in (q, k, v))
        xb = None if bias is None else bias.reshape(B * H, L, S)
    else:
        xb = bias
    out, lse = lse_sources.xformers_with_lse(q, k, v, attn_bias=xb, scale=0.2, op=(object, object))
    expected_out = sys.modules["xformers.ops"].memory_efficient_attention(q, k, v, attn_bias=xb, scale=0.2)
    assert torch.equal(out, expected_out)
    assert lse.dtype == torch.float32 and lse.shape == ((B * H, 1, L) if bmk else (B, H, L))
    ref = _ref_lse(*(x.reshape(B, H, -1, D) if bmk else x for x in (q, k)), scale=0.2, bias=bias,
                   layout="BHLD" if bmk else "BLHD")  # fmt: skip
    torch.testing.assert_close(lse.reshape(B, H, L).double(), ref, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("name", ["flash_attn", "flash_attn_3", "sage"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_blhd_kernel_lse_contract(monkeypatch, name, dtype):
    install(monkeypatch, {**fake_flash_attn_modules(), **fake_sage_modules()})
    q, k, v = _qkv(dtype=dtype)
    out, lse = SOURCES[name].fn(q, k, v, scale=0.3)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    _assert_lse_close(lse, q, k, scale=0.3)


# -- diffusers' dispatch_attention_fn backends ------------------------------------------------------


@pytest.mark.skipif(not DISPATCH_TOO_OLD, reason="the dispatcher exists in this diffusers")
def test_dispatcher_backends_name_the_minimum_diffusers():
    q, k, v = _qkv()
    with pytest.raises(DiffusersVersionError, match=r"attention dispatcher.*needs diffusers >= 0\.35; installed"):
        diffusers_attention_with_lse(q, k, v)


def _dispatch(q, k, v, backend, **kw):
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex in eager mode warns that it is unfused
        return dispatch_attention_fn(q, k, v, backend=backend, **kw)


@pytest.mark.parametrize(
    "backend,dtype,masked",
    [
        ("native", torch.float32, False),
        ("native", torch.bfloat16, False),
        ("native", torch.float32, True),  # [B, S] boolean key mask, reshaped as diffusers does
        ("_native_flash", torch.float32, False),
        ("flex", torch.float32, False),
        ("flex", torch.bfloat16, False),
    ],
)
@needs_dispatch
def test_diffusers_backend_output_is_the_backends_and_lse_is_exact(backend, dtype, masked):
    q, k, v = _qkv(dtype=dtype)
    mask = None
    if masked:
        mask = torch.ones(q.shape[0], k.shape[1], dtype=torch.bool)
        mask[0, 70:] = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, lse = diffusers_attention_with_lse(q, k, v, attn_mask=mask, backend=backend)
    assert torch.equal(out, _dispatch(q, k, v, backend, attn_mask=mask))
    bias = None
    if masked:
        bias = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))[:, None, None, :]
    assert lse is not None and lse.dtype == torch.float32
    _assert_lse_close(lse, q, k, bias=bias)


@needs_dispatch
def test_diffusers_active_backend_is_used():
    from diffusers.models.attention_dispatch import attention_backend

    q, k, v = _qkv()
    with attention_backend("flex"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, lse = diffusers_attention_with_lse(q, k, v)
    assert torch.equal(out, _dispatch(q, k, v, "flex"))
    torch.testing.assert_close(lse.double(), _ref_lse(q, k), atol=1e-5, rtol=1e-6)


@needs_dispatch
@pytest.mark.parametrize("backend", ["flash", "_flash_3", "sage", "xformers"])
def test_diffusers_optional_backend_contract(monkeypatch, backend):
    """With stand-in kernels (made CPU-capable here) the output is what diffusers' own backend returns
    and the lse is the kernel's, converted to [B, H, L] natural log."""
    from diffusers.models import attention_dispatch as ad

    fakes = {**fake_flash_attn_modules(), **fake_sage_modules(), **fake_xformers_modules()}
    install(monkeypatch, fakes)
    monkeypatch.setattr(ad, "flash_attn_func", fakes["flash_attn"].flash_attn_func, raising=False)
    monkeypatch.setattr(ad, "flash_attn_3_func", fakes["flash_attn_interface"].flash_attn_func, raising=False)
    monkeypatch.setattr(ad, "sageattn", fakes["sageattention"].sageattn, raising=False)
    monkeypatch.setattr(ad, "xops", fakes["xformers.ops"], raising=False)
    name = lse_sources.DIFFUSERS_BACKENDS[backend]
    monkeypatch.setitem(SOURCES, name, dataclasses.replace(SOURCES[name], devices=("cpu",)))
    dtype = torch.float32 if backend == "xformers" else torch.float16
    q, k, v = _qkv(dtype=dtype)
    out, lse = diffusers_attention_with_lse(q, k, v, backend=backend)
    if backend == "_flash_3":  # diffusers wraps FA3 in a CUDA-only custom op: compare with the kernel itself
        expected = fakes["flash_attn_interface"].flash_attn_func(q, k, v)
    else:
        expected = _dispatch(q, k, v, backend)
    assert torch.equal(out, expected)
    _assert_lse_close(lse, q, k)


@needs_dispatch
def test_backend_without_lse_keeps_output_and_says_so(caplog):
    q, k, v = _qkv()
    lse_sources._logged.discard("diffusers-_native_math")
    with caplog.at_level(logging.WARNING, logger=lse_sources.__name__):
        out, lse = diffusers_attention_with_lse(q, k, v, backend="_native_math")
        diffusers_attention_with_lse(q, k, v, backend="_native_math")
    assert lse is None
    assert torch.equal(out, _dispatch(q, k, v, "_native_math"))
    msgs = [r.getMessage() for r in caplog.records if "_native_math" in r.getMessage()]
    assert len(msgs) == 1 and "computes its own lse" in msgs[0]


# -- the processor that was installed decides the kernel --------------------------------------------

PROMPT = "a red circle and a blue square"


def _run(pipe):
    return pipe(PROMPT, num_inference_steps=2, height=64, width=48, generator=torch.Generator().manual_seed(0),
                output_type="np").images  # fmt: skip


def test_xformers_processor_keeps_xformers_under_tracing(monkeypatch, sd_pipe):
    from diffusers.models import attention_processor as ap

    fakes = fake_xformers_modules()
    install(monkeypatch, fakes)
    monkeypatch.setattr(ap, "xformers", fakes["xformers"], raising=False)
    unet = sd_pipe.unet
    with trace(sd_pipe) as tc:
        _run(sd_pipe)
        sdpa_maps = tc.compute_global_heat_map().heat_maps
    unet.set_attn_processor(ap.XFormersAttnProcessor())
    try:
        plain = _run(sd_pipe)
        calls = fakes["xformers"].calls
        calls["forward_requires_grad"] = 0
        with trace(sd_pipe) as tc:
            traced = _run(sd_pipe)
            maps = tc.compute_global_heat_map().heat_maps
        n_cross = len(tc.layers)
    finally:
        unet.set_attn_processor(ap.AttnProcessor2_0())
    assert torch.equal(torch.from_numpy(traced), torch.from_numpy(plain))  # xformers output, bit for bit
    assert calls["forward_requires_grad"] == 2 * n_cross  # every traced call took xformers' lse
    # The xformers stand-in computes in float64, SDPA in float32: the latents differ by rounding only.
    torch.testing.assert_close(maps, sdpa_maps, rtol=2e-4, atol=1e-6)


def test_fused_qkv_processor_keeps_sdpa_with_lse():
    from tests.fixtures.pipelines import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    with trace(pipe) as tc:
        _run(pipe)
        sdpa_maps = tc.compute_global_heat_map().heat_maps
    pipe.fuse_qkv_projections()
    plain = _run(pipe)
    with trace(pipe) as tc:
        kinds = {m.processor.kind for m in tc._modules}
        traced = _run(pipe)
        maps = tc.compute_global_heat_map().heat_maps
    assert kinds == {"sdpa_fused"}  # reproduced with lse, not wrapped and recomputed
    assert torch.equal(torch.from_numpy(traced), torch.from_numpy(plain))
    # Fused linears round differently from separate ones: the latents differ by rounding only.
    torch.testing.assert_close(maps, sdpa_maps, rtol=2e-4, atol=1e-6)


def test_sdpa_source_follows_sdpa_kernel_selection():
    """With SDPA restricted to math (sdpa_kernel), tracing must not run the flash kernel instead."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from daam_fast.processors.attention import attention_with_lse

    q, k, v = _qkv(layout="BHLD")
    out, lse = attention_with_lse(q, k, v)
    assert lse is not None and torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    with sdpa_kernel(SDPBackend.MATH):
        out, lse = attention_with_lse(q, k, v)
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert lse is None and torch.equal(out, expected)
