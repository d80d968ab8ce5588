"""What the joint-attention transformer families (SD3, Flux) share: the image-token grid, every transformer
block traced, and maps whose rows are positions of a text sequence joined from several tokenizers.

A transformer call's forward pre-hook reads its geometry: the image-token grid, the batch, the text length, and
the timestep (a second call at the same timestep is Flux's true-CFG pass, see :mod:`daam_fast.accumulate.capture`).
All blocks share one grid, so the global map is the mean over (block, head), summed over steps, with no
resampling. ``factors`` and ``mid_block`` do not apply.
"""

from __future__ import annotations

from ..heatmap import JointGlobalHeatMap
from .base import Family

__all__ = ["JointFamily"]


class JointFamily(Family):
    """Base of joint-attention transformer families; ``model_class`` names the transformer class."""

    model_class = ""

    def matches(self, pipe) -> bool:
        """Whether ``pipe.transformer`` is this family's model class (also for subclasses)."""
        model = getattr(pipe, "transformer", None)
        return model is not None and any(c.__name__ == self.model_class for c in type(model).__mro__)

    def model(self, pipe):
        return pipe.transformer

    def heat_map(self, pipe, model, rec, maps, text, positions, *, normalize, negative):
        sources = self.text_sources(pipe, text.prompt, text.source_prompts, rec.geometry.text_len)

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
        pixels = rec.geometry.pixels
        vae = int(getattr(pipe, "vae_scale_factor", 1))
        meta = self.base_meta(pipe, model, rec)
        meta.update(
            token_grid=[H, W],
            latent_size=[H * pixels // vae, W * pixels // vae],
            image_size=[H * pixels, W * pixels],
            negative=negative,
            complete=rec.complete,
            text_sources=[{"name": s.name, "offset": s.offset, "tokens": s.tokens.to_dict()} for s in sources],
            default_source="both" if len(sources) > 1 else sources[0].name,
        )
        return JointGlobalHeatMap(sources[0].tokens, maps, positions=positions, meta=meta)
