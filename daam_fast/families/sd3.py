"""SD3 / SD3.5 (``SD3Transformer2DModel``, ``StableDiffusion3Pipeline``).

Latents ``[B, C, H, W]`` are patchified by ``patch_size``, so the token grid is ``(H / p, W / p)``; the text
sequence is 77 CLIP positions (CLIP-L and CLIP-G joined on features, sharing positions) followed by the T5
positions (``max_sequence_length``; 77 zero rows when the pipeline has no T5). Joint attention is
``[image, text]``. CFG batches ``[uncond, cond]``; SD3.5's skip-layer guidance pass is not traced.
"""

from __future__ import annotations

from ..accumulate import Geometry
from ..processors.joint import SD3JointCaptureProcessor
from ..tokens import tokenize_prompt, tokenize_shared
from .base import TextSource, bind_call, call_default, cfg_batch
from .joint import JointFamily

__all__ = ["SD3", "SD3Family"]


class SD3Family(JointFamily):
    name = "sd3"
    model_class = "SD3Transformer2DModel"
    source_prompt_args = {"t5": ("prompt_3", "negative_prompt_3")}

    def locate(self, model, *, mid_block: bool = False):
        return [(f"transformer_blocks.{i}.attn", "joint", b.attn) for i, b in enumerate(model.transformer_blocks)]

    def processor(self, original, sink, layer_idx: int):
        return SD3JointCaptureProcessor(original, sink, layer_idx)

    def geometry(self, pipe, model, args, kwargs) -> Geometry:
        bound = bind_call(model, args, kwargs)
        x, ctx = bound["hidden_states"], bound["encoder_hidden_states"]
        p = int(model.config.patch_size)
        batch = int(x.shape[0])
        return Geometry(
            grid=(int(x.shape[-2]) // p, int(x.shape[-1]) // p),
            batch=batch,
            text_len=int(ctx.shape[1]),
            pixels=p * int(getattr(pipe, "vae_scale_factor", 1)),
            cfg=cfg_batch(pipe, batch),
            expected_steps=getattr(pipe, "_num_timesteps", None),
            timestep=bound.get("timestep"),
            auxiliary=bound.get("skip_layers") is not None,
        )

    def text_sources(self, pipe, prompt, source_prompts=None, text_len=None):
        clip_len = int(getattr(pipe, "tokenizer_max_length", 77))
        if text_len is None:
            text_len = clip_len + int(call_default(pipe, "max_sequence_length", 256))
        clip = [t for t in (pipe.tokenizer, pipe.tokenizer_2) if t is not None]
        sources = [TextSource("clip", tokenize_shared(clip, prompt), 0)]
        # Without T5 the pipeline fills the T5 part with zeros: no tokens to name.
        if getattr(pipe, "text_encoder_3", None) is not None and getattr(pipe, "tokenizer_3", None) is not None:
            t5_prompt = (source_prompts or {}).get("t5") or prompt
            t5 = tokenize_prompt(pipe.tokenizer_3, t5_prompt, max_length=text_len - clip_len)
            sources.append(TextSource("t5", t5, clip_len))
        return sources


SD3 = SD3Family()
