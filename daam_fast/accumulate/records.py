"""What a traced pipeline call leaves: its :class:`Record`, the heat buffers in it, and the :class:`Geometry` of a
model call that the model family reads and accumulation needs.

A record's heat buffers are fp32 running sums over steps, one per attention grid (``[rows, tokens, h·w]``), per
layer (``per_layer=True``) or per layer and head (``daam_compat=True``: ``[rows, heads, tokens, h·w]``), so
their memory does not grow with steps. ``rows`` are the batch rows kept: the conditional half of a CFG batch,
or every row with ``negative=True`` (negative rows first).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["CallRows", "Geometry", "HeatBuffer", "LayerPlan", "Record", "grid_at", "layer_grid"]


@dataclass(frozen=True)
class Geometry:
    """One model call (UNet or transformer forward), as its model family reads it from the call's arguments.

    Attributes:
        grid: the grid the maps are on: the latent ``(h, w)`` of a UNet; the image-token grid of a transformer.
        batch: batch rows of the call.
        text_len: text positions (keys) of the call, or None when the call has no text input.
        pixels: image pixels per grid cell along each side.
        cfg: the batch is ``[unconditional, conditional]`` halves (classifier-free guidance).
        expected_steps: the pipeline call's denoising steps, when the pipeline says.
        multiscale: layers run on the grid halved 0, 1, 2... times (UNet); a layer's grid then follows from
            its query count. False: every layer is on ``grid``.
        timestep: set by families whose true CFG repeats a step's timestep in a second, unconditional call
            (joint transformers); None disables that detection.
        auxiliary: an extra guidance pass that is not traced (SD3.5's skip-layer guidance).
    """

    grid: tuple[int, int]
    batch: int
    text_len: int | None
    pixels: int
    cfg: bool = False
    expected_steps: int | None = None
    multiscale: bool = False
    timestep: torch.Tensor | None = None
    auxiliary: bool = False

    @property
    def shape(self) -> tuple:
        """What must stay the same for calls of one pipeline call (else a new record starts)."""
        return self.grid, self.batch, self.text_len


@dataclass(frozen=True)
class LayerPlan:
    """A traced layer as the snapshot memory guard needs it: its grid ``factor`` (relative to the map grid)
    and its ``heads``."""

    idx: int
    factor: int
    heads: int


@dataclass
class HeatBuffer:
    """A heat buffer: ``buf`` is fp32 ``[rows, tokens, h·w]`` or ``[rows, heads, tokens, h·w]`` on the ``grid``
    ``(h, w)`` at ``factor`` (relative to the record's grid); ``layer_heads`` counts the heads each layer added."""

    grid: tuple[int, int]
    factor: int
    buf: torch.Tensor
    layer_heads: dict[int, int] = field(default_factory=dict)


@dataclass
class CallRows:
    """Where the running model call's captures go.

    ``src``: the batch rows the call traces (None: the call adds nothing, e.g. an untraced guidance pass);
    ``dst``: the buffer rows they add into; ``buffer_rows``: rows of every heat buffer of the record.
    ``true_cfg`` / ``last_timestep``: Flux's true CFG makes a second, unconditional call per step at the same
    timestep; its rows go to the negative rows (doubling ``buffer_rows``) and it is not a step.
    """

    src: slice | None = None
    dst: slice | None = None
    buffer_rows: int = 0
    true_cfg: bool = False
    last_timestep: torch.Tensor | None = None


@dataclass
class Record:
    """What one pipeline call left: its prompts, geometry, step count and heat buffers."""

    prompts: list[str | None] | None = None
    negative_prompts: list[str | None] | None = None
    #: prompts of text sources that read an argument of their own (SD3's T5: ``prompt_3``; Flux's: ``prompt_2``),
    #: by source name; None where the argument was not given.
    source_prompts: dict[str, list[str | None] | None] = field(default_factory=dict)
    source_negative_prompts: dict[str, list[str | None] | None] = field(default_factory=dict)
    #: the first model call's geometry (None until then).
    geometry: Geometry | None = None
    #: the text positions (relative to the text span) this call captures, set at its first model call: the
    #: prompts' own tokens (start and end tokens included) by default, ``trace(tokens=...)`` when given, all
    #: positions when the prompts are unknown (``prompt_embeds``).
    positions: tuple[int, ...] | None = None
    rows: slice = field(default_factory=lambda: slice(0))
    n_images: int = 0
    has_negative: bool = False
    steps_seen: int = 0
    steps_traced: int = 0
    interrupted: bool = False
    slots: dict = field(default_factory=dict, repr=False)
    grids: dict = field(default_factory=dict, repr=False)
    #: ``snapshots="step"`` only: ``{step: {slot key: copy of the buffer after that step}}``.
    snapshots: dict = field(default_factory=dict, repr=False)
    calls: CallRows = field(default_factory=CallRows, repr=False)

    @property
    def latent_hw(self) -> tuple[int, int] | None:
        """The grid of the maps (UNet: the latent; transformers: the image-token grid), None before the first
        model call."""
        return None if self.geometry is None else self.geometry.grid

    @property
    def expected_steps(self) -> int | None:
        return None if self.geometry is None else self.geometry.expected_steps

    @property
    def complete(self) -> bool:
        """True when the pipeline call ran all its steps without being interrupted."""
        return not self.interrupted and (self.expected_steps is None or self.steps_seen >= self.expected_steps)


def layer_grid(grid: tuple[int, int], n_queries: int, multiscale: bool) -> tuple[int, int, int]:
    """``(h, w, factor)`` of a layer with ``n_queries`` positions. Multiscale (UNet): the UNet halves the grid
    with stride-2 convolutions (``ceil(h / 2)``), so non-square and odd sizes are followed exactly."""
    h, w = grid
    if not multiscale:
        if h * w != n_queries:
            raise ValueError(f"{n_queries} image queries do not fill the {grid} token grid")
        return h, w, 1
    factor = 1
    while h * w > n_queries:
        h, w, factor = (h + 1) // 2, (w + 1) // 2, factor * 2
    if h * w != n_queries:
        raise ValueError(f"{n_queries} attention queries match no grid of the {grid} latent")
    return h, w, factor


def grid_at(grid: tuple[int, int], factor: int) -> tuple[int, int]:
    """The grid ``factor`` times coarser than ``grid`` (``ceil`` halving, as the UNet's convolutions)."""
    h, w = grid
    while factor > 1:
        h, w, factor = (h + 1) // 2, (w + 1) // 2, factor // 2
    return h, w
