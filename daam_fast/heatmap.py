"""Heat-map objects: per-token maps of one traced image (:class:`GlobalHeatMap`) and per-word maps
(:class:`WordHeatMap`), with daam 0.2.0's names; saving to safetensors + JSON metadata (no pickle).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import heatmap_file
from .heatmap_file import FORMAT_VERSION, HeatMapFileError
from .tokens import PromptTokens, WordNotFoundError

__all__ = ["FORMAT_VERSION", "GlobalHeatMap", "HeatMapFileError", "JointGlobalHeatMap", "WordHeatMap", "load"]


def _image_hw(image) -> tuple[int, int]:
    if hasattr(image, "shape"):  # numpy [H, W, C] or torch
        return int(image.shape[0]), int(image.shape[1])
    w, h = image.size  # PIL: (width, height)
    return int(h), int(w)


class WordHeatMap:
    """The heat map of one word: ``heatmap`` fp32 ``[H_latent, W_latent]`` (mean of its tokens' maps)."""

    def __init__(self, heatmap: torch.Tensor, word: str | None = None, word_idx: int | None = None, positions=()):
        self.heatmap = heatmap
        self.word = word
        self.word_idx = word_idx
        self.positions = list(positions)

    @property
    def value(self) -> torch.Tensor:
        """daam's alias of :attr:`heatmap`."""
        return self.heatmap

    def expand(self, size: tuple[int, int], absolute: bool = False, threshold: float | None = None) -> torch.Tensor:
        """Bicubic up-sampling to ``size = (height, width)``: fp32 ``[height, width]`` on the CPU.

        Unless ``absolute``, the result is min-max normalised to [0, 1] (daam's ``expand_as``);
        ``threshold`` then binarises it (daam uses 0.4 for masks).
        """
        im = F.interpolate(self.heatmap.detach().float()[None, None], size=tuple(size), mode="bicubic")[0, 0]
        if not absolute:
            im = (im - im.min()) / (im.max() - im.min() + 1e-8)
        if threshold is not None:
            im = (im > threshold).float()
        return im.cpu()

    def expand_as(self, image, absolute: bool = False, threshold: float | None = None) -> torch.Tensor:
        """:meth:`expand` to the size of ``image`` (PIL image or ``[H, W, C]`` array); non-square images keep
        their orientation (daam swaps height and width there)."""
        return self.expand(_image_hw(image), absolute=absolute, threshold=threshold)

    def plot_overlay(self, image, out_file=None, color_normalize: bool = True, ax=None, cmap: str = "jet", title=None):
        """Draw the map over ``image`` with matplotlib (daam's look: the map under a semi-opaque image).

        Args:
            image: PIL image or ``[H, W, 3]`` uint8 array.
            out_file: save the figure there when given.
            color_normalize: scale colours to the map's own range; else clamp to [0, 1].
            ax: draw into this axes; default a new figure.
        Returns:
            The matplotlib axes drawn into.
        """
        import matplotlib

        if ax is None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig = None
        if ax is None:
            fig, ax = plt.subplots(figsize=(5, 5))
        heat = self.expand_as(image, absolute=not color_normalize)
        if not color_normalize:
            heat = heat.clamp(0, 1)
        ax.imshow(heat.numpy(), cmap=cmap, vmin=None if color_normalize else 0.0, vmax=None if color_normalize else 1.0)
        im = torch.from_numpy(np.array(image.convert("RGB") if hasattr(image, "convert") else image)).float()
        im = im / 255 if im.max() > 1 else im
        ax.imshow(torch.cat((im, 1 - heat.unsqueeze(-1)), dim=-1).clamp(0, 1).numpy())
        ax.set_title(title if title is not None else (self.word or ""))
        ax.axis("off")
        if out_file is not None:
            (fig or ax.figure).savefig(out_file, bbox_inches="tight")
        if fig is not None and out_file is not None:
            plt.close(fig)
        return ax


class GlobalHeatMap:
    """Per-token heat maps of one traced image.

    Attributes:
        tokens: the prompt's :class:`~daam_fast.tokens.PromptTokens`.
        heat_maps: fp32 ``[n_positions, H_latent, W_latent]``; row ``i`` is token position ``positions[i]``
            (0 = start token), as daam's ``heat_maps`` when all positions were traced.
        positions: token positions of the rows.
        meta: model, steps, sizes, ... (saved with the maps).
    """

    def __init__(self, tokens: PromptTokens, heat_maps: torch.Tensor, positions=None, meta: dict | None = None):
        self.tokens = tokens
        self.heat_maps = heat_maps
        self.positions = list(range(heat_maps.shape[0])) if positions is None else list(positions)
        self.meta = dict(meta or {})
        self._row = {p: i for i, p in enumerate(self.positions)}

    @property
    def prompt(self) -> str:
        return self.tokens.prompt

    def token_heat_map(self, position: int) -> torch.Tensor:
        """fp32 ``[H, W]`` map of one token position."""
        if position not in self._row:
            raise IndexError(f"token position {position} was not traced; traced positions: {self.positions}")
        return self.heat_maps[self._row[position]]

    def compute_word_heat_map(
        self, word: str, word_idx: int | None = None, occurrence: int | None = None
    ) -> WordHeatMap:
        """The map of ``word``: the mean of the maps of its tokens (all occurrences unless ``occurrence``).

        Args:
            word: a word (or several) of the prompt; case-insensitive, whole words, weighting syntax
                like ``(word:1.3)`` stripped.
            word_idx: daam's meaning: use the single token at index ``word_idx`` of the prompt's tokens
                (0 = first token after the start token) instead of looking ``word`` up.
            occurrence: the n-th (0-based) occurrence of a repeated word.
        """
        if word_idx is not None:
            n_prompt = self.tokens.n_tokens() - 2
            if not 0 <= word_idx < n_prompt:
                raise IndexError(
                    f"word_idx {word_idx} out of range: the prompt has {n_prompt} tokens (0..{n_prompt - 1})"
                )
            positions = [word_idx + 1]
        else:
            positions = self.tokens.positions(word, occurrence)
        rows = [self._row.get(p) for p in positions]
        if any(r is None for r in rows):
            raise IndexError(f"tokens {positions} of {word!r} were not all traced; traced positions: {self.positions}")
        return WordHeatMap(self.heat_maps[rows].mean(0), word, word_idx, positions)

    # -- persistence -----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, **extra_meta: Any) -> Path:
        """Write maps (safetensors) and metadata (JSON in the safetensors header) to ``path``, atomically:
        a temporary file in the same folder is renamed, so an interrupted save leaves no partial file."""
        return heatmap_file.write(path, self.heat_maps, self.tokens, self.positions, {**self.meta, **extra_meta})

    @classmethod
    def load(cls, path: str | os.PathLike) -> GlobalHeatMap:
        """Read a file written by :meth:`save`. Raises :class:`HeatMapFileError` for corrupt, truncated, foreign or
        inconsistent files (every header field is checked) and for files of a newer format version."""
        tokens, maps, positions, meta = heatmap_file.read(path)
        return cls(tokens, maps, positions=positions, meta=meta)


def load(path: str | os.PathLike) -> GlobalHeatMap:
    """Load a :class:`GlobalHeatMap` (or :class:`JointGlobalHeatMap`) saved with :meth:`GlobalHeatMap.save`."""
    gm = GlobalHeatMap.load(path)
    if "text_sources" in gm.meta:
        return JointGlobalHeatMap(gm.tokens, gm.heat_maps, positions=gm.positions, meta=gm.meta)
    return gm


class JointGlobalHeatMap(GlobalHeatMap):
    """Per-token heat maps of a joint-attention transformer (SD3, Flux), whose text sequence joins the
    tokens of several tokenizers.

    ``positions`` index the model's text sequence. ``meta["text_sources"]`` lists each tokenizer's part:
    ``{"name": "clip" | "t5", "offset": first position, "tokens": PromptTokens.to_dict()}`` (SD3: CLIP at 0,
    T5 at 77; Flux: T5 at 0), and ``meta["default_source"]`` the source words are looked up in by default.
    ``tokens`` is the first source's :class:`~daam_fast.tokens.PromptTokens`.
    """

    def __init__(self, tokens: PromptTokens, heat_maps: torch.Tensor, positions=None, meta: dict | None = None):
        super().__init__(tokens, heat_maps, positions=positions, meta=meta)
        self.sources = {
            s["name"]: (PromptTokens.from_dict(s["tokens"]), int(s["offset"])) for s in self.meta["text_sources"]
        }
        self.default_source = self.meta.get("default_source", "both")

    def source_tokens(self, source: str) -> tuple[PromptTokens, int]:
        """``(PromptTokens, offset)`` of one source (``"clip"`` or ``"t5"``)."""
        if source not in self.sources:
            raise ValueError(f"no {source!r} text in this model's sequence; sources: {list(self.sources)}")
        return self.sources[source]

    def compute_word_heat_map(
        self, word: str, word_idx: int | None = None, occurrence: int | None = None, source: str | None = None
    ) -> WordHeatMap:
        """The map of ``word`` from one tokenizer's tokens or from all.

        Args:
            word, occurrence: as :meth:`GlobalHeatMap.compute_word_heat_map`, looked up with each source's own
                tokenizer offsets.
            word_idx: the ``word_idx``-th non-special token of one source (needs a single source).
            source: ``"clip"``, ``"t5"`` or ``"both"``; default ``meta["default_source"]``, which the tracer
                sets to ``"both"`` for SD3 with T5 (the model attends to the word through both encoders, and
                a word past CLIP's 77-token window is still found through T5) and to the only source
                otherwise. ``"both"`` is the mean of the per-source maps (each the mean of that source's
                tokens), over the sources that contain the word, so each encoder weighs the same however
                many tokens it splits the word into.
        """
        source = source or self.default_source
        names = list(self.sources) if source == "both" else [source]
        if word_idx is not None and len(names) > 1:
            raise ValueError(f"word_idx picks a token of one tokenizer: pass source= one of {list(self.sources)}")
        maps, all_positions, errors = [], [], []
        for name in names:
            tokens, offset = self.source_tokens(name)
            if word_idx is not None:
                content = [i for i, (a, b) in enumerate(tokens.offsets) if b > a]
                if not 0 <= word_idx < len(content):
                    raise IndexError(f"word_idx {word_idx} out of range: {name} has {len(content)} prompt tokens")
                local = [content[word_idx]]
            else:
                try:
                    local = tokens.positions(word, occurrence)
                except WordNotFoundError as exc:  # a word may be cut from one window but not the other
                    errors.append(exc)
                    continue
            positions = [offset + p for p in local]
            rows = [self._row.get(p) for p in positions]
            if any(r is None for r in rows):
                raise IndexError(f"tokens {positions} of {word!r} were not all traced; traced: {self.positions}")
            maps.append(self.heat_maps[rows].mean(0))
            all_positions += positions
        if not maps:
            raise errors[0]
        return WordHeatMap(torch.stack(maps).mean(0), word, word_idx, all_positions)
