"""Train the embedded demo model (daam_fast/demo/model/) from scratch on procedural shape scenes.

Stage 1 trains a tiny AutoencoderKL (scale factor 2: 32x32 RGB <-> 4x16x16) to reconstruct the
scenes. Stage 2 trains a UNet2DConditionModel and a small CLIPTextModel together on the frozen
VAE's latents with the epsilon loss plus an attention-alignment term: on the conditional rows,
every cross-attention layer's head-mean attention (softmax over all 77 keys, materialised here by
our own processor) is pushed, by a soft-target cross-entropy, toward the colour and shape tokens
on each object's pixels (half each) and toward <|startoftext|> on the background. (The issue that
asked for this model reports that ordinary training alone, for 33 minutes here, gave word maps no
better than a uniform map; this script uses the term from the first step.)

Everything is deterministic from --seed with one torch thread (the data set, the initial weights,
batches, noise and timesteps); step counts, not the wall clock, decide what is trained. The
shipped weights are the run below cut by --max-minutes 52 at step 877 of the 3000-step schedule;
`--stop-at 877` reproduces that cut without depending on the machine's speed:

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE PYTHONPATH=$PWD nohup python scripts/train_demo_model.py \
        --work /tmp/demo_train --stop-at 877 > /tmp/demo_train.log 2>&1 &

Checkpoints (full state; --resume continues from them on the same schedule, bit for bit) and an
exported fp16 pipeline folder are written to --work every --ckpt-every steps and when stopping;
the final export goes to --out (default: the package's daam_fast/demo/model/).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from daam_fast.demo import shapes  # noqa: E402

TEXT_HIDDEN = 32
MAX_LEN = 77


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------- model


def build_models(seed: int):
    """Fresh VAE, UNet and text encoder with deterministic initial weights; the scheduler."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=shapes.SIZE,
        mid_block_add_attention=False,  # flat-colour scenes need no global mixing; saves time
    )
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        sample_size=shapes.SIZE // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=(2, 4),  # = number of heads in diffusers' legacy naming: head dim 16
        norm_num_groups=8,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=TEXT_HIDDEN,
            intermediate_size=4 * TEXT_HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=MAX_LEN,
            projection_dim=TEXT_HIDDEN,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    # SD 1.x's schedule, so the standard DDIM/img2img pipelines behave as they do on real models.
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )
    return vae, unet, text_encoder, scheduler


class AlignProcessor:
    """Cross-attention with a materialised softmax whose head-mean probabilities are recorded.

    ``records`` receives ``probs.mean(heads)`` of shape ``[B, L, S]`` fp32 (L = query positions of
    the layer, S = 77 text keys) when ``self.recording`` is True. Same output as diffusers' processor.
    """

    def __init__(self, records: list):
        self.records = records
        self.recording = False

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        b, n, _ = hidden_states.shape
        q = attn.to_q(hidden_states)
        k = attn.to_k(encoder_hidden_states)
        v = attn.to_v(encoder_hidden_states)
        h = attn.heads
        q, k, v = (t.view(b, -1, h, t.shape[-1] // h).transpose(1, 2) for t in (q, k, v))
        probs = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)  # [B, H, L, S]
        if self.recording:
            self.records.append(probs.mean(1))
        out = (probs @ v).transpose(1, 2).reshape(b, n, -1)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def install_processors(unet, records: list) -> list[AlignProcessor]:
    procs, table = [], {}
    for name, proc in unet.attn_processors.items():
        if name.endswith("attn2.processor"):
            p = AlignProcessor(records)
            procs.append(p)
            table[name] = p
        else:
            table[name] = proc
    unet.set_attn_processor(table)
    return procs


# ------------------------------------------------------------------------------------------------ data


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="pt").input_ids


def word_positions(tokenizer, objects) -> np.ndarray:
    """``[n, 3, 2]`` int64: caption token position of (colour, shape) of each object, -1 if absent.

    Captions are ``a C S and a C S ...`` and every word is one CLIP token, so positions are fixed;
    this is checked once against the tokenizer."""
    ids = tokenize(tokenizer, ["a red circle and a blue square and a green triangle"])[0].tolist()
    expect = [tokenizer.convert_tokens_to_ids(w + "</w>") for w in ("red", "circle", "blue", "square")]
    assert [ids[2], ids[3], ids[6], ids[7]] == expect, ids[:12]
    pos = np.full((len(objects), 3, 2), -1, np.int64)
    for i, objs in enumerate(objects):
        for k in range(len(objs)):
            pos[i, k] = (4 * k + 2, 4 * k + 3)
    return pos


def mask_fractions(labels: torch.Tensor, grid: int) -> torch.Tensor:
    """labels int ``[B, S, S]`` (-1 background) -> fractions ``[B, 4, grid*grid]`` (bg, obj0..obj2)."""
    one_hot = torch.stack([(labels == k) for k in (-1, 0, 1, 2)], 1).float()
    return F.adaptive_avg_pool2d(one_hot, grid).flatten(2)


def alignment_loss(records: list[torch.Tensor], rows: torch.Tensor, labels: torch.Tensor, pos: torch.Tensor):
    """Soft-target cross-entropy between recorded head-mean attention and the word masks.

    records: ``[B, L, S]`` per layer; rows: bool ``[B]`` (conditional rows); labels ``[B, 32, 32]``;
    pos ``[B, 3, 2]`` token positions (-1 absent). Target on a pixel: fraction of background on
    token 0 (<|startoftext|>), fraction of object k split equally on its colour and shape tokens.
    """
    pos = pos[rows]
    idx = torch.cat([torch.zeros(pos.shape[0], 1, dtype=torch.long), pos.clamp(min=0).flatten(1)], 1)  # [b, 7]
    total = 0.0
    for p in records:
        p = p[rows]
        grid = int(round(math.sqrt(p.shape[1])))
        frac = mask_fractions(labels[rows], grid)  # [b, 4, L]
        w = torch.cat([frac[:, :1], frac[:, 1:].repeat_interleave(2, 1) * 0.5], 1)  # [b, 7, L]
        logp = torch.log(p.clamp(min=1e-8)).gather(2, idx[:, None, :].expand(-1, p.shape[1], -1))  # [b, L, 7]
        total = total - (logp * w.transpose(1, 2)).sum(-1).mean()
    return total / len(records)


# -------------------------------------------------------------------------------------------- monitor


@torch.no_grad()
def probe_miou(unet, text_encoder, tokenizer, captions, latents, labels, pos, scheduler, ts=(200, 400, 600)):
    """mIoU (DAAM threshold 0.4) of word maps from our own processor on held-out rendered scenes,
    summed over noise levels ``ts`` and all cross-attention layers (each upsampled to 16x16)."""
    procs = [p for p in unet.attn_processors.values() if isinstance(p, AlignProcessor)]
    records = procs[0].records
    g = torch.Generator().manual_seed(1234)
    enc = text_encoder(tokenize(tokenizer, captions))[0]
    heat = torch.zeros(latents.shape[0], MAX_LEN, 16, 16)
    for p in procs:
        p.recording = True
    for t in ts:
        noise = torch.randn(latents.shape, generator=g)
        tt = torch.full((latents.shape[0],), t, dtype=torch.long)
        records.clear()
        unet(scheduler.add_noise(latents, noise, tt), tt, enc)
        for r in records:
            grid = int(round(math.sqrt(r.shape[1])))
            m = r.transpose(1, 2).reshape(r.shape[0], MAX_LEN, grid, grid)
            heat += F.interpolate(m, size=16, mode="bicubic", align_corners=False).clamp(min=0)
    for p in procs:
        p.recording = False
    records.clear()
    up = F.interpolate(heat, size=shapes.SIZE, mode="bicubic", align_corners=False).clamp(min=0)
    ious = []
    for i in range(latents.shape[0]):
        for k in range(3):
            if pos[i, k, 0] < 0:
                continue
            gt = labels[i] == k
            for j in pos[i, k]:
                m = up[i, j]
                m = (m - m.min()) / (m.max() - m.min() + 1e-8)
                pred = m > 0.4
                ious.append(((pred & gt).sum() / (pred | gt).sum()).item())
    return float(np.mean(ious))


# ------------------------------------------------------------------------------------------------ export


def export(folder: Path, vae, unet, text_encoder, scheduler) -> None:
    """Write an fp16 diffusers folder that StableDiffusionPipeline.from_pretrained loads."""
    from diffusers import StableDiffusionPipeline
    from diffusers.models.attention_processor import AttnProcessor2_0
    from transformers import CLIPTokenizer

    from tests.fixtures.pipelines import write_clip_tokenizer_files

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok_dir = write_clip_tokenizer_files(tmp / "tokenizer")
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2))
    (tok_dir / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS, indent=2))
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    unet16 = copy.deepcopy(unet).half()
    unet16.set_attn_processor(AttnProcessor2_0())  # drop our recording processors
    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(vae).half(), unet=unet16, text_encoder=copy.deepcopy(text_encoder).half(),
        tokenizer=tokenizer, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    for name in ("vae", "unet", "text_encoder", "scheduler"):
        kwargs = {} if name == "scheduler" else {"safe_serialization": True}
        getattr(pipe, name).save_pretrained(str(tmp / name), **kwargs)
    pipe.save_config(str(tmp))  # model_index.json
    _prefix_text_model_keys(tmp / "text_encoder" / "model.safetensors")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _prefix_text_model_keys(path: Path) -> None:
    """Store CLIPTextModel's weights under "text_model.", as checkpoints on the hub do: transformers 5 writes them
    without it, and transformers 4.x would then not read them (it would run a randomly initialised encoder)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k if k.startswith("text_model.") else "text_model." + k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata=meta)


TOKENIZER_CONFIG = {
    "tokenizer_class": "CLIPTokenizer",
    "model_max_length": MAX_LEN,
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
    "do_lower_case": True,
    "errors": "replace",
}
SPECIAL_TOKENS = {k: TOKENIZER_CONFIG[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}


# ------------------------------------------------------------------------------------------------- main


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/demo_train"))
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "daam_fast/demo/model")
    ap.add_argument("--n-train", type=int, default=20000)
    ap.add_argument("--n-held", type=int, default=48)
    ap.add_argument("--vae-steps", type=int, default=800)
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--align-weight", type=float, default=0.2)
    ap.add_argument("--cond-drop", type=float, default=0.1)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--ckpt-every", type=int, default=500)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="stop stage 2 early (after a whole step) once this much wall time has passed since start; "
                    "the run is then the deterministic prefix of the full one")
    ap.add_argument("--stop-at", type=int, default=None,
                    help="stop stage 2 after this step: a prefix of the --steps schedule (same LR and EMA)")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    args.work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    log(f"args {vars(args)}")

    from tests.fixtures.pipelines import clip_tokenizer

    tokenizer = clip_tokenizer()
    images, labels, captions, objects = shapes.make_dataset(args.n_train + args.n_held, args.seed)
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    lab_all = torch.from_numpy(labels).long()
    pos_all = torch.from_numpy(word_positions(tokenizer, objects))
    ids_all = tokenize(tokenizer, captions)
    ids_empty = tokenize(tokenizer, [""])[0]
    n = args.n_train
    log(f"data: {len(captions)} scenes in {time.time() - t_start:.0f}s")

    vae, unet, text_encoder, scheduler = build_models(args.seed)
    n_vae, n_unet, n_text = (sum(p.numel() for p in m.parameters()) / 1e6 for m in (vae, unet, text_encoder))
    log(f"params: vae {n_vae:.3f}M unet {n_unet:.3f}M text {n_text:.3f}M")

    # ---- stage 1: VAE
    vae_path = args.work / "vae.pt"
    if args.resume and vae_path.exists():
        vae.load_state_dict(torch.load(vae_path))
        log("vae: loaded")
    else:
        g = torch.Generator().manual_seed(args.seed + 10)
        opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
        t0 = time.time()
        for step in range(args.vae_steps):
            for grp in opt.param_groups:
                grp["lr"] = lr_at(step, args.vae_steps, 2e-3, 100)
            idx = torch.randint(0, n, (args.vae_batch,), generator=g)
            x = x_all[idx]
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
            rec = vae.decode(z).sample
            mse = F.mse_loss(rec, x)
            kl = post.kl().mean() / post.mean[0].numel()
            loss = mse + 1e-4 * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % args.log_every == 0 or step == args.vae_steps - 1:
                log(f"vae step {step} mse {mse.item():.5f} kl {kl.item():.3f} ({(time.time()-t0)/(step+1):.3f}s/step)")
        torch.save(vae.state_dict(), vae_path)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        lat = torch.cat([vae.encode(x_all[i : i + 256]).latent_dist.mean for i in range(0, len(x_all), 256)])
        rec = torch.cat([vae.decode(lat[n + i : n + i + 256]).sample for i in range(0, args.n_held, 256)])
    held_err = (((rec.clamp(-1, 1) + 1) * 127.5).round() - ((x_all[n:] + 1) * 127.5)).abs()
    off = (held_err.amax(1) > 40).float().mean()
    log(f"vae held-out: mean abs err {held_err.mean():.2f}/255, pixels off by >40: {off:.4f}")
    scale = float(1.0 / lat[:n].std())
    vae.register_to_config(scaling_factor=scale)
    lat = lat * scale
    log(f"latents: scaling_factor {scale:.4f}")

    # ---- stage 2: UNet + text encoder
    records: list[torch.Tensor] = []
    procs = install_processors(unet, records)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    install_processors(ema_unet, records)  # deepcopy gave the copy its own records list
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())
    g = torch.Generator().manual_seed(args.seed + 20)
    start = 0
    ckpt_path = args.work / "ckpt.pt"
    if args.resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False)
        unet.load_state_dict(ck["unet"]), text_encoder.load_state_dict(ck["text"])
        ema_unet.load_state_dict(ck["ema_unet"]), ema_text.load_state_dict(ck["ema_text"])
        opt.load_state_dict(ck["opt"])
        g.set_state(ck["gen"])
        start = ck["step"]
        log(f"resumed at step {start}")
    acp = scheduler.alphas_cumprod
    t0, hist = time.time(), {"eps": [], "align": []}
    for step in range(start, args.steps):
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, args.steps, args.lr, 300)
        idx = torch.randint(0, n, (args.batch,), generator=g)
        cond = torch.rand(args.batch, generator=g) >= args.cond_drop
        ids = torch.where(cond[:, None], ids_all[idx], ids_empty[None])
        x0 = lat[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (args.batch,), generator=g)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        enc = text_encoder(ids)[0]
        records.clear()
        for p in procs:
            p.recording = args.align_weight > 0
        eps = unet(xt, t, enc).sample
        l_eps = F.mse_loss(eps, noise)
        if records and cond.any():
            l_align = alignment_loss(records, cond, lab_all[idx], pos_all[idx])
        else:
            l_align = torch.zeros(())
        records.clear()
        loss = l_eps + args.align_weight * l_align
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - decay)
        hist["eps"].append(l_eps.item())
        hist["align"].append(l_align.item())
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            el = time.time() - t0
            log(f"step {done} eps {np.mean(hist['eps'][-args.log_every:]):.4f} align "
                f"{np.mean(hist['align'][-args.log_every:]):.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"({el/(done-start):.3f}s/step, total {(time.time()-t_start)/60:.1f} min)")
        out_of_time = args.max_minutes is not None and time.time() - t_start > 60 * args.max_minutes
        if out_of_time:
            log(f"out of time at step {done} of {args.steps}")
        out_of_time = out_of_time or (args.stop_at is not None and done >= args.stop_at)
        if done % args.ckpt_every == 0 or done == args.steps or out_of_time:
            held = slice(n, n + args.n_held)
            miou = probe_miou(ema_unet, ema_text, tokenizer, captions[held], lat[held], lab_all[held], pos_all[held],
                              scheduler)
            log(f"step {done} probe mIoU (EMA, own maps, t=200/400/600, {args.n_held} held-out scenes): {miou:.3f}")
            torch.save({"unet": unet.state_dict(), "text": text_encoder.state_dict(), "ema_unet": ema_unet.state_dict(),
                        "ema_text": ema_text.state_dict(), "opt": opt.state_dict(), "gen": g.get_state(), "step": done,
                        "hist": hist}, ckpt_path)
            export(args.work / "model", vae, ema_unet, ema_text, scheduler)
            log(f"checkpoint + export at step {done}")
        if out_of_time:
            break
    export(args.out, vae, ema_unet, ema_text, scheduler)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    log(f"exported {args.out} ({size/1e6:.2f} MB); total {(time.time()-t_start)/60:.1f} min")


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
