"""UNet pipelines: SD 1.x / 2.x (v-prediction included), SDXL, and every pipeline built on a diffusers
``UNet2DConditionModel`` with CLIP tokenizers (img2img, inpainting, ControlNet).

- Layers: the cross-attention modules (``attn2``) of the transformer blocks, in daam's order: up blocks, down
  blocks, then (``mid_block=True``) the mid block; each gets a
  :class:`~daam_fast.processors.unet.UNetCrossAttnCaptureProcessor`.
- Geometry: the UNet's ``sample`` ``[B, C, h, w]`` gives the latent grid; a layer's grid follows from its query
  count (the UNet halves the grid with stride-2 convolutions); CFG batches ``[uncond, cond]``.
- Text: one CLIP window (77 positions); SDXL's two CLIP tokenizers share positions.
"""

from __future__ import annotations

import re

from ..accumulate import Geometry
from ..heatmap import GlobalHeatMap
from ..processors.unet import UNetCrossAttnCaptureProcessor
from ..tokens import tokenize_shared
from .base import Family, TextSource, UnsupportedPipelineError, cfg_batch

__all__ = ["UNET", "UNetFamily"]

_BLOCK_RE = re.compile(r"^(down|up|mid)_blocks\.(\d+)\.")
# transformers gives an unknown limit as a huge sentinel; only a real text window length counts.
_NO_WINDOW = 1_000_000


def _index_in_block(names: list[str]) -> list[int]:
    """Each located layer's index among the layers of its block (``up_blocks.1``, ...), in order."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        block = _BLOCK_RE.match(name).group(0)
        out.append(seen.get(block, 0))
        seen[block] = out[-1] + 1
    return out


def tokenizers(pipe) -> list:
    """The pipeline's CLIP tokenizers (SDXL has two; they share positions)."""
    return [t for t in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)) if t]


class UNetFamily(Family):
    """SD 1.x / 2.x / SDXL and the pipelines built on their UNet."""

    name = "unet"

    def matches(self, pipe) -> bool:
        unet = getattr(pipe, "unet", None)
        return unet is not None and hasattr(unet, "up_blocks")

    def check(self, pipe) -> None:
        if not tokenizers(pipe):
            raise UnsupportedPipelineError(f"{type(pipe).__name__} has no tokenizer")

    def model(self, pipe):
        return pipe.unet

    def locate(self, model, *, mid_block: bool = False):
        found = []
        blocks = [("up", i, b) for i, b in enumerate(model.up_blocks)] + [
            ("down", i, b) for i, b in enumerate(model.down_blocks)
        ]
        if mid_block and model.mid_block is not None:
            blocks.append(("mid", 0, model.mid_block))
        for kind, bi, block in blocks:
            for ai, spatial in enumerate(getattr(block, "attentions", None) or []):
                for ti, tb in enumerate(getattr(spatial, "transformer_blocks", None) or []):
                    attn2 = getattr(tb, "attn2", None)
                    if attn2 is not None and getattr(attn2, "is_cross_attention", False):
                        name = f"{kind}_blocks.{bi}.attentions.{ai}.transformer_blocks.{ti}.attn2"
                        found.append((name, kind, attn2))
        return found

    def layer_factor(self, model, name: str) -> int:
        """Counted from the blocks' own ``downsamplers`` / ``upsamplers`` (each halves / doubles the grid), so any
        ``UNet2DConditionModel`` configuration is followed; other names give 1 (an upper bound on the grid)."""
        m = _BLOCK_RE.match(name)
        if m is None:
            return 1
        kind, idx = m.group(1), int(m.group(2))
        downs = [bool(getattr(b, "downsamplers", None)) for b in model.down_blocks]
        if kind == "down":
            return 2 ** sum(downs[:idx])
        if kind == "mid":
            return 2 ** sum(downs)
        ups = [bool(getattr(b, "upsamplers", None)) for b in model.up_blocks]
        return 2 ** (sum(downs) - sum(ups[:idx]))

    def processor(self, original, sink, layer_idx: int):
        return UNetCrossAttnCaptureProcessor(original, sink, layer_idx)

    def daam_layer_names(self, names: list[str]) -> list[str]:
        """``"<up|down|mid>-attn-<i>"``, ``i`` counting the cross-attentions of one block in order (daam's)."""
        return [f"{_BLOCK_RE.match(n).group(1)}-attn-{i}" for n, i in zip(names, _index_in_block(names), strict=True)]

    def low_memory_layers(self, names: list[str]) -> list[int]:
        """The first cross-attention of each block, as daam's ``low_memory`` restricts its hooks."""
        return [k for k, i in enumerate(_index_in_block(names)) if i == 0]

    def geometry(self, pipe, model, args, kwargs) -> Geometry:
        sample = args[0] if args else kwargs.get("sample")
        text = args[2] if len(args) > 2 else kwargs.get("encoder_hidden_states")
        batch = int(sample.shape[0])
        return Geometry(
            grid=(int(sample.shape[-2]), int(sample.shape[-1])),
            batch=batch,
            text_len=None if text is None else int(text.shape[1]),
            pixels=int(getattr(pipe, "vae_scale_factor", 1)),
            cfg=cfg_batch(pipe, batch),
            expected_steps=getattr(pipe, "_num_timesteps", None),
            multiscale=True,
        )

    def text_window(self, pipe) -> int | None:
        window = getattr(tokenizers(pipe)[0], "model_max_length", None)
        return window if isinstance(window, int) and window < _NO_WINDOW else None

    def text_sources(self, pipe, prompt, source_prompts=None, text_len=None):
        return [TextSource("clip", tokenize_shared(tokenizers(pipe), prompt), 0)]

    def heat_map(self, pipe, model, rec, maps, text, positions, *, normalize, negative):
        tokens = self.text_sources(pipe, text.prompt)[0].tokens
        keep = [i for i, p in enumerate(positions) if p < tokens.n_tokens()]
        maps = maps[keep]
        positions = [positions[i] for i in keep]
        if normalize:
            inner = [i for i, p in enumerate(positions) if 0 < p < tokens.n_tokens() - 1]
            maps = maps / (maps[inner].sum(0, keepdim=True) + 1e-6)
        meta = self.base_meta(pipe, model, rec)
        meta.update(
            latent_size=list(rec.latent_hw),
            image_size=[s * int(getattr(pipe, "vae_scale_factor", 1)) for s in rec.latent_hw],
            negative=negative,
            complete=rec.complete,
        )
        return GlobalHeatMap(tokens, maps, positions=positions, meta=meta)


UNET = UNetFamily()
