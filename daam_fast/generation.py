"""Traced generations: run a pipeline under :func:`daam_fast.trace` and keep the image with its heat maps.

Used by the front-end session (``daam-fast generate`` / ``ui``), by the demo and from Python. Negative-prompt
maps are traced whenever a non-empty ``negative_prompt`` is given, and returned when the pipeline call ran
classifier-free guidance (SD/SDXL/SD3: ``guidance_scale > 1``; Flux: ``true_cfg_scale > 1``), else ``None``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .analysis import TimeProfile, time_profile
from .heatmap import GlobalHeatMap
from .trace import trace

__all__ = ["Generation", "run_seed_sweep", "trace_generation", "trace_time_profile"]


@dataclass
class Generation:
    """One traced generation: the ``image`` (what the pipeline returns as ``images[0]``: PIL by default), its
    ``maps`` and, when a negative prompt was traced, ``negative_maps`` (both :class:`GlobalHeatMap`, fp32
    ``[n_positions, H_latent, W_latent]``, with ``meta["seed"]``)."""

    seed: int
    image: object
    maps: GlobalHeatMap
    negative_maps: GlobalHeatMap | None = None


def _generator(pipe, seed: int) -> torch.Generator:
    # A generator on the pipeline's device, so a seed gives the same image as diffusers' own examples.
    device = str(getattr(pipe, "device", "cpu"))
    return torch.Generator(device="cpu" if device == "mps" else device).manual_seed(int(seed))


def _run(pipe, prompt: str, seed: int, trace_kwargs: dict, pipe_kwargs: dict, step_maps: bool):
    negative = bool(pipe_kwargs.get("negative_prompt"))
    generator = _generator(pipe, seed)
    with trace(pipe, negative=negative, **trace_kwargs) as tc:
        image = pipe(prompt, generator=generator, **pipe_kwargs).images[0]
        gm = tc.compute_global_heat_map()
        neg = tc.compute_global_heat_map(negative=True) if tc.records[-1].has_negative else None
        per_step = tc.compute_step_heat_maps() if step_maps else None
    for g in (gm, neg):
        if g is not None:
            g.meta["seed"] = int(seed)
    return Generation(int(seed), image, gm, neg), per_step


def trace_generation(pipe, prompt: str, seed: int = 0, *, trace_kwargs: dict | None = None, **pipe_kwargs):
    """Run ``pipe(prompt, generator=<seeded on the pipeline's device>, **pipe_kwargs)`` under
    :func:`daam_fast.trace` (``trace_kwargs`` go to it) and return a :class:`Generation`."""
    return _run(pipe, prompt, seed, dict(trace_kwargs or {}), pipe_kwargs, step_maps=False)[0]


def run_seed_sweep(pipe, prompt: str, seeds: Sequence[int], *, progress: bool = True, **kwargs) -> list[Generation]:
    """:func:`trace_generation` for each seed (tqdm bar over seeds unless ``progress=False``); ``kwargs`` go to
    :func:`trace_generation` (pipeline arguments and ``trace_kwargs``)."""
    from tqdm.auto import tqdm

    return [
        trace_generation(pipe, prompt, s, **kwargs)
        for s in tqdm(list(seeds), desc="seeds", unit="seed", disable=not progress)
    ]


def trace_time_profile(
    pipe,
    prompt: str,
    seed: int = 0,
    words: Sequence[str] | None = None,
    phases: int = 3,
    *,
    trace_kwargs: dict | None = None,
    **pipe_kwargs,
) -> tuple[Generation, TimeProfile]:
    """One traced generation with per-step maps, in a single pipeline run.

    How: the tracer's own per-step snapshots (``trace(pipe, snapshots="step")``, a copy of the small native-
    resolution heat buffers after each step, under the tracer's memory guard ``max_snapshot_bytes``) and
    :meth:`Trace.compute_step_heat_maps`, which differences them; a step's map equals a ``trace(pipe, steps=[i])``
    run to fp32 rounding (the tests check a phase against such a run), without running the pipeline per step.
    ``trace_kwargs`` go to :func:`daam_fast.trace` (e.g. ``max_snapshot_bytes``; not ``steps``).

    Returns:
        ``(generation, profile)``: the :class:`Generation` (whole-run maps; negative-prompt maps as in
        :func:`trace_generation`) and the prompt's :class:`~daam_fast.analysis.TimeProfile`.
    """
    kwargs = dict(trace_kwargs or {})
    if "steps" in kwargs or "snapshots" in kwargs:
        raise ValueError("trace_time_profile traces every step with snapshots; do not pass steps or snapshots")
    gen, per_step = _run(pipe, prompt, seed, {**kwargs, "snapshots": "step"}, pipe_kwargs, step_maps=True)
    steps = [per_step[k] for k in sorted(per_step)]
    return gen, time_profile(steps, words, phases)
