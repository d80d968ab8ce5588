"""The CUDA capture kernels (csrc/capture_kernels.cuh), run on the CPU through a thread-per-CUDA-thread
emulation (tests/cuda_emu/), against the float64 reference.

This checks what a compile cannot: index and stride arithmetic, tiling over queries / tokens / keys / head dim,
tails, the online logsumexp and its fixed-order reduction, per-head output, bias and token gathering. Parameters
are packed here the way csrc/capture.cu packs them. On a GPU, tests/test_cuda_gpu.py runs the real thing.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from daam_fast.kernels import reference

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "tests" / "cuda_emu"
CXX = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler to build the kernel emulation")

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# The kernels compute in fp32 from the same fp16/bf16 values the float64 oracle upcasts, so input rounding is
# shared and only fp32 arithmetic differs: one tolerance for all input dtypes.
TOL = {torch.float32: (2e-5, 1e-4), torch.float16: (2e-5, 1e-4), torch.bfloat16: (2e-5, 1e-4)}


class Params(ctypes.Structure):
    """Mirror of daam_fast::kernels::Params (the size is checked against the C++ sizeof)."""

    _fields_ = [
        ("q", ctypes.c_void_p),
        ("q_stride", ctypes.c_int64 * 4),
        ("k", ctypes.c_void_p),
        ("k_stride", ctypes.c_int64 * 4),
        ("lse", ctypes.c_void_p),
        ("lse_stride", ctypes.c_int64 * 3),
        ("bias", ctypes.c_void_p),
        ("bias_stride", ctypes.c_int64 * 4),
        ("token_idx", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("out_stride", ctypes.c_int64 * 4),
        ("H", ctypes.c_int),
        ("L", ctypes.c_int),
        ("D", ctypes.c_int),
        ("T", ctypes.c_int),
        ("S", ctypes.c_int),
        ("heads_per_block", ctypes.c_int),
        ("scale", ctypes.c_float),
    ]


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """The emulation library, compiled once per session (a few seconds)."""
    so = tmp_path_factory.mktemp("cuda_emu") / "capture_emu.so"
    torch_inc = Path(torch.__file__).parent / "include"
    cmd = [CXX, "-std=c++20", "-O2", "-shared", "-fPIC", "-pthread", "-Wall", "-Wextra", "-Wno-unknown-pragmas"]
    cmd += [f"-I{ROOT / 'csrc'}", f"-I{EMU}", "-isystem", str(torch_inc), str(EMU / "capture_emu.cpp"), "-o", str(so)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lib = ctypes.CDLL(str(so))
    lib.emu_params_size.restype = ctypes.c_int64
    lib.emu_capture.argtypes = [ctypes.POINTER(Params), ctypes.c_int64, ctypes.c_int]
    lib.emu_row_lse.argtypes = [ctypes.POINTER(Params), ctypes.c_int64, ctypes.c_int, ctypes.c_void_p]
    assert lib.emu_params_size() == ctypes.sizeof(Params)
    return lib


def _strides(t: torch.Tensor, n: int):
    return (ctypes.c_int64 * n)(*t.stride())


def _pack(q, k, n_cols, scale, out, bias) -> Params:
    # As check_and_pack in csrc/capture.cu.
    p = Params()
    p.q, p.q_stride = q.data_ptr(), _strides(q, 4)
    p.k, p.k_stride = k.data_ptr(), _strides(k, 4)
    p.out = out.data_ptr()
    if out.dim() == 4:
        p.out_stride = _strides(out, 4)
    else:
        p.out_stride = (ctypes.c_int64 * 4)(out.stride(0), 0, out.stride(1), out.stride(2))
    if bias is not None:
        p.bias, p.bias_stride = bias.data_ptr(), _strides(bias, 4)
    p.H, p.L, p.D = q.shape[1], q.shape[2], q.shape[3]
    p.T, p.S = n_cols, k.shape[2]
    p.heads_per_block = 1 if out.dim() == 4 else q.shape[1]
    p.scale = scale
    return p


def emu_capture_from_lse(emu, q, k_sel, lse, scale, out, bias=None):
    B, H, L, _ = q.shape
    T = k_sel.shape[2]
    bias = None if bias is None else bias.float().expand(B, H, L, T)  # as daam_fast.kernels.cuda does
    p = _pack(q, k_sel, T, scale, out, bias)
    p.lse, p.lse_stride = lse.data_ptr(), _strides(lse, 3)
    assert emu.emu_capture(ctypes.byref(p), B, DTYPE_CODE[q.dtype]) == 0
    return out


def emu_capture_self_normalising(emu, q, k, token_idx, scale, out, bias=None):
    B, H, L, _ = q.shape
    S = k.shape[2]
    bias = None if bias is None else bias.float().expand(B, H, L, S)
    idx = torch.as_tensor(token_idx, dtype=torch.int64).contiguous()
    p = _pack(q, k, idx.numel(), scale, out, bias)
    lse = torch.full((B, H, L), float("nan"))  # every row must be written
    assert emu.emu_row_lse(ctypes.byref(p), B, DTYPE_CODE[q.dtype], lse.data_ptr()) == 0
    p.lse, p.lse_stride = lse.data_ptr(), _strides(lse, 3)
    p.token_idx = idx.data_ptr()
    assert emu.emu_capture(ctypes.byref(p), B, DTYPE_CODE[q.dtype]) == 0
    return out, lse


def _inputs(B, H, L, D, n_keys, dtype, *, strided: bool, seed: int = 0):
    """q [B,H,L,D] and keys [B,H,n_keys,D]; strided: views of [B,L,H,D] / [B,n,H,D] (diffusers' layout)."""
    g = torch.Generator().manual_seed(seed)
    if strided:
        q = torch.randn(B, L, H, D, generator=g).to(dtype).transpose(1, 2)
        k = torch.randn(B, n_keys, H, D, generator=g).to(dtype).transpose(1, 2)
    else:
        q = torch.randn(B, H, L, D, generator=g).to(dtype)
        k = torch.randn(B, H, n_keys, D, generator=g).to(dtype)
    return q, k


def _out(B, H, T, L, per_head, seed=1):
    # Non-zero start: the kernel must add, not overwrite.
    shape = (B, H, T, L) if per_head else (B, T, L)
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FROM_LSE_SHAPES = [
    # (B, H, L, D, T)
    (2, 3, 130, 40, 77),  # 3 query tiles with a tail of 2; SD's 77 tokens in one 80-wide tile; D tail (40 = 32+8)
    (1, 2, 64, 64, 1),  # exactly one query tile; T = 1
    (1, 2, 70, 80, 7),  # D = 80 (2.5 slices); T = 7
    (1, 1, 5, 160, 100),  # two token tiles (100 > 80); D = 160 (5 slices); L below one tile
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", FROM_LSE_SHAPES, ids=str)
def test_capture_from_lse(emu, shape, dtype):
    B, H, L, D, T = shape
    q, k_all = _inputs(B, H, L, D, T + 20, dtype, strided=False)
    k_sel = k_all[:, :, 3 : 3 + T]  # a slice of the full keys, as the processors pass it
    scale = D**-0.5
    lse = reference.row_logsumexp(q.double(), k_all.double(), scale).float()
    out = _out(B, H, T, L, per_head=False)
    expected = reference.capture_from_lse(q.double(), k_sel.double(), lse.double(), scale, out.double())
    emu_capture_from_lse(emu, q, k_sel, lse, scale, out)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_capture_from_lse_strided(emu, dtype):
    """q, k_sel, lse and out all non-contiguous: q/k in [B, L, H, D] memory, lse sliced from a padded buffer
    (torch's efficient SDPA pads L to a multiple of 32), out a column block of a wider heat buffer."""
    B, H, L, D, T = 2, 3, 77, 64, 9
    q, k_all = _inputs(B, H, L, D, 30, dtype, strided=True)
    k_sel = k_all[:, :, 10 : 10 + T]
    scale = 0.125
    lse_padded = torch.zeros(B, H, 96)
    lse_padded[..., :L] = reference.row_logsumexp(q.double(), k_all.double(), scale).float()
    lse = lse_padded[..., :L]
    heat = torch.rand(B, T, 2 * L, generator=torch.Generator().manual_seed(1))
    out = heat[..., 1::2]  # stride 2 along L
    assert not (q.is_contiguous() or k_sel.is_contiguous() or lse.is_contiguous() or out.is_contiguous())
    expected = reference.capture_from_lse(q.double(), k_sel.double(), lse.double(), scale, out.double())
    untouched = heat[..., 0::2].clone()
    emu_capture_from_lse(emu, q, k_sel, lse, scale, out)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=rtol)
    assert torch.equal(heat[..., 0::2], untouched)


def test_capture_from_lse_per_head_and_bias(emu):
    """[B, H, T, L] output keeps heads apart; an additive bias broadcast from [L, T] (with -inf: masked)."""
    B, H, L, D, T = 2, 3, 70, 40, 12
    q, k_sel = _inputs(B, H, L, D, T, torch.float16, strided=False)
    scale = D**-0.5
    lse = torch.randn(B, H, L).abs() + 3
    bias = torch.randn(L, T)
    bias[::5, 2] = float("-inf")
    out = _out(B, H, T, L, per_head=True)
    expected = reference.capture_from_lse(q.double(), k_sel.double(), lse.double(), scale, out.double(), bias=bias)
    emu_capture_from_lse(emu, q, k_sel, lse, scale, out, bias=bias)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-4)


SELF_NORM_SHAPES = [
    # (B, H, L, D, S, T)
    (2, 2, 70, 64, 77, 5),  # cross-attention-like: all 77 keys in one tile, query tail of 6
    (1, 2, 33, 40, 200, 7),  # 3 key tiles (200 = 2·80 + 40): the online max/sum across tiles and threads
    (1, 1, 1, 80, 1, 1),  # single query, single key
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SELF_NORM_SHAPES, ids=str)
def test_capture_self_normalising(emu, shape, dtype):
    B, H, L, D, S, T = shape
    q, k = _inputs(B, H, L, D, S, dtype, strided=True)
    token_idx = torch.randperm(S, generator=torch.Generator().manual_seed(2))[:T]
    scale = D**-0.5
    out = _out(B, H, T, L, per_head=False)
    expected = reference.capture_self_normalising(q.double(), k.double(), token_idx, scale, out.double())
    _, lse = emu_capture_self_normalising(emu, q, k, token_idx, scale, out)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(lse.double(), reference.row_logsumexp(q.double(), k.double(), scale), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=rtol)


def test_capture_self_normalising_masked_keys_and_per_head(emu):
    """A key-padding mask (bias -inf on some keys, broadcast [B, 1, 1, S]) drops those keys from the lse and
    zeroes their captured columns; large score offsets exercise the running-max rescaling."""
    B, H, L, D, S, T = 2, 2, 40, 32, 150, 4
    q, k = _inputs(B, H, L, D, S, torch.float32, strided=False)
    k[:, :, 100] *= 8  # one dominant key late in the sequence: the running max must move
    mask = torch.zeros(B, 1, 1, S)
    mask[0, ..., 120:] = float("-inf")
    mask[1, ..., :10] = float("-inf")
    token_idx = torch.tensor([0, 5, 100, 130])
    out = _out(B, H, T, L, per_head=True)
    expected = reference.capture_self_normalising(q.double(), k.double(), token_idx, 0.2, out.double(), bias=mask)
    emu_capture_self_normalising(emu, q, k, token_idx, 0.2, out, bias=mask)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-4)


def test_out_of_range_token_gives_nan_without_reading(emu):
    """The Python wrapper rejects bad indices; should one reach the kernel, its column is NaN (visible), the
    others are unaffected, and no key row outside [0, S) is read."""
    B, H, L, D, S = 1, 2, 20, 32, 10
    q, k = _inputs(B, H, L, D, S, torch.float32, strided=False)
    out = torch.zeros(B, 2, L)
    emu_capture_self_normalising(emu, q, k, torch.tensor([3, S + 5]), 0.2, out)
    expected = reference.capture_self_normalising(
        q.double(), k.double(), torch.tensor([3]), 0.2, torch.zeros(B, 1, L, dtype=torch.float64)
    )
    torch.testing.assert_close(out[:, :1].double(), expected, atol=2e-5, rtol=1e-4)
    assert torch.isnan(out[:, 1]).all()
