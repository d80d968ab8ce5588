"""The joint-attention half of :class:`daam_fast.trace.Trace` (SD3, Flux), as a mixin.

A transformer call's forward pre-hook reads its geometry (:mod:`daam_fast.families`): the image-token grid,
the batch, the text length. Every traced block adds the image-query × text-key block of its joint softmax,
summed over heads, into one fp32 buffer ``[rows, text tokens, grid cells]`` (one per block with
``per_layer=True``, per block and head with ``daam_compat=True``). All blocks share one grid, so the global map
is the mean over (block, head), summed over steps, with no resampling.

Classifier-free guidance: SD3 batches ``[uncond, cond]`` as SD does. Flux.1-dev's distilled guidance makes one
call per step. Flux's true CFG (``true_cfg_scale > 1`` with a negative prompt) makes a conditional call and then
an unconditional one at the same timestep: a call repeating the previous call's timestep is that second pass,
its maps go to the negative rows (kept with ``negative=True``), and it does not count as a step. SD3.5's
skip-layer guidance pass (``skip_layers``) is not traced.
"""

from __future__ import annotations

import torch

from .families import Family, Geometry
from .heatmap import JointGlobalHeatMap
from .kernels import dispatch

__all__ = ["JointTraceMixin"]


class JointTraceMixin:
    """Methods :class:`~daam_fast.trace.Trace` uses when it traces a joint-attention transformer."""

    family: Family | None

    # -- geometry --------------------------------------------------------------------------------
    def current_text_len(self) -> int:
        """Text positions of the running transformer call (single-stream Flux blocks need it)."""
        rec = self.records[-1] if self.records else None
        return int(rec.text_len or 0) if rec is not None else 0

    def _on_transformer_call(self, module, args, kwargs) -> None:
        from .snapshots import snapshot_step
        from .trace import Record

        geo = self.family.geometry(self.pipe, module, args, kwargs)
        last = self.records[-1] if self.records else None
        if geo.auxiliary:  # skip-layer guidance: an extra pass of the current step, with other blocks
            if last is not None:
                last.call_src = None
            return
        if last is None or (
            last.batch_size is not None
            and (last.latent_hw, last.batch_size, last.text_len) != (geo.grid, geo.batch, geo.text_len)
        ):
            self._append(Record())
        rec = self.records[-1]
        first = rec.batch_size is None
        if first:
            self._start_joint_geometry(rec, geo)
            self._check_first_call(rec, geo.text_len)
        t = geo.timestep
        second = (
            t is not None
            and rec.last_timestep is not None
            and rec.last_timestep.shape == t.shape
            and torch.equal(rec.last_timestep, t.detach())
        )
        rec.last_timestep = None if t is None else t.detach().clone()
        if second:  # Flux true CFG: the unconditional pass of the current step
            if not rec.true_cfg:
                rec.true_cfg = True
                if self.negative:
                    rec.has_negative = True
                    # Negative rows come first, as in a batched-CFG buffer.
                    for slot in rec.slots.values():
                        slot.buf = torch.cat([torch.zeros_like(slot.buf), slot.buf])
                    rec.buf_rows *= 2
            rec.call_src = slice(0, geo.batch) if rec.has_negative else None
            rec.call_dst = slice(0, geo.batch)
            return
        if not first and self.snapshots and (self.steps is None or rec.steps_seen - 1 in self.steps):
            snapshot_step(self, rec, rec.steps_seen - 1)  # the previous step (and its true-CFG pass) is final
        rec.steps_seen += 1
        if self.steps is None or rec.steps_seen - 1 in self.steps:
            rec.steps_traced += 1
        rec.call_src = rec.rows
        n_src = rec.rows.stop - rec.rows.start
        rec.call_dst = slice(rec.buf_rows - n_src, rec.buf_rows)

    def _start_joint_geometry(self, rec, geo: Geometry) -> None:
        rec.latent_hw = geo.grid
        rec.batch_size = B = geo.batch
        rec.text_len = geo.text_len
        rec.pixels = geo.pixels
        # SD3 batches [uncond, cond] (do_classifier_free_guidance); Flux has no such batch.
        rec.cfg = bool(getattr(self.pipe, "do_classifier_free_guidance", False)) and B % 2 == 0
        n = B // 2 if rec.cfg else B
        rec.n_images = n
        rec.has_negative = self.negative and rec.cfg
        rec.rows = slice(0, B) if rec.has_negative else slice(B - n, B)
        rec.buf_rows = rec.rows.stop - rec.rows.start
        rec.expected_steps = getattr(self.pipe, "_num_timesteps", None)

    # -- capture ---------------------------------------------------------------------------------
    def on_joint_attention(self, layer_idx, q, k, lse, image, text, scale, bias=None) -> None:
        """Capture sink entry (called by the joint processors): add this call's image × text maps.

        ``q``, ``k`` ``[B, H, S, D]`` over the joint sequence; ``lse [B, H, S]`` fp32 or None; ``image`` and
        ``text`` slices of the sequence; ``bias`` broadcastable to ``[B, H, S, S]`` or None.
        """
        rec = self.records[-1] if self.records else None
        if rec is None or rec.batch_size is None or rec.call_src is None:
            return
        if self.steps is not None and rec.steps_seen - 1 not in self.steps:
            return
        n_txt = text.stop - text.start
        if self.tokens is not None and max(self.tokens) >= n_txt:
            raise IndexError(f"tokens {self.tokens} exceed the {n_txt} text positions of layer {layer_idx}")
        rel = range(n_txt) if self.tokens is None else self.tokens
        cols = torch.tensor([text.start + t for t in rel], device=k.device)
        src = rec.call_src
        qi = q[src][:, :, image]
        H, N = qi.shape[1], qi.shape[2]
        if N != rec.latent_hw[0] * rec.latent_hw[1]:
            raise ValueError(f"layer {layer_idx}: {N} image queries do not fill the {rec.latent_hw} token grid")
        key = layer_idx if self.per_layer else "joint"
        slot = rec.slots.get(key)
        if slot is None:
            from .trace import _Slot

            shape = (rec.buf_rows, H, len(cols), N) if self.daam_compat else (rec.buf_rows, len(cols), N)
            slot = rec.slots[key] = _Slot(rec.latent_hw, 1, torch.zeros(shape, dtype=torch.float32, device=q.device))
        out = slot.buf[rec.call_dst]
        b = None
        if bias is not None:
            b = bias if bias.shape[0] == 1 else bias[src]
            b = b if b.shape[2] == 1 else b[:, :, image]
        if lse is not None:
            k_sel = k[src].index_select(2, cols)
            if b is not None and b.shape[-1] != 1:
                b = b.index_select(-1, cols)
            dispatch.capture_from_lse(qi, k_sel, lse[src][:, :, image], scale, out, bias=b, backend=self.backend)
        else:
            dispatch.capture_self_normalising(qi, k[src], cols, scale, out, bias=b, backend=self.backend)
        slot.layer_heads.setdefault(layer_idx, H)

    # -- results ---------------------------------------------------------------------------------
    def _joint_heat_map(self, rec, maps, text: str, t5_text: str | None, normalize: bool, negative: bool):
        sources = self.family.text_sources(self.pipe, text, t5_text, rec.text_len)
        positions = list(range(maps.shape[0])) if self.tokens is None else list(self.tokens)

        def content(p):  # None: padding; True: a prompt token; False: a special token (start / end)
            for s in sources:
                if s.offset <= p < s.offset + s.tokens.n_tokens():
                    a, b = s.tokens.offsets[p - s.offset]
                    return b > a
            return None

        kinds = [content(p) for p in positions]
        keep = [i for i, c in enumerate(kinds) if c is not None]
        maps = maps[keep]
        positions = [positions[i] for i in keep]
        if normalize:
            inner = [j for j, i in enumerate(keep) if kinds[i]]
            maps = maps / (maps[inner].sum(0, keepdim=True) + 1e-6)
        H, W = rec.latent_hw
        vae = int(getattr(self.pipe, "vae_scale_factor", 1))
        meta = {
            "model": type(self.pipe).__name__,
            "model_name": str(getattr(self.model.config, "_name_or_path", "")),
            "steps": rec.steps_traced,
            "token_grid": [H, W],
            "latent_size": [H * rec.pixels // vae, W * rec.pixels // vae],
            "image_size": [H * rec.pixels, W * rec.pixels],
            "negative": negative,
            "complete": rec.complete,
            "text_sources": [{"name": s.name, "offset": s.offset, "tokens": s.tokens.to_dict()} for s in sources],
            "default_source": "both" if len(sources) > 1 else sources[0].name,
        }
        return JointGlobalHeatMap(sources[0].tokens, maps, positions=positions, meta=meta)
