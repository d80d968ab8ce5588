"""``daam_fast.trace``: the context manager that installs capture processors on a pipeline and gives heat maps.

The tracer holds no model knowledge and does no accumulation itself: the model family
(:mod:`daam_fast.families`) locates the layers, builds their processors, reads each model call's geometry and
the prompt's text sources; the :class:`~daam_fast.accumulate.Accumulator` keeps the records and heat buffers and
is the processors' capture sink. The tracer checks the options, installs and restores, and delegates.

Memory does not grow with steps: each traced attention call adds into a small fp32 buffer per attention
resolution (``[rows, tokens, h·w]``), or per layer (``per_layer=True``), or per layer and head
(``daam_compat=True``). Each pipeline call inside one ``with trace(pipe)`` block is its own :class:`Record`;
heat maps come from the last one unless another is asked for. Failure modes and what is guaranteed after each
are listed in docs/RELIABILITY.md.
"""

from __future__ import annotations

import inspect
import logging
import threading
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from . import families
from .accumulate import (
    DEFAULT_SKIPPED_FACTORS,
    Accumulator,
    CaptureOptions,
    ImageText,
    LayerPlan,
    Record,
    SnapshotBudgetError,
    aggregate,
    select_image,
    step_buffers,
)
from .accumulate.options import as_int, check_flag, describe
from .experiment import GenerationExperiment, as_pil
from .families import UnsupportedPipelineError
from .heatmap import GlobalHeatMap

__all__ = [
    "DEFAULT_SKIPPED_FACTORS",
    "LayerInfo",
    "Record",
    "SnapshotBudgetError",
    "Trace",
    "UnsupportedPipelineError",
    "trace",
]

logger = logging.getLogger(__name__)

_ACTIVE: weakref.WeakSet = weakref.WeakSet()
_ACTIVE_LOCK = threading.Lock()


@dataclass(frozen=True)
class LayerInfo:
    """One traced attention module. ``idx`` follows daam's order: up blocks, down blocks, mid."""

    idx: int
    name: str
    block: str
    heads: int


class Trace:
    """Context manager that traces a diffusers pipeline (use :func:`trace`).

    Joint-attention transformers (SD3, Flux): the layers are the transformer blocks' joint attentions (Flux:
    double-stream then single-stream blocks), all traced by default; maps are on the image-token grid (latent
    size / patch size; Flux packs 2×2 latents per token); ``factors`` and ``mid_block`` do not apply.

    Args:
        pipe: a supported pipeline (see ``daam_fast.families.SUPPORTED``).
        low_memory: daam 0.2.0's option, with its meaning: trace only the first cross-attention of each UNet
            block (so the maps are daam's low-memory maps). daam_fast's memory does not depend on it.
        load_heads, save_heads: daam 0.2.0's options to pickle every attention-probability tensor to disk and
            swap saved ones back into the model; daam_fast never materialises those tensors, so ``True`` raises
            ``ValueError`` (per-head maps: ``daam_compat=True`` and ``compute_global_heat_map(head_idx=...)``).
        data_dir: daam's folder for saved heads; accepted and unused.
        layers: ``None`` for daam's default (cross-attention of down and up blocks; all blocks of a
            transformer), or indices / names of :attr:`layers` to trace.
        mid_block: also trace the mid block's cross-attention.
        factors: grid down-sampling factors (relative to the latent) to trace; default all but 8.
        steps: denoising-step indices (0-based model calls of each pipeline call) to trace; default all.
        tokens: text positions to capture (0 = start token); default the prompt's own positions (start token,
            the prompt's tokens, end token; the negative prompt's too with ``negative=True``), read from the prompt
            the pipeline is called with, or every position when the prompt is unknown (``prompt_embeds``). Maps
            are the same either way: word lookup keeps only the prompt's positions.
        negative: also keep the unconditional half of the CFG batch (negative-prompt maps).
        per_layer: keep one buffer per layer (needed for ``layer_idx`` selection).
        daam_compat: keep one buffer per (layer, head) and aggregate exactly as daam 0.2.0 does.
        backend: force a capture backend (``torch``, ``triton``, ``cuda``); default automatic.
        fused: opt in to computing UNet cross-attention and its capture in one kernel where the dispatcher finds
            a backend with that capability (Triton on CUDA). The image then equals SDPA's to rounding, not bit for
            bit. Default ``False``: the model's own attention kernel runs and the image is unchanged.
        keep_records: keep only the last ``keep_records`` :class:`Record` s (default ``None``: all). Each record
            holds its heat buffers, so a long-lived tracer over many pipeline calls should bound this.
        snapshots: ``"step"`` also keeps a copy of the buffers after every traced step, so
            :meth:`compute_step_heat_maps` can give each step's own maps (memory grows with steps).
        max_snapshot_bytes: refuse snapshots needing more bytes per pipeline call: checked at the call's first
            model call, before anything is captured, by raising :class:`SnapshotBudgetError` (the ``with`` block
            then restores the pipeline as after any exception).

    Records: every pipeline call inside the block appends a new :class:`Record` to :attr:`records` (its own
    buffers; nothing accumulates across calls); :meth:`compute_global_heat_map` reads the last one unless
    ``record=`` says otherwise. A Trace object may be entered again after it exited: it patches the pipeline
    anew and keeps appending to the same :attr:`records`. Entering it (or any Trace of the same pipeline) while
    it is active raises ``RuntimeError``.

    Bad ``tokens`` fail at construction when beyond the tokenizer's ``model_max_length``, else at the first
    model call once the text length is known (before any capture).
    """

    def __init__(
        self,
        pipe,
        low_memory: bool = False,
        load_heads: bool = False,
        save_heads: bool = False,
        data_dir=None,
        *,
        layers: Iterable[int | str] | None = None,
        mid_block: bool = False,
        factors: Iterable[int] | None = None,
        steps: Iterable[int] | None = None,
        tokens: Sequence[int] | None = None,
        negative: bool = False,
        per_layer: bool = False,
        daam_compat: bool = False,
        backend: str | None = None,
        fused: bool = False,
        keep_records: int | None = None,
        snapshots: str | None = None,
        max_snapshot_bytes: int | None = None,
    ):
        for name, value in (("save_heads", save_heads), ("load_heads", load_heads)):
            if value:
                raise ValueError(
                    f"{name}=True is not supported: daam 0.2.0 pickles every attention-probability tensor to disk "
                    "(save_heads) and swaps saved ones into the model (load_heads); daam_fast never materialises "
                    "them. For per-head maps use trace(pipe, daam_compat=True) and "
                    "compute_global_heat_map(head_idx=...)"
                )
        if low_memory and layers is not None:
            raise ValueError("low_memory=True chooses daam's layers itself: pass either low_memory=True or layers=")
        self.family = families.detect(pipe)
        self.pipe = pipe
        self.model = self.family.model(pipe)
        located = self.family.locate(self.model, mid_block=check_flag("mid_block", mid_block))
        if check_flag("low_memory", low_memory):
            located = [located[i] for i in self.family.low_memory_layers([name for name, _, _ in located])]
        if not located:
            raise UnsupportedPipelineError(
                f"{type(pipe).__name__}'s {type(self.model).__name__} has no cross-attention modules; "
                f"supported are {families.SUPPORTED}"
            )
        self.layers = [LayerInfo(i, name, kind, mod.heads) for i, (name, kind, mod) in enumerate(located)]
        self._modules = [mod for _, _, mod in located]
        self._enabled = self._select_layers(layers)
        self.options = CaptureOptions(
            factors=factors,
            steps=steps,
            tokens=tokens,
            negative=negative,
            per_layer=per_layer,
            daam_compat=daam_compat,
            backend=backend,
            fused=fused,
            keep_records=keep_records,
            snapshots=snapshots,
            max_snapshot_bytes=max_snapshot_bytes,
        )
        window = self.family.text_window(pipe)
        chosen = self.options.tokens
        if chosen is not None and window is not None and max(chosen) >= window:
            raise ValueError(
                f"tokens {[t for t in chosen if t >= window]} out of range: the tokenizer's text window has "
                f"{window} positions (valid 0..{window - 1})"
            )
        plans = [
            LayerPlan(info.idx, self.family.layer_factor(self.model, info.name), info.heads)
            for info in self.layers
            if info.idx in self._enabled
        ]
        #: the records and heat buffers; the processors' capture sink.
        self.accumulator = Accumulator(self.options, plans, self._prompt_positions)
        self._installed: list = []  # (module, its processor before, the capture processor installed)
        self._hooks: list = []
        self._shadowed: list = []
        self._active = False
        self._images = None
        #: pipeline steps counted by :meth:`time_callback` (daam's ``time_idx``).
        self.time_idx = 0

    @property
    def records(self) -> list[Record]:
        """One :class:`Record` per traced pipeline call, oldest first."""
        return self.accumulator.records

    def _select_layers(self, layers) -> frozenset[int]:
        if layers is None:
            return frozenset(range(len(self.layers)))
        what = "layers must be a list of layer indices or names"
        if isinstance(layers, str | bytes) or not isinstance(layers, Iterable):
            raise TypeError(f"{what}, got {describe(layers)}")
        by_name = {info.name: info.idx for info in self.layers}
        chosen = set()
        for item in layers:
            if isinstance(item, str):
                if item not in by_name:
                    raise ValueError(f"unknown layer {item!r}; valid names: {list(by_name)}")
                chosen.add(by_name[item])
            elif (idx := as_int(item)) is None:
                raise TypeError(f"{what}, got {describe(item)} in it")
            elif 0 <= idx < len(self.layers):
                chosen.add(idx)
            else:
                raise ValueError(f"layer {item!r} out of range: valid indices 0..{len(self.layers) - 1}")
        if not chosen:
            raise ValueError("layers selects nothing: give at least one layer index or name")
        return frozenset(chosen)

    # -- context ---------------------------------------------------------------------------------
    def __enter__(self) -> Trace:
        with _ACTIVE_LOCK:
            if self.model in _ACTIVE:
                raise RuntimeError(
                    f"{type(self.pipe).__name__} is already being traced; nest no traces on one pipeline"
                )
            _ACTIVE.add(self.model)
        try:
            for idx, mod in enumerate(self._modules):
                if idx in self._enabled:
                    wrapper = self.family.processor(mod.processor, self.accumulator, idx)
                    self._installed.append((mod, mod.processor, wrapper))
                    mod.set_processor(wrapper)
            self._hooks.append(self.model.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
            self._wrap_check_inputs()
            self._wrap_postprocess()
            self._active = True
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.accumulator.mark_interrupted()
        self._restore()

    def _restore(self) -> None:
        # Only what the tracer installed and is still installed: a processor the user set inside the block
        # (pipe.enable_attention_slicing(), set_attn_processor, ...) stays, on traced layers as on the others.
        for mod, original, wrapper in self._installed:
            if mod.processor is wrapper:
                mod.set_processor(original)
        self._installed = []
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for obj, name, had, old in reversed(self._shadowed):
            if had:
                obj.__dict__[name] = old
            else:
                obj.__dict__.pop(name, None)
        self._shadowed = []
        with _ACTIVE_LOCK:
            _ACTIVE.discard(self.model)
        self._active = False

    def _shadow(self, obj, name: str, make_wrapper) -> None:
        """Shadow method ``name`` of ``obj`` with an instance attribute ``make_wrapper(original)`` until exit."""
        original = getattr(obj, name, None)
        if original is None:
            return
        self._shadowed.append((obj, name, name in obj.__dict__, obj.__dict__.get(name)))
        obj.__dict__[name] = make_wrapper(original)

    def _wrap_check_inputs(self) -> None:
        # The pipeline's prompt is only visible to the pipeline; every supported pipeline passes it to
        # check_inputs first thing in __call__.
        self._shadow(self.pipe, "check_inputs", self._check_inputs_wrapper)

    def _wrap_postprocess(self) -> None:
        # The image is only visible to the pipeline too; every supported pipeline turns the decoded tensor into
        # its output through image_processor.postprocess (daam reads it there as well).
        processor = getattr(self.pipe, "image_processor", None)
        if processor is None:
            return

        def make(original):
            def postprocess(*args, **kwargs):
                images = original(*args, **kwargs)
                output_type = kwargs.get("output_type", args[1] if len(args) > 1 else "pil")
                self._images = None if output_type == "latent" else images
                return images

            return postprocess

        self._shadow(processor, "postprocess", make)

    def _check_inputs_wrapper(self, original):
        signature = inspect.signature(original)
        source_args = self.family.source_prompt_args

        def check_inputs(*args, **kwargs):
            try:
                bound = signature.bind_partial(*args, **kwargs).arguments
            except TypeError:
                bound = {}
            self._images = None  # a new call: the last image is this call's (none for output_type="latent")
            self.accumulator.begin_record(
                bound.get("prompt"),
                bound.get("negative_prompt"),
                {name: bound.get(arg) for name, (arg, _) in source_args.items()},
                {name: bound.get(arg) for name, (_, arg) in source_args.items()},
            )
            return original(*args, **kwargs)

        return check_inputs

    def _prompt_positions(self, rec: Record, text_len: int) -> set[int] | None:
        """The text positions of ``rec``'s prompts (and negative prompts when they are traced), for the default
        token selection; None when a prompt is unknown."""
        groups = [(rec.prompts, rec.source_prompts)]
        if self.options.negative:
            groups.append((rec.negative_prompts, rec.source_negative_prompts))
        positions: set[int] = set()
        for prompts, sources in groups:
            found = self.family.prompt_positions(self.pipe, prompts, sources, text_len)
            if found is None:
                return None
            positions |= found
        return positions

    def _on_model_call(self, module, args, kwargs) -> None:
        # Raised from the model's pre-hook, before any capture: the exception leaves the pipeline call and the
        # `with` block, whose exit restores the pipeline.
        self.accumulator.begin_call(self.family.geometry(self.pipe, module, args, kwargs))

    # -- daam 0.2.0's tracer attributes ---------------------------------------------------------------
    @property
    def layer_names(self) -> list[str]:
        """daam's names of :attr:`layers` (``"up-attn-0"``, ...; ``layer_idx`` indexes this list)."""
        return self.family.daam_layer_names([info.name for info in self.layers])

    @property
    def last_prompt(self) -> str:
        """The prompt of the last traced pipeline call (the first one of a batch); ``""`` before any call."""
        prompts = self.records[-1].prompts if self.records else None
        return prompts[0] if prompts and prompts[0] is not None else ""

    @property
    def last_image(self):
        """The last image the last traced pipeline call returned, as a PIL image (None before any call and for
        ``output_type="latent"``)."""
        return None if self._images is None else as_pil(self._images[-1])

    def time_callback(self, *args, **kwargs):
        """Count a denoising step in :attr:`time_idx`: a step callback for ``callback=`` (daam's use) or
        ``callback_on_step_end=`` (then it returns the callback's tensors unchanged, as diffusers requires)."""
        self.time_idx += 1
        return args[3] if len(args) > 3 and isinstance(args[3], dict) else kwargs.get("callback_kwargs")

    def to_experiment(self, path, seed: int | None = None, id: str = ".", subtype: str = ".", **compute_kwargs):
        """The last traced generation as a :class:`~daam_fast.GenerationExperiment` in ``path / id`` (daam's
        ``to_experiment``): :attr:`last_image`, the :meth:`compute_global_heat_map` maps (``compute_kwargs``)
        and the prompt; ``save()`` writes it."""
        if self.last_image is None:
            raise RuntimeError("no image to export: run the pipeline inside the trace with an image output_type")
        heat_map = self.compute_global_heat_map(**compute_kwargs)
        tokenizer = getattr(self.pipe, "tokenizer", None)
        return GenerationExperiment.from_heat_map(heat_map, self.last_image, path, seed, id, subtype, tokenizer)

    # -- results ---------------------------------------------------------------------------------
    def compute_global_heat_map(
        self,
        prompt: str | None = None,
        factors: Iterable[int] | None = None,
        head_idx: int | None = None,
        layer_idx: int | None = None,
        normalize: bool = False,
        *,
        image_idx: int | None = None,
        negative: bool = False,
        record: int = -1,
        step: int | None = None,
    ) -> GlobalHeatMap:
        """Aggregate the traced maps of one pipeline call into a :class:`GlobalHeatMap`.

        As daam 0.2.0: the mean over traced (layer, head) maps, each brought to the latent size with
        bicubic interpolation, summed over steps. Here per-layer maps are summed at their native
        resolution, up-sampled once and clamped at 0: attributions, never negative (daam clamps each map
        instead; ``daam_compat=True`` does exactly that).

        Args:
            prompt: text used for word lookup; default: the prompt of the traced image.
            factors: keep only grids with these down-sampling factors (relative to the latent).
            head_idx: one head only (needs ``daam_compat=True``).
            layer_idx: one layer only (needs ``per_layer=True`` or ``daam_compat=True``). A selection that
                matches no maps or was not opted into raises :class:`~daam_fast.HeatMapSelectionError`, a
                ``RuntimeError`` as daam's (its scripts catch that while looping over layers and heads).
            normalize: divide each pixel by ``S + 1e-6``, ``S`` the sum of the prompt tokens' maps there (start
                and end tokens excluded; ``S >= 0``, as the maps are): those maps then sum to ``S / (S + 1e-6)``,
                at most 1.
            image_idx: which image of the call (default: the mean over all images, which must share a prompt).
            negative: the negative prompt's maps (needs ``trace(..., negative=True)`` and CFG).
            record: which pipeline call (default the last).
            step: one traced step's own maps (needs ``trace(..., snapshots="step")``); default all steps.

        Returns:
            :class:`GlobalHeatMap` whose ``heat_maps`` are fp32 ``[n_tokens, H_latent, W_latent]``. Its
            ``meta["complete"]`` is False when the call was interrupted, and ``meta["nonfinite"]`` is True (with a
            logged warning) when the maps hold NaN or inf, i.e. the model's attention inputs were non-finite.
            For SD3 and Flux a :class:`~daam_fast.heatmap.JointGlobalHeatMap`:
            ``[n_text_positions, grid_h, grid_w]`` on the image-token grid, rows indexed by text-sequence
            position (SD3: CLIP 0..76, then T5), words looked up through CLIP, T5 or both
            (``compute_word_heat_map(word, source=...)``).
        """
        acc = self.accumulator
        rec = acc.record(record)
        bufs = None
        if step is not None:
            traced = acc.traced_steps(rec)
            if step not in traced:
                raise ValueError(f"step {step} has no maps of its own; steps with maps: {traced}")
            bufs = step_buffers(rec, step, traced[-1])
        maps = aggregate(rec, self.options, factors, head_idx, layer_idx, bufs)  # [R, T, H, W]
        maps, text = select_image(rec, maps, image_idx, negative)
        if prompt is not None:
            if not isinstance(prompt, str):
                raise TypeError(f"prompt must be a str or None, got {type(prompt).__name__}")
            text = ImageText(prompt)
        if text.prompt is None:
            raise ValueError("the traced call's prompt is unknown (prompt_embeds?): pass prompt=... to name its words")
        positions = list(range(maps.shape[0])) if rec.positions is None else list(rec.positions)
        hm = self.family.heat_map(
            self.pipe, self.model, rec, maps, text, positions, normalize=normalize, negative=negative
        )
        hm.meta["nonfinite"] = self._flag_nonfinite(hm.heat_maps, text.prompt)
        if step is not None:
            hm.meta.update(steps=1, step=step)
        return hm

    def compute_step_heat_maps(self, record: int = -1, **kwargs) -> dict[int, GlobalHeatMap]:
        """Per-step maps of one pipeline call (needs ``trace(..., snapshots="step")``).

        Returns ``{step index: GlobalHeatMap}`` for every traced step, each ``heat_maps`` fp32
        ``[n_tokens, H_latent, W_latent]`` holding only what that step added; without
        ``normalize`` their sum is the :meth:`compute_global_heat_map` map (to fp32 rounding) wherever the
        up-sampling overshoots nowhere below 0 (each map is clamped at 0 on its own). ``kwargs`` are those of
        :meth:`compute_global_heat_map`.
        """
        if self.options.snapshots != "step":
            raise ValueError("per-step maps need snapshots: trace with trace(pipe, snapshots='step')")
        rec = self.accumulator.record(record)
        steps = self.accumulator.traced_steps(rec)
        return {s: self.compute_global_heat_map(record=record, step=s, **kwargs) for s in steps}

    @staticmethod
    def _flag_nonfinite(maps: torch.Tensor, text: str) -> bool:
        # NaN/inf in any attention input poison the running sums for good; one pass over the result finds it.
        nonfinite = not bool(torch.isfinite(maps).all())
        if nonfinite:
            logger.warning(
                "heat maps of %r hold NaN/inf: the model's attention inputs were not finite (meta['nonfinite'])", text
            )
        return nonfinite


#: daam's spelling: ``with trace(pipe) as tc: ...``.
trace = Trace
