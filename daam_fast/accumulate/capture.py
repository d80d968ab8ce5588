"""The capture sink: the processors hand it each traced attention call, and it adds that call's maps into the
heat buffers of the running pipeline call's :class:`~.records.Record`.

Each model call (UNet or transformer forward) is announced first with its :class:`~.records.Geometry`
(:meth:`Accumulator.begin_call`, from the tracer's forward pre-hook): it starts a record when needed, counts
the step, takes the previous step's snapshot, and says which batch rows the call's captures add into which
buffer rows. An attention call then adds, for the image queries × the selected text keys of its softmax,
``Σ_heads softmax(scale·q·kᵀ + bias)`` (normalised over all keys) into one fp32 buffer per grid (per layer with
``per_layer``, per layer and head with ``daam_compat``). Kernels are chosen by :mod:`daam_fast.kernels.dispatch`.

Classifier-free guidance: UNets and SD3 batch ``[uncond, cond]``. Flux.1-dev's distilled guidance makes one
call per step. Flux's true CFG (``true_cfg_scale > 1`` with a negative prompt) makes a conditional call and then
an unconditional one at the same timestep: a call repeating the previous call's timestep is that second pass
(only for families that report a timestep), its maps go to the negative rows (kept with ``negative=True``), and
it does not count as a step. Auxiliary passes (SD3.5's skip-layer guidance) are not traced.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from ..kernels import dispatch
from .options import CaptureOptions
from .records import Geometry, HeatBuffer, LayerPlan, Record, layer_grid
from .snapshots import check_budget, snapshot_step

__all__ = ["Accumulator"]

logger = logging.getLogger(__name__)


class Accumulator:
    """Records and heat buffers of one tracer; the capture sink of its processors.

    Args:
        options: what to capture.
        layers: the traced layers (for the snapshot memory guard).
        prompt_positions: ``(record, text_len) -> positions or None``: the text positions the record's prompts
            occupy (the tracer asks the model family); None (or no callable) captures every text position.
    """

    def __init__(
        self,
        options: CaptureOptions,
        layers: Sequence[LayerPlan],
        prompt_positions: Callable[[Record, int], Sequence[int] | None] | None = None,
    ):
        self.options = options
        self.layers = list(layers)
        self._prompt_positions = prompt_positions
        self.records: list[Record] = []
        self._index_cache: dict = {}

    # -- records ---------------------------------------------------------------------------------
    def begin_record(self, prompt, negative_prompt, source_prompts=None, source_negative_prompts=None) -> Record:
        """Start the record of a pipeline call with its prompt arguments (a string or a list each; the source
        prompts: ``{source name: argument}``). Returns the new record."""
        prompts = None if prompt is None else ([prompt] if isinstance(prompt, str) else list(prompt))
        if negative_prompt is None or isinstance(negative_prompt, str):
            negatives = None if prompts is None else [negative_prompt or ""] * len(prompts)
        else:
            negatives = list(negative_prompt)
        rec = Record(prompts=prompts, negative_prompts=negatives)
        rec.source_prompts = {k: _prompt_list(v, prompts) for k, v in (source_prompts or {}).items()}
        rec.source_negative_prompts = {k: _prompt_list(v, prompts) for k, v in (source_negative_prompts or {}).items()}
        self._append(rec)
        return rec

    def _append(self, rec: Record) -> None:
        self.records.append(rec)
        keep = self.options.keep_records
        if keep is not None and len(self.records) > keep:
            del self.records[: len(self.records) - keep]

    def mark_interrupted(self) -> None:
        """The pipeline call that is running (the last record) ended with an exception."""
        if self.records:
            self.records[-1].interrupted = True

    def record(self, index: int) -> Record:
        """The record of pipeline call ``index`` (``-1``: the last), checked to hold maps."""
        if not self.records:
            raise RuntimeError("no heat maps yet: call the pipeline inside `with trace(pipe):` first")
        try:
            rec = self.records[index]
        except IndexError:
            raise IndexError(f"record {index} out of range: {len(self.records)} pipeline call(s) traced") from None
        # A buffer whose first capture raised holds no finished call (no heads counted): it does not count.
        if not any(slot.layer_heads for slot in rec.slots.values()):
            raise RuntimeError("this pipeline call traced no attention step (no denoising step ran, or none selected)")
        return rec

    def traced_steps(self, rec: Record) -> list[int]:
        """The steps of ``rec`` that have maps of their own (needs ``snapshots="step"``)."""
        if self.options.snapshots != "step":
            raise ValueError("per-step maps need snapshots: trace with trace(pipe, snapshots='step')")
        return [s for s in range(rec.steps_seen) if self.options.traces_step(s)]

    # -- model calls -----------------------------------------------------------------------------
    def begin_call(self, geo: Geometry) -> None:
        """A model call is about to run (called from the model's forward pre-hook, before any capture: what it
        raises leaves the pipeline call)."""
        opts = self.options
        last = self.records[-1] if self.records else None
        if geo.auxiliary:
            if last is not None:
                last.calls.src = None
            return
        # A model call outside any pipeline call (or with another geometry) starts a record of its own.
        if last is None or (last.geometry is not None and last.geometry.shape != geo.shape):
            self._append(Record())
        rec = self.records[-1]
        calls = rec.calls
        first = rec.geometry is None
        if first:
            self._start(rec, geo)
        t = geo.timestep
        second = (
            t is not None
            and calls.last_timestep is not None
            and calls.last_timestep.shape == t.shape
            and torch.equal(calls.last_timestep, t.detach())
        )
        calls.last_timestep = None if t is None else t.detach().clone()
        if second:  # Flux true CFG: the unconditional pass of the current step
            self._second_pass(rec, geo.batch)
            return
        if not first and opts.snapshots and opts.traces_step(rec.steps_seen - 1):
            snapshot_step(opts, rec, rec.steps_seen - 1)  # the previous step (and any second pass) is final
        rec.steps_seen += 1
        if opts.traces_step(rec.steps_seen - 1):
            rec.steps_traced += 1
        calls.src = rec.rows
        n_src = rec.rows.stop - rec.rows.start
        calls.dst = slice(calls.buffer_rows - n_src, calls.buffer_rows)

    def _start(self, rec: Record, geo: Geometry) -> None:
        opts = self.options
        rec.geometry = geo
        B = geo.batch
        n = B // 2 if geo.cfg else B
        rec.n_images = n
        rec.has_negative = opts.negative and geo.cfg
        # Families that report a timestep may still run CFG as a second call per step (Flux's true CFG).
        if opts.negative and not geo.cfg and geo.timestep is None:
            logger.warning("negative-prompt maps requested, but this call ran without classifier-free guidance")
        rec.rows = slice(0, B) if rec.has_negative else slice(B - n, B)
        rec.calls.buffer_rows = rec.rows.stop - rec.rows.start
        n_text = geo.text_len
        if n_text is None:
            return
        if opts.tokens is not None:
            if max(opts.tokens) >= n_text:
                raise ValueError(
                    f"tokens {[t for t in opts.tokens if t >= n_text]} out of range: the text has {n_text} "
                    f"positions (valid 0..{n_text - 1})"
                )
            rec.positions = tuple(opts.tokens)
        else:
            rec.positions = self._default_positions(rec, n_text)
        check_budget(opts, self.layers, rec, len(rec.positions))

    def _default_positions(self, rec: Record, n_text: int) -> tuple[int, ...]:
        # Only the prompts' own positions: the heat maps keep nothing else, and a short prompt then costs a
        # fraction of the capture work and buffer memory of the whole text window.
        chosen = None if self._prompt_positions is None else self._prompt_positions(rec, n_text)
        inside = sorted({int(p) for p in chosen if 0 <= p < n_text}) if chosen is not None else []
        return tuple(inside) if inside else tuple(range(n_text))

    def _second_pass(self, rec: Record, batch: int) -> None:
        calls = rec.calls
        if not calls.true_cfg:
            calls.true_cfg = True
            if self.options.negative:
                rec.has_negative = True
                # Negative rows come first, as in a batched-CFG buffer.
                for slot in rec.slots.values():
                    slot.buf = torch.cat([torch.zeros_like(slot.buf), slot.buf])
                calls.buffer_rows *= 2
        calls.src = slice(0, batch) if rec.has_negative else None
        calls.dst = slice(0, batch)

    def current_text_len(self) -> int:
        """Text positions of the running model call (single-stream Flux blocks need it)."""
        rec = self.records[-1] if self.records else None
        geo = None if rec is None else rec.geometry
        return int(geo.text_len or 0) if geo is not None else 0

    # -- capture ---------------------------------------------------------------------------------
    def on_attention(self, layer_idx, q, k, lse, bias, scale) -> None:
        """Capture sink entry of cross-attention (UNet): ``q [B, H, L, D]`` image queries, ``k [B, H, S, D]`` text
        keys, ``lse [B, H, L]`` fp32 or None, ``bias`` broadcastable to ``[B, H, L, S]`` or None."""
        self.on_joint_attention(layer_idx, q, k, lse, slice(0, q.shape[2]), slice(0, k.shape[2]), scale, bias)

    def on_joint_attention(self, layer_idx, q, k, lse, image, text, scale, bias=None) -> None:
        """Capture sink entry of joint attention: add this call's image × text maps.

        ``q``, ``k`` ``[B, H, S, D]`` over the joint sequence; ``lse [B, H, S]`` fp32 or None; ``image`` and
        ``text`` slices of the sequence; ``bias`` broadcastable to ``[B, H, S, S]`` or None.
        """
        target = self._target(layer_idx, q.shape[1], image.stop - image.start, text.stop - text.start, q.device)
        if target is None:
            return
        rec, slot = target
        src, opts = rec.calls.src, self.options
        cols, every_key = self._token_index(rec, text, k.shape[2], k.device)
        qi = q[src][:, :, image]
        out = slot.buf[rec.calls.dst]
        b = None
        if bias is not None:
            b = bias if bias.shape[0] == 1 else bias[src]
            b = b if b.shape[2] == 1 else b[:, :, image]
        if lse is not None:
            k_sel = k[src]
            if not every_key:
                k_sel = k_sel.index_select(2, cols)
                if b is not None and b.shape[-1] != 1:
                    b = b.index_select(-1, cols)
            dispatch.capture_from_lse(qi, k_sel, lse[src][:, :, image], scale, out, bias=b, backend=opts.backend)
        else:
            dispatch.capture_self_normalising(qi, k[src], cols, scale, out, bias=b, backend=opts.backend)
        slot.layer_heads.setdefault(layer_idx, q.shape[1])

    def fused_attention(self, layer_idx, q, k, v, scale) -> torch.Tensor | None:
        """Fast path for processors (no mask, eager): attention output and capture in one kernel.

        Used when ``fused=True`` and the dispatcher finds a backend with the fused capability for the call
        (the forced one, else any: Triton on CUDA, or on the CPU in the Triton interpreter). The traced rows go
        through the fused kernel; the other rows of the batch (the unconditional half) through SDPA.

        Args: ``q [B, H, L, D]``, ``k``/``v`` ``[B, H, S, D]``, the softmax ``scale``.
        Returns: the attention output ``[B, H, L, D]`` in ``q``'s dtype, or None (then the processor runs its
        usual attention + capture path).
        """
        if not self.options.fused:
            return None
        target = self._target(layer_idx, q.shape[1], q.shape[2], k.shape[2], q.device)
        if target is None:
            return None
        rec, slot = target
        idx, _ = self._token_index(rec, slice(0, k.shape[2]), k.shape[2], k.device)
        out = slot.buf[rec.calls.dst]
        o = dispatch.fused_attention_capture(
            q, k, v, idx, scale, out, rows=rec.calls.src, backend=self.options.backend
        )
        if o is not None:
            slot.layer_heads.setdefault(layer_idx, q.shape[1])
        return o

    def _target(self, layer_idx: int, heads: int, n_queries: int, n_text: int, device) -> tuple | None:
        """The record and heat buffer an attention call adds into, or None when it is not traced."""
        rec = self.records[-1] if self.records else None
        if rec is None or rec.geometry is None or rec.calls.src is None:
            return None
        opts = self.options
        if not opts.traces_step(rec.steps_seen - 1):
            return None
        if opts.tokens is not None and max(opts.tokens) >= n_text:
            raise IndexError(f"tokens {list(opts.tokens)} exceed the {n_text} text positions of layer {layer_idx}")
        if n_queries not in rec.grids:
            try:
                rec.grids[n_queries] = layer_grid(rec.latent_hw, n_queries, rec.geometry.multiscale)
            except ValueError as exc:
                raise ValueError(f"layer {layer_idx}: {exc}") from None
        h, w, factor = rec.grids[n_queries]
        if rec.geometry.multiscale and not opts.traces_factor(factor):
            return None
        key = layer_idx if opts.per_layer else (h, w)
        slot = rec.slots.get(key)
        if slot is None:
            T = n_text if rec.positions is None else len(rec.positions)
            R = rec.calls.buffer_rows
            shape = (R, heads, T, n_queries) if opts.daam_compat else (R, T, n_queries)
            slot = rec.slots[key] = HeatBuffer((h, w), factor, torch.zeros(shape, dtype=torch.float32, device=device))
        return rec, slot

    def _token_index(self, rec: Record, text: slice, n_keys: int, device: torch.device) -> tuple[torch.Tensor, bool]:
        """The captured key positions of the text span as an int64 tensor on ``device`` (cached: this runs every
        call), and whether they are all ``n_keys`` keys in order (then no key selection is needed)."""
        rel = rec.positions if rec.positions is not None else tuple(range(text.stop - text.start))
        key = (text.start, text.stop, n_keys, rel, device)
        hit = self._index_cache.get(key)
        if hit is None:
            if len(self._index_cache) > 256:  # a long-lived tracer over many prompt lengths stays bounded
                self._index_cache.clear()
            positions = [text.start + t for t in rel]
            every_key = positions == list(range(n_keys))
            hit = self._index_cache[key] = (torch.tensor(positions, dtype=torch.long, device=device), every_key)
        return hit


def _prompt_list(value, like) -> list[str | None] | None:
    """A pipeline's prompt argument as one entry per prompt of ``like`` (None: not given)."""
    if value is None or like is None:
        return None
    return [value] * len(like) if isinstance(value, str) else list(value)
