"""``daam-fast`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

__all__ = ["main"]

logger = logging.getLogger("daam_fast.cli")


def _demo(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from tqdm import tqdm

    from . import trace
    from .testing import tiny_sd_pipeline

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Until a trained demo model ships, the demo runs a tiny random-weight pipeline: it shows the
    # plumbing and the outputs, not meaningful attributions.
    tqdm.write("daam-fast demo: tiny RANDOM-WEIGHT SD pipeline (maps show the tool, not real attributions)")
    pipe = tiny_sd_pipeline()
    prompt = args.prompt
    with trace(pipe) as tc:
        image = pipe(
            prompt,
            num_inference_steps=args.steps,
            height=64,
            width=64,
            generator=torch.Generator().manual_seed(args.seed),
        ).images[0]
        gm = tc.compute_global_heat_map()
    image = image.resize((256, 256))
    image.save(out / "image.png")
    gm.save(out / "maps.safetensors", seed=args.seed)
    words = [w.text for w in gm.tokens.words]
    for word in tqdm(dict.fromkeys(words), desc="overlays", unit="word"):
        fig, ax = plt.subplots(figsize=(4, 4))
        gm.compute_word_heat_map(word).plot_overlay(image, ax=ax, title=f"{word} (random-weight demo)")
        fig.savefig(out / f"overlay_{word}.png", bbox_inches="tight")
        plt.close(fig)
    tqdm.write(f"wrote {out}/image.png, maps.safetensors and {len(set(words))} overlays")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="daam-fast", description="DAAM heat maps for diffusers pipelines.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser(
        "demo",
        help="generate with the demo model and write per-word overlays",
        epilog="example: daam-fast demo --out daam-out",
    )
    d.add_argument("--out", default="daam-out", help="output folder (default: daam-out)")
    d.add_argument("--prompt", default="a red circle and a blue square")
    d.add_argument("--steps", type=int, default=10)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    d.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``daam-fast`` command; returns the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
