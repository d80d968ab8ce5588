"""Shared helpers for the benchmarks: machine info, random-weight pipelines from the real configs in
``benchmarks/configs/``, per-call peak-RSS measurement, interleaved timing and table formatting.

Nothing here touches CUDA at import time; GPU-only helpers take a ``device`` argument.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

CONFIGS = Path(__file__).resolve().parent / "configs"

#: Results that the bench modules add; ``conftest.pytest_terminal_summary`` prints them as tables.
RESULTS: dict[str, list[dict]] = {}


# -- machine ---------------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: str = "cpu") -> dict:
    """What a figure depends on: CPU, cores, torch threads, library versions, GPU name when ``device`` is CUDA."""
    import diffusers

    info = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


# -- configs and random-weight pipelines -------------------------------------------------------------
def load_config(family: str, name: str) -> dict:
    """``benchmarks/configs/<family>/<name>.json`` without its ``_comment`` key."""
    cfg = json.loads((CONFIGS / family / f"{name}.json").read_text())
    cfg.pop("_comment", None)
    return cfg


def _clip_text(cfg: dict, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = {k: v for k, v in cfg.items() if k != "architectures"}
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(CLIPTextConfig(**cfg)).eval()


def build_sd15_pipeline(dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0):
    """``StableDiffusionPipeline`` with SD 1.5's architecture (``configs/sd15``) and random weights.

    Weights are random (timing and memory do not depend on their values); the tokenizer is the real
    CLIP BPE, built offline by :func:`tests.fixtures.pipelines.clip_tokenizer`.
    """
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from tests.fixtures.pipelines import clip_tokenizer

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(load_config("sd15", "unet")).eval()
        vae = AutoencoderKL.from_config(load_config("sd15", "vae")).eval()
        text_encoder = _clip_text(load_config("sd15", "text_encoder"), projection=False)
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        scheduler=PNDMScheduler.from_config(load_config("sd15", "scheduler")),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if dtype != torch.float32:
        pipe = pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_sdxl_pipeline(dtype: torch.dtype = torch.float16, device: str = "cuda", seed: int = 0):
    """``StableDiffusionXLPipeline`` with SDXL base 1.0's architecture (``configs/sdxl``), random weights."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    from tests.fixtures.pipelines import clip_tokenizer

    torch.manual_seed(seed)
    # Built directly on the device in the target dtype: 3.5 B random parameters initialise in seconds there.
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(load_config("sdxl", "unet")).to(dtype).eval()
        vae = AutoencoderKL.from_config(load_config("sdxl", "vae")).to(dtype).eval()
        te1 = _clip_text(load_config("sdxl", "text_encoder"), projection=False).to(dtype)
        te2 = _clip_text(load_config("sdxl", "text_encoder_2"), projection=True).to(dtype)
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=vae,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(pad_token="!"),
        scheduler=EulerDiscreteScheduler.from_config(load_config("sdxl", "scheduler")),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- heat-buffer size ------------------------------------------------------------------------------
def attention_grids(unet_config: dict, latent_hw: tuple[int, int]) -> list[tuple[int, int, int]]:
    """``(h, w, factor)`` of every cross-attention resolution of the down blocks (the up blocks mirror
    them), from the UNet config: block ``i`` runs at the latent halved ``i`` times (``ceil``)."""
    h, w = latent_hw
    grids = []
    for i, kind in enumerate(unet_config["down_block_types"]):
        if "CrossAttn" in kind:
            grids.append((h, w, 2**i))
        h, w = (h + 1) // 2, (w + 1) // 2
    return grids


def heat_buffer_bytes_per_image(
    unet_config: dict, latent_hw: tuple[int, int], n_tokens: int, skipped_factors=frozenset({8})
) -> int:
    """Analytic size of daam_fast's heat buffers for one image: fp32 ``[n_tokens, h·w]`` per traced resolution
    (grids at ``skipped_factors`` of the latent are not traced, as in daam). By default the tracer captures the
    prompt's own positions (:func:`prompt_positions`); ``tokens=range(77)`` captures the whole CLIP window."""
    grids = {(h, w) for h, w, f in attention_grids(unet_config, latent_hw) if f not in skipped_factors}
    return 4 * n_tokens * sum(h * w for h, w in grids)


def prompt_positions(tokenizer, prompt: str) -> int:
    """Text positions a default trace captures for ``prompt``: start token, its tokens, end token (truncated to
    the tokenizer's window)."""
    return len(tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids)


def traced_buffer_bytes_per_image(tc) -> int:
    """Bytes of the heat buffers the tracer ``tc`` holds for its last record, divided by its images."""
    rec = tc.records[-1]
    total = sum(slot.buf.numel() * slot.buf.element_size() for slot in rec.slots.values())
    rows = rec.rows.stop - rec.rows.start
    return total // rows


# -- memory ----------------------------------------------------------------------------------------
_libc = None


def _malloc_trim() -> None:
    global _libc
    try:
        _libc = _libc or ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise KeyError(field_name)


def fix_malloc_thresholds(threshold: int = 128 * 1024) -> bool:
    """Make glibc hand every allocation of ``threshold`` bytes or more to ``mmap`` and give it back on
    free (``mallopt(M_MMAP_THRESHOLD)``, which also turns off glibc's *dynamic* threshold, and
    ``M_TRIM_THRESHOLD``). With glibc's defaults, freed tensors up to 32 MB stay in the heap and the
    RSS peak of two identical calls can differ by tens of MB depending on what ran before; with fixed
    thresholds RSS follows the live tensors, so per-call peaks compare variants rather than heap
    history. Returns False where this is not glibc. Call before the large allocations."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, threshold)) and bool(libc.mallopt(-1, threshold))  # M_MMAP_ / M_TRIM_
    except (OSError, AttributeError):
        return False


def peak_rss_supported() -> str | None:
    """``None`` when per-call peak RSS can be measured here, else the reason."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kib("VmHWM")
    except (OSError, KeyError) as exc:
        return f"per-call peak RSS needs Linux /proc/self/clear_refs and VmHWM ({exc})"
    return None


@dataclass
class PeakRSS:
    """Peak resident memory of the enclosed block above the resident memory at its start, in bytes.

    Linux keeps a process's RSS high-water mark (``VmHWM``); writing ``5`` to ``/proc/self/clear_refs``
    resets it to the current RSS. Freed heap is first handed back with ``malloc_trim`` so that every
    measured call starts from the same baseline and its transient allocations count in full. Unlike
    ``ru_maxrss`` (a lifetime maximum) this measures each call of an interleaved sequence separately.
    """

    baseline: int = 0
    peak: int = 0
    delta: int = field(default=0)

    def __enter__(self) -> PeakRSS:
        gc.collect()
        _malloc_trim()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.baseline = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc) -> None:
        self.peak = _status_kib("VmHWM") * 1024
        self.delta = self.peak - self.baseline


# -- timing ----------------------------------------------------------------------------------------
def sync(device: str) -> None:
    """Wait for queued GPU work (no-op on the CPU) so wall time covers the kernels."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Sample:
    """One timed call: wall seconds, this process's CPU seconds, and memory above the call's start
    (bytes; RSS on CPU, allocator on CUDA)."""

    seconds: float
    mem_bytes: int | None
    cpu_seconds: float | None = None


def timed_call(fn: Callable[[], object], device: str = "cpu", memory: bool = True) -> Sample:
    """Run ``fn`` once; wall time between synchronisations, plus its peak memory above its start."""
    on_cuda = str(device).startswith("cuda")
    if on_cuda:
        sync(device)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        fn()
        sync(device)
        seconds = time.perf_counter() - t0
        return Sample(seconds, torch.cuda.max_memory_allocated() - base)
    # On a shared CPU the process's CPU time is far steadier than wall time (it does not count the
    # time other jobs hold the cores); both are reported.
    if not memory:
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        return Sample(time.perf_counter() - t0, None, time.process_time() - c0)
    with PeakRSS() as m:
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return Sample(seconds, m.delta, cpu)


def interleaved(
    variants: dict[str, Callable[[], object]],
    rounds: int,
    *,
    baseline: str = "vanilla",
    device: str = "cpu",
    warmup: dict[str, Callable[[], object]] | None = None,
    memory: bool = True,
) -> dict[str, dict]:
    """Time ``variants`` in interleaved rounds (each round runs every variant once; the order is
    reversed on odd rounds so a slow drift of the machine does not favour one of them).

    Returns, per variant: ``seconds`` (list), ``mem`` (list of bytes or None), ``median_s``,
    ``ratio`` (median over rounds of this variant's time / the baseline's time in the same round),
    ``ratio_min``/``ratio_max``, ``cpu_seconds`` / ``cpu_ratio`` (the same with process CPU time; CPU
    only, else None), ``mem_median`` and ``mem_vs_baseline`` (median difference in bytes).
    Warm-up calls (``warmup`` or one call of each variant) are not counted.
    """
    if baseline not in variants:
        raise ValueError(f"baseline {baseline!r} is not one of {list(variants)}")
    for fn in (warmup or variants).values():
        fn()
        sync(device)
    names = list(variants)
    samples: dict[str, list[Sample]] = {n: [] for n in names}
    progress = os.environ.get("DAAM_FAST_BENCH_PROGRESS")  # optional JSON-lines log of every sample
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            samples[name].append(timed_call(variants[name], device, memory))
            if progress:
                with open(progress, "a") as f:
                    f.write(json.dumps({"round": r, "variant": name, **vars(samples[name][-1])}) + "\n")
    out = {}
    for name in names:
        secs = [s.seconds for s in samples[name]]
        ratios = [a.seconds / b.seconds for a, b in zip(samples[name], samples[baseline], strict=True)]
        mems = [s.mem_bytes for s in samples[name]]
        cpu = [s.cpu_seconds for s in samples[name]]
        row = {
            "seconds": secs,
            "median_s": statistics.median(secs),
            "ratio": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "cpu_seconds": cpu,
            "cpu_ratio": None,
            "mem": mems,
            "mem_median": None,
            "mem_vs_baseline": None,
        }
        if all(c is not None for c in cpu):
            base_cpu = [s.cpu_seconds for s in samples[baseline]]
            row["cpu_ratio"] = statistics.median([a / b for a, b in zip(cpu, base_cpu, strict=True)])
        if all(m is not None for m in mems):
            base_mems = [s.mem_bytes for s in samples[baseline]]
            row["mem_median"] = statistics.median(mems)
            row["mem_vs_baseline"] = statistics.median([a - b for a, b in zip(mems, base_mems, strict=True)])
        out[name] = row
    return out


# -- tables ----------------------------------------------------------------------------------------
def _mb(x: float | None) -> str:
    return "n/a" if x is None else f"{x / 1e6:+.1f}" if x < 0 else f"{x / 1e6:.1f}"


def comparison_table(title: str, results: dict[str, dict], mem_label: str = "peak RSS of the call") -> str:
    """Markdown table of an :func:`interleaved` result."""
    lines = [
        f"**{title}**",
        "",
        f"| variant | median wall time (s) | wall time / vanilla (median of rounds) [min, max] "
        f"| CPU time / vanilla (median) | {mem_label} (MB) | memory − vanilla (MB, median) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        cpu = "n/a" if r.get("cpu_ratio") is None else f"{r['cpu_ratio']:.3f}"
        lines.append(
            f"| {name} | {r['median_s']:.3f} | {r['ratio']:.3f} [{r['ratio_min']:.3f}, {r['ratio_max']:.3f}] "
            f"| {cpu} | {_mb(r['mem_median'])} | {_mb(r['mem_vs_baseline'])} |"
        )
    return "\n".join(lines)


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A Markdown table of ``rows`` (dicts) with the given column keys."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c, "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
