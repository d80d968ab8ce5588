"""Figures of the analyses in :mod:`daam_fast.analysis` (matplotlib, no display needed).

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot, so nothing global changes and
the functions are safe in servers and threads; :func:`save` writes one to PNG at a fixed size (``figsize x dpi``
pixels, no tight cropping, so callers know the size in advance). Colour maps are perceptual (``inferno`` for
maps, ``viridis`` / ``RdBu_r`` for matrices); titles name the word and, when given, the model.

:func:`overlay_image` is the exception: a PIL image of exactly the input image's size (the map blended over it),
for per-word overlay files and the web UI.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .analysis import Dominance, Overlap, SeedSweep, TimeProfile, normalize01, word_maps
from .heatmap import GlobalHeatMap

__all__ = [
    "MAP_CMAP",
    "dominance_figure",
    "overlap_figure",
    "overlay_grid",
    "overlay_image",
    "save",
    "seed_sweep_figure",
    "time_profile_figure",
]

#: Colour map of heat maps: perceptually uniform and readable in grey scale.
MAP_CMAP = "inferno"
DPI = 100


def _figure(width_in: float, height_in: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")


def _suffix(model: str | None) -> str:
    return f" — {model}" if model else ""


def _rgb(image) -> np.ndarray:
    """``image`` (PIL or ``[H, W, 3]`` uint8 / float array) as float ``[H, W, 3]`` in [0, 1]."""
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float32)
    return arr / 255.0 if arr.max() > 1.0 else arr


def _upsample(m: torch.Tensor, hw: tuple[int, int]) -> np.ndarray:
    """fp32 ``[h, w]`` map -> ``[H, W]`` numpy, bicubic, clamped at 0 (bicubic overshoots below)."""
    return F.interpolate(m.float()[None, None], size=hw, mode="bicubic")[0, 0].clamp_min(0).numpy()


def save(fig, path: str | Path) -> tuple[int, int]:
    """Write ``fig`` as PNG to ``path`` at :data:`DPI`; returns its ``(width, height)`` in pixels."""
    fig.savefig(path, dpi=DPI, format="png")
    w, h = fig.get_size_inches() * DPI
    return int(round(w)), int(round(h))


def overlay_image(image, heat: torch.Tensor, cmap: str = MAP_CMAP, alpha: float = 0.6):
    """The map ``heat`` (fp32 ``[h, w]``, any scale; min-max normalised here) coloured with ``cmap`` and blended
    over ``image`` with ``alpha`` where the map is high. Returns a PIL RGB image of ``image``'s size."""
    from matplotlib import colormaps
    from PIL import Image

    rgb = _rgb(image)
    up = normalize01(torch.from_numpy(_upsample(heat, rgb.shape[:2]))).numpy()
    colour = colormaps[cmap](up)[..., :3]
    a = alpha * up[..., None]
    out = (1 - a) * rgb + a * colour
    return Image.fromarray((out.clip(0, 1) * 255).round().astype(np.uint8))


def overlay_grid(
    image,
    gm: GlobalHeatMap,
    words: Sequence[str] | None = None,
    model: str | None = None,
    ncols: int = 4,
    cmap: str = MAP_CMAP,
    panel_in: float = 2.6,
):
    """Per-word overlays: one panel per word (the map, min-max normalised per word, over the image) and the
    image itself, with one colour bar (relative attention 0..1).

    Args:
        image: the generated image (PIL or ``[H, W, 3]`` array).
        gm: its :class:`GlobalHeatMap` (fp32 ``[n_positions, h, w]``).
        words: default all prompt words.
    """
    names, maps = word_maps(gm, words)
    rgb = _rgb(image)
    n = len(names) + 1
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = _figure(panel_in * ncols + 0.8, panel_in * nrows + 0.5)
    axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
    axes[0].imshow(rgb)
    axes[0].set_title("image", fontsize=10)
    mappable = None
    for ax, name, m in zip(axes[1:], names, maps, strict=False):
        heat = normalize01(torch.from_numpy(_upsample(m, rgb.shape[:2]))).numpy()
        ax.imshow(rgb)
        mappable = ax.imshow(heat, cmap=cmap, alpha=0.6, vmin=0.0, vmax=1.0)
        ax.set_title(repr(name), fontsize=10)
    for ax in axes:
        ax.axis("off")
    if mappable is not None:
        fig.colorbar(mappable, ax=list(axes), shrink=0.8, label="relative attention (per word)")
    fig.suptitle(f"{gm.prompt!r}{_suffix(model)}", fontsize=11)
    return fig


def overlap_figure(overlap: Overlap, model: str | None = None, panel_in: float = 4.0):
    """Two matrix heat maps side by side: soft IoU (0..1, ``viridis``) and Pearson correlation (-1..1,
    ``RdBu_r``), each cell annotated with its value."""
    n = len(overlap.words)
    size = max(panel_in, 0.45 * n + 1.5)
    fig = _figure(2 * size + 1.0, size + 0.6)
    axes = fig.subplots(1, 2)
    for ax, mat, title, cmap, lo in (
        (axes[0], overlap.iou, "soft IoU of normalised maps", "viridis", 0.0),
        (axes[1], overlap.pearson, "Pearson correlation", "RdBu_r", -1.0),
    ):
        arr = mat.numpy()
        im = ax.imshow(arr, cmap=cmap, vmin=lo, vmax=1.0)
        ax.set_xticks(range(n), overlap.words, rotation=45, ha="right")
        ax.set_yticks(range(n), overlap.words)
        ax.set_title(title, fontsize=10)
        for i in range(n):
            for j in range(n):
                v = arr[i, j]
                light = (v - lo) / (1.0 - lo) < 0.5 if cmap == "viridis" else abs(v) > 0.6
                ax.text(
                    j,
                    i,
                    "nan" if v != v else f"{v:.2f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if light else "black",
                )
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(f"concept overlap{_suffix(model)}", fontsize=11)
    return fig


def dominance_figure(dominance: Dominance, image=None, model: str | None = None, panel_in: float = 4.0):
    """Left: per pixel the word that attends most (one colour per word, legend with each word's area), faded
    where its margin over the runner-up is small. Right: the margin itself. With ``image``, both are drawn at
    the image's size and the image is shown faintly under the word colours."""
    from matplotlib import colormaps
    from matplotlib.patches import Patch

    words = dominance.words
    palette = colormaps["tab10" if len(words) <= 10 else "tab20"]
    colours = np.array([palette(i % palette.N)[:3] for i in range(len(words))])
    index, margin = dominance.index, dominance.margin.float()
    hw = tuple(index.shape) if image is None else _rgb(image).shape[:2]
    if image is not None:
        index = F.interpolate(index[None, None].float(), size=hw, mode="nearest")[0, 0].long()
        margin = torch.from_numpy(_upsample(margin, hw))
    strength = normalize01(margin).numpy()[..., None]
    picture = colours[index.numpy()]
    base = _rgb(image) if image is not None else np.ones_like(picture)
    picture = (0.35 + 0.65 * strength) * picture + (0.65 - 0.65 * strength) * base
    fig = _figure(2 * panel_in + 2.2, panel_in + 0.6)
    axes = fig.subplots(1, 2)
    axes[0].imshow(picture.clip(0, 1), interpolation="nearest")
    axes[0].set_title("strongest word per pixel (faded: small margin)", fontsize=10)
    area = dominance.area()
    handles = [Patch(color=colours[i], label=f"{w} ({100 * area[w]:.0f}%)") for i, w in enumerate(words)]
    axes[0].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    im = axes[1].imshow(margin.numpy(), cmap="viridis")
    unit = "normalised" if dominance.normalized else "attention"
    axes[1].set_title(f"margin over the runner-up ({unit})", fontsize=10)
    fig.colorbar(im, ax=axes[1], shrink=0.8)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(f"dominance map{_suffix(model)}", fontsize=11)
    return fig


def seed_sweep_figure(sweep: SeedSweep, model: str | None = None, max_seeds: int = 8, panel_in: float = 1.6):
    """One row per word: its map for each seed (up to ``max_seeds``) and the mean, on the word's own colour scale
    (min .. max over seeds), then the standard deviation (0 .. its max); the row label gives the stability."""
    words = sweep.words
    n_seeds = min(max_seeds, len(sweep.seeds))
    ncols = n_seeds + 2
    fig = _figure(panel_in * ncols + 1.2, panel_in * len(words) + 0.6)
    axes = np.array(fig.subplots(len(words), ncols, squeeze=False))
    for r, w in enumerate(words):
        stack = sweep.per_seed[w]
        # Seeds and mean share the word's range over seeds; std (much smaller) gets its own 0 .. max scale.
        lo, hi = float(stack.min()), float(stack.max())
        panels = [(stack[i], f"seed {sweep.seeds[i]}", lo, hi) for i in range(n_seeds)]
        panels += [(sweep.mean[w], "mean", lo, hi), (sweep.std[w], "std", 0.0, float(sweep.std[w].max()))]
        for c, (m, title, vmin, vmax) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(m.numpy(), cmap=MAP_CMAP, vmin=vmin, vmax=vmax if vmax > vmin else None)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
        stab = sweep.stability[w]
        axes[r, 0].set_ylabel(f"{w!r}\nstability {stab:.2f}" if stab == stab else f"{w!r}", fontsize=9)
    fig.suptitle(f"{len(sweep.seeds)} seeds{_suffix(model)}", fontsize=11)
    return fig


def time_profile_figure(profile: TimeProfile, model: str | None = None, max_steps: int = 8, panel_in: float = 1.5):
    """Per-step strip: one row per word, its map at up to ``max_steps`` evenly spaced steps (each row on its own
    colour scale), and on the right each word's share of the step's attribution over all steps."""
    n_steps = profile.step_maps.shape[0]
    k = max(1, min(max_steps, n_steps))
    shown = sorted({round(i * (n_steps - 1) / max(1, k - 1)) for i in range(k)})
    words = profile.words
    fig = _figure(panel_in * len(shown) + 4.5, max(3.0, panel_in * len(words) + 0.6))
    grid = fig.add_gridspec(len(words), len(shown) + 1, width_ratios=[1.0] * len(shown) + [2.4])
    for r, w in enumerate(words):
        # One scale per row (the word's min .. max over the shown steps) so changes between steps are visible.
        row = profile.step_maps[shown, r]
        vmin, vmax = float(row.min()), float(row.max())
        for c, s in enumerate(shown):
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(profile.step_maps[s, r].numpy(), cmap=MAP_CMAP, vmin=vmin, vmax=vmax if vmax > vmin else None)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"step {s}", fontsize=9)
            if c == 0:
                ax.set_ylabel(repr(w), fontsize=9)
    ax = fig.add_subplot(grid[:, -1])
    for r, w in enumerate(words):
        ax.plot(range(n_steps), profile.share[:, r].numpy(), marker="o", markersize=3, label=w)
    for name, rng in profile.phases.items():
        if len(profile.phases) > 1 and rng.start > 0:
            ax.axvline(rng.start - 0.5, color="grey", linewidth=0.8, linestyle=":")
        ax.text(
            (rng.start + rng.stop - 1) / 2,
            1.0,
            name,
            transform=ax.get_xaxis_transform(),
            ha="center",
            va="bottom",
            fontsize=8,
            color="grey",
        )
    ax.set_xlabel("denoising step")
    ax.set_ylabel("share of the step's attribution")
    ax.legend(fontsize=8, frameon=False)
    fig.suptitle(f"attribution over denoising steps{_suffix(model)}", fontsize=11)
    return fig
