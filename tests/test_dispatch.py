"""Dispatch decides every kernel choice, the fused attention + capture kernel included: a backend declares that
capability with its key limit, select_backend / fused_attention_capture pick it (or say why not), and the tracer
reaches it only through dispatch. A stand-in fused backend (reference kernels) runs on the CPU."""

import pytest
import torch
import torch.nn.functional as F

from daam_fast import trace
from daam_fast.kernels import dispatch, reference, verify

PROMPT = "a red circle and a blue square"


@pytest.fixture
def fused_backend(monkeypatch):
    """A CPU backend with the fused capability (SDPA + the reference capture), up to 80 keys; records the batch
    size of each fused call."""
    calls = []

    def fused(q, k, v, token_idx, scale, out):
        calls.append(q.shape[0])
        reference.capture_self_normalising(q, k, token_idx, scale, out)
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    backend = dispatch.Backend(
        "fakefused",
        100,
        reference.capture_from_lse,
        reference.capture_self_normalising,
        devices=("cpu",),
        dtypes=(torch.float32, torch.float64),
        fused_attention=fused,
        max_fused_keys=80,
    )
    monkeypatch.setitem(dispatch._REGISTRY, "fakefused", backend)
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    verify.CHECKS.reset()  # each test sees the fake's first-use check
    yield calls
    verify.CHECKS.reset()


def _qkv(B=2, H=2, L=12, S=77, D=16):
    torch.manual_seed(0)
    return torch.randn(B, H, L, D), torch.randn(B, H, S, D), torch.randn(B, H, S, D)


def test_select_backend_decides_the_fused_capability(fused_backend):
    q, k, _ = _qkv()
    out = torch.zeros(2, 3, 12)
    assert dispatch.select_backend(q, out, fused_keys=77).name == "fakefused"
    with pytest.raises(dispatch.BackendUnavailable) as exc:
        dispatch.select_backend(q, out, fused_keys=81)  # past the fake's limit; no other backend fuses
    assert "81 keys > 80" in str(exc.value) and "torch: no fused attention + capture kernel" in str(exc.value)
    with pytest.raises(dispatch.BackendUnavailable, match="'torch' was forced.*no fused attention"):
        dispatch.select_backend(q, out, backend="torch", fused_keys=77)
    assert dispatch.select_backend(q, out).name == "fakefused"  # the capture kernels themselves: as before


def test_fused_attention_capture_runs_traced_rows_fused_and_the_rest_through_sdpa(fused_backend):
    q, k, v = _qkv()
    idx = torch.tensor([0, 3, 76])
    out = torch.zeros(1, 3, 12)
    o = dispatch.fused_attention_capture(q, k, v, idx, 0.25, out, rows=slice(1, 2))
    # Only the traced row went through the fused kernel: once for its first-use check (on a slice), once for real.
    assert fused_backend == [1, 1]
    torch.testing.assert_close(o, F.scaled_dot_product_attention(q, k, v, scale=0.25))
    expected = torch.zeros(1, 3, 12)
    reference.capture_self_normalising(q[1:], k[1:], idx, 0.25, expected)
    torch.testing.assert_close(out, expected)


def test_fused_attention_capture_answers_none_when_nothing_fuses(fused_backend, monkeypatch):
    q, k, v = _qkv(S=90)
    out = torch.zeros(2, 90, 12)
    assert dispatch.fused_attention_capture(q, k, v, torch.arange(90), 0.25, out) is None  # too many keys
    q, k, v = _qkv()
    assert dispatch.fused_attention_capture(q, k, v, torch.arange(77), 0.25, out[:, :77], backend="torch") is None
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")  # the environment forces a backend without the capability
    assert dispatch.fused_attention_capture(q, k, v, torch.arange(77), 0.25, out[:, :77]) is None
    assert fused_backend == [] and not out.any()
    with pytest.raises(ValueError, match="unknown capture backend 'nope'"):
        dispatch.fused_attention_capture(q, k, v, torch.arange(77), 0.25, out[:, :77], backend="nope")


def _maps(pipe, **kw):
    with trace(pipe, **kw) as tc:
        out = pipe(PROMPT, num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0),
                   output_type="np")  # fmt: skip
        return tc.compute_global_heat_map().heat_maps, torch.from_numpy(out.images)


def test_the_tracer_reaches_the_fused_kernel_only_through_dispatch(sd_pipe, fused_backend):
    expected, image = _maps(sd_pipe, backend="torch")
    assert fused_backend == []
    unfused, _ = _maps(sd_pipe, backend="fakefused", fused=False)
    assert fused_backend == []
    got, fused_image = _maps(sd_pipe, backend="fakefused", fused=True)
    assert fused_backend and set(fused_backend) == {1}  # CFG: the conditional row fused, the other through SDPA
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(unfused, expected, rtol=1e-5, atol=1e-7)
    assert (fused_image - image).abs().max() < 1e-4  # the fused rows' SDPA runs on their own: equal to rounding
