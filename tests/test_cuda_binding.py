"""The CUDA backend's Python layer, without a GPU: lazy loading and its cached failure, the dispatcher's error
when the backend is forced without the extension, argument validation (on fake CUDA tensors), and the op
schemas + fake kernels (through `torch.library.opcheck` on a scratch namespace with a CPU reference kernel).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension
from torch._subclasses.fake_tensor import FakeTensorMode

from daam_fast.kernels import cuda, cuda_build, dispatch, reference
from daam_fast.kernels.dispatch import BackendUnavailable

ROOT = Path(__file__).resolve().parents[1]
EXT_BUILT = cuda.load_extension() is None
needs_no_ext = pytest.mark.skipif(EXT_BUILT, reason="the CUDA extension is built here: its absence is untestable")


@pytest.fixture
def fresh_loader(monkeypatch):
    """Forget the cached load result for one test (restored afterwards)."""
    monkeypatch.setattr(cuda, "_load_result", cuda._NOT_TRIED)
    monkeypatch.delenv(cuda_build.JIT_ENV, raising=False)
    return cuda


@pytest.fixture
def fake():
    with FakeTensorMode() as mode:
        yield mode


def _from_lse_args(B=2, H=3, L=77, D=40, T=7, dtype=torch.float16, device="cuda"):
    q = torch.empty(B, L, H, D, dtype=dtype, device=device).transpose(1, 2)  # diffusers' strided layout
    k_sel = torch.empty(B, H, T, D, dtype=dtype, device=device)
    lse = torch.empty(B, H, 96, device=device).narrow(-1, 0, L)  # efficient SDPA pads L to a multiple of 32
    out = torch.zeros(B, T, L, device=device)
    return q, k_sel, lse, out


def test_import_touches_no_cuda_and_loads_nothing():
    code = (
        "import sys, torch, daam_fast, daam_fast.kernels\n"
        "from daam_fast.kernels import cuda\n"
        "assert not torch.cuda.is_initialized()\n"
        "assert 'daam_fast._C' not in sys.modules\n"
        "assert cuda._load_result is cuda._NOT_TRIED\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


def test_backend_registered_first():
    names = [b.name for b in dispatch.backends()]
    assert names[0] == "cuda" and "torch" in names
    b = next(b for b in dispatch.backends() if b.name == "cuda")
    assert b.devices == ("cuda",)
    assert set(b.dtypes) == {torch.float16, torch.bfloat16, torch.float32}


@needs_no_ext
def test_unavailable_reason_says_how_to_build(fresh_loader):
    reason = cuda.available()
    assert reason == cuda.HOW_TO_BUILD
    for hint in ("CUDA toolkit", "DAAM_FAST_BUILD_CUDA=1 pip install -e .", "DAAM_FAST_CUDA_JIT=1"):
        assert hint in reason


@needs_no_ext
def test_lazy_ops_attribute_raises_with_build_hint(fresh_loader):
    with pytest.raises(BackendUnavailable, match="daam_fast._C not built"):
        cuda.ops  # noqa: B018 (the attribute access is the test)
    with pytest.raises(AttributeError):
        cuda.no_such_attribute  # noqa: B018


@needs_no_ext
def test_load_failure_is_cached(fresh_loader, monkeypatch):
    calls = []
    real = cuda.importlib.import_module

    def counting(name, *a, **kw):
        calls.append(name)
        return real(name, *a, **kw)

    monkeypatch.setattr(cuda.importlib, "import_module", counting)
    assert cuda.load_extension() is not None
    assert cuda.load_extension() is not None
    assert calls == [cuda_build.EXT_MODULE]


@needs_no_ext
def test_broken_extension_reports_import_error(fresh_loader, monkeypatch):
    def broken(name, *a, **kw):
        raise ImportError("_C.so: undefined symbol: _ZN3c104cuda9SomethingEv")

    monkeypatch.setattr(cuda.importlib, "import_module", broken)
    reason = cuda.load_extension()
    assert reason.startswith(cuda.HOW_TO_BUILD) and "undefined symbol" in reason


@needs_no_ext
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU JIT guard")
def test_jit_opt_in_never_compiles_without_gpu(fresh_loader, monkeypatch):
    monkeypatch.setenv(cuda_build.JIT_ENV, "1")
    monkeypatch.setattr(cuda, "build_jit", lambda *a, **kw: pytest.fail("must not compile without a GPU"))
    reason = cuda.load_extension()
    assert "no CUDA device" in reason


@needs_no_ext
def test_forced_backend_raises_with_build_hint(fake, monkeypatch):
    q, _, _, out = _from_lse_args()
    with pytest.raises(BackendUnavailable, match=re.escape("DAAM_FAST_BUILD_CUDA=1 pip install -e .")):
        dispatch.select_backend(q, out, backend="cuda")
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(BackendUnavailable, match="daam_fast._C not built"):
        dispatch.select_backend(q, out)
    monkeypatch.delenv(dispatch.ENV_VAR)
    assert dispatch.select_backend(q, out).name != "cuda"  # an automatic pick falls back quietly


@needs_no_ext
def test_direct_call_validates_then_raises_unavailable(fake):
    q, k_sel, lse, out = _from_lse_args()
    with pytest.raises(BackendUnavailable, match="daam_fast._C not built"):
        cuda.capture_from_lse(q, k_sel, lse, 0.1, out)
    with pytest.raises(ValueError, match="lse must be"):  # validation comes first
        cuda.capture_from_lse(q, k_sel, lse.narrow(-1, 0, 5), 0.1, out)


# ---- validation, on fake CUDA tensors ------------------------------------------------------------------------


def _bad_from_lse_cases():
    """(description, mutate(args) -> args, exception, message regex)."""
    return [
        ("q 3-D", lambda a: (a[0].reshape(6, 77, 40), *a[1:]), ValueError, r"q must be \[B, H, L, D\]"),
        (
            "k_sel head dim",
            lambda a: (a[0], a[1].narrow(-1, 0, 8), *a[2:]),
            ValueError,
            r"k_sel must be \[B, H, \*, D\]",
        ),
        ("q float64", lambda a: (a[0].double(), a[1].double(), *a[2:]), TypeError, "float16, bfloat16 or float32"),
        ("k_sel dtype", lambda a: (a[0], a[1].float(), *a[2:]), TypeError, "k_sel dtype torch.float32 differs"),
        ("lse shape", lambda a: (a[0], a[1], a[2].narrow(-1, 0, 76), a[3]), ValueError, r"lse must be \[B, H, L\]"),
        ("lse dtype", lambda a: (a[0], a[1], a[2].half(), a[3]), TypeError, "lse must be float32"),
        ("out dtype", lambda a: (*a[:3], a[3].half()), TypeError, "out must be float32"),
        ("out shape", lambda a: (*a[:3], a[3].narrow(1, 0, 6)), ValueError, r"out must be \[B, T, L\]"),
        ("q on cpu", lambda a: (a[0].to("cpu"), *a[1:]), ValueError, "needs CUDA tensors"),
        ("lse on cpu", lambda a: (a[0], a[1], a[2].to("cpu"), a[3]), ValueError, "lse is on cpu"),
    ]


@pytest.mark.parametrize("case", _bad_from_lse_cases(), ids=lambda c: c[0])
def test_validate_capture_from_lse_rejects(fake, case):
    _, mutate, exc, msg = case
    with pytest.raises(exc, match=msg):
        cuda.validate_capture_from_lse(*mutate(_from_lse_args()))


def test_validate_capture_from_lse_accepts(fake):
    q, k_sel, lse, out = _from_lse_args(T=1)
    assert cuda.validate_capture_from_lse(q, k_sel, lse, out) == (2, 3, 77, 40, 1)
    per_head = torch.zeros(2, 3, 1, 77, device="cuda")
    mask = torch.zeros(77, 1, dtype=torch.float16, device="cuda")  # broadcasts to [B, H, L, T]
    assert cuda.validate_capture_from_lse(q, k_sel, lse, per_head, mask) == (2, 3, 77, 40, 1)
    with pytest.raises(ValueError, match="does not broadcast"):
        cuda.validate_capture_from_lse(q, k_sel, lse, out, torch.zeros(76, 1, device="cuda"))
    with pytest.raises(TypeError, match="bias must be a floating-point"):
        cuda.validate_capture_from_lse(q, k_sel, lse, out, torch.zeros(77, 1, dtype=torch.bool, device="cuda"))


def test_validate_capture_self_normalising(fake):
    q = torch.empty(1, 2, 64, 80, dtype=torch.bfloat16, device="cuda")
    k = torch.empty(1, 2, 300, 80, dtype=torch.bfloat16, device="cuda")
    idx = torch.tensor([0, 299], device="cuda")
    out = torch.zeros(1, 2, 64, device="cuda")
    assert cuda.validate_capture_self_normalising(q, k, idx, out) == (1, 2, 64, 80, 300, 2)
    with pytest.raises(ValueError, match="S = 0"):
        cuda.validate_capture_self_normalising(q, k.narrow(2, 0, 0), idx, out)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        cuda.validate_capture_self_normalising(q, k, idx.narrow(0, 0, 0), out.narrow(1, 0, 0))
    with pytest.raises(TypeError, match="integer key positions"):
        cuda.validate_capture_self_normalising(q, k, idx.float(), out)
    with pytest.raises(ValueError, match=r"\[B, H, L, S\]"):
        cuda.validate_capture_self_normalising(q, k, idx, out, torch.zeros(1, 1, 1, 299, device="cuda"))


def test_token_range_checked_before_loading(monkeypatch):
    """Out-of-range indices are an IndexError (as in the reference), raised before the extension is needed.
    (Index values cannot be read from fake tensors, so the metadata validation is stubbed and CPU tensors used.)"""
    monkeypatch.setattr(cuda, "validate_capture_self_normalising", lambda *a, **kw: (1, 2, 16, 32, 10, 2))
    monkeypatch.setattr(cuda, "_require_ops", lambda: pytest.fail("loaded the extension before checking indices"))
    q, k, out = torch.empty(1, 2, 16, 32), torch.empty(1, 2, 10, 32), torch.zeros(1, 2, 16)
    with pytest.raises(IndexError, match=r"must lie in \[0, 9\]"):
        cuda.capture_self_normalising(q, k, torch.tensor([1, 10]), 0.1, out)
    with pytest.raises(IndexError, match=r"got values in \[-1, 1\]"):
        cuda.capture_self_normalising(q, k, [1, -1], 0.1, out)


# ---- schemas and fake kernels --------------------------------------------------------------------------------


def _ext_cpp_schemas() -> dict[str, str]:
    """The m.def(...) schemas of csrc/ext.cpp, adjacent string literals joined."""
    text = (ROOT / "csrc" / "ext.cpp").read_text()
    schemas = {}
    for body in re.findall(r"m\.def\((.*?)\);", text, flags=re.DOTALL):
        schema = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', body))
        schemas[schema.split("(", 1)[0]] = schema
    return schemas


def test_python_schemas_match_ext_cpp():
    assert _ext_cpp_schemas() == cuda_build.SCHEMAS


NS = "daam_fast_schema_test"


@pytest.fixture(scope="module")
def scratch_ops():
    """The real schemas and fake kernels under a scratch namespace, with CPU kernels from the reference (so
    the real `daam_fast` namespace stays free for the extension)."""
    lib = torch.library.Library(NS, "DEF")
    for schema in cuda_build.SCHEMAS.values():
        lib.define(schema)

    def from_lse_cpu(q, k_sel, lse, scale, out, bias=None):
        reference.capture_from_lse(q, k_sel, lse, scale, out, bias=bias)

    def self_norm_cpu(q, k, token_idx, scale, out, bias=None):
        reference.capture_self_normalising(q, k, token_idx, scale, out, bias=bias)

    lib.impl("cuda_capture_from_lse", from_lse_cpu, "CPU")
    lib.impl("cuda_capture_self_normalising", self_norm_cpu, "CPU")
    torch.library.register_fake(f"{NS}::cuda_capture_from_lse", cuda.fake_capture_from_lse, lib=lib)
    torch.library.register_fake(f"{NS}::cuda_capture_self_normalising", cuda.fake_capture_self_normalising, lib=lib)
    yield getattr(torch.ops, NS)
    lib._destroy()


def test_opcheck_schemas_and_fakes(scratch_ops):
    """opcheck: the schema's mutation annotations match what the kernel does (out only), the fake kernel agrees
    with the real one, and the ops trace under AOT autograd / functionalization (torch.compile)."""
    g = torch.Generator().manual_seed(0)
    B, H, L, D, T, S = 1, 2, 9, 16, 3, 11
    q = torch.randn(B, L, H, D, generator=g).transpose(1, 2)
    k = torch.randn(B, H, S, D, generator=g)
    lse = reference.row_logsumexp(q, k, 0.25)
    k_sel = k[:, :, :T].contiguous()
    bias = torch.zeros(B, H, L, T)
    torch.library.opcheck(scratch_ops.cuda_capture_from_lse.default, (q, k_sel, lse, 0.25, torch.zeros(B, T, L), bias))
    torch.library.opcheck(
        scratch_ops.cuda_capture_from_lse.default, (q, k_sel, lse, 0.25, torch.zeros(B, H, T, L), None)
    )
    idx = torch.tensor([0, 4, 10])
    torch.library.opcheck(
        scratch_ops.cuda_capture_self_normalising.default, (q, k, idx, 0.25, torch.zeros(B, T, L), None)
    )


def test_fake_kernels_check_shapes(scratch_ops, fake):
    q, k_sel, lse, out = _from_lse_args()
    scratch_ops.cuda_capture_from_lse(q, k_sel, lse, 0.1, out, None)  # well-formed: no error, returns nothing
    with pytest.raises(ValueError, match=r"out must be \[B, T, L\]"):
        scratch_ops.cuda_capture_from_lse(q, k_sel, lse, 0.1, out.narrow(2, 0, 76), None)
    with pytest.raises(ValueError, match="expand it first"):  # the op itself takes bias fully expanded
        scratch_ops.cuda_capture_from_lse(q, k_sel, lse, 0.1, out, torch.zeros(1, 1, 77, 7, device="cuda"))
    k = torch.empty(2, 3, 50, 40, dtype=torch.float16, device="cuda")
    with pytest.raises(ValueError, match="contiguous int64"):
        scratch_ops.cuda_capture_self_normalising(
            q, k, torch.zeros(7, dtype=torch.int32, device="cuda"), 0.1, out, None
        )


def test_register_fakes_is_guarded(monkeypatch):
    """Without the ops, registering fakes is a no-op (it must not define the namespace or raise)."""
    monkeypatch.setattr(cuda, "_fakes_registered", False)
    monkeypatch.setattr(cuda, "_ops_registered", lambda: False)
    monkeypatch.setattr(torch.library, "register_fake", lambda *a, **kw: pytest.fail("registered without the ops"))
    cuda._register_fakes()
    assert cuda._fakes_registered is False


# ---- setup.py: when the extension is built ------------------------------------------------------------------


@pytest.fixture
def setup_py():
    """setup.py as a module (not __main__, so setup() does not run)."""
    spec = importlib.util.spec_from_file_location("daam_fast_setup_under_test", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_setup_skips_extension_without_cuda_torch(setup_py, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert setup_py.cuda_extension_kwargs({}) == {}
    with pytest.raises(RuntimeError, match="DAAM_FAST_BUILD_CUDA=1 but torch .* is not a CUDA build"):
        setup_py.cuda_extension_kwargs({"DAAM_FAST_BUILD_CUDA": "1"})


def test_setup_builds_extension_when_cuda_usable(setup_py, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.utils.cpp_extension, "CUDA_HOME", "/usr/local/cuda")
    kwargs = setup_py.cuda_extension_kwargs({})
    (ext,) = kwargs["ext_modules"]
    assert ext.name == "daam_fast._C"
    assert ext.sources == list(cuda_build.SOURCES)
    assert "csrc/capture_kernels.cuh" in ext.depends and "csrc/common.h" in ext.depends
    assert kwargs["cmdclass"]["build_ext"] is torch.utils.cpp_extension.BuildExtension
    assert setup_py.cuda_extension_kwargs({"DAAM_FAST_BUILD_CUDA": "0"}) == {}
