"""``daam-fast`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from . import loading, session
from .session import UsageError

__all__ = ["main"]

logger = logging.getLogger("daam_fast.cli")


def _demo(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from .demo import DEFAULT_PROMPTS, run_demo

    session.check_out_dir(args.out)
    torch.set_num_threads(args.threads)
    # The demo model (daam_fast/demo/model, trained here with an attention-alignment loss) shows the tool
    # and checks its plumbing; its maps say nothing about how faithful attention is on real models.
    prompts = [args.prompt] if args.prompt else list(DEFAULT_PROMPTS)
    results = run_demo(args.out, prompts=prompts, steps=args.steps, seed=args.seed)
    n_files = sum(len(r["files"]) for r in results)
    tqdm.write(f"wrote {n_files} images and overlays for {len(results)} prompt(s) to {args.out}/")
    return 0


# ----------------------------------------------------------------------------------------------- generate / analyze
REPORT_EPILOG = """\
examples:
  daam-fast generate --model ./my-sd-folder --prompt "a red circle and a blue square" --words red circle
  daam-fast generate --model runwayml/stable-diffusion-v1-5 --prompt "a cat on a sofa" \\
      --negative-prompt "blurry" --seeds 0-7 --steps 30 --size 512x512 --out cat-run
  daam-fast generate --model ./dreamshaper_8.safetensors --config ./sd15-configs --offload model \
      --prompt "a castle on a hill"      (a WebUI-style single-file checkpoint, offline)
  daam-fast generate --model demo --prompt "a red circle and a blue square"   (the shipped demo model)
  daam-fast analyze cat-run/seed0/maps.safetensors --words cat sofa --out cat-analysis

outputs (paths relative to --out):
  report.json                 the analysis (fields below)
  seed<S>/image.png           the generated image of seed S
  seed<S>/maps.safetensors    per-token heat maps (daam_fast.load / daam-fast analyze)
  seed<S>/negative_maps.safetensors   negative-prompt maps (with --negative-prompt)
  seed<S>/overlays/NN_<word>.png      each word's map over the image, at the image's size
  seed<S>/overlay_grid.png, overlap.png, dominance.png[, negative_overlay_grid.png]   figures
  seed_sweep.png              maps across seeds (2+ seeds); time_profile.png: per-step strip (first seed)

report.json fields:
  daam_fast_version, command ("generate" | "analyze" | "ui"), model, prompt, negative_prompt, words (analysed),
  seeds, steps, size ([width, height] of the images), guidance_scale (as used; the pipeline's default if not given),
  runs: one per seed: {seed, image, maps, negative_maps, overlays {word: png}, influence [{word, share, mass}]
        ranked (share of all prompt tokens' attribution, start/end/padding excluded), negative_influence,
        overlap {words, iou [[..]], pearson [[..]]}, dominance_area {word: fraction of pixels}},
  seed_sweep: {seeds, stability {word: mean pairwise Pearson across seeds}, figure} or null (one seed),
  time_profile: {seed, words, phases {early|middle|late: [start, stop)}, share [[step][word]],
        mass [[step][word]], figure} or null,
  figures: {name: {path, width, height}} every figure PNG with its pixel size.
  Undefined numbers (e.g. the correlation of a constant map) are null.

exit codes: 0 ok, 2 bad arguments (one-line message), 1 runtime failure (model failed to load or run).
"""


def _quiet_third_party(quiet: bool) -> None:
    # The command decides what its user sees. Other libraries' notices a command-line user cannot act on
    # (transformers: "CLIPImageProcessor requires torchvision", logged when diffusers' pipelines are imported;
    # diffusers' loading chatter) stay out of the console; errors still show. Set before diffusers is imported.
    warnings.filterwarnings("ignore", module=r"(diffusers|transformers|huggingface_hub|accelerate)(\.|$)")
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    for lib in (tlogging, dlogging):
        lib.set_verbosity_error()
        if quiet:
            lib.disable_progress_bar()


def _size(args: argparse.Namespace) -> str:
    """``--size``, by default the model's own: 32x32 for the demo model (what it was trained at), else 512x512.
    (``ui``: its first ``--model``, the demo model when none is given.)"""
    model = args.model[0] if isinstance(args.model, list) and args.model else args.model or loading.DEMO
    return args.size or ("32x32" if model == loading.DEMO else "512x512")


def _load(args: argparse.Namespace, **kw):
    """The pipeline of ``--model`` with the model options of :func:`_model_options`."""
    return session.load_pipeline(
        args.model,
        args.device,
        dtype=args.dtype,
        config=args.config,
        offload=args.offload,
        vae_tiling=args.vae_tiling,
        **kw,
    )


def _generate(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    request = session.make_request(
        args.prompt,
        seeds=args.seeds,
        size=_size(args),
        steps=args.steps,
        negative_prompt=args.negative_prompt,
        guidance_scale=args.guidance_scale,
        words=args.words,
        time_profile=not args.no_time_profile,
    )
    session.check_model(args.model, args.config)
    session.check_device(args.device)
    session.check_out_dir(args.out)
    torch.set_num_threads(args.threads)
    pipe = _load(args, quiet=args.quiet)
    report = session.generate(pipe, request, Path(args.out), model=args.model, progress=not args.quiet)
    if not args.quiet:
        path = Path(args.out) / "report.json"
        tqdm.write(f"wrote {len(report['runs'])} run(s) and {len(report['figures'])} figures; report: {path}")
    return 0


def _analyze(args: argparse.Namespace) -> int:
    if len(args.maps) == 1 and Path(args.maps[0]).is_dir():
        return _analyze_batch(args)
    out = session.check_out_dir(args.out or "daam-analysis")
    report = session.analyze(args.maps, out, words=args.words, image=args.image)
    print(f"wrote {len(report['figures'])} figures; report: {out / 'report.json'}")
    return 0


# ---------------------------------------------------------------------------------------------------------- batch
def _analyze_batch(args: argparse.Namespace) -> int:
    from . import batch

    if args.image:
        raise UsageError("--image works with maps files; a batch folder uses each item's own image")
    out = Path(args.out or args.maps[0])
    summary = batch.summarize(args.maps[0], out, words=args.words, command="analyze")
    n = summary["items"]
    print(
        f"summarised {n['ok']} finished item(s) of {len(summary['prompts'])} prompt(s) ({n['failed']} failed); "
        f"{len(summary['figures'])} figures; summary: {out / 'summary.json'}"
    )
    return 0


def _batch(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from . import batch

    specs = batch.read_prompts(
        args.prompts,
        seeds=args.seeds,
        steps=args.steps,
        size=_size(args),
        negative_prompt=args.negative_prompt,
        guidance_scale=args.guidance_scale,
        words=args.words,
    )
    session.check_model(args.model)
    session.check_device(args.device)
    engine = batch.make_engine(
        args.engine, args.model, args.device, workers=args.workers, address=args.ray_address, threads=args.threads
    )
    if args.engine == "local":
        torch.set_num_threads(args.threads or 2)
    _quiet_third_party(quiet=True)  # one items bar: not the libraries' loading bars per pipeline component
    result = batch.run_batch(
        specs,
        args.out,
        engine,
        model=args.model,
        guidance_scale=args.guidance_scale,
        words=args.words,
        progress=not args.quiet,
    )
    for rec in result.failed[:10]:
        print(f"failed: {rec['id']}: {rec['error']}", file=sys.stderr)
    if len(result.failed) > 10:
        print(f"... and {len(result.failed) - 10} more (index.jsonl has every error)", file=sys.stderr)
    if not args.quiet:
        tqdm.write(
            f"{result.planned} item(s): {result.ok} done now, {result.skipped} done before, {len(result.failed)} "
            f"failed; index: {result.out / 'index.jsonl'}; summary: {result.out / 'summary.json'}"
        )
    return 0 if not result.failed else BATCH_FAILED + min(len(result.failed), 100)


def _ui(args: argparse.Namespace) -> int:
    import torch

    from .ui import make_server

    size = _size(args)
    session.parse_size(size)
    session.parse_steps(args.steps)
    singles = [m for m in args.model or [] if Path(m).expanduser().is_file()]
    if args.config is not None and not singles:
        raise UsageError("--config applies to single-file checkpoints (.safetensors / .ckpt) only")
    models = [session.check_model(m, args.config if m in singles else None) for m in args.model or []]
    session.check_device(args.device)
    torch.set_num_threads(args.threads)
    options = dict(dtype=args.dtype, config=args.config, offload=args.offload, vae_tiling=args.vae_tiling)
    try:
        server = make_server(
            args.host,
            args.port,
            model=models,
            steps=args.steps,
            size=size,
            device=args.device,
            workdir=args.workdir,
            load_options=options,
        )
    except OSError as exc:
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    host, port = server.server_address[:2]
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}: anyone who can reach it can run the model", file=sys.stderr)
    print(f"daam-fast UI on http://{host}:{port}/  (Ctrl-C to stop; outputs in {server.workdir})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _check_numbers(args: argparse.Namespace) -> None:
    """The numeric options every command has, checked before the command does anything."""
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise UsageError(f"--threads {threads}: must be at least 1")
    port = getattr(args, "port", None)
    if port is not None and not 0 <= port <= 65535:
        raise UsageError(f"--port {port}: must be 0..65535 (0: any free port)")
    seed = getattr(args, "seed", None)
    if seed is not None and not 0 <= seed <= session.MAX_SEED:
        raise UsageError(f"--seed {seed}: must be an integer 0..{session.MAX_SEED}")
    if args.command == "demo":
        session.parse_steps(args.steps)


#: ``daam-fast batch`` exits with this plus the number of failed items (at most 100).
BATCH_FAILED = 10

BATCH_EPILOG = """\
examples:
  daam-fast batch prompts.txt --model demo --seeds 0-7 --words red circle blue square --out shapes-batch
  daam-fast batch prompts.jsonl --model ./sdxl --engine ray --out dataset        # one actor per GPU
  daam-fast batch prompts.jsonl --model /models/sdxl --engine ray --ray-address auto --out dataset  # a cluster
  daam-fast analyze shapes-batch                  # the summary again (also on a partial batch)

PROMPTS: a text file, one prompt a line, or JSONL (*.jsonl) with the fields
  prompt (required), id, negative_prompt, seeds ("0-7", 3 or [1, 4]), steps, size ("WxH" or [w, h]);
  a line's fields override the options. Default ids: a slug of the prompt and 8 hex digits of its hash.

outputs (paths relative to --out):
  index.jsonl                      one line per finished item: id, prompt_id, prompt, negative_prompt, seed,
                                   steps, size, guidance_scale, status (ok|failed), complete, nonfinite, error,
                                   image, maps, negative_maps, bytes, influence [{word, share, mass}], seconds, worker
  items/<id>/image.png, maps.safetensors[, negative_maps.safetensors]     each written atomically
  summary.json, summary/*.png      the dataset summary (docs/BATCH.md); batch.json: the batch's settings

Rerunning the same command skips finished items and redoes the rest (failed ones too); a second batch on the
same --out is refused while the first runs. Settings a finished item depends on must stay the same.

exit codes: 0 ok, 2 bad arguments or prompts file (before anything runs), 1 runtime failure,
  10 + N when N items failed (at most 110; the others are written).
"""

MODEL_HELP = (
    "diffusers pipeline folder, hub id (needs network), a single-file checkpoint (.safetensors / .ckpt: SD 1.x/2.x "
    "or SDXL, as WebUIs use them), or 'demo' (the demo model shipped with daam_fast)"
)


def _model_options(p: argparse.ArgumentParser) -> None:
    """Where the model's weights run: device, dtype, offload, VAE tiling, and configs for single files."""
    p.add_argument("--config", default=None, help="with a single-file --model: a diffusers folder of the same kind "
                   "of model (configs and tokenizers; no weights needed) to load it offline")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=loading.DTYPES,
                   help="weights' dtype (default auto: on CUDA fp16 for SD/SDXL, bf16 for SD3/Flux; on the CPU fp32)")
    p.add_argument("--offload", default=None, choices=loading.OFFLOAD_MODES,
                   help="keep weights on the CPU and move each model (model) or each layer (sequential, slowest, "
                   "least memory) to the GPU when it runs; needs accelerate")
    p.add_argument("--vae-tiling", action="store_true", help="decode the image in tiles (less memory at large sizes)")


SIZE_HELP = "image WIDTHxHEIGHT, multiples of 8 (default 512x512; the demo model: 32x32)"


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so main() decides the exit code and message."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message}")


def _parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    p = _Parser(
        prog="daam-fast",
        description="DAAM heat maps for diffusers pipelines.",
        formatter_class=raw,
        epilog="run `daam-fast COMMAND --help` for a command's options and outputs",
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    d = sub.add_parser(
        "demo",
        help="generate with the bundled demo model and write images, per-word overlays and dominance figures",
        epilog="examples: daam-fast demo --out daam-out\n"
        '          daam-fast demo --prompt "a white square and a red triangle"',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d.add_argument("--out", default="daam-out", help="output folder (default: daam-out)")
    d.add_argument(
        "--prompt",
        default=None,
        help="one prompt (colours red/green/blue/yellow/white, shapes circle/square/triangle); "
        "default: three built-in prompts",
    )
    d.add_argument("--steps", type=int, default=20)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    d.set_defaults(func=_demo)

    g = sub.add_parser(
        "generate",
        help="generate images with a diffusers model and write heat maps, figures and report.json",
        description="Generate one prompt over one or more seeds, trace the heat maps, analyse and plot them.",
        epilog=REPORT_EPILOG,
        formatter_class=raw,
    )
    g.add_argument("--model", required=True, help=MODEL_HELP)
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default=None, help="also trace and analyse the negative prompt's words")
    g.add_argument("--words", nargs="+", default=None, help="words to analyse (default: every prompt word)")
    g.add_argument("--seeds", default="0", help="seeds: 3, 0-7 or 1,4,9 (default 0)")
    g.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    g.add_argument(
        "--size", default=None, help="image WIDTHxHEIGHT, multiples of 8 (default 512x512; the demo model: 32x32)"
    )
    g.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="classifier-free guidance (default: the pipeline's own: SD 7.5, SDXL 5.0, SD3 7.0, Flux 3.5)",
    )
    g.add_argument("--out", default="daam-out", help="output folder (default daam-out)")
    _model_options(g)
    g.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    g.add_argument("--no-time-profile", action="store_true", help="skip the per-step maps of the first seed")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.set_defaults(func=_generate)

    a = sub.add_parser(
        "analyze",
        help="re-run the analysis and figures on saved maps (*.safetensors)",
        description="Analyse saved maps: influence, overlap, dominance, figures; several files = a seed sweep.",
        epilog="examples:\n  daam-fast analyze daam-out/seed0/maps.safetensors --words red circle --out again\n"
        "  daam-fast analyze daam-out/seed*/maps.safetensors --out sweep\n"
        "  daam-fast analyze my-batch      # a `daam-fast batch` folder: its summary.json and summary/*.png again\n\n"
        "The image next to each maps file (image.png) is used for overlays when present, or --image.\n"
        "Writes overlay_grid.png, overlap.png, dominance.png, overlays/ (with an image), seed_sweep.png\n"
        "(2+ files) and report.json with the fields of `daam-fast generate --help` (command: analyze).\n"
        "exit codes: 0 ok, 2 bad arguments or unreadable maps file, 1 runtime failure.",
        formatter_class=raw,
    )
    a.add_argument(
        "maps", nargs="+", help="maps file(s) written by generate, demo or GlobalHeatMap.save; or a batch folder"
    )
    a.add_argument("--words", nargs="+", default=None, help="words to analyse (default: every prompt word)")
    a.add_argument("--image", default=None, help="image for the overlays (one maps file only)")
    a.add_argument("--out", default=None, help="output folder (default daam-analysis; a batch folder: itself)")
    a.set_defaults(func=_analyze)

    b = sub.add_parser(
        "batch",
        help="many prompts x seeds: images, maps and an index per item, resumable, locally or on Ray; a summary",
        description="Run every prompt of PROMPTS over its seeds, write each item's image and maps, index and "
        "summarise them.",
        epilog=BATCH_EPILOG,
        formatter_class=raw,
    )
    b.add_argument("prompts", metavar="PROMPTS", help="text file (one prompt a line) or JSONL (*.jsonl)")
    b.add_argument("--model", required=True, help=MODEL_HELP)
    b.add_argument("--out", required=True, help="output folder (created; a rerun resumes it)")
    b.add_argument("--seeds", default="0", help="seeds of every prompt: 3, 0-7 or 1,4,9 (default 0)")
    b.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    b.add_argument("--size", default=None, help=SIZE_HELP)
    b.add_argument("--guidance-scale", type=float, default=None, help="default: the pipeline's own")
    b.add_argument("--negative-prompt", default=None, help="negative prompt of every item (JSONL lines may override)")
    b.add_argument("--words", nargs="+", default=None, help="words to summarise, each in every prompt (default all)")
    b.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    b.add_argument("--engine", choices=("local", "ray"), default="local", help="local (default) or ray")
    b.add_argument("--workers", type=int, default=None, help="ray: actors (default one per GPU, else CPUs/threads)")
    b.add_argument("--ray-address", default=None, help="ray: a running cluster (default: start a local Ray)")
    b.add_argument("--threads", type=int, default=None, help="torch CPU threads (local: default 2; ray: per actor, 1)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_batch)

    u = sub.add_parser(
        "ui",
        help="a local web page: prompt in, image, clickable word overlays, overlap and dominance out",
        description="Serve the daam-fast web UI (standard library http.server; no extra packages).",
        epilog="examples:\n  daam-fast ui                (the demo model)\n  daam-fast ui --model ./my-sd-folder\n"
        "  daam-fast ui --model ./dreamshaper_8.safetensors --config ./sd15-configs --offload model\n"
        "  daam-fast ui --model ./my-sd-folder --port 8080 "
        "--steps 10 --size 256x256\n\nListens on 127.0.0.1 only unless --host says otherwise. Outputs of each "
        "request\n(the same files as `daam-fast generate`) go under --workdir (default: a new temp folder).",
        formatter_class=raw,
    )
    u.add_argument(
        "--model",
        nargs="+",
        action="extend",
        default=None,
        help=f"the model(s) the page offers, each a {MODEL_HELP}; the first is the default; the demo model is "
        "always offered (the default when no --model is given)",
    )
    u.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    u.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 = any free port)")
    u.add_argument("--steps", type=int, default=20, help="default steps of the page (default 20)")
    u.add_argument(
        "--size", default=None, help="default WIDTHxHEIGHT of the page (default 512x512; the demo model: 32x32)"
    )
    _model_options(u)
    u.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    u.add_argument("--workdir", default=None, help="folder for the outputs (default: a new temp folder)")
    u.set_defaults(func=_ui)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``daam-fast`` command; returns the exit code (0 ok, 2 bad arguments, 1 failure)."""
    try:
        args = _parser().parse_args(argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        _check_numbers(args)
        if args.command != "analyze":  # demo and ui show their own progress, not the libraries' loading bars
            _quiet_third_party(args.command in ("demo", "ui", "batch") or args.quiet)
        return args.func(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        logger.debug("daam-fast %s failed", args.command, exc_info=True)
        print(
            f"error: {exc}" if isinstance(exc, RuntimeError) else f"error: {type(exc).__name__}: {exc}", file=sys.stderr
        )
        print("(set DAAM_FAST_DEBUG=1 for the traceback)", file=sys.stderr)
        if os.environ.get("DAAM_FAST_DEBUG"):
            raise
        return 1


if __name__ == "__main__":
    sys.exit(main())
