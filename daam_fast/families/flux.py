"""Flux (``FluxTransformer2DModel``, ``FluxPipeline``).

The pipeline packs 2×2 latents per token into ``[B, N, 4C]`` and passes ``img_ids`` ``(0, row, col)``, which
give the grid; the text sequence is T5 only (CLIP gives the pooled vector). Joint attention is ``[text, image]``,
in double-stream and single-stream blocks. Flux.1-dev's distilled guidance makes one call per step; true CFG
(``true_cfg_scale > 1`` with a negative prompt) a second, unconditional call at the same timestep.
Flux Kontext (the context image's tokens join the sequence: ``img_ids`` of two grids) is not supported.
"""

from __future__ import annotations

from ..accumulate import Geometry
from ..processors.joint import FluxCaptureProcessor
from ..tokens import tokenize_prompt
from .base import TextSource, bind_call, call_default, cfg_batch
from .joint import JointFamily

__all__ = ["FLUX", "FluxFamily"]


class FluxFamily(JointFamily):
    name = "flux"
    model_class = "FluxTransformer2DModel"
    source_prompt_args = {"t5": ("prompt_2", "negative_prompt_2")}

    def matches(self, pipe) -> bool:
        return super().matches(pipe) and "Kontext" not in type(pipe).__name__

    def locate(self, model, *, mid_block: bool = False):
        double = [(f"transformer_blocks.{i}.attn", "double", b.attn) for i, b in enumerate(model.transformer_blocks)]
        single = [
            (f"single_transformer_blocks.{i}.attn", "single", b.attn)
            for i, b in enumerate(model.single_transformer_blocks)
        ]
        return double + single

    def processor(self, original, sink, layer_idx: int):
        return FluxCaptureProcessor(original, sink, layer_idx)

    def geometry(self, pipe, model, args, kwargs) -> Geometry:
        bound = bind_call(model, args, kwargs)
        x, ctx, ids = bound["hidden_states"], bound["encoder_hidden_states"], bound.get("img_ids")
        n = int(x.shape[1])
        if ids is None:
            raise ValueError("Flux transformer call without img_ids: the image-token grid is unknown")
        ids = ids[0] if ids.ndim == 3 else ids
        rows, cols = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
        if rows * cols != n:
            raise ValueError(f"img_ids describe a {rows}x{cols} grid but the call has {n} image tokens")
        batch = int(x.shape[0])
        return Geometry(
            grid=(rows, cols),
            batch=batch,
            text_len=int(ctx.shape[1]),
            # The pipeline packs 2x2 latents per token (and the model may patchify further).
            pixels=2 * int(model.config.patch_size) * int(getattr(pipe, "vae_scale_factor", 1)),
            cfg=cfg_batch(pipe, batch),
            expected_steps=getattr(pipe, "_num_timesteps", None),
            timestep=bound.get("timestep"),
        )

    def text_sources(self, pipe, prompt, source_prompts=None, text_len=None):
        if text_len is None:
            text_len = int(call_default(pipe, "max_sequence_length", 512))
        t5_prompt = (source_prompts or {}).get("t5") or prompt
        return [TextSource("t5", tokenize_prompt(pipe.tokenizer_2, t5_prompt, max_length=text_len), 0)]


FLUX = FluxFamily()
