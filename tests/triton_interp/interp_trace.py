"""A traced tiny SD pipeline with ``DAAM_FAST_BACKEND=triton`` (interpreted) gives the torch backend's maps.

Run only through tests/test_triton_kernels.py (needs TRITON_INTERPRET=1 before triton is imported).
"""

import pytest
import torch
from triton_interp_helpers import DTYPES

from daam_fast import trace
from daam_fast.kernels import dispatch, triton_capture, triton_fused

# The pipeline runs in fp32; both backends compute in fp32, so the maps agree to fp32 relative error.
# Maps are means of probabilities (peak ~0.02 here): the absolute floor is relative to the peak.
_, _, RTOL = DTYPES[0]
ATOL_OF_PEAK = 1e-6


@pytest.fixture
def launches(monkeypatch):
    """Counts Triton launches through the backend (and still runs them)."""
    seen = []

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            seen.append(name)
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(triton_capture, "capture_from_lse", spy("from_lse", triton_capture.capture_from_lse))
    monkeypatch.setattr(
        triton_fused, "capture_self_normalising", spy("self_normalising", triton_fused.capture_self_normalising)
    )
    return seen


def _maps(pipe, **trace_kw) -> torch.Tensor:
    return _run(pipe, **trace_kw)[0]


def _run(pipe, **trace_kw):
    with trace(pipe, **trace_kw) as tc:
        out = pipe(
            prompt="a red circle and a blue square",
            height=64,
            width=64,
            num_inference_steps=1,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        )
        return tc.compute_global_heat_map().heat_maps, torch.from_numpy(out.images)


@pytest.mark.parametrize("daam_compat", [False, True])  # head-summed buffers / per-(layer, head) buffers
def test_traced_maps_with_triton_equal_torch_backend(sd_pipe, monkeypatch, launches, daam_compat):
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    expected = _maps(sd_pipe, daam_compat=daam_compat)
    assert launches == []
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    got = _maps(sd_pipe, daam_compat=daam_compat, fused=False)  # SDPA + capture_from_lse
    assert launches, "the traced run never reached the Triton kernels"
    assert got.abs().sum() > 0
    torch.testing.assert_close(got, expected, atol=ATOL_OF_PEAK * expected.abs().max().item(), rtol=RTOL)


@pytest.mark.parametrize("daam_compat", [False, True])
def test_fused_attention_capture_in_the_processor(sd_pipe, monkeypatch, daam_compat):
    # fused=True (opt-in) with the Triton backend: the UNet cross-attention output and its capture come from
    # one kernel (the unconditional CFG half through SDPA); maps equal the torch backend's, the image SDPA's
    # to fp32 rounding.
    fused_calls = []
    real = triton_fused.fused_attention_capture

    def spy(*args, **kwargs):
        fused_calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(triton_fused, "fused_attention_capture", spy)
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    expected, image = _run(sd_pipe, daam_compat=daam_compat)
    assert fused_calls == []
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    got, fused_image = _run(sd_pipe, daam_compat=daam_compat, fused=True)
    assert fused_calls and all(shape[0] == 1 for shape in fused_calls)  # only the conditional row is fused
    torch.testing.assert_close(got, expected, atol=ATOL_OF_PEAK * expected.abs().max().item(), rtol=RTOL)
    assert (fused_image - image).abs().max() < 1e-4


def test_default_trace_keeps_the_image_bit_identical_with_triton_active(sd_pipe, monkeypatch, launches):
    # The Triton backend is the automatic pick here (interpreter), and the fused kernel is available: a default
    # trace must still leave the model's own attention kernel in place, so the image is unchanged bit for bit.
    fused_calls = []
    monkeypatch.setattr(triton_fused, "fused_attention_capture", lambda *a, **k: fused_calls.append(1))
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    kw = dict(
        prompt="a red circle and a blue square", height=64, width=64, num_inference_steps=1, output_type="np"
    )
    plain = sd_pipe(generator=torch.Generator().manual_seed(0), **kw).images
    maps, traced = _run(sd_pipe)
    assert launches, "the default trace never reached the Triton capture kernels"
    assert fused_calls == []
    assert torch.equal(traced, torch.from_numpy(plain))
    assert maps.abs().sum() > 0
