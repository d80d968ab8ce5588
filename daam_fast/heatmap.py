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

__all__ = [
    "FORMAT_VERSION",
    "GlobalHeatMap",
    "HeatMapFileError",
    "HeatMapSelectionError",
    "JointGlobalHeatMap",
    "WordHeatMap",
    "load",
]


class HeatMapSelectionError(ValueError, RuntimeError):
    """``compute_global_heat_map``'s selection (``factors``, ``layer_idx``, ``head_idx``) matches no traced maps,
    or needs buffers the trace did not keep. A ``ValueError`` (a bad argument) and a ``RuntimeError``: daam 0.2.0
    raises ``RuntimeError`` there, and its scripts catch that when they loop over layers and heads."""


def _image_hw(image) -> tuple[int, int]:
    if hasattr(image, "shape"):  # numpy [H, W, C] or torch
        return int(image.shape[0]), int(image.shape[1])
    w, h = image.size  # PIL: (width, height)
    return int(h), int(w)


def _image_rgb(image) -> np.ndarray:
    """``image`` (PIL, or an ``[H, W, 3|4]`` uint8 array, or a float array in [0, 1] as diffusers' ``output_type=
    "np"`` gives) as float32 ``[H, W, 3]`` in [0, 1]."""
    if hasattr(image, "convert"):
        image = image.convert("RGB")
    arr = np.asarray(image)[..., :3]
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.float32) / 255.0
    return arr.astype(np.float32).clip(0.0, 1.0)


def _offset(offset_idx) -> int:
    if offset_idx is None:
        return 0
    if isinstance(offset_idx, bool) or not isinstance(offset_idx, int):
        raise TypeError(f"offset_idx must be an int (a token shift, daam's meaning), got {offset_idx!r}")
    return offset_idx


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

    def expand_as(
        self, image, absolute: bool = False, threshold: float | None = None, plot: bool = False, **plot_kwargs
    ) -> torch.Tensor:
        """:meth:`expand` to the size of ``image`` (PIL image or ``[H, W, C]`` array): fp32 ``[H, W]`` on the CPU.

        Non-square images keep their orientation (daam 0.2.0 swaps height and width there). ``plot=True`` also
        draws the returned map with :meth:`plot_overlay` (``plot_kwargs``: ``out_file``, ``color_normalize``,
        ``ax``), as daam does.
        """
        im = self.expand(_image_hw(image), absolute=absolute, threshold=threshold)
        if plot:
            self.plot_overlay(image, **{"absolute": absolute, "threshold": threshold, **plot_kwargs})
        return im

    def compute_ioa(self, other: WordHeatMap | torch.Tensor) -> float:
        """Intersection over this map's area, ``sum(a * b) / sum(a)`` (daam 0.2.0's ``compute_ioa``), for masks
        such as ``expand_as(image, threshold=0.4)``.

        ``other`` is a :class:`WordHeatMap` or a tensor. When the sizes differ, this map is first brought to
        ``other``'s ``[H, W]`` bicubically and binarised at 1, as daam does for an up-sampled mask.
        """
        a = self.heatmap.detach().float()
        b = (other.heatmap if isinstance(other, WordHeatMap) else other).detach().float().to(a.device)
        if a.shape != b.shape:
            a = F.interpolate(a[None, None], size=tuple(b.shape[-2:]), mode="bicubic")[0, 0]
            a = (a >= 1).float()
        return float((a * b).sum() / (a.sum() + 1e-8))

    def plot_overlay(self, image, out_file=None, color_normalize: bool = True, ax=None, **expand_kwargs):
        """Draw the map under a semi-transparent ``image`` with matplotlib, as daam 0.2.0 draws it.

        The map is :meth:`expand_as` ``(image, **expand_kwargs)`` (min-max normalised unless ``absolute=True``),
        drawn with the ``jet`` colour map, and the image on top with opacity ``1 - map``.

        Args:
            image: PIL image or ``[H, W, 3]`` array (uint8, or float in [0, 1]).
            out_file: save the figure there when given.
            color_normalize: colours span the map's own range; else the map is clamped to [0, 1] and coloured on
                that fixed scale (which only differs for ``absolute=True``).
            ax: draw into this axes; default the current pyplot figure, cleared first, as daam does (the
                backend is never changed, so ``plt.show()`` afterwards shows it).
            expand_kwargs: ``absolute``, ``threshold`` of :meth:`expand_as`.
        Returns:
            The matplotlib axes drawn into.
        """
        heat = self.expand_as(image, **expand_kwargs)
        if ax is None:
            import matplotlib.pyplot as plt

            fig = plt.gcf()
            fig.clf()
            ax = fig.add_subplot()
        if color_normalize:
            ax.imshow(heat.numpy(), cmap="jet")
        else:
            heat = heat.clamp(0, 1)
            ax.imshow(heat.numpy(), cmap="jet", vmin=0.0, vmax=1.0)
        alpha = (1 - heat).clamp(0, 1).numpy()[..., None]
        ax.imshow(np.concatenate([_image_rgb(image), alpha], axis=-1))
        if self.word is not None:
            ax.set_title(self.word)
        if out_file is not None:
            ax.figure.savefig(out_file)
        return ax


class GlobalHeatMap:
    """Per-token heat maps of one traced image.

    ``GlobalHeatMap(tokens, heat_maps, positions=None, meta=None)``, or daam 0.2.0's
    ``GlobalHeatMap(tokenizer, prompt, heat_maps)`` (the prompt is then encoded with ``tokenizer``, a Hugging Face
    fast tokenizer, and row ``i`` of ``heat_maps`` is token position ``i``).

    Attributes:
        tokens: the prompt's :class:`~daam_fast.tokens.PromptTokens`.
        heat_maps: fp32 ``[n_positions, H_latent, W_latent]``; row ``i`` is token position ``positions[i]``
            (0 = start token), as daam's ``heat_maps`` when all positions were traced.
        positions: token positions of the rows.
        meta: model, steps, sizes, ... (saved with the maps).
        tokenizer: the tokenizer of daam's form, else None.
    """

    def __init__(self, tokens, heat_maps, positions=None, meta: dict | None = None):
        self.tokenizer = None
        if isinstance(heat_maps, str):  # daam's GlobalHeatMap(tokenizer, prompt, heat_maps)
            if positions is None or isinstance(positions, (list, tuple, range)):
                raise TypeError("daam's form is GlobalHeatMap(tokenizer, prompt, heat_maps): heat_maps is missing")
            from .tokens import tokenize_prompt

            self.tokenizer, tokens, heat_maps, positions = tokens, tokenize_prompt(tokens, heat_maps), positions, None
        if not isinstance(tokens, PromptTokens):
            raise TypeError(
                f"GlobalHeatMap takes (tokens: PromptTokens, heat_maps, positions=None, meta=None) or daam's "
                f"(tokenizer, prompt: str, heat_maps); got a {type(tokens).__name__} and a {type(heat_maps).__name__}"
            )
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
        self, word: str, word_idx: int | None = None, offset_idx: int | None = None, *, occurrence: int | None = None
    ) -> WordHeatMap:
        """The map of ``word``: fp32 ``[H, W]``, the mean of the maps of its tokens (all occurrences unless
        ``occurrence``). The arguments are daam 0.2.0's, in its order.

        Args:
            word: a word (or several) of the prompt; case-insensitive, whole words, weighting syntax
                like ``(word:1.3)`` stripped.
            word_idx: daam's meaning: use the single token at index ``word_idx`` of the prompt's tokens
                (0 = first token after the start token) instead of looking ``word`` up.
            offset_idx: daam's meaning: shift every token position found for ``word`` by this many tokens
                (ignored with ``word_idx``, as in daam); default 0.
            occurrence: the n-th (0-based) occurrence of a repeated word (keyword only).
        """
        if word_idx is not None:
            n_prompt = self.tokens.n_tokens() - 2
            if not 0 <= word_idx < n_prompt:
                raise IndexError(
                    f"word_idx {word_idx} out of range: the prompt has {n_prompt} tokens (0..{n_prompt - 1})"
                )
            positions = [word_idx + 1]
        else:
            positions = [p + _offset(offset_idx) for p in self.tokens.positions(word, occurrence)]
        return WordHeatMap(self._mean_of(positions, word), word, word_idx, positions)

    def _mean_of(self, positions: list[int], word: str) -> torch.Tensor:
        rows = [self._row.get(p) for p in positions]
        if any(r is None for r in rows):
            raise IndexError(f"tokens {positions} of {word!r} were not all traced; traced positions: {self.positions}")
        return self.heat_maps[rows].mean(0)

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
        self,
        word: str,
        word_idx: int | None = None,
        offset_idx: int | None = None,
        *,
        occurrence: int | None = None,
        source: str | None = None,
    ) -> WordHeatMap:
        """The map of ``word`` from one tokenizer's tokens or from all.

        Args:
            word, offset_idx, occurrence: as :meth:`GlobalHeatMap.compute_word_heat_map`, looked up with each
                source's own tokenizer offsets (``offset_idx`` shifts within each source).
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
                    local = [p + _offset(offset_idx) for p in tokens.positions(word, occurrence)]
                except WordNotFoundError as exc:  # a word may be cut from one window but not the other
                    errors.append(exc)
                    continue
            positions = [offset + p for p in local]
            maps.append(self._mean_of(positions, word))
            all_positions += positions
        if not maps:
            raise errors[0]
        return WordHeatMap(torch.stack(maps).mean(0), word, word_idx, all_positions)
