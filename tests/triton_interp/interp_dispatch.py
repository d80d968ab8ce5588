"""The ``triton`` backend through the dispatcher and as torch.library ops, in the Triton interpreter.

Run only through tests/test_triton_kernels.py (needs TRITON_INTERPRET=1 before triton is imported).
"""

import pytest
import torch
from triton_interp_helpers import DTYPES, flash_lse, make_inputs, start_buffer, token_idx

from daam_fast.kernels import (
    BackendUnavailable,
    dispatch,
    reference,
    select_backend,
    triton_capture,
    triton_fused,
    verify,
)

B, H, L, S, D, T = 1, 2, 19, 20, 16, 3
DTYPE, ATOL, RTOL = DTYPES[0]


@pytest.fixture
def calls(monkeypatch):
    """Counts launches of the Triton entry points the backend calls (and still runs them)."""
    seen = {"from_lse": 0, "self_normalising": 0}

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            seen[name] += 1
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(triton_capture, "capture_from_lse", spy("from_lse", triton_capture.capture_from_lse))
    monkeypatch.setattr(
        triton_fused, "capture_self_normalising", spy("self_normalising", triton_fused.capture_self_normalising)
    )
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    verify.CHECKS.reset()  # every test sees the first-use check: one launch on a slice, then the call
    return seen


def _inputs():
    q, k, v = make_inputs(B, H, L, S, D, DTYPE)
    idx = token_idx(S, T)
    return q, k, v, idx, flash_lse(q, k, v, D**-0.5)


def test_auto_dispatch_prefers_triton_when_interpreting(calls):
    q, k, _, idx, lse = _inputs()
    assert select_backend(q, start_buffer((B, T, L))).name == "triton"  # priority 10 > torch's 0
    out = start_buffer((B, T, L))
    expected = reference.capture_from_lse(q.double(), k[:, :, idx].double(), lse.double(), D**-0.5, out.double())
    dispatch.capture_from_lse(q, k[:, :, idx], lse, D**-0.5, out)
    assert calls["from_lse"] == 2  # the first-use check, then the call
    torch.testing.assert_close(out.double(), expected, atol=ATOL * H, rtol=RTOL)


@pytest.mark.parametrize("how", ["argument", "env"])
def test_forcing_triton(how, calls, monkeypatch):
    q, k, _, idx, lse = _inputs()
    kwargs = {"backend": "triton"} if how == "argument" else {}
    if how == "env":
        monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    out = start_buffer((B, T, L))
    expected = reference.capture_from_lse(q.double(), k[:, :, idx].double(), lse.double(), D**-0.5, out.double())
    dispatch.capture_from_lse(q, k[:, :, idx], lse, D**-0.5, out, **kwargs)
    torch.testing.assert_close(out.double(), expected, atol=ATOL * H, rtol=RTOL)
    out = start_buffer((B, H, T, L))  # per head, through the self-normalising kernel
    expected = reference.capture_self_normalising(q.double(), k.double(), idx, D**-0.5, out.double())
    dispatch.capture_self_normalising(q, k, idx, D**-0.5, out, **kwargs)
    torch.testing.assert_close(out.double(), expected, atol=ATOL, rtol=RTOL)
    assert calls == {"from_lse": 2, "self_normalising": 2}  # each: its first-use check, then the call


def test_forced_triton_raises_on_what_it_cannot_run(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    q, k, _, idx, lse = _inputs()
    with pytest.raises(BackendUnavailable, match="out dtype torch.float64"):
        dispatch.capture_from_lse(
            q, k[:, :, idx], lse, D**-0.5, torch.zeros(B, T, L, dtype=torch.float64), backend="triton"
        )
    with pytest.raises(BackendUnavailable, match="dtype torch.float64 not in"):
        dispatch.capture_self_normalising(q.double(), k.double(), idx, D**-0.5, torch.zeros(B, T, L), backend="triton")
    # ... while an automatic pick falls back to torch quietly.
    assert select_backend(q.double(), torch.zeros(B, T, L)).name == "torch"


def test_ops_pass_opcheck():
    q, k, v, idx, lse = _inputs()
    out = torch.zeros(B, T, L)
    ops = torch.ops.daam_fast
    torch.library.opcheck(ops.triton_capture_from_lse.default, (q, k[:, :, idx], lse, D**-0.5, out, None))
    torch.library.opcheck(ops.triton_capture_self_normalising.default, (q, k, idx, D**-0.5, out, None))
    torch.library.opcheck(ops.triton_fused_attention_capture.default, (q, k, v, idx, D**-0.5, out, None))


def test_torch_compile_keeps_the_ops_in_the_graph(monkeypatch):
    # Under torch.compile the backend goes through the registered ops: one graph (fullgraph), the ops in it.
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    q, k, v, idx, lse = _inputs()
    triton = next(b for b in dispatch.backends() if b.name == "triton")
    targets = []

    def record(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    def step(q, k, v, k_sel, lse, heat, heat_sn):
        triton.capture_from_lse(q, k_sel, lse, D**-0.5, heat)
        triton.capture_self_normalising(q, k, idx, D**-0.5, heat_sn)
        return torch.ops.daam_fast.triton_fused_attention_capture(q, k, v, idx, D**-0.5, heat_sn, None) * 2

    got = [torch.zeros(B, T, L), torch.zeros(B, T, L)]
    want = [torch.zeros(B, T, L), torch.zeros(B, T, L)]
    o = torch.compile(step, backend=record, fullgraph=True)(q, k, v, k[:, :, idx], lse, *got)
    o_eager = step(q, k, v, k[:, :, idx], lse, *want)
    for name in ("triton_capture_from_lse", "triton_capture_self_normalising", "triton_fused_attention_capture"):
        assert f"daam_fast.{name}" in targets, targets
    torch.testing.assert_close(o, o_eager, atol=0, rtol=0)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=0, rtol=0)
    assert got[1].abs().sum() > 0
