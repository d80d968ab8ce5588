"""Ahead-of-time compiles of the Triton kernels for real GPUs, on a machine without one.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` runs Triton's whole pipeline down to
the ``ptxas`` shipped in the Triton wheel, so registers, spills and shared memory are known per
architecture without a device. Each variant is built through the launchers' own ``*_call`` functions on
``meta`` tensors (same arguments, same constants, same tiles as a real launch) and specialised the way
Triton's runtime specialises a launch (integers equal to 1 become constants, pointers and multiples of 16
get the divisibility hint), so the binary is the one a GPU would build.

Used by ``benchmarks/kernel_report.py`` (``make kernel-report``) and ``tests/test_kernel_resources.py``.
"""

from __future__ import annotations

import contextlib
import io
import re
import tempfile
from dataclasses import asdict, dataclass

import torch

from daam_fast.kernels import triton_capture, triton_fused
from daam_fast.kernels.triton_common import INTERPRET, Blocks, Gpu, KernelCall

#: Architectures compiled for: T4 / RTX 20xx, A100, RTX 30xx, RTX 40xx / L4, H100 / H200.
ARCHS = (75, 80, 86, 89, 90)

#: Per-SM limits that decide how many programs stay resident: registers, shared memory (what one SM can
#: give, after the 1 KiB per block the driver reserves on sm_80+), warps and blocks. CUDA C Programming
#: Guide, "Technical Specifications per Compute Capability".
SM_LIMITS = {
    75: {"registers": 65536, "shared": 64 * 1024, "reserved": 0, "warps": 32, "blocks": 16},
    80: {"registers": 65536, "shared": 164 * 1024, "reserved": 1024, "warps": 64, "blocks": 32},
    86: {"registers": 65536, "shared": 100 * 1024, "reserved": 1024, "warps": 48, "blocks": 16},
    89: {"registers": 65536, "shared": 100 * 1024, "reserved": 1024, "warps": 48, "blocks": 24},
    90: {"registers": 65536, "shared": 228 * 1024, "reserved": 1024, "warps": 64, "blocks": 32},
}

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


@dataclass(frozen=True)
class Variant:
    """One compile: a kernel with its constants and tiles, for one architecture."""

    kernel: str  # capture_lse | self_normalising | fused
    arch: int
    dtype: str
    head_dim: int
    blocks: Blocks
    bias: bool = False
    per_head: bool = False
    heads: int = 10
    queries: int = 4096
    tokens: int = 77
    keys: int = 77

    def key(self) -> tuple:
        """What decides the binary, up to the head count (a loop trip count) and the sizes (runtime ints): one
        key block or several changes the online-softmax loop of the attention kernels."""
        key_blocks = 1 if self.kernel == "capture_lse" else min(2, -(-self.keys // self.blocks.keys))
        return (self.kernel, self.arch, self.dtype, self.head_dim, self.blocks, self.bias, self.per_head, key_blocks)


def kernel_call(v: Variant) -> KernelCall:
    """The launch the library would make for ``v``, on ``meta`` tensors laid out as diffusers lays them out
    (q, k, v: transposed views of ``[B, L, H·D]``; lse ``[B, H, L]``; heat buffer ``[B, T, L]`` or per head)."""
    if INTERPRET:
        raise RuntimeError("TRITON_INTERPRET=1 is set: the kernels were defined for the interpreter, not a GPU")
    B, H, L, S, T, D = 1, v.heads, v.queries, v.keys, v.tokens, v.head_dim
    dt = _DTYPES[v.dtype]

    def rows(n):
        return torch.empty(B, n, H * D, device="meta", dtype=dt).view(B, n, H, D).transpose(1, 2)

    q = rows(L)
    gpu = Gpu(f"sm_{v.arch}", divmod(v.arch, 10), 0)  # the architecture decides upcasting (tiles are given)
    heat = torch.empty((B, H, T, L) if v.per_head else (B, T, L), device="meta", dtype=torch.float32)
    if v.kernel == "capture_lse":
        lse = torch.empty(B, H, L, device="meta", dtype=torch.float32)
        bias = torch.empty(B, 1, 1, T, device="meta", dtype=dt) if v.bias else None  # a key mask
        return triton_capture.capture_from_lse_call(q, rows(T), lse, D**-0.5, heat, bias=bias, blocks=v.blocks, gpu=gpu)
    k = rows(S)
    val = rows(S) if v.kernel == "fused" else None
    o = torch.empty(B, L, H, D, device="meta", dtype=dt).transpose(1, 2) if val is not None else None
    idx = torch.empty(T, device="meta", dtype=torch.long)
    bias = torch.empty(B, 1, 1, S, device="meta", dtype=dt) if v.bias else None
    return triton_fused.attn_capture_call(q, k, val, o, idx, D**-0.5, heat, bias=bias, blocks=v.blocks, gpu=gpu)


def specialize(arg) -> tuple[str, bool]:
    """``(signature type, divisible by 16)`` of one launch argument, as Triton's runtime specialises it
    (``"constexpr"`` for the integer 1)."""
    if isinstance(arg, torch.Tensor):
        return "*" + {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int64: "i64"}[
            arg.dtype
        ], True
    if isinstance(arg, bool):
        return "u1", False
    if isinstance(arg, int):
        if arg == 1:
            return "constexpr", False
        return ("i32" if -(2**31) <= arg < 2**31 else "i64"), arg % 16 == 0
    if isinstance(arg, float):
        return "fp32", False
    raise TypeError(f"cannot specialise a launch argument of type {type(arg).__name__}")


def compile_call(call: KernelCall, arch: int) -> dict:
    """Compile ``call`` for ``sm_<arch>``: ``registers`` per thread, ``spill_bytes`` (stores + loads, from
    ``ptxas -v``), ``shared_memory`` bytes per program (Triton's metadata). Raises on a compile error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = call.kernel.arg_names
    signature, constexprs, attrs = {}, dict(call.constants), {}
    for i, (name, arg) in enumerate(zip(names, call.args, strict=False)):
        kind, divisible = specialize(arg)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = arg
        elif divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]
    for name in names[len(call.args) :]:
        signature[name] = "constexpr"
    src = ASTSource(call.kernel, signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": call.blocks.num_warps, "num_stages": call.blocks.num_stages}
    # A fresh cache directory: a cached kernel skips ptxas, whose log is where registers and spills come from.
    with contextlib.ExitStack() as stack:
        stack.enter_context(_knob(triton.knobs.cache, "dir", stack.enter_context(tempfile.TemporaryDirectory())))
        stack.enter_context(_knob(triton.knobs.nvidia, "dump_ptxas_log", True))
        log = stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    text = log.getvalue()
    used = _PTXAS_USED.search(text)
    if used is None:
        raise RuntimeError(f"no ptxas report for {call.kernel.__name__} on sm_{arch}:\n{text[-2000:]}")
    spills = _PTXAS_SPILL.search(text)
    return {
        "registers": int(used.group(1)),
        "spill_bytes": int(spills.group(1)) + int(spills.group(2)) if spills else 0,
        "shared_memory": int(compiled.metadata.shared),
    }


@contextlib.contextmanager
def _knob(group, name: str, value):
    old = getattr(group, name)
    setattr(group, name, value)
    try:
        yield
    finally:
        setattr(group, name, old)


def resident_programs(arch: int, registers: int, shared_memory: int, num_warps: int) -> int:
    """Programs (thread blocks) that fit on one SM at once: the smallest of the register, shared-memory,
    warp and block limits. Registers are allocated per warp in units of 256 (8 per thread)."""
    lim = SM_LIMITS[arch]
    regs_per_warp = -(-registers * 32 // 256) * 256
    by_regs = (lim["registers"] // regs_per_warp) // num_warps
    by_smem = lim["shared"] // (shared_memory + lim["reserved"]) if shared_memory else lim["blocks"]
    return min(by_regs, by_smem, lim["warps"] // num_warps, lim["blocks"])


def measure(v: Variant) -> dict:
    """Compile ``v`` and return its report entry (the :class:`Variant` fields, resources, occupancy)."""
    res = compile_call(kernel_call(v), v.arch)
    entry = {k: val for k, val in asdict(v).items() if k != "blocks"}
    entry["arch"] = f"sm_{v.arch}"
    entry["blocks"] = {k: val for k, val in asdict(v.blocks).items() if k not in ("num_warps", "num_stages")}
    entry["num_warps"] = v.blocks.num_warps
    entry["num_stages"] = v.blocks.num_stages
    entry.update(res)
    entry["programs_per_sm"] = resident_programs(v.arch, res["registers"], res["shared_memory"], v.blocks.num_warps)
    return entry
