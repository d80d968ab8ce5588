"""What a model family tells the tracer: where the traced attention layers are, which capture processor each
gets, the :class:`~daam_fast.accumulate.Geometry` of a model call, the prompt's text sources (tokenizers and
their positions in the text sequence), and how the aggregated maps become a heat-map object.

A family holds no state: one instance serves every pipeline of its kind.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from ..accumulate import Geometry, ImageText, Record
from ..heatmap import GlobalHeatMap
from ..tokens import PromptTokens

__all__ = ["Family", "TextSource", "UnsupportedPipelineError", "bind_call", "call_default", "cfg_batch"]


class UnsupportedPipelineError(TypeError):
    """The pipeline or model cannot be traced (the message says what is supported)."""


@dataclass(frozen=True)
class TextSource:
    """One tokenizer's part of the text sequence: its ``tokens`` occupy positions ``offset + i``."""

    name: str
    tokens: PromptTokens
    offset: int


def bind_call(model, args, kwargs) -> dict:
    """A model call's arguments by name (as far as they bind to ``model.forward``)."""
    try:
        return inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments
    except TypeError:
        return dict(kwargs)


def call_default(pipe, name: str, fallback=None):
    """The default of argument ``name`` of the pipeline's ``__call__`` (``fallback`` when it has none)."""
    try:
        param = inspect.signature(type(pipe).__call__).parameters.get(name)
    except (TypeError, ValueError):
        return fallback
    return fallback if param is None or param.default is inspect.Parameter.empty else param.default


def cfg_batch(pipe, batch: int) -> bool:
    """Whether a model call of ``batch`` rows is a ``[unconditional, conditional]`` CFG batch."""
    return bool(getattr(pipe, "do_classifier_free_guidance", False)) and batch % 2 == 0


class Family:
    """Base of the model families; subclasses fill in the model-specific parts.

    Attributes:
        name: short name (``"unet"``, ``"sd3"``, ``"flux"``).
        source_prompt_args: text sources that read a pipeline argument of their own,
            ``{source name: (prompt argument, negative prompt argument)}`` (SD3's T5: ``prompt_3``).
    """

    name = ""
    source_prompt_args: dict[str, tuple[str, str]] = {}

    # -- what the pipeline is --------------------------------------------------------------------
    def matches(self, pipe) -> bool:
        """Whether ``pipe`` is of this family."""
        raise NotImplementedError

    def check(self, pipe) -> None:
        """Raise :class:`UnsupportedPipelineError` when ``pipe`` matches but lacks what tracing needs."""
        if not any(getattr(pipe, n, None) for n in ("tokenizer", "tokenizer_2")):
            raise UnsupportedPipelineError(f"{type(pipe).__name__} has no tokenizer")

    def model(self, pipe) -> torch.nn.Module:
        """The denoising model whose calls are traced (the UNet or the transformer)."""
        raise NotImplementedError

    # -- layers ----------------------------------------------------------------------------------
    def locate(self, model, *, mid_block: bool = False) -> list[tuple[str, str, object]]:
        """``(name, block kind, attention module)`` of every traceable layer, in the order layers are indexed."""
        raise NotImplementedError

    def layer_factor(self, model, name: str) -> int:
        """Grid down-sampling factor of layer ``name`` relative to the map grid (1: on the grid itself)."""
        return 1

    def processor(self, original, sink, layer_idx: int):
        """The capture processor wrapping ``original`` for layer ``layer_idx``, reporting to ``sink``."""
        raise NotImplementedError

    def daam_layer_names(self, names: list[str]) -> list[str]:
        """daam 0.2.0's names of the located layers ``names`` (``Trace.layer_names``); the names themselves for
        models daam does not know."""
        return list(names)

    def low_memory_layers(self, names: list[str]) -> list[int]:
        """Indices into ``names`` of the layers daam 0.2.0's ``trace(pipe, low_memory=True)`` traces; all of them
        for models daam does not know."""
        return list(range(len(names)))

    # -- calls -----------------------------------------------------------------------------------
    def geometry(self, pipe, model, args, kwargs) -> Geometry:
        """The :class:`~daam_fast.accumulate.Geometry` of a model call from its arguments."""
        raise NotImplementedError

    # -- text ------------------------------------------------------------------------------------
    def text_window(self, pipe) -> int | None:
        """Text positions a call has, when known before any call (to check ``tokens`` early), else None."""
        return None

    def text_sources(self, pipe, prompt: str, source_prompts=None, text_len: int | None = None) -> list[TextSource]:
        """The tokenizers' parts of the text sequence for ``prompt`` (``source_prompts``: ``{source: its own
        prompt}``); ``text_len``: the call's text positions (None: the pipeline's default)."""
        raise NotImplementedError

    def prompt_positions(self, pipe, prompts, source_prompts, text_len: int | None) -> set[int] | None:
        """The text positions the tokens of ``prompts`` occupy (start and end tokens included), over all of them.

        ``prompts``: one string per image (None entries, or ``prompts`` None, mean unknown: returns None);
        ``source_prompts``: ``{source name: one prompt per image, or None}``; ``text_len``: the call's text
        positions.
        """
        if not prompts or any(not isinstance(p, str) for p in prompts):
            return None
        positions: set[int] = set()
        seen = set()
        for i, prompt in enumerate(prompts):
            own = {name: values[i] for name, values in (source_prompts or {}).items() if values}
            key = (prompt, tuple(sorted(own.items())))
            if key in seen:  # a batch repeats its prompts (and its default empty negative prompts)
                continue
            seen.add(key)
            for src in self.text_sources(pipe, prompt, own, text_len):
                positions.update(range(src.offset, src.offset + src.tokens.n_tokens()))
        return positions

    def heat_map(
        self,
        pipe,
        model,
        rec: Record,
        maps: torch.Tensor,
        text: ImageText,
        positions: list[int],
        *,
        normalize: bool,
        negative: bool,
    ) -> GlobalHeatMap:
        """The heat-map object of aggregated ``maps`` fp32 ``[len(positions), H, W]`` (rows: text positions) of
        one image of ``rec``, words looked up in ``text``; ``normalize``: divide by the sum over prompt tokens."""
        raise NotImplementedError

    @staticmethod
    def base_meta(pipe, model, rec: Record) -> dict:
        """Meta every heat map carries: the pipeline class and model name, and the traced step count."""
        return {
            "model": type(pipe).__name__,
            "model_name": str(getattr(model.config, "_name_or_path", "")),
            "steps": rec.steps_traced,
        }
