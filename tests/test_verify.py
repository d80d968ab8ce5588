"""Trust, then verify: automatic backend picks are checked at first use against the float64 reference; a
backend that fails (raises, or gives other numbers) is disabled for that key with one warning and the next one
runs the call, so the maps equal the reference backend's; a forced backend raises instead."""

import logging

import pytest
import torch

from daam_fast import trace
from daam_fast.kernels import dispatch, reference, verify
from daam_fast.kernels.registry import _REGISTRY, Backend, register_backend

PROMPT = "a red circle and a blue square"


def _inputs(B=2, H=3, L=200, S=77, D=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, D, generator=g)
    k = torch.randn(B, H, S, D, generator=g)
    v = torch.randn(B, H, S, D, generator=g)
    return q, k, v


class Calls:
    def __init__(self):
        self.n = 0


def _broken(name: str, priority: int, calls: Calls) -> Backend:
    """A backend whose kernels fail to compile (raise on every call)."""

    def fail(*args, **kwargs):
        calls.n += 1
        raise RuntimeError("PTX compile failed for this GPU")

    return Backend(name=name, priority=priority, capture_from_lse=fail, capture_self_normalising=fail,
                   devices=("cpu",), fused_attention=fail, max_fused_keys=512)  # fmt: skip


def _wrong(name: str, priority: int, calls: Calls) -> Backend:
    """A backend that runs but adds the wrong numbers (twice the reference's)."""

    def from_lse(q, k_sel, lse, scale, out, *, bias=None, max_chunk_bytes=None):
        calls.n += 1
        return out.add_(2 * reference.capture_from_lse(q, k_sel, lse, scale, torch.zeros_like(out), bias=bias))

    def self_norm(q, k, idx, scale, out, *, bias=None, max_chunk_bytes=None):
        calls.n += 1
        return out.add_(2 * reference.capture_self_normalising(q, k, idx, scale, torch.zeros_like(out), bias=bias))

    def fused(q, k, v, idx, scale, out):
        calls.n += 1
        out.add_(reference.capture_self_normalising(q, k, idx, scale, torch.zeros_like(out)))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale) + 1.0  # wrong output

    return Backend(name=name, priority=priority, capture_from_lse=from_lse, capture_self_normalising=self_norm,
                   devices=("cpu",), fused_attention=fused, max_fused_keys=512)  # fmt: skip


@pytest.fixture
def bad_backends(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    verify.CHECKS.reset()
    calls = {"broken": Calls(), "wrong": Calls()}
    register_backend(_broken("broken", 90, calls["broken"]))
    register_backend(_wrong("wrong", 80, calls["wrong"]))
    yield calls
    for name in ("broken", "wrong"):
        _REGISTRY.pop(name, None)
    verify.CHECKS.reset()


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "disabled" in r.getMessage()]


def test_failing_and_wrong_backends_are_rejected_once_and_the_reference_runs(bad_backends, caplog):
    q, k, _ = _inputs()
    lse = reference.row_logsumexp(q, k, 0.2)
    k_sel = k[:, :, 3:10]
    expected = reference.capture_from_lse(q, k_sel, lse, 0.2, torch.zeros(2, 7, 200))
    with caplog.at_level(logging.WARNING, logger="daam_fast.kernels.dispatch"):
        got = dispatch.capture_from_lse(q, k_sel, lse, 0.2, torch.zeros(2, 7, 200))
        warned = _warnings(caplog)
        assert torch.equal(got, expected)
        assert len(warned) == 2
        assert "'broken'" in warned[0] and "PTX compile failed" in warned[0]
        assert "'wrong'" in warned[1] and "differs from the float64 reference" in warned[1]
        seen = (bad_backends["broken"].n, bad_backends["wrong"].n)
        # Later calls with the same key skip both without another check or warning.
        again = dispatch.capture_from_lse(q, k_sel, lse, 0.2, torch.zeros(2, 7, 200))
        assert torch.equal(again, expected)
        assert (bad_backends["broken"].n, bad_backends["wrong"].n) == seen
        assert len(_warnings(caplog)) == 2
    assert dispatch.select_backend(q, torch.zeros(2, 7, 200)).name == "torch"
    # Another head dim is another key: checked (and rejected) anew.
    q2, k2, _ = _inputs(D=64)
    lse2 = reference.row_logsumexp(q2, k2, 0.2)
    dispatch.capture_from_lse(q2, k2[:, :, :7], lse2, 0.2, torch.zeros(2, 7, 200))
    assert bad_backends["broken"].n == seen[0] + 1


def test_self_normalising_and_bias_are_checked_too(bad_backends, caplog):
    q, k, _ = _inputs(L=100)
    idx = torch.tensor([0, 4, 9, 76])
    bias = torch.randn(2, 1, 100, 77)
    expected = reference.capture_self_normalising(q, k, idx, 0.2, torch.zeros(2, 3, 4, 100), bias=bias)
    with caplog.at_level(logging.WARNING, logger="daam_fast.kernels.dispatch"):
        got = dispatch.capture_self_normalising(q, k, idx, 0.2, torch.zeros(2, 3, 4, 100), bias=bias)
    assert torch.equal(got, expected)
    assert len(_warnings(caplog)) == 2


def test_fused_check_falls_back_to_no_fusion(bad_backends, caplog):
    q, k, v = _inputs(L=100)
    out = torch.zeros(1, 5, 100)
    with caplog.at_level(logging.WARNING, logger="daam_fast.kernels.dispatch"):
        o = dispatch.fused_attention_capture(q, k, v, torch.arange(5), 0.2, out, rows=slice(1, 2))
    assert o is None and not out.any()  # nothing added: the caller runs attention + capture itself
    warned = _warnings(caplog)
    assert len(warned) == 2 and "fused attention output differs" in warned[1]


# A forced backend raises: its own error when it fails to run, BackendCheckError when its numbers are wrong.
@pytest.mark.parametrize(
    "name,error,match",
    [
        ("broken", RuntimeError, "PTX compile failed"),
        ("wrong", dispatch.BackendCheckError, "'wrong' was forced but failed its first-use check"),
    ],
)
def test_forced_backend_that_fails_its_check_raises(bad_backends, name, error, match):
    q, k, v = _inputs(L=100)
    lse = reference.row_logsumexp(q, k, 0.2)
    with pytest.raises(error, match=match):
        dispatch.capture_from_lse(q, k[:, :, :7], lse, 0.2, torch.zeros(2, 7, 100), backend=name)
    with pytest.raises(error, match=match.replace("capture_from_lse", "fused")):
        dispatch.fused_attention_capture(q, k, v, torch.arange(5), 0.2, torch.zeros(2, 5, 100), backend=name)


def test_error_after_a_passed_check_falls_back(monkeypatch):
    # The check builds one specialisation (64 queries); the full call may need another that fails to compile.
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    verify.CHECKS.reset()
    calls = Calls()

    def only_small(q, k_sel, lse, scale, out, *, bias=None, max_chunk_bytes=None):
        calls.n += 1
        if q.shape[2] > verify.CHECK_QUERIES:
            raise RuntimeError("out of resources: shared memory")
        return reference.capture_from_lse(q, k_sel, lse, scale, out, bias=bias)

    register_backend(
        Backend("small", 90, only_small, reference.capture_self_normalising, devices=("cpu",))
    )
    try:
        q, k, _ = _inputs()
        lse = reference.row_logsumexp(q, k, 0.2)
        expected = reference.capture_from_lse(q, k[:, :, :7], lse, 0.2, torch.zeros(2, 7, 200))
        got = dispatch.capture_from_lse(q, k[:, :, :7], lse, 0.2, torch.zeros(2, 7, 200))
        assert torch.equal(got, expected) and calls.n == 2
        with pytest.raises(RuntimeError, match="out of resources"):  # forced: its own error
            verify.CHECKS.reset()
            dispatch.capture_from_lse(q, k[:, :, :7], lse, 0.2, torch.zeros(2, 7, 200), backend="small")
    finally:
        _REGISTRY.pop("small", None)
        verify.CHECKS.reset()


def _maps(pipe, **kw):
    with trace(pipe, **kw) as tc:
        pipe(PROMPT, num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0),
             output_type="latent")  # fmt: skip
        return tc.compute_global_heat_map().heat_maps


def test_traced_maps_equal_the_reference_backend_despite_bad_backends(sd_pipe, bad_backends, caplog):
    expected = _maps(sd_pipe, backend="torch")
    assert bad_backends["broken"].n == bad_backends["wrong"].n == 0  # forced torch: never asked
    with caplog.at_level(logging.WARNING, logger="daam_fast.kernels.dispatch"):
        got = _maps(sd_pipe)
        fused = _maps(sd_pipe, fused=True)
    assert torch.equal(got, expected)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-7)
    warned = _warnings(caplog)
    assert warned and all("'broken'" in w or "'wrong'" in w for w in warned)
    with pytest.raises(RuntimeError, match="PTX compile failed"):
        _maps(sd_pipe, backend="broken")
    with pytest.raises(dispatch.BackendCheckError):
        _maps(sd_pipe, backend="wrong")
