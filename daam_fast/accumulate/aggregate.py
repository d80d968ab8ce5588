"""From heat buffers to per-token maps: the mean over traced (layer, head) maps on the record's grid, and the
rows and prompt of the image (or images) asked for.

As daam 0.2.0: each (layer, head) map is brought to the grid with bicubic interpolation and the maps are
averaged, summed over steps. Here the buffers hold sums at each layer's native resolution and are up-sampled
once, then clamped at 0: the maps are attributions, and bicubic overshoot below 0 at sharp edges is not a
negative one (daam clamps each (layer, head) map instead, so the two differ by a few % of a sharp map's maximum;
``daam_compat=True`` keeps one buffer per (layer, head) and daam's per-map clamp).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..heatmap import HeatMapSelectionError
from .options import CaptureOptions
from .records import Record

__all__ = ["ImageText", "aggregate", "select_image"]


@dataclass(frozen=True)
class ImageText:
    """The texts a map's words come from: the ``prompt``, and per text source that read an argument of its own
    (SD3's T5: ``prompt_3``), that argument (``overrides``: ``(source name, text)`` pairs)."""

    prompt: str | None
    overrides: tuple[tuple[str, str | None], ...] = ()

    @property
    def source_prompts(self) -> dict[str, str | None]:
        """``{source name: its own prompt}`` (sources absent here read :attr:`prompt`)."""
        return dict(self.overrides)


def aggregate(
    rec: Record,
    options: CaptureOptions,
    factors=None,
    head_idx: int | None = None,
    layer_idx: int | None = None,
    bufs: dict | None = None,
) -> torch.Tensor:
    """fp32 ``[buffer rows, tokens, H, W]``, never negative, on the record's grid ``(H, W)``: the mean over traced
    (layer, head) maps of ``rec``'s buffers (or of ``bufs``, ``{slot key: buffer-shaped tensor}``, e.g. one
    step's share), restricted to grid ``factors``, one head (``daam_compat``) or one layer (``per_layer``).

    A selection that matches no maps, or needs buffers the options did not keep, raises
    :class:`~daam_fast.heatmap.HeatMapSelectionError` (a ``ValueError`` and the ``RuntimeError`` daam raises)."""
    if head_idx is not None and not options.daam_compat:
        raise HeatMapSelectionError("head_idx needs per-head buffers: trace with trace(pipe, daam_compat=True)")
    if layer_idx is not None and not options.per_layer:
        raise HeatMapSelectionError(
            "layer_idx needs per-layer buffers: trace with trace(pipe, per_layer=True) (or daam_compat=True)"
        )
    if layer_idx is not None and layer_idx not in rec.slots:
        raise HeatMapSelectionError(f"layer {layer_idx} has no maps; traced layers: {sorted(rec.slots)}")
    wanted = None if factors is None else {int(f) for f in factors}
    H, W = rec.latent_hw
    total, count = None, 0
    for key, slot in rec.slots.items():
        if wanted is not None and slot.factor not in wanted:
            continue
        if (layer_idx is not None and key != layer_idx) or not slot.layer_heads:
            continue
        h, w = slot.grid
        buf = slot.buf if bufs is None else bufs[key]
        if options.daam_compat:
            heads = range(buf.shape[1]) if head_idx is None else [head_idx]
            if head_idx is not None and not 0 <= head_idx < buf.shape[1]:
                raise HeatMapSelectionError(f"head_idx {head_idx} out of range: layer {key} has {buf.shape[1]} heads")
            for hd in heads:
                m = buf[:, hd].reshape(buf.shape[0], buf.shape[2], h, w)
                m = F.interpolate(m, size=(H, W), mode="bicubic").clamp_(min=0)
                total = m if total is None else total + m
                count += 1
        else:
            m = F.interpolate(buf.reshape(buf.shape[0], buf.shape[1], h, w), size=(H, W), mode="bicubic")
            total = m if total is None else total + m
            count += sum(slot.layer_heads.values())
    if total is None:
        raise HeatMapSelectionError(f"no heat maps for factors={factors}, layer_idx={layer_idx}, head_idx={head_idx}")
    # One clamp after the single up-sampling (a no-op for daam_compat's per-map clamped sums).
    return (total / count).clamp_(min=0)


def select_image(
    rec: Record, maps: torch.Tensor, image_idx: int | None, negative: bool
) -> tuple[torch.Tensor, ImageText]:
    """The ``[tokens, H, W]`` maps of one image of the call (``image_idx``) or their mean over the call's images
    (which must share their prompts), from ``maps`` ``[buffer rows, tokens, H, W]``; with the texts of its words.

    ``negative``: the negative prompt's rows (the first ``n_images`` rows; they exist with ``negative=True`` and
    CFG), else the prompt's (the last ``n_images``).
    """
    n = rec.n_images
    if negative:
        if not rec.has_negative:
            raise ValueError(
                "no negative-prompt maps: trace with trace(pipe, negative=True) and guidance_scale > 1 "
                "(Flux: true_cfg_scale > 1 and a negative_prompt)"
            )
        maps, texts, by_source = maps[:n], rec.negative_prompts, rec.source_negative_prompts
    else:
        maps, texts, by_source = maps[maps.shape[0] - n :], rec.prompts, rec.source_prompts
    names = [name for name, values in by_source.items() if values]

    def text_of(i: int) -> ImageText:
        return ImageText(texts[i], tuple((name, by_source[name][i]) for name in names))

    per_prompt = max(1, n // len(texts)) if texts else n  # num_images_per_prompt
    if image_idx is not None:
        if not -n <= image_idx < n:
            raise IndexError(f"image_idx {image_idx} out of range: this call made {n} image(s)")
        image_idx %= n
        return maps[image_idx], text_of(image_idx // per_prompt) if texts else ImageText(None)
    distinct = {text_of(i) for i in range(len(texts))} if texts else {ImageText(None)}
    if len(distinct) > 1:
        raise ValueError(f"the {n} images have different prompts {texts}: pass image_idx in 0..{n - 1}")
    return maps.mean(0), next(iter(distinct))
