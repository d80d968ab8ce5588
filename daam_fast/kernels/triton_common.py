"""What the Triton kernels share: the optional ``triton`` import, interpreter detection, the tile table and
the launch helpers. :mod:`.triton_capture` (capture from lse) and :mod:`.triton_fused` (self-normalising and
fused attention + capture) import this module; it imports neither.

Triton is optional: when it cannot be imported this module still imports, ``TRITON_IMPORT_ERROR`` says why,
and nothing can be launched. Triton decides when a ``@triton.jit`` kernel is defined whether it is compiled
or interpreted, so ``TRITON_INTERPRET=1`` must be set **before** the kernel modules are imported.

Tiles (:func:`block_sizes`): measured choices when a measurements file exists (see :func:`measured_tiles`),
else the static table, whose every pick ``make kernel-report`` compiles for sm_75 … sm_90 and checks for register
spills and occupancy (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl
except (ImportError, RuntimeError, OSError, AttributeError) as exc:  # absent, or broken install
    triton = None
    tl = None
    TRITON_IMPORT_ERROR: str | None = f"triton cannot be imported ({type(exc).__name__}: {exc})"
else:
    TRITON_IMPORT_ERROR = None

__all__ = [
    "INTERPRET",
    "KERNELS",
    "KernelCall",
    "MAX_HEAD_DIM",
    "MEASURED_TILES_ENV",
    "TRITON_IMPORT_ERROR",
    "Blocks",
    "Gpu",
    "alignment",
    "bias_view",
    "block_sizes",
    "check_launchable",
    "gpu_for",
    "gpu_of",
    "jit",
    "measured_tiles",
    "out_strides",
    "pow2",
    "tensor_cores",
    "tile_candidates",
    "tl",
    "triton",
    "upcast_for",
]

logger = logging.getLogger(__name__)


def _interpreting() -> bool:
    # Read once, at import: kernels defined below this point follow it.
    if triton is not None and hasattr(triton, "knobs"):
        return bool(triton.knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET") == "1"


#: True when the kernels were defined for Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import).
INTERPRET: bool = _interpreting()


def _no_jit(fn):
    # Stand-in decorator when triton is missing: the kernels stay plain (never launched) functions.
    return fn


#: ``triton.jit``, or a no-op decorator without triton.
jit = triton.jit if triton is not None else _no_jit

#: Largest padded head dim the kernels accept (the q tile is BLOCK_L × next_pow2(D)).
MAX_HEAD_DIM = 256


def alignment(*values: int) -> int:
    """The ``ALIGN`` kernel constant: the largest power of two ≤ 16 dividing every value (the head dim and the
    head strides of q, k, v, o). Kernels mark ``D`` and each per-head offset ``tl.multiple_of(…, ALIGN)``: Triton
    otherwise knows only what its launch specialisation tells it (an int divisible by 16, or nothing), so at
    head dim 40 (SD 1.x) every row element loads alone, with its own 64-bit address (204 registers where 128
    suffice, measured by the ahead-of-time report). Zero strides (broadcasts) divide everything."""
    align = 16
    while align > 1 and any(v % align for v in values):
        align //= 2
    return align


def check_launchable(*tensors: torch.Tensor) -> None:
    """Raise when the Triton kernels cannot run on these tensors in this process."""
    if TRITON_IMPORT_ERROR is not None:
        raise RuntimeError(TRITON_IMPORT_ERROR)
    dev = tensors[0].device
    if dev.type != "cuda" and not INTERPRET:
        raise ValueError(f"Triton kernels need CUDA tensors (got {dev}); set TRITON_INTERPRET=1 to interpret on CPU")
    if tensors[0].dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"Triton kernels take float16, bfloat16 or float32 inputs, got {tensors[0].dtype}")


def out_strides(out: torch.Tensor, per_head: bool) -> tuple[int, int, int, int]:
    """``(batch, head, token, query)`` strides of the heat buffer; head stride 0 when summed over heads."""
    if per_head:
        return out.stride(0), out.stride(1), out.stride(2), out.stride(3)
    return out.stride(0), 0, out.stride(1), out.stride(2)


def bias_view(bias: torch.Tensor | None, shape: tuple[int, int, int, int], like: torch.Tensor):
    """``(tensor, strides)`` of ``bias`` broadcast to ``shape`` = ``[B, H, L, C]`` (stride 0 where it
    broadcasts); a 1-element dummy and zero strides without a bias."""
    if bias is None:
        return like, (0, 0, 0, 0)
    b = bias.expand(shape)
    return b, b.stride()


# --- tiles ---

#: The kernels that take tiles: capture from lse, the self-normalising capture, fused attention + capture.
KERNELS = ("capture_lse", "self_normalising", "fused")


@dataclass(frozen=True)
class Blocks:
    """Tile sizes of one launch: ``queries``, selected ``tokens``, head ``dim`` (padded to a power of
    two, masked), ``keys`` per online-softmax step, ``num_warps`` and software-pipelining ``num_stages``
    per program (both ignored by the interpreter)."""

    queries: int
    tokens: int
    dim: int
    keys: int = 16
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class Gpu:
    """What the tile choice reads from a CUDA device."""

    name: str
    capability: tuple[int, int]
    sm_count: int


@functools.cache
def gpu_of(index: int) -> Gpu:
    """:class:`Gpu` of CUDA device ``index`` (cached: the properties do not change)."""
    props = torch.cuda.get_device_properties(index)
    return Gpu(props.name, (props.major, props.minor), props.multi_processor_count)


def gpu_for(device: torch.device) -> Gpu | None:
    """:class:`Gpu` of a CUDA ``device``; None for any other device (the interpreter's CPU tensors, ``meta``)."""
    if device.type != "cuda":
        return None
    return gpu_of(device.index if device.index is not None else torch.cuda.current_device())


def tensor_cores(dtype: torch.dtype, gpu: Gpu | None) -> bool:
    """Whether ``tl.dot`` on ``dtype`` tiles runs on tensor cores: fp16 / bf16 on sm_80 and newer. Triton lowers
    sm_75's dots to FMAs (no ``mma`` in the PTX); fp32 tiles always take FMAs (IEEE precision, below)."""
    return dtype in (torch.float16, torch.bfloat16) and gpu is not None and gpu.capability >= (8, 0)


def upcast_for(dtype: torch.dtype, gpu: Gpu | None) -> tuple[bool, str | None]:
    """``(UPCAST, DOT_PRECISION)`` kernel constants for inputs of ``dtype`` on ``gpu`` (None: not a GPU).

    Tiles are cast to fp32 before the dots in the interpreter (it computes bf16 ``tl.dot`` wrongly) and
    wherever the dot runs on FMAs: there fp32 operands need far fewer registers than fp16 ones (the
    ahead-of-time report measured 255 registers and spills for fp16 on sm_75 where fp32 takes 104), and
    the products are the same (fp16/bf16 products are exact in fp32). On tensor cores fp16/bf16 tiles go
    in as they are, accumulating in fp32. fp32 dots use IEEE fp32, not TF32: fp32 inputs keep fp32 accuracy.
    """
    upcast = INTERPRET or not tensor_cores(dtype, gpu)
    return upcast, ("ieee" if upcast else None)


# Static GPU tiles: (kernel, tensor cores?) → padded head dim → (largest query block, largest token block, keys
# per online-softmax step, num_warps, num_stages). From the ahead-of-time compile report (docs/PERFORMANCE.md,
# "GPU kernels: registers, spills and occupancy"): on sm_75 … sm_90, with bias and per-head output included, no
# pick spills at head dim ≤ 128 except the attention kernels on the FMA path (documented there), and every
# capture-from-lse pick keeps ≥ 2 programs resident per SM on sm_80 … sm_90. FMA dots (fp32, sm_75) hold whole
# operand rows in registers: smaller token blocks, so T = 77 takes two (q is read twice).
_TC_LSE, _FMA_LSE = (16, 128, 64, 8, 2), (16, 64, 64, 8, 2)
_TC_ATTN, _FMA_ATTN = (16, 128, 32, 8, 2), (16, 64, 16, 8, 2)
_TABLE: dict[tuple[str, bool], dict[int, tuple[int, int, int, int, int]]] = {
    ("capture_lse", True): {16: _TC_LSE, 32: _TC_LSE, 64: _TC_LSE, 128: _TC_LSE, 256: (16, 64, 64, 8, 2)},
    ("capture_lse", False): {16: _FMA_LSE, 32: _FMA_LSE, 64: _FMA_LSE, 128: _FMA_LSE, 256: (16, 16, 64, 8, 2)},
    ("self_normalising", True): {16: _TC_ATTN, 32: _TC_ATTN, 64: _TC_ATTN, 128: _TC_ATTN, 256: (16, 32, 32, 8, 2)},
    ("self_normalising", False): {16: _FMA_ATTN, 32: _FMA_ATTN, 64: _FMA_ATTN, 128: (16, 16, 16, 8, 2),
                                  256: (16, 16, 16, 8, 2)},
    ("fused", True): {16: _TC_ATTN, 32: _TC_ATTN, 64: _TC_ATTN, 128: _TC_ATTN, 256: (16, 32, 32, 8, 2)},
    ("fused", False): {16: _FMA_ATTN, 32: _FMA_ATTN, 64: _FMA_ATTN, 128: (16, 16, 16, 8, 2), 256: (16, 16, 16, 8, 2)},
}  # fmt: skip
_GPU_MIN_BLOCK = 16  # tl.dot needs M, N, K ≥ 16 on GPUs
# Below this many cells in the largest 2-D tile, 8 warps would leave threads with one or two cells each (on
# tensor cores; FMA dots need 8 warps whatever the tile: ptxas spills their 4-warp variants, kernel report).
_CELLS_FOR_8_WARPS = 2048

# The interpreter's cost is per program and per op, nearly independent of tile size: one big tile.
_INTERP_BLOCK_L = 128
_INTERP_MAX_BLOCK = 512


def pow2(n: int, lo: int = 16) -> int:
    """Smallest power of two ≥ ``n`` and ≥ ``lo``."""
    return max(lo, 1 << max(0, (n - 1).bit_length()))


def _check_kernel(kernel: str, head_dim: int) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"unknown Triton kernel {kernel!r}; valid: {KERNELS}")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head dim {head_dim} > {MAX_HEAD_DIM} is not supported by the Triton kernels")


def block_sizes(
    kernel: str,
    head_dim: int,
    n_cols: int,
    n_keys: int,
    n_rows: int,
    device: torch.device,
    dtype: torch.dtype = torch.float16,
    *,
    gpu: Gpu | None = None,
) -> Blocks:
    """Tiles for ``kernel`` (one of :data:`KERNELS`) on ``n_rows`` queries × ``n_cols`` selected tokens,
    ``head_dim``, ``n_keys`` keys, inputs of ``dtype``.

    GPUs (``device`` of type cuda, or any ``device`` when ``gpu`` describes one): a measured choice for this
    device when a measurements file has one (:func:`measured_tiles`), else the static table (token and key
    blocks no larger than the tokens and keys). Interpreter: the largest tiles (fewest programs).
    """
    _check_kernel(kernel, head_dim)
    bd = pow2(head_dim)
    if gpu is None and (INTERPRET or device.type != "cuda"):
        return Blocks(
            queries=_INTERP_BLOCK_L,
            tokens=min(pow2(n_cols), _INTERP_MAX_BLOCK),
            dim=bd,
            keys=min(pow2(n_keys), _INTERP_MAX_BLOCK),
        )
    gpu = gpu or gpu_for(device)
    measured = _measured_choice(kernel, gpu, dtype, head_dim, n_cols, n_rows)
    if measured is not None:
        return measured
    tc = tensor_cores(dtype, gpu)
    bl, bt, bs, warps, stages = _TABLE[kernel, tc][bd]
    bs = min(bs, pow2(n_keys))
    bt = min(bt, pow2(n_cols))
    if tc and bl * max(bt, bs, bd) < _CELLS_FOR_8_WARPS:
        warps = 4  # FMA dots keep 8: their operand rows, not the tile, fill the registers
    return Blocks(queries=bl, tokens=bt, dim=bd, keys=bs, num_warps=warps, num_stages=stages)


def tile_candidates(
    kernel: str, head_dim: int, n_cols: int, n_keys: int, n_rows: int, dtype: torch.dtype, gpu: Gpu
) -> list[Blocks]:
    """The pruned autotuning list for one shape on ``gpu``'s architecture: what ``benchmarks/autotune_tiles.py``
    times on a GPU and ``make kernel-report`` compiles for every architecture.

    Keyed on (head dim, tokens, queries): query blocks 16 up to twice the table's (and ≤ the queries), the
    table's token block and, for capture from lse, half of it (two token blocks read q twice but double the
    programs), 4 warps (tiles up to 4096 cells, tensor cores only) or 8 (from 2048 cells, or FMA dots), 2 or 3
    pipeline stages. ``benchmarks/autotune_tiles.py`` drops those the kernel report shows spilling.
    """
    _check_kernel(kernel, head_dim)
    bd = pow2(head_dim)
    tc = tensor_cores(dtype, gpu)
    table_bl, table_bt, bs, _, _ = _TABLE[kernel, tc][bd]
    bs = min(bs, pow2(n_keys))
    full_t = min(table_bt, pow2(n_cols))
    token_blocks = [full_t] + ([full_t // 2] if kernel == "capture_lse" and full_t >= 32 else [])
    max_bl = max(_GPU_MIN_BLOCK, min(2 * table_bl, pow2(n_rows)))
    found = []
    for bt in token_blocks:
        bl = _GPU_MIN_BLOCK
        while bl <= max_bl:
            cells = bl * max(bt, bs, bd)
            warp_counts = [w for w in (4, 8) if (w == 8 and cells >= _CELLS_FOR_8_WARPS) or (w == 4 and cells <= 4096)]
            for warps in warp_counts if tc else [8]:
                found += [Blocks(bl, bt, bd, bs, warps, stages) for stages in (2, 3)]
            bl *= 2
    return found


#: Environment variable naming a measured-tiles JSON file (written by ``benchmarks/autotune_tiles.py``);
#: without it, ``triton_tiles.json`` next to this module is read when it exists.
MEASURED_TILES_ENV = "DAAM_FAST_TRITON_TILES"
_PACKAGED_TILES = Path(__file__).with_name("triton_tiles.json")
_ENTRY_KEYS = {"kernel", "device", "capability", "dtype", "head_dim", "tokens", "queries", "best"}


@functools.cache
def _load_tiles(path: str) -> tuple[dict, ...]:
    try:
        data = json.loads(Path(path).read_text())
        entries = tuple(data["entries"])
        for e in entries:
            missing = _ENTRY_KEYS - set(e)
            if missing:
                raise KeyError(f"entry {e} lacks {sorted(missing)}")
            Blocks(**e["best"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("ignoring measured Triton tiles in %s (%s); using the static table", path, exc)
        return ()
    logger.debug("measured Triton tiles: %d entries from %s", len(entries), path)
    return entries


def measured_tiles() -> tuple[dict, ...]:
    """Entries of the measured-tiles file: ``$DAAM_FAST_TRITON_TILES`` if set, else ``triton_tiles.json`` beside
    this module if present; empty without either (the static table is then used everywhere).

    Each entry: ``kernel``, ``device`` (name), ``capability`` ``[major, minor]``, ``dtype`` (``"float16"`` …),
    ``head_dim``, ``tokens``, ``queries`` and ``best`` (the :class:`Blocks` fields of the fastest config).
    An unreadable or malformed file is ignored with one warning.
    """
    path = os.environ.get(MEASURED_TILES_ENV) or (str(_PACKAGED_TILES) if _PACKAGED_TILES.is_file() else None)
    return _load_tiles(path) if path else ()


def _measured_choice(kernel: str, gpu: Gpu, dtype: torch.dtype, head_dim: int, n_cols: int, n_rows: int):
    # Same kernel, dtype, architecture, padded head dim and token bucket; then the same device name first and
    # the nearest query count (log scale). A measured choice for another card of the same architecture is
    # still a better guess than the static table.
    dtype_name = str(dtype).removeprefix("torch.")
    matches = [
        e
        for e in measured_tiles()
        if e["kernel"] == kernel
        and e["dtype"] == dtype_name
        and tuple(e["capability"]) == tuple(gpu.capability)
        and pow2(e["head_dim"]) == pow2(head_dim)
        and pow2(e["tokens"]) == pow2(n_cols)
    ]
    if not matches:
        return None
    log_rows = math.log2(max(n_rows, 1))
    best = min(matches, key=lambda e: (e["device"] != gpu.name, abs(math.log2(e["queries"]) - log_rows)))
    return Blocks(**best["best"])


class KernelCall(NamedTuple):
    """One launch, fully decided: ``kernel[grid](*args, **constants, num_warps=…, num_stages=…)``. The launchers
    build it; ``make kernel-report`` compiles the same thing for GPUs it does not have."""

    kernel: object
    grid: tuple[int, int, int]
    args: tuple
    constants: dict
    blocks: Blocks

    def launch(self) -> None:
        """Run the kernel (compiling it on first use)."""
        self.kernel[self.grid](
            *self.args, **self.constants, num_warps=self.blocks.num_warps, num_stages=self.blocks.num_stages
        )
