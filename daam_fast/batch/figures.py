"""Figures of a batch summary (matplotlib ``Figure`` objects built without pyplot, as :mod:`daam_fast.figures`):
word influence over the dataset, a prompt's mean overlap matrices and the items where two words overlap most."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .. import analysis as A
from .. import figures as Fg
from ..heatmap import load

__all__ = ["influence_figure", "prompt_overlap_figure", "top_overlaps_figure"]

#: Images smaller than this (pixels, longer side) are enlarged for the figures, so a map is more than a few pixels.
MIN_SIDE = 128


def _figure(width_in: float, height_in: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width_in, height_in), dpi=Fg.DPI, layout="constrained")


def _suffix(model: str | None) -> str:
    return f" — {model}" if model else ""


def influence_figure(word_stats: dict, model: str | None = None, max_words: int = 30):
    """Left: each word's mean influence share over the items that have it, with its std as an error bar and its
    min..max as a thin line; right: its stability across seeds (mean Pearson of its maps between seeds, averaged
    over prompts; empty where no prompt has two seeds). ``word_stats``: summary.json's ``word_stats``. The
    ``max_words`` words of highest mean share are drawn."""
    ranked = sorted(word_stats.items(), key=lambda kv: -(kv[1]["share"]["mean"] or 0.0))[:max_words]
    names = [w for w, _ in ranked]
    share = [s["share"] for _, s in ranked]
    stab = [s["stability"]["mean"] for _, s in ranked]
    y = np.arange(len(names))
    fig = _figure(9.0, 0.32 * len(names) + 1.6)
    ax, bx = fig.subplots(1, 2, sharey=True, width_ratios=[3, 2])
    mean = np.array([s["mean"] or 0.0 for s in share])
    ax.hlines(y, [s["min"] or 0.0 for s in share], [s["max"] or 0.0 for s in share], color="0.6", lw=1)
    ax.barh(y, mean, xerr=[s["std"] or 0.0 for s in share], color="#3b6ea8", capsize=3, height=0.6)
    for yi, s in zip(y, share, strict=True):
        ax.text(s["max"] or 0.0, yi, f"  n={s['n']}", va="center", fontsize=7, color="0.35")
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("influence share (mean ± std over items; line: min..max)")
    finite = [v if v is not None else np.nan for v in stab]
    bx.barh(y, np.nan_to_num(finite, nan=0.0), color="#6a9e5b", height=0.6)
    for yi, v in zip(y, finite, strict=True):
        if not np.isfinite(v):
            bx.text(0.02, yi, "n/a", va="center", fontsize=7, color="0.35")
    bx.set_xlim(min(0.0, np.nanmin(finite) if np.isfinite(finite).any() else 0.0), 1.0)
    bx.set_xlabel("stability across seeds (mean Pearson)")
    fig.suptitle(f"word influence over the dataset{_suffix(model)}", fontsize=11)
    return fig


def prompt_overlap_figure(prompt: dict, model: str | None = None):
    """A prompt's mean soft-IoU and Pearson matrices over its seeds (:func:`daam_fast.figures.overlap_figure`).
    ``prompt``: one entry of summary.json's ``prompts``."""
    ov = prompt["overlap"]
    mean = A.Overlap(
        list(ov["words"]),
        torch.tensor(ov["iou"], dtype=torch.float64),
        torch.tensor(ov["pearson"], dtype=torch.float64),
    )
    text = prompt["prompt"] if len(prompt["prompt"]) <= 60 else prompt["prompt"][:57] + "..."
    where = f"{text!r}, mean of {len(prompt['seeds'])} seed(s)" + (f", {model}" if model else "")
    return Fg.overlap_figure(mean, model=where)


def _enlarged(image):
    side = max(image.size)
    if side >= MIN_SIDE:
        return image
    k = math.ceil(MIN_SIDE / side)
    return image.resize((image.width * k, image.height * k), resample=0)  # nearest: keep the pixels visible


def top_overlaps_figure(root: str | Path, top: list[dict], model: str | None = None, rows: int = 6):
    """One row per (item, word pair) of ``top`` (summary.json's ``top_overlaps``, highest soft IoU first; at most
    ``rows``): the item's image and each word's map over it, titled with the IoU."""
    from PIL import Image

    root = Path(root)
    shown = top[:rows]
    fig = _figure(7.5, 2.3 * len(shown) + 0.6)
    axes = np.atleast_2d(fig.subplots(len(shown), 3))
    for row, entry in zip(axes, shown, strict=True):
        item = root / "items" / entry["id"]
        with Image.open(item / "image.png") as im:
            image = _enlarged(im.convert("RGB"))
        names, maps = A.word_maps(load(item / "maps.safetensors"), entry["words"])
        prompt = entry.get("prompt", "")
        prompt = prompt if len(prompt) <= 40 else prompt[:37] + "..."
        row[0].imshow(np.asarray(image))
        row[0].set_title(f"{prompt!r}\nseed {entry['seed']}", fontsize=8)
        # The map over a grey copy of the image: colours of the image would hide the map's own.
        grey = image.convert("L").convert("RGB")
        for ax, name, m in zip(row[1:], names, maps, strict=True):
            ax.imshow(np.asarray(Fg.overlay_image(grey, m, alpha=0.8)))
            ax.set_title(repr(name), fontsize=9)
        row[1].text(
            1.0,
            -0.08,
            f"soft IoU {entry['iou']:.2f}, Pearson {entry['pearson']:.2f}",
            transform=row[1].transAxes,
            ha="center",
            va="top",
            fontsize=8,
        )
        for ax in row:
            ax.axis("off")
    fig.suptitle(f"where two words overlap most{_suffix(model)}", fontsize=11)
    return fig
