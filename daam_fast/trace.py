"""``daam_fast.trace``: install capture processors on a pipeline and collect heat maps.

Memory does not grow with steps: each traced attention call adds into a small fp32 buffer per
attention resolution (``[rows, tokens, h·w]``), or per layer (``per_layer=True``), or per layer and
head (``daam_compat=True``). Each pipeline call inside one ``with trace(pipe)`` block is its own
:class:`Record`; heat maps come from the last one unless another is asked for. Failure modes and what
is guaranteed after each are listed in docs/RELIABILITY.md.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import families
from .heatmap import GlobalHeatMap
from .kernels import dispatch
from .processors.unet import UNetCrossAttnCaptureProcessor
from .snapshots import SNAPSHOT_MODES, SnapshotBudgetError, check_budget, snapshot_step, step_buffers
from .tokens import tokenize_shared
from .trace_joint import JointTraceMixin

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

#: Longest key sequence the fused attention + capture kernel takes (SD/SDXL cross-attention has 77).
_MAX_FUSED_KEYS = 512

#: daam skips the attention grids at 1/8 of the latent size (too coarse to localise anything).
DEFAULT_SKIPPED_FACTORS = frozenset({8})

SUPPORTED = (
    "UNet pipelines with a diffusers UNet2DConditionModel and a CLIP tokenizer: StableDiffusionPipeline "
    "(SD 1.x / 2.x, v-prediction included), StableDiffusionXLPipeline, and their img2img / inpaint / "
    "ControlNet variants; joint-attention transformers: StableDiffusion3Pipeline (SD3 / SD3.5, "
    "SD3Transformer2DModel) and FluxPipeline (FluxTransformer2DModel; distilled guidance and true CFG)"
)

_ACTIVE: weakref.WeakSet = weakref.WeakSet()
_ACTIVE_LOCK = threading.Lock()


class UnsupportedPipelineError(TypeError):
    """The pipeline or model cannot be traced (the message says what is supported)."""


@dataclass(frozen=True)
class LayerInfo:
    """One traced cross-attention module. ``idx`` follows daam's order: up blocks, down blocks, mid."""

    idx: int
    name: str
    block: str
    heads: int


@dataclass
class _Slot:
    """A heat buffer: ``buf`` is fp32 ``[rows, tokens, h·w]`` or ``[rows, heads, tokens, h·w]``."""

    grid: tuple[int, int]
    factor: int
    buf: torch.Tensor
    layer_heads: dict[int, int] = field(default_factory=dict)


@dataclass
class Record:
    """What one pipeline call left: its prompts, geometry, step count and heat buffers."""

    prompts: list[str | None] | None = None
    negative_prompts: list[str | None] | None = None
    latent_hw: tuple[int, int] | None = None
    batch_size: int | None = None
    cfg: bool = False
    rows: slice = field(default_factory=lambda: slice(0))
    n_images: int = 0
    has_negative: bool = False
    steps_seen: int = 0
    steps_traced: int = 0
    expected_steps: int | None = None
    interrupted: bool = False
    slots: dict = field(default_factory=dict, repr=False)
    grids: dict = field(default_factory=dict, repr=False)
    #: ``snapshots="step"`` only: ``{step: {slot key: copy of the buffer after that step}}``.
    snapshots: dict = field(default_factory=dict, repr=False)
    # Joint-attention transformers (see trace_joint): latent_hw is then the image-token grid.
    text_len: int | None = None
    pixels: int = 1
    buf_rows: int = 0
    true_cfg: bool = False
    last_timestep: torch.Tensor | None = field(default=None, repr=False)
    call_src: slice | None = None
    call_dst: slice | None = None
    t5_prompts: list[str | None] | None = None
    t5_negative_prompts: list[str | None] | None = None

    @property
    def complete(self) -> bool:
        """True when the pipeline call ran all its steps without being interrupted."""
        return not self.interrupted and (self.expected_steps is None or self.steps_seen >= self.expected_steps)


def _grid(n_queries: int, latent_hw: tuple[int, int]) -> tuple[int, int, int]:
    """``(h, w, factor)`` of a layer with ``n_queries`` positions. The UNet halves the grid with
    stride-2 convolutions (``ceil(h / 2)``), so non-square and odd sizes are followed exactly."""
    h, w = latent_hw
    factor = 1
    while h * w > n_queries:
        h, w, factor = (h + 1) // 2, (w + 1) // 2, factor * 2
    if h * w != n_queries:
        raise ValueError(f"{n_queries} attention queries match no grid of the {latent_hw} latent")
    return h, w, factor


def _prompt_list(value, like) -> list[str | None] | None:
    """A pipeline's prompt argument as one entry per prompt of ``like`` (None: not given)."""
    if value is None or like is None:
        return None
    return [value] * len(like) if isinstance(value, str) else list(value)


def _locate_unet_layers(unet, mid_block: bool) -> list[tuple[str, str, object]]:
    found = []
    blocks = [("up", i, b) for i, b in enumerate(unet.up_blocks)] + [
        ("down", i, b) for i, b in enumerate(unet.down_blocks)
    ]
    if mid_block and unet.mid_block is not None:
        blocks.append(("mid", 0, unet.mid_block))
    for kind, bi, block in blocks:
        for ai, spatial in enumerate(getattr(block, "attentions", None) or []):
            for ti, tb in enumerate(getattr(spatial, "transformer_blocks", None) or []):
                attn2 = getattr(tb, "attn2", None)
                if attn2 is not None and getattr(attn2, "is_cross_attention", False):
                    found.append((f"{kind}_blocks.{bi}.attentions.{ai}.transformer_blocks.{ti}.attn2", kind, attn2))
    return found


class Trace(JointTraceMixin):
    """Context manager that traces a diffusers pipeline (use :func:`trace`).

    Joint-attention transformers (SD3, Flux): the layers are the transformer blocks' joint attentions (Flux:
    double-stream then single-stream blocks), all traced by default; maps are on the image-token grid (latent
    size / patch size; Flux packs 2×2 latents per token); ``factors`` and ``mid_block`` do not apply.

    Args:
        pipe: a supported pipeline (see ``SUPPORTED``).
        layers: ``None`` for daam's default (cross-attention of down and up blocks; all blocks of a
            transformer), or indices / names of :attr:`layers` to trace.
        mid_block: also trace the mid block's cross-attention.
        factors: grid down-sampling factors (relative to the latent) to trace; default all but 8.
        steps: denoising-step indices (0-based UNet calls of each pipeline call) to trace; default all.
        tokens: key positions to capture (0 = start token); default all.
        negative: also keep the unconditional half of the CFG batch (negative-prompt maps).
        per_layer: keep one buffer per layer (needed for ``layer_idx`` selection).
        daam_compat: keep one buffer per (layer, head) and aggregate exactly as daam 0.2.0 does.
        backend: force a capture backend (``torch``, ``triton``, ``cuda``); default automatic.
        fused: on CUDA with Triton, compute UNet cross-attention and its capture in one fused kernel (the
            image then equals SDPA's to rounding, not bit for bit); ``False`` keeps SDPA's own kernel.
        keep_records: keep only the last ``keep_records`` :class:`Record` s (default ``None``: all). Each record
            holds its heat buffers, so a long-lived tracer over many pipeline calls should bound this.
        snapshots: ``"step"`` also keeps a copy of the buffers after every traced step, so
            :meth:`compute_step_heat_maps` can give each step's own maps (memory grows with steps).
        max_snapshot_bytes: refuse snapshots needing more bytes per pipeline call: checked at the call's first
            UNet call, before anything is captured, by raising :class:`SnapshotBudgetError` (the ``with`` block
            then restores the pipeline as after any exception).

    Records: every pipeline call inside the block appends a new :class:`Record` to :attr:`records` (its own
    buffers; nothing accumulates across calls); :meth:`compute_global_heat_map` reads the last one unless
    ``record=`` says otherwise. A Trace object may be entered again after it exited: it patches the pipeline
    anew and keeps appending to the same :attr:`records`. Entering it (or any Trace of the same pipeline) while
    it is active raises ``RuntimeError``.

    Bad ``tokens`` fail at construction when beyond the tokenizer's ``model_max_length``, else at the first
    UNet call once the text length is known (before any capture).
    """

    def __init__(
        self,
        pipe,
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
        fused: bool = True,
        keep_records: int | None = None,
        snapshots: str | None = None,
        max_snapshot_bytes: int | None = None,
    ):
        self.family = families.detect(pipe)
        unet = getattr(pipe, "unet", None)
        if self.family is None and (unet is None or not hasattr(unet, "up_blocks")):
            model = getattr(pipe, "transformer", None)
            what = f" (its transformer is a {type(model).__name__})" if model is not None else ""
            raise UnsupportedPipelineError(f"cannot trace {type(pipe).__name__}{what}: supported are {SUPPORTED}")
        self.pipe = pipe
        self.unet = None if self.family is not None else unet
        self.model = pipe.transformer if self.family is not None else unet
        # SDXL's two CLIP tokenizers share positions; tokenize_shared checks that they agree.
        self.tokenizers = [t for t in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)) if t]
        if not self.tokenizers:
            raise UnsupportedPipelineError(f"{type(pipe).__name__} has no tokenizer; supported are {SUPPORTED}")
        located = self.family.locate(self.model) if self.family else _locate_unet_layers(unet, mid_block)
        if not located:
            raise UnsupportedPipelineError(
                f"{type(pipe).__name__}'s {type(self.model).__name__} has no cross-attention modules; "
                f"supported are {SUPPORTED}"
            )
        self.layers = [LayerInfo(i, name, kind, mod.heads) for i, (name, kind, mod) in enumerate(located)]
        self._modules = [mod for _, _, mod in located]
        self._enabled = self._select_layers(layers)
        self.factors = None if factors is None else frozenset(int(f) for f in factors)
        self.steps = None if steps is None else frozenset(int(s) for s in steps)
        self.tokens = None if tokens is None else [int(t) for t in tokens]
        if self.tokens is not None and (not self.tokens or min(self.tokens) < 0):
            raise ValueError(f"tokens must be non-empty key positions >= 0, got {tokens!r}")
        # transformers gives an unknown limit as a huge sentinel; only a real text window length counts here.
        # Joint transformers' text spans several tokenizers: checked at their first call instead.
        window = getattr(self.tokenizers[0], "model_max_length", None) if self.family is None else None
        if self.tokens is not None and isinstance(window, int) and window < 1_000_000 and max(self.tokens) >= window:
            raise ValueError(
                f"tokens {[t for t in self.tokens if t >= window]} out of range: the tokenizer's text window has "
                f"{window} positions (valid 0..{window - 1})"
            )
        if keep_records is not None and (isinstance(keep_records, bool) or int(keep_records) < 1):
            raise ValueError(f"keep_records must be None (keep all) or >= 1, got {keep_records!r}")
        self.keep_records = keep_records
        if snapshots is not None and snapshots not in SNAPSHOT_MODES:
            raise ValueError(f"unknown snapshots mode {snapshots!r}; valid: None or {sorted(SNAPSHOT_MODES)}")
        if max_snapshot_bytes is not None and snapshots is None:
            raise ValueError("max_snapshot_bytes limits snapshots: pass snapshots='step' too")
        self.snapshots = snapshots
        self.max_snapshot_bytes = max_snapshot_bytes
        self.negative = negative
        self.daam_compat = daam_compat
        self.per_layer = per_layer or daam_compat
        self.backend = backend
        self.fused = bool(fused)
        if backend is not None and backend not in {b.name for b in dispatch.backends()} | {"auto"}:
            raise ValueError(f"unknown backend {backend!r}; valid: {[b.name for b in dispatch.backends()]} or 'auto'")
        self.records: list[Record] = []
        self._originals: list = []
        self._hooks: list = []
        self._saved_check_inputs = None
        self._index_cache: dict = {}
        self._active = False

    # -- selection -------------------------------------------------------------------------------
    def _select_layers(self, layers) -> frozenset[int]:
        if layers is None:
            return frozenset(range(len(self.layers)))
        by_name = {info.name: info.idx for info in self.layers}
        chosen = set()
        for item in layers:
            if isinstance(item, str):
                if item not in by_name:
                    raise ValueError(f"unknown layer {item!r}; valid names: {list(by_name)}")
                chosen.add(by_name[item])
            elif isinstance(item, int) and 0 <= item < len(self.layers):
                chosen.add(item)
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
                self._originals.append(mod.processor)
                if idx in self._enabled:
                    mod.set_processor(
                        self.family.processor(mod.processor, self, idx)
                        if self.family
                        else UNetCrossAttnCaptureProcessor(mod.processor, self, idx)
                    )
            on_call = self._on_transformer_call if self.family else self._on_unet_call
            self._hooks.append(self.model.register_forward_pre_hook(on_call, with_kwargs=True))
            self._wrap_check_inputs()
            self._active = True
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self.records:
            self.records[-1].interrupted = True
        self._restore()

    def _restore(self) -> None:
        for mod, orig in zip(self._modules, self._originals, strict=False):
            mod.set_processor(orig)
        self._originals = []
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self._saved_check_inputs is not None:
            saved = self._saved_check_inputs
            if saved[0]:
                self.pipe.__dict__["check_inputs"] = saved[1]
            else:
                self.pipe.__dict__.pop("check_inputs", None)
            self._saved_check_inputs = None
        with _ACTIVE_LOCK:
            _ACTIVE.discard(self.model)
        self._active = False

    def _wrap_check_inputs(self) -> None:
        # The pipeline's prompt is only visible to the pipeline; every supported pipeline passes it to
        # check_inputs first thing in __call__. An instance attribute shadows the method until exit.
        original = getattr(self.pipe, "check_inputs", None)
        if original is None:
            return
        self._saved_check_inputs = ("check_inputs" in self.pipe.__dict__, self.pipe.__dict__.get("check_inputs"))
        signature = inspect.signature(original)

        def check_inputs(*args, **kwargs):
            try:
                bound = signature.bind_partial(*args, **kwargs).arguments
            except TypeError:
                bound = {}
            self._begin_record(bound.get("prompt"), bound.get("negative_prompt"))
            if self.family is not None:  # SD3's prompt_3 / Flux's prompt_2 feed T5
                rec = self.records[-1]
                rec.t5_prompts = _prompt_list(bound.get(self.family.t5_prompt_arg), rec.prompts)
                rec.t5_negative_prompts = _prompt_list(bound.get(self.family.t5_negative_arg), rec.prompts)
            return original(*args, **kwargs)

        self.pipe.__dict__["check_inputs"] = check_inputs

    # -- recording -------------------------------------------------------------------------------
    def _begin_record(self, prompt, negative_prompt) -> None:
        prompts = None if prompt is None else ([prompt] if isinstance(prompt, str) else list(prompt))
        if negative_prompt is None or isinstance(negative_prompt, str):
            negatives = None if prompts is None else [negative_prompt or ""] * len(prompts)
        else:
            negatives = list(negative_prompt)
        self._append(Record(prompts=prompts, negative_prompts=negatives))

    def _append(self, rec: Record) -> None:
        self.records.append(rec)
        if self.keep_records is not None and len(self.records) > self.keep_records:
            del self.records[: len(self.records) - self.keep_records]

    def _on_unet_call(self, module, args, kwargs) -> None:
        sample = args[0] if args else kwargs.get("sample")
        last = self.records[-1] if self.records else None
        # A UNet call outside any pipeline call (or with another geometry) starts a record of its own.
        if last is None or (
            last.batch_size is not None
            and (last.latent_hw, last.batch_size) != (tuple(sample.shape[-2:]), sample.shape[0])
        ):
            self._append(Record())
        rec = self.records[-1]
        if rec.batch_size is None:
            self._start_geometry(rec, sample)
            text = args[2] if len(args) > 2 else kwargs.get("encoder_hidden_states")
            self._check_first_call(rec, None if text is None else int(text.shape[1]))
        elif self.snapshots and (self.steps is None or rec.steps_seen - 1 in self.steps):
            snapshot_step(self, rec, rec.steps_seen - 1)  # the previous step is complete: its buffers are final
        rec.steps_seen += 1
        if self.steps is None or rec.steps_seen - 1 in self.steps:
            rec.steps_traced += 1

    def _check_first_call(self, rec: Record, n_text: int | None) -> None:
        # Raised from the UNet pre-hook, before any capture: the exception leaves the pipeline call and the
        # `with` block, whose exit restores the pipeline.
        if n_text is None:
            return
        if self.tokens is not None and max(self.tokens) >= n_text:
            raise ValueError(
                f"tokens {[t for t in self.tokens if t >= n_text]} out of range: the text has {n_text} positions "
                f"(valid 0..{n_text - 1})"
            )
        check_budget(self, rec, n_text)

    def _start_geometry(self, rec: Record, sample: torch.Tensor) -> None:
        rec.latent_hw = (int(sample.shape[-2]), int(sample.shape[-1]))
        rec.batch_size = B = int(sample.shape[0])
        cfg = getattr(self.pipe, "do_classifier_free_guidance", None)
        rec.cfg = bool(cfg) and B % 2 == 0
        n = B // 2 if rec.cfg else B
        rec.n_images = n
        rec.has_negative = self.negative and rec.cfg
        if self.negative and not rec.cfg:
            logger.warning("negative-prompt maps requested, but this call ran without classifier-free guidance")
        rec.rows = slice(0, B) if rec.has_negative else slice(B - n, B)
        rec.expected_steps = getattr(self.pipe, "_num_timesteps", None)

    def _target(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor) -> tuple[Record, _Slot] | None:
        """The record and heat buffer this attention call adds into, or None when it is not traced."""
        if not self.records or self.records[-1].batch_size is None:
            return None
        rec = self.records[-1]
        if self.steps is not None and rec.steps_seen - 1 not in self.steps:
            return None
        slot = self._slot(rec, layer_idx, q, k)
        return None if slot is None else (rec, slot)

    def fused_attention(self, layer_idx, q, k, v, scale) -> torch.Tensor | None:
        """Fast path for processors (no mask, eager): attention output and capture in one Triton kernel.

        Used when ``fused=True`` (default), the Triton backend can run the call (CUDA; the CPU only in the
        Triton interpreter), no other backend is forced and ``k`` has at most 512 keys. The traced rows go
        through the fused kernel; the other rows of the batch (the unconditional half) through SDPA.

        Args: ``q [B, H, L, D]``, ``k``/``v`` ``[B, H, S, D]``, the softmax ``scale``.
        Returns: the attention output ``[B, H, L, D]`` in ``q``'s dtype, or None (then the processor runs its
        usual SDPA + capture path).
        """
        if not self.fused or self.backend not in (None, "auto", "triton"):
            return None
        forced = os.environ.get(dispatch.ENV_VAR)
        if self.backend is None and forced not in (None, "", "auto", "triton"):
            return None
        triton = next((b for b in dispatch.backends() if b.name == "triton"), None)
        if triton is None or k.shape[2] > _MAX_FUSED_KEYS or q.device.type not in triton.devices or triton.available():
            return None
        target = self._target(layer_idx, q, k)
        if target is None:
            return None
        rec, slot = target
        if triton.not_supported_reasons(q, slot.buf):
            return None
        from .kernels.triton_fused import fused_attention_capture

        rows, B = rec.rows, q.shape[0]
        if rows.stop != B:  # the traced rows are the batch's tail (CFG: the conditional half) by construction
            return None
        idx = self._token_index(k.shape[2], k.device)
        traced = fused_attention_capture(q[rows], k[rows], v[rows], idx, scale, slot.buf)
        if rows.start > 0:  # the untraced leading rows (CFG's unconditional half) need no capture
            rest = slice(0, rows.start)
            plain = F.scaled_dot_product_attention(q[rest], k[rest], v[rest], scale=scale)
            traced = torch.cat([plain, traced.to(plain.dtype)])
        if layer_idx not in slot.layer_heads:
            slot.layer_heads[layer_idx] = q.shape[1]
        return traced

    def on_attention(self, layer_idx, q, k, lse, bias, scale) -> None:
        """Capture sink entry (called by the processors): add this call's maps into the record."""
        target = self._target(layer_idx, q, k)
        if target is None:
            return
        rec, slot = target
        rows = rec.rows
        qr, kr = q[rows], k[rows]
        br = None if bias is None else (bias if bias.shape[0] == 1 else bias[rows])
        out = slot.buf
        if lse is not None:
            k_sel, b_sel = kr, br
            if self.tokens is not None:
                idx = self._token_index(k.shape[2], k.device)
                k_sel = kr.index_select(2, idx)
                if br is not None and br.shape[-1] != 1:
                    b_sel = br.index_select(-1, idx)
            dispatch.capture_from_lse(qr, k_sel, lse[rows], scale, out, bias=b_sel, backend=self.backend)
        else:
            idx = self._token_index(k.shape[2], k.device)
            dispatch.capture_self_normalising(qr, kr, idx, scale, out, bias=br, backend=self.backend)
        if layer_idx not in slot.layer_heads:
            slot.layer_heads[layer_idx] = q.shape[1]

    def _token_index(self, n_keys: int, device: torch.device) -> torch.Tensor:
        """The captured key positions as an int64 tensor on ``device`` (cached: this runs every call)."""
        key = (n_keys, device)
        idx = self._index_cache.get(key)
        if idx is None:
            positions = self.tokens if self.tokens is not None else range(n_keys)
            idx = self._index_cache[key] = torch.tensor(list(positions), dtype=torch.long, device=device)
        return idx

    def _slot(self, rec: Record, layer_idx: int, q: torch.Tensor, k: torch.Tensor) -> _Slot | None:
        B, H, L, _ = q.shape
        if L not in rec.grids:
            rec.grids[L] = _grid(L, rec.latent_hw)
        h, w, factor = rec.grids[L]
        if factor in (DEFAULT_SKIPPED_FACTORS if self.factors is None else frozenset()) or (
            self.factors is not None and factor not in self.factors
        ):
            return None
        key = layer_idx if self.per_layer else (h, w)
        slot = rec.slots.get(key)
        if slot is None:
            S = k.shape[2]
            if self.tokens is not None and max(self.tokens) >= S:
                raise IndexError(f"tokens {self.tokens} exceed the {S} text positions of layer {layer_idx}")
            T = S if self.tokens is None else len(self.tokens)
            R = rec.rows.stop - rec.rows.start
            shape = (R, H, T, L) if self.daam_compat else (R, T, L)
            slot = rec.slots[key] = _Slot((h, w), factor, torch.zeros(shape, dtype=torch.float32, device=q.device))
        return slot

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
        resolution and up-sampled once (exact up to daam's per-map clamp; ``daam_compat=True`` keeps
        that clamp too).

        Args:
            prompt: text used for word lookup; default: the prompt of the traced image.
            factors: keep only grids with these down-sampling factors (relative to the latent).
            head_idx: one head only (needs ``daam_compat=True``).
            layer_idx: one layer only (needs ``per_layer=True`` or ``daam_compat=True``).
            normalize: divide each pixel by the sum over prompt tokens (start and end tokens excluded).
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
        rec = self._record(record)
        bufs = None
        if step is not None:
            traced = self._traced_steps(rec)
            if step not in traced:
                raise ValueError(f"step {step} has no maps of its own; steps with maps: {traced}")
            bufs = step_buffers(rec, step, traced[-1])
        maps = self._aggregate(rec, factors, head_idx, layer_idx, bufs)  # [R, T, H, W]
        n = rec.n_images
        if negative:
            if not rec.has_negative:
                raise ValueError(
                    "no negative-prompt maps: trace with trace(pipe, negative=True) and guidance_scale > 1 "
                    "(Flux: true_cfg_scale > 1 and a negative_prompt)"
                )
            maps, texts, t5_texts = maps[:n], rec.negative_prompts, rec.t5_negative_prompts
        else:
            maps, texts, t5_texts = maps[maps.shape[0] - n :], rec.prompts, rec.t5_prompts
        per_prompt = max(1, n // len(texts)) if texts else n  # num_images_per_prompt
        if image_idx is not None:
            if not -n <= image_idx < n:
                raise IndexError(f"image_idx {image_idx} out of range: this call made {n} image(s)")
            image_idx %= n
            maps = maps[image_idx]
            text = texts[image_idx // per_prompt] if texts else None
            t5_text = t5_texts[image_idx // per_prompt] if t5_texts else None
        else:
            distinct = set(zip(texts, t5_texts or [None] * len(texts), strict=True)) if texts else {(None, None)}
            if len(distinct) > 1:
                raise ValueError(f"the {n} images have different prompts {texts}: pass image_idx in 0..{n - 1}")
            maps = maps.mean(0)
            text, t5_text = next(iter(distinct))
        text, t5_text = (prompt, None) if prompt is not None else (text, t5_text)
        if text is None:
            raise ValueError("the traced call's prompt is unknown (prompt_embeds?): pass prompt=... to name its words")
        if self.family is not None:
            hm = self._joint_heat_map(rec, maps, text, t5_text, normalize, negative)
            hm.meta["nonfinite"] = self._flag_nonfinite(hm.heat_maps, text)
            if step is not None:
                hm.meta.update(steps=1, step=step)
            return hm
        tokens = tokenize_shared(self.tokenizers, text)
        positions = list(range(maps.shape[0])) if self.tokens is None else list(self.tokens)
        keep = [i for i, p in enumerate(positions) if p < tokens.n_tokens()]
        maps = maps[keep]
        positions = [positions[i] for i in keep]
        if normalize:
            inner = [i for i, p in enumerate(positions) if 0 < p < tokens.n_tokens() - 1]
            maps = maps / (maps[inner].sum(0, keepdim=True) + 1e-6)
        nonfinite = self._flag_nonfinite(maps, text)
        meta = {
            "model": type(self.pipe).__name__,
            "model_name": str(getattr(self.model.config, "_name_or_path", "")),
            "steps": rec.steps_traced if step is None else 1,
            "latent_size": list(rec.latent_hw),
            "image_size": [s * int(getattr(self.pipe, "vae_scale_factor", 1)) for s in rec.latent_hw],
            "negative": negative,
            "complete": rec.complete,
            "nonfinite": nonfinite,
        }
        if step is not None:
            meta["step"] = step
        return GlobalHeatMap(tokens, maps, positions=positions, meta=meta)

    def compute_step_heat_maps(self, record: int = -1, **kwargs) -> dict[int, GlobalHeatMap]:
        """Per-step maps of one pipeline call (needs ``trace(..., snapshots="step")``).

        Returns ``{step index: GlobalHeatMap}`` for every traced step, each ``heat_maps`` fp32
        ``[n_tokens, H_latent, W_latent]`` holding only what that step added; without
        ``normalize`` their sum is the :meth:`compute_global_heat_map` map (to fp32 rounding), which sums over
        steps. ``kwargs`` are those of :meth:`compute_global_heat_map`.
        """
        if self.snapshots != "step":
            raise ValueError("per-step maps need snapshots: trace with trace(pipe, snapshots='step')")
        rec = self._record(record)
        return {s: self.compute_global_heat_map(record=record, step=s, **kwargs) for s in self._traced_steps(rec)}

    def _traced_steps(self, rec: Record) -> list[int]:
        if self.snapshots != "step":
            raise ValueError("per-step maps need snapshots: trace with trace(pipe, snapshots='step')")
        return [s for s in range(rec.steps_seen) if self.steps is None or s in self.steps]

    @staticmethod
    def _flag_nonfinite(maps: torch.Tensor, text: str) -> bool:
        # NaN/inf in any attention input poison the running sums for good; one pass over the result finds it.
        nonfinite = not bool(torch.isfinite(maps).all())
        if nonfinite:
            logger.warning(
                "heat maps of %r hold NaN/inf: the model's attention inputs were not finite (meta['nonfinite'])", text
            )
        return nonfinite

    def _record(self, record: int) -> Record:
        if not self.records:
            raise RuntimeError("no heat maps yet: call the pipeline inside `with trace(pipe):` first")
        try:
            rec = self.records[record]
        except IndexError:
            raise IndexError(f"record {record} out of range: {len(self.records)} pipeline call(s) traced") from None
        # A slot whose first capture raised holds no finished call (no heads counted): it does not count.
        if not any(slot.layer_heads for slot in rec.slots.values()):
            raise RuntimeError("this pipeline call traced no attention step (no denoising step ran, or none selected)")
        return rec

    def _aggregate(self, rec: Record, factors, head_idx, layer_idx, bufs: dict | None = None) -> torch.Tensor:
        if head_idx is not None and not self.daam_compat:
            raise ValueError("head_idx needs per-head buffers: trace with trace(pipe, daam_compat=True)")
        if layer_idx is not None and not self.per_layer:
            raise ValueError("layer_idx needs per-layer buffers: trace with trace(pipe, per_layer=True)")
        if layer_idx is not None and layer_idx not in rec.slots:
            raise ValueError(f"layer {layer_idx} has no maps; traced layers: {sorted(rec.slots)}")
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
            if self.daam_compat:
                heads = range(buf.shape[1]) if head_idx is None else [head_idx]
                if head_idx is not None and not 0 <= head_idx < buf.shape[1]:
                    raise ValueError(f"head_idx {head_idx} out of range: layer {key} has {buf.shape[1]} heads")
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
            raise ValueError(f"no heat maps for factors={factors}, layer_idx={layer_idx}, head_idx={head_idx}")
        return total / count


#: daam's spelling: ``with trace(pipe) as tc: ...``.
trace = Trace
