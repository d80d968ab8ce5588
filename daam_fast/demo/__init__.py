"""The embedded demo: a tiny text-to-image model trained here on procedural shape scenes (see
``MODEL_CARD.md``), shipped as an fp16 diffusers folder in ``daam_fast/demo/model/``, and a demo
that draws its word heat maps with daam_fast's public API.

The model exists to show the tool and check its plumbing end to end without downloading anything.
It was trained with an extra loss that aligns its cross-attention with the objects, so its maps
are good by construction: they say nothing about how faithful attention maps are on normally
trained models.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

__all__ = ["MODEL_DIR", "DEFAULT_PROMPTS", "load_pipeline", "run_demo"]

logger = logging.getLogger(__name__)

MODEL_DIR = Path(__file__).resolve().parent / "model"
DEFAULT_PROMPTS = (
    "a red circle and a blue square",
    "a yellow triangle and a green circle",
    "a white square and a red triangle and a blue circle",
)
# Words that name nothing in the image; the demo draws maps for the others.
_STOPWORDS = {"a", "and"}


def load_pipeline(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, folder: str | os.PathLike | None = None
):
    """Load the shipped demo model as a ``diffusers.StableDiffusionPipeline`` with ``from_pretrained``.

    The weights are stored in fp16 and cast to ``dtype`` (fp32 by default: fp16 matmuls are slow
    or missing on CPUs). 32x32 RGB images, 16x16x4 latents, DDIM scheduler, real CLIP tokenizer.
    """
    import diffusers
    from diffusers import StableDiffusionPipeline

    # diffusers renamed torch_dtype to dtype (0.42 warns about the old name; older ones lack the new).
    major_minor = tuple(int(x) for x in diffusers.__version__.split(".")[:2])
    dtype_kw = "dtype" if major_minor >= (0, 42) else "torch_dtype"
    pipe = StableDiffusionPipeline.from_pretrained(
        str(folder or MODEL_DIR), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        **{dtype_kw: dtype},
    )
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _words(prompt: str) -> list[str]:
    seen: list[str] = []
    for w in prompt.replace(",", " ").split():
        if w.lower() not in _STOPWORDS and w not in seen:
            seen.append(w)
    return seen


def run_demo(
    out_dir: str | os.PathLike,
    prompts: list[str] | tuple[str, ...] | None = None,
    steps: int = 20,
    seed: int = 0,
    guidance_scale: float = 4.0,
    pipe=None,
    progress: bool = True,
) -> list[dict]:
    """Generate ``prompts`` with the demo model under ``daam_fast.trace`` and write, into ``out_dir``:
    ``<i>_image.png`` (the image, upscaled), ``<i>_<word>.png`` (the word's heat map over the image)
    and ``<i>_dominance.png`` (which word's normalised map is largest at each pixel).

    Returns one dict per prompt: ``prompt``, ``image`` (uint8 ``[32, 32, 3]``), ``heatmaps``
    (``{word: float32 tensor [16, 16]}``, the latent-resolution maps) and ``files`` (written paths).
    """
    import numpy as np
    from tqdm.auto import tqdm

    from ..generation import trace_generation

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = pipe if pipe is not None else load_pipeline()
    prompts = list(prompts or DEFAULT_PROMPTS)
    results = []
    bar = tqdm(total=len(prompts) * steps, desc="daam-fast demo", unit="step", disable=not progress)

    def on_step(p, i, t, kw):  # diffusers' step-end callback: advance the bar
        bar.update(1)
        return kw

    for n, prompt in enumerate(prompts):
        gen = trace_generation(
            pipe, prompt, seed + n, num_inference_steps=steps, guidance_scale=guidance_scale, output_type="np",
            callback_on_step_end=on_step,
        )
        maps = {w: gen.maps.compute_word_heat_map(w) for w in _words(prompt)}
        image = (gen.image * 255).round().clip(0, 255).astype(np.uint8)
        files = _plot(out_dir, n, prompt, image, maps)
        heatmaps = {w: m.heatmap.detach().float().cpu() for w, m in maps.items()}
        results.append({"prompt": prompt, "image": image, "heatmaps": heatmaps, "files": files})
    bar.close()
    logger.info("demo: wrote %d files to %s", sum(len(r["files"]) for r in results), out_dir)
    return results


def _plot(out_dir: Path, n: int, prompt: str, image, maps: dict) -> list[Path]:
    # Figures of their own, not pyplot's: a library never switches the user's backend or touches their figures.
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    files = []
    h, w = image.shape[:2]
    extent = (0, w, h, 0)

    fig = Figure(figsize=(3, 3), dpi=100)
    ax = fig.subplots()
    ax.imshow(image, interpolation="nearest", extent=extent)
    ax.set_title(prompt, fontsize=7)
    ax.axis("off")
    files.append(out_dir / f"{n}_image.png")
    fig.savefig(files[-1], bbox_inches="tight")

    # WordHeatMap.expand: daam's bicubic up-sampling to the image size, min-max normalised to [0, 1].
    up = {word: m.expand((h, w)).numpy() for word, m in maps.items()}
    for word, m in up.items():
        fig = Figure(figsize=(3, 3), dpi=100)
        ax = fig.subplots()
        ax.imshow(image, interpolation="nearest", extent=extent)
        ax.imshow(m, cmap="jet", alpha=0.5, interpolation="bilinear", extent=extent, vmin=0, vmax=1)
        ax.set_title(f"{word!r} in {prompt!r}", fontsize=6)
        ax.axis("off")
        files.append(out_dir / f"{n}_{word}.png")
        fig.savefig(files[-1], bbox_inches="tight")

    # Dominance: each pixel takes the word whose normalised map is largest there, or none if every
    # map is below DAAM's 0.4 threshold.
    words = list(up)
    stack = np.stack([up[w] for w in words])
    winner = np.where(stack.max(0) >= 0.4, stack.argmax(0), -1)
    cmap = colormaps["tab10"]
    rgb = np.zeros((h, w, 3))
    for k in range(len(words)):
        rgb[winner == k] = cmap(k % 10)[:3]
    fig = Figure(figsize=(6, 3), dpi=100)
    axes = fig.subplots(1, 2)
    axes[0].imshow(image, interpolation="nearest", extent=extent)
    axes[1].imshow(rgb, interpolation="nearest", extent=extent)
    for ax in axes:
        ax.axis("off")
    handles = [Rectangle((0, 0), 1, 1, color=cmap(k % 10)) for k in range(len(words))]
    axes[1].legend(handles, words, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False)
    fig.suptitle(f"dominant word per pixel: {prompt!r}", fontsize=7)
    files.append(out_dir / f"{n}_dominance.png")
    fig.savefig(files[-1], bbox_inches="tight")
    return files
