"""Offline builders for tests, benchmarks and the demo: the real CLIP BPE tokenizer and tiny
random-weight diffusers pipelines, all made in memory without a model hub.

The CLIP vocabulary comes from ``bpe_simple_vocab_16e6.txt.gz``, which the ``clip-anytorch`` wheel
ships (``make`` installs it with ``--no-deps``). From it we derive ``vocab.json`` and ``merges.txt``
exactly as OpenAI's ``simple_tokenizer`` orders them, which is the order Hugging Face's CLIP
tokenizer files use.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
import tempfile
from pathlib import Path

import torch

__all__ = [
    "clip_bpe_path",
    "clip_tokenizer",
    "tiny_sd_pipeline",
    "tiny_sdxl_pipeline",
    "write_clip_tokenizer_files",
]


def clip_bpe_path() -> Path:
    """Path of ``bpe_simple_vocab_16e6.txt.gz`` inside the installed ``clip-anytorch`` package."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the CLIP BPE vocabulary comes from the 'clip-anytorch' wheel; install it with "
            "`pip install --no-deps clip-anytorch==2.6.0` (make does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed 'clip' package")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2 / CLIP reversible byte -> printable unicode table.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def write_clip_tokenizer_files(dest: str | os.PathLike) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` of the 49408-token CLIP BPE into ``dest``; return it."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (dest / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (dest / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return dest


@functools.cache
def _tokenizer_dir() -> Path:
    return write_clip_tokenizer_files(tempfile.mkdtemp(prefix="daam_fast_clip_"))


def clip_tokenizer(model_max_length: int = 77, pad_token: str = "<|endoftext|>"):
    """The real CLIP BPE tokenizer (transformers ``CLIPTokenizer``), built offline.

    ``pad_token`` is ``<|endoftext|>`` as in SD 1.x; SD 2.x and SDXL's second encoder pad with ``!``.
    """
    from transformers import CLIPTokenizer

    # from_pretrained on the folder: the same loading path as a real model's tokenizer/ folder.
    return CLIPTokenizer.from_pretrained(str(_tokenizer_dir()), model_max_length=model_max_length, pad_token=pad_token)


def _text_encoder(hidden: int, projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=hidden,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config).eval()


def _vae(seed: int, latent_channels: int = 4):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 8),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
    ).eval()


def tiny_sd_pipeline(
    seed: int = 0, prediction_type: str = "epsilon", attention_head_dim=(2, 4), cross_attention_dim: int = 32
):
    """A random-weight SD-1.x-shaped ``StableDiffusionPipeline`` (a few MB), with the real CLIP tokenizer.

    VAE scale factor 2; the UNet has cross-attention at the latent grid and at 1/2 of it (down and
    up blocks), with 2 and 4 heads, and a cross-attention mid block at 1/4.
    ``prediction_type="v_prediction"`` gives an SD-2.x-like model.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_head_dim,
        norm_num_groups=8,
    ).eval()
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        scheduler=scheduler,
        vae=_vae(seed + 1),
        text_encoder=_text_encoder(cross_attention_dim, False, seed + 2),
        tokenizer=clip_tokenizer(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0):
    """A random-weight SDXL-shaped ``StableDiffusionXLPipeline``: two CLIP text encoders whose hidden
    states are concatenated (cross-attention dim 64), added time/text conditioning, and transformer
    depth 2 at the lower resolution, as SDXL has."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=64,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
        norm_num_groups=8,
    ).eval()
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        scheduler=scheduler,
        vae=_vae(seed + 1),
        text_encoder=_text_encoder(32, False, seed + 2),
        text_encoder_2=_text_encoder(32, True, seed + 3),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(pad_token="!"),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
