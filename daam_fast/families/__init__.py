"""Model families: one module per family says everything model-specific the tracer needs (see
:class:`~daam_fast.families.base.Family`): where the traced layers are, their processors, a model call's
geometry, the prompt's text sources and tokenizers, and the heat-map object of the maps.

- :mod:`.unet`: SD 1.x / 2.x, SDXL and the pipelines built on their UNet.
- :mod:`.sd3`: SD3 / SD3.5; :mod:`.flux`: Flux (both joint-attention transformers, :mod:`.joint`).

A new model family is one new module with a :class:`Family` subclass, added to :data:`FAMILIES`.
"""

from __future__ import annotations

from .base import Family, TextSource, UnsupportedPipelineError
from .flux import FLUX
from .sd3 import SD3
from .unet import UNET

__all__ = ["FAMILIES", "FLUX", "SD3", "SUPPORTED", "UNET", "Family", "TextSource", "UnsupportedPipelineError", "detect"]

#: Every family, in detection order.
FAMILIES: tuple[Family, ...] = (SD3, FLUX, UNET)

SUPPORTED = (
    "UNet pipelines with a diffusers UNet2DConditionModel and a CLIP tokenizer: StableDiffusionPipeline "
    "(SD 1.x / 2.x, v-prediction included), StableDiffusionXLPipeline, and their img2img / inpaint / "
    "ControlNet variants; joint-attention transformers: StableDiffusion3Pipeline (SD3 / SD3.5, "
    "SD3Transformer2DModel) and FluxPipeline (FluxTransformer2DModel; distilled guidance and true CFG)"
)


def detect(pipe) -> Family:
    """The family of ``pipe``; raises :class:`UnsupportedPipelineError` naming what is supported when there is
    none, or when the pipeline lacks what tracing needs (a tokenizer)."""
    family = next((f for f in FAMILIES if f.matches(pipe)), None)
    if family is None:
        model = getattr(pipe, "transformer", None)
        what = f" (its transformer is a {type(model).__name__})" if model is not None else ""
        raise UnsupportedPipelineError(f"cannot trace {type(pipe).__name__}{what}: supported are {SUPPORTED}")
    try:
        family.check(pipe)
    except UnsupportedPipelineError as exc:
        raise UnsupportedPipelineError(f"{exc}; supported are {SUPPORTED}") from None
    return family
