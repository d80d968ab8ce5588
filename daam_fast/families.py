"""Per-family adapters for joint-attention transformers: where the traced layers are, how a transformer call's
input gives the image-token grid, and how the text sequence's positions map to each tokenizer's tokens.

- SD3 / SD3.5 (``SD3Transformer2DModel``): latents ``[B, C, H, W]`` are patchified by ``patch_size``, so the
  token grid is ``(H / p, W / p)``; the text sequence is 77 CLIP positions (CLIP-L and CLIP-G joined on
  features, sharing positions) followed by the T5 positions (``max_sequence_length``; 77 zero rows when the
  pipeline has no T5). Joint attention is ``[image, text]``.
- Flux (``FluxTransformer2DModel``): the pipeline packs 2×2 latents per token into ``[B, N, 4C]`` and passes
  ``img_ids`` ``(0, row, col)``, which give the grid; the text sequence is T5 only (CLIP gives the pooled
  vector). Joint attention is ``[text, image]``, in double-stream and single-stream blocks.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from .tokens import PromptTokens, tokenize_prompt, tokenize_shared

__all__ = ["FLUX", "SD3", "Family", "Geometry", "TextSource", "detect"]


@dataclass(frozen=True)
class Geometry:
    """One transformer call: image-token ``grid`` (rows, cols), ``batch`` rows, ``text_len`` text positions,
    ``timestep`` (to tell a true-CFG second pass from the next step), ``pixels`` per grid cell, and whether it is
    an ``auxiliary`` guidance pass that is not traced (SD3.5's skip-layer guidance: cond rows, some blocks off)."""

    grid: tuple[int, int]
    batch: int
    text_len: int
    timestep: torch.Tensor | None
    pixels: int
    auxiliary: bool = False


@dataclass(frozen=True)
class TextSource:
    """One tokenizer's part of the text sequence: its ``tokens`` occupy positions ``offset + i``."""

    name: str
    tokens: PromptTokens
    offset: int


def _bind(model, args, kwargs) -> dict:
    try:
        return inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments
    except TypeError:
        return dict(kwargs)


class Family:
    """Base adapter; subclasses fill in the model-specific parts."""

    name = ""
    model_class = ""
    #: call arguments that override the prompt for the T5 encoder (SD3: prompt_3, Flux: prompt_2).
    t5_prompt_arg = ""
    t5_negative_arg = ""

    def matches(self, pipe) -> bool:
        """Whether ``pipe.transformer`` is this family's model class (also for subclasses)."""
        model = getattr(pipe, "transformer", None)
        return model is not None and any(c.__name__ == self.model_class for c in type(model).__mro__)

    def locate(self, model) -> list[tuple[str, str, object]]:
        """``(name, block kind, attention module)`` of every joint-attention layer, in block order."""
        raise NotImplementedError

    def processor(self, original, sink, layer_idx):
        """The capture processor wrapping ``original``."""
        raise NotImplementedError

    def geometry(self, pipe, model, args, kwargs) -> Geometry:
        """The :class:`Geometry` of a transformer call from its arguments."""
        raise NotImplementedError

    def text_sources(self, pipe, prompt: str, t5_prompt: str | None, text_len: int) -> list[TextSource]:
        """The tokenizers' parts of a ``text_len``-position text sequence for ``prompt``."""
        raise NotImplementedError


class _SD3(Family):
    name = "sd3"
    model_class = "SD3Transformer2DModel"
    t5_prompt_arg = "prompt_3"
    t5_negative_arg = "negative_prompt_3"

    def locate(self, model):
        return [(f"transformer_blocks.{i}.attn", "joint", b.attn) for i, b in enumerate(model.transformer_blocks)]

    def processor(self, original, sink, layer_idx):
        from .processors.joint import SD3JointCaptureProcessor

        return SD3JointCaptureProcessor(original, sink, layer_idx)

    def geometry(self, pipe, model, args, kwargs):
        bound = _bind(model, args, kwargs)
        x, ctx = bound["hidden_states"], bound["encoder_hidden_states"]
        p = int(model.config.patch_size)
        grid = (int(x.shape[-2]) // p, int(x.shape[-1]) // p)
        pixels = p * int(getattr(pipe, "vae_scale_factor", 1))
        aux = bound.get("skip_layers") is not None
        return Geometry(grid, int(x.shape[0]), int(ctx.shape[1]), bound.get("timestep"), pixels, aux)

    def text_sources(self, pipe, prompt, t5_prompt, text_len):
        clip_len = int(getattr(pipe, "tokenizer_max_length", 77))
        clip = [t for t in (pipe.tokenizer, pipe.tokenizer_2) if t is not None]
        sources = [TextSource("clip", tokenize_shared(clip, prompt), 0)]
        # Without T5 the pipeline fills the T5 part with zeros: no tokens to name.
        if getattr(pipe, "text_encoder_3", None) is not None and getattr(pipe, "tokenizer_3", None) is not None:
            t5 = tokenize_prompt(pipe.tokenizer_3, t5_prompt or prompt, max_length=text_len - clip_len)
            sources.append(TextSource("t5", t5, clip_len))
        return sources


class _Flux(Family):
    name = "flux"
    model_class = "FluxTransformer2DModel"
    t5_prompt_arg = "prompt_2"
    t5_negative_arg = "negative_prompt_2"

    def matches(self, pipe) -> bool:
        # Kontext appends the context image's tokens to the sequence (img_ids of two grids): not supported.
        return super().matches(pipe) and "Kontext" not in type(pipe).__name__

    def locate(self, model):
        double = [(f"transformer_blocks.{i}.attn", "double", b.attn) for i, b in enumerate(model.transformer_blocks)]
        single = [
            (f"single_transformer_blocks.{i}.attn", "single", b.attn)
            for i, b in enumerate(model.single_transformer_blocks)
        ]
        return double + single

    def processor(self, original, sink, layer_idx):
        from .processors.joint import FluxCaptureProcessor

        return FluxCaptureProcessor(original, sink, layer_idx)

    def geometry(self, pipe, model, args, kwargs):
        bound = _bind(model, args, kwargs)
        x, ctx, ids = bound["hidden_states"], bound["encoder_hidden_states"], bound.get("img_ids")
        n = int(x.shape[1])
        if ids is None:
            raise ValueError("Flux transformer call without img_ids: the image-token grid is unknown")
        ids = ids[0] if ids.ndim == 3 else ids
        rows, cols = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
        if rows * cols != n:
            raise ValueError(f"img_ids describe a {rows}x{cols} grid but the call has {n} image tokens")
        # The pipeline packs 2x2 latents per token (and the model may patchify further).
        pixels = 2 * int(model.config.patch_size) * int(getattr(pipe, "vae_scale_factor", 1))
        return Geometry((rows, cols), int(x.shape[0]), int(ctx.shape[1]), bound.get("timestep"), pixels)

    def text_sources(self, pipe, prompt, t5_prompt, text_len):
        return [TextSource("t5", tokenize_prompt(pipe.tokenizer_2, t5_prompt or prompt, max_length=text_len), 0)]


SD3 = _SD3()
FLUX = _Flux()
_FAMILIES = (SD3, FLUX)


def detect(pipe) -> Family | None:
    """The family of ``pipe``'s transformer, or None (no transformer, or an unsupported one)."""
    return next((f for f in _FAMILIES if f.matches(pipe)), None)
