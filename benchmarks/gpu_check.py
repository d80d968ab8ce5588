"""Full-size GPU check (run by ``benchmarks/gpu_check.sh``): SDXL at 1024² fp16, 20 steps, vanilla vs
traced vs DAAM-style, then Flux.1 at 1024² bf16 when it fits; random weights from the real configs.

Writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out``. Timings: one untimed warm-up call per
variant, then interleaved rounds with ``torch.cuda.synchronize()`` around each call; memory is the
peak of ``torch.cuda.max_memory_allocated()`` during a call above what was allocated at its start.
Pipeline calls use ``output_type="latent"`` (no VAE decode: tracing does not touch it).

``--tiny-cpu`` runs the same flow with tiny models on the CPU: it checks the script, not the GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

from benchmarks import harness
from benchmarks.compare import compare_pipeline

PROMPT = "a photograph of an astronaut riding a horse"


def _flux_pipeline(device: str, dtype: torch.dtype, tiny: bool):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tcfg = harness.load_config("flux", "transformer")
    vcfg = harness.load_config("flux", "vae")
    if tiny:
        tcfg.update(
            num_layers=1,
            num_single_layers=1,
            num_attention_heads=2,
            attention_head_dim=16,
            axes_dims_rope=[4, 6, 6],
            joint_attention_dim=32,
            pooled_projection_dim=32,
            in_channels=64,
        )
        vcfg.update(block_out_channels=[8, 8, 8, 8], norm_num_groups=4)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    # Initialise directly in bf16 on the device: 12 B parameters would need 48 GB in fp32.
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            transformer = FluxTransformer2DModel.from_config(tcfg).eval()
            vae = AutoencoderKL.from_config(vcfg).eval()
    finally:
        torch.set_default_dtype(previous)
    from tests.fixtures.pipelines import clip_tokenizer, t5_tokenizer

    # Tokenizers only name the prompt's words for the tracer (the real CLIP BPE; a tiny offline T5
    # sentencepiece model stands in for T5's): the text encoders are replaced by random embeddings below.
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(harness.load_config("flux", "scheduler")),
        vae=vae,
        text_encoder=None,
        tokenizer=clip_tokenizer(),
        text_encoder_2=None,
        tokenizer_2=t5_tokenizer(),
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    # Random T5 / CLIP outputs in place of the text encoders (T5-XXL adds 4.7 B parameters and a
    # tokenizer file this offline check does not have); the transformer sees real shapes: 512 text tokens.
    g = torch.Generator(device="cpu").manual_seed(0)
    embeds = torch.randn(1, 512, tcfg["joint_attention_dim"], generator=g).to(device, dtype)
    pooled = torch.randn(1, tcfg["pooled_projection_dim"], generator=g).to(device, dtype)
    return pipe, embeds, pooled


def run_flux(device: str, size: int, steps: int, rounds: int, tiny: bool) -> dict:
    """Vanilla vs traced Flux (traced only when daam_fast's tracer accepts the pipeline)."""
    from daam_fast import trace

    dtype = torch.bfloat16
    pipe, embeds, pooled = _flux_pipeline(device, dtype, tiny)

    def call():
        pipe(
            prompt_embeds=embeds,
            pooled_prompt_embeds=pooled,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=3.5,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        )

    variants = {"vanilla": call}
    notes = []
    try:
        with trace(pipe):
            pass
    except Exception as exc:  # any refusal is a result to report, not a crash of the check
        notes.append(f"traced: skipped, daam_fast.trace refused FluxPipeline: {type(exc).__name__}: {exc}")
    else:

        # The check feeds random T5 embeddings (no prompt reaches the pipeline), so a default trace captures every
        # one of the 512 text positions; a real call with this prompt captures only the prompt's own positions
        # (the T5 tokens and </s>), which `tokens=` reproduces here.
        n_prompt = len(pipe.tokenizer_2(PROMPT).input_ids)

        def traced(tokens=None):
            with trace(pipe, tokens=tokens) as tc:
                call()
                tc.compute_global_heat_map(prompt=PROMPT)

        variants["traced (all 512 positions)"] = traced
        variants[f"traced (prompt's {n_prompt} positions)"] = lambda: traced(range(n_prompt))
    notes.append("daam_style: n/a (daam 0.2.0 supports UNet pipelines only)")
    with torch.no_grad():
        res = harness.interleaved(variants, rounds, device=device)
    return {"results": res, "notes": notes, "shape": {"size": size, "steps": steps, "rounds": rounds}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gpu-check-out")
    ap.add_argument("--sdxl-steps", type=int, default=20)
    ap.add_argument("--flux-steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=280.0, help="skip Flux when less than its estimate is left")
    ap.add_argument("--tests-rc", type=int, default=None, help="exit status of the GPU test run, for the report")
    ap.add_argument("--tiny-cpu", action="store_true", help="tiny models on the CPU: checks the script only")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    if args.tiny_cpu:
        device, size = "cpu", 64
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        print("gpu_check needs a CUDA GPU (torch.cuda.is_available() is False); nothing was run.")
        return 0
    else:
        device, size = "cuda", 1024
    report: dict = {"machine": harness.machine_info(device), "tests_rc": args.tests_rc, "tiny_cpu": args.tiny_cpu}
    md = ["# daam_fast GPU check", "", "Machine: " + ", ".join(f"{k}={v}" for k, v in report["machine"].items())]
    if args.tests_rc is not None:
        md.append(f"\nGPU tests (`pytest -m gpu tests/`): exit status {args.tests_rc}")

    # SDXL
    sdxl_kind = "fp16" if device == "cuda" else "tiny model, fp32"
    try:
        if args.tiny_cpu:
            from tests.fixtures.pipelines import tiny_sdxl_pipeline

            pipe = tiny_sdxl_pipeline()
        else:
            pipe = harness.build_sdxl_pipeline(torch.float16, device)
        with torch.no_grad():
            sdxl = compare_pipeline(
                pipe, PROMPT, height=size, width=size, steps=args.sdxl_steps, rounds=args.rounds, device=device
            )
        report["sdxl"] = sdxl
        md += [
            "",
            harness.comparison_table(
                f"SDXL base 1.0 architecture (random weights), {size}², {sdxl_kind}, {args.sdxl_steps} steps, CFG",
                sdxl["results"],
                mem_label="peak CUDA memory above the call's start" if device == "cuda" else "peak RSS",
            ),
            "",
            f"- heat buffers: {sdxl['heat_buffer_bytes_per_image'] / 1e6:.2f} MB per image "
            f"{sdxl['heat_buffer_shapes']}; DAAM-style keeps {sdxl['daam_style_maps']} maps, "
            f"{sdxl['daam_style_store_bytes'] / 1e6:.1f} MB per image",
        ]
        del pipe
    except Exception:
        report["sdxl_error"] = traceback.format_exc()
        md += ["", "SDXL: failed:", "```", report["sdxl_error"], "```"]
    if device == "cuda":
        torch.cuda.empty_cache()

    _write(out, report, md)  # partial results survive if the Flux part is cut off by the shell's timeout

    # Flux: 0.18 s (vanilla) to 0.24 s (traced, every text position) per step at 1024² measured on an H200
    # (×3 variants, warm-up + rounds), plus about a minute of building.
    left = args.budget_s - (time.perf_counter() - start)
    estimate = 60 + 3 * (args.rounds + 1) * args.flux_steps * 0.25
    if device == "cuda" and left < estimate:
        report["flux_skipped"] = f"not enough time left ({left:.0f} s < estimate {estimate:.0f} s)"
        md += ["", f"Flux: skipped, {report['flux_skipped']}"]
    else:
        try:
            flux = run_flux(device, size, args.flux_steps if not args.tiny_cpu else 2, args.rounds, args.tiny_cpu)
            report["flux"] = flux
            md += [
                "",
                harness.comparison_table(
                    f"Flux.1-dev architecture (random weights, random text embeddings), {size}², bf16, "
                    f"{flux['shape']['steps']} steps",
                    flux["results"],
                    mem_label="peak memory above the call's start",
                ),
                "",
            ] + [f"- {n}" for n in flux["notes"]]
        except Exception:
            report["flux_error"] = traceback.format_exc()
            md += ["", "Flux: failed:", "```", report["flux_error"], "```"]
    report["wall_s"] = time.perf_counter() - start
    _write(out, report, md)
    print("\n".join(md))
    return 0


def _write(out: Path, report: dict, md: list[str]) -> None:
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_check.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    sys.exit(main())
