"""Vanilla vs traced (daam_fast) vs DAAM-style (daam 0.2.0's method) on one UNet pipeline, measured
side by side in interleaved rounds. Used by ``bench_pipeline_cpu.py``, ``gpu_check.py`` and the smoke test.

Each variant is one pipeline call with ``output_type="latent"`` (text encoding, the UNet steps with
classifier-free guidance, the scheduler; no VAE decode, which tracing does not touch and which would
only dilute the ratios) followed, for the two tracing variants, by the end-of-run aggregation into a
global heat map (a default trace: the prompt's own text positions are captured).
"""

from __future__ import annotations

import torch

from benchmarks import harness
from benchmarks.daam_style import DaamStyleTrace

VARIANTS = ("vanilla", "traced", "daam_style")
#: Also timed on CUDA: UNet cross-attention through the fused Triton attention + capture kernel (opt-in).
FUSED_VARIANT = "traced_fused"


def _call(pipe, prompt: str, height: int, width: int, steps: int):
    return pipe(
        prompt,
        height=height,
        width=width,
        num_inference_steps=steps,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    )


def make_variants(
    pipe, prompt: str, height: int, width: int, steps: int, sink: dict | None = None, fused: bool = False
) -> dict:
    """The three calls as zero-argument functions (four with ``fused``: ``traced_fused`` traces with
    ``fused=True``). ``sink`` (optional) receives the last traced ``Trace`` (key ``"trace"``) and the last
    DAAM-style map (key ``"daam_style_map"``)."""
    from daam_fast import trace

    n_prompt_tokens = len(pipe.tokenizer.tokenize(prompt))

    def vanilla():
        _call(pipe, prompt, height, width, steps)

    def traced():
        with trace(pipe, fused=False) as tc:
            _call(pipe, prompt, height, width, steps)
            tc.compute_global_heat_map()
        if sink is not None:
            sink["trace"] = tc

    def traced_fused():
        with trace(pipe, fused=True) as tc:
            _call(pipe, prompt, height, width, steps)
            tc.compute_global_heat_map()

    def daam_style():
        with DaamStyleTrace(pipe) as dt:
            _call(pipe, prompt, height, width, steps)
            maps = dt.compute_global_heat_map(n_prompt_tokens)
        if sink is not None:
            sink["daam_style_map"] = maps
            sink["daam_style_store_bytes"] = sum(m.numel() * m.element_size() for m in dt.maps.values())
            sink["daam_style_n_maps"] = len(dt.maps)

    variants = {"vanilla": vanilla, "traced": traced, "daam_style": daam_style}
    if fused:
        variants[FUSED_VARIANT] = traced_fused
    return variants


def compare_pipeline(
    pipe,
    prompt: str = "a photograph of an astronaut riding a horse",
    *,
    height: int,
    width: int,
    steps: int = 1,
    rounds: int = 3,
    device: str = "cpu",
    warmup_size: tuple[int, int] | None = None,
    memory: bool = True,
) -> dict:
    """Interleaved comparison of the three variants (see :func:`benchmarks.harness.interleaved`).

    ``warmup_size`` runs the untimed warm-up call of each variant at a smaller image size (first-call
    costs: lazy imports, allocator growth, kernel selection) when full-size calls are expensive.
    Returns ``{"results": {variant: stats}, "heat_buffer_bytes_per_image": int, "heat_buffer_shapes",
    "daam_style_maps": int (per-(layer, head) maps kept), "daam_style_store_bytes": int, "shape": {...}}``.
    """
    sink: dict = {}
    fused = str(device).startswith("cuda")
    variants = make_variants(pipe, prompt, height, width, steps, sink, fused=fused)
    warmup = None
    if warmup_size is not None:
        warmup = make_variants(pipe, prompt, warmup_size[0], warmup_size[1], steps, fused=fused)
    if memory and not str(device).startswith("cuda") and harness.peak_rss_supported() is not None:
        memory = False
    results = harness.interleaved(variants, rounds, device=device, warmup=warmup, memory=memory)
    tc = sink["trace"]
    return {
        "results": results,
        "heat_buffer_bytes_per_image": harness.traced_buffer_bytes_per_image(tc),
        "heat_buffer_shapes": [list(s.buf.shape) for s in tc.records[-1].slots.values()],
        "daam_style_maps": sink["daam_style_n_maps"],
        "daam_style_store_bytes": sink["daam_style_store_bytes"],
        "shape": {"height": height, "width": width, "steps": steps, "rounds": rounds, "prompt": prompt},
    }
