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
    "t5_tokenizer",
    "tiny_flux_pipeline",
    "tiny_sd3_pipeline",
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


# ----------------------------------------------------------------------------------- joint-attention models
#: Sentences the tiny T5 sentencepiece model is trained on: whole words of the test prompts become pieces.
_T5_CORPUS = (
    "a red circle and a blue square.",
    "a photo of a cat wearing a hat, on a sofa!",
    "the dog-house is next to the tall tree",
    "a hippopotamus swimming in a river",
    "a bird flying over the mountains at sunset",
    "two cats and one dog in the garden",
)


@functools.cache
def _t5_model(vocab_size: int = 120) -> bytes:
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    # T5's id layout: <pad> 0, </s> 1, <unk> 2, no BOS.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_T5_CORPUS * 10),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
        num_threads=1,
    )
    return model.getvalue()


@functools.cache
def _t5_vocab() -> tuple[tuple[str, float], ...]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=_t5_model())
    return tuple((sp.id_to_piece(i), float(sp.get_score(i))) for i in range(sp.get_piece_size()))


def t5_tokenizer(model_max_length: int = 512):
    """A tiny T5 tokenizer: a BPE sentencepiece model trained offline on a few sentences, with T5's special-token
    layout. transformers 5: its tokenizers-backed ``T5Tokenizer`` (offsets); 4.x: the sentencepiece-backed slow
    ``T5Tokenizer``, what 4.x pipelines have."""
    import transformers
    from transformers import T5Tokenizer

    if int(transformers.__version__.split(".")[0]) >= 5:
        return T5Tokenizer(vocab=list(_t5_vocab()), extra_ids=0, model_max_length=model_max_length)
    path = Path(tempfile.mkdtemp(prefix="daam_fast_t5_")) / "spiece.model"
    path.write_bytes(_t5_model())
    return T5Tokenizer(vocab_file=str(path), extra_ids=0, model_max_length=model_max_length, legacy=True)


def _t5_encoder(d_model: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(_t5_vocab()),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config).eval()


def _flow_vae(seed: int, latent_channels: int):
    vae = _vae(seed, latent_channels)
    # SD3 and Flux shift latents; the tiny VAE has no shift, which the pipelines read as a number.
    vae.register_to_config(shift_factor=0.0, scaling_factor=1.0)
    return vae


def tiny_sd3_pipeline(seed: int = 0, patch_size: int = 2):
    """A random-weight SD3-shaped ``StableDiffusion3Pipeline``: CLIP-L + CLIP-G (real CLIP tokenizer, hidden 32
    each, joined on features: 64) then tiny T5 (d_model 64) along the sequence; a 2-block ``SD3Transformer2DModel``
    with 2 heads of dim 16 and ``patch_size`` (VAE scale 2, so a 32×48 image gives a 8×12 token grid at patch 2).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=patch_size,
        in_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=64,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
        pos_embed_max_size=32,
    ).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_flow_vae(seed + 1, 4),
        text_encoder=_text_encoder(32, True, seed + 2),
        tokenizer=clip_tokenizer(),
        text_encoder_2=_text_encoder(32, True, seed + 3),
        tokenizer_2=clip_tokenizer(pad_token="!"),
        text_encoder_3=_t5_encoder(64, seed + 4),
        tokenizer_3=t5_tokenizer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True):
    """A random-weight Flux-shaped ``FluxPipeline``: CLIP (pooled only) and tiny T5 (d_model 32, the text
    sequence); a ``FluxTransformer2DModel`` with 1 double-stream and 2 single-stream blocks, 2 heads of dim 16,
    RoPE over (0, row, col) ids. Latents are packed 2×2 per token (VAE scale 2: a 32×48 image gives 8×12 tokens).
    ``guidance_embeds=True`` is Flux.1-dev's distilled guidance (one transformer call per step)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_flow_vae(seed + 1, 4),
        text_encoder=_text_encoder(32, False, seed + 2),
        tokenizer=clip_tokenizer(),
        text_encoder_2=_t5_encoder(32, seed + 3),
        tokenizer_2=t5_tokenizer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
