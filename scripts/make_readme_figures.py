"""Write one figure of each kind into docs/figures/ (for the README).

    python scripts/make_readme_figures.py [--model PATH_OR_ID] [--out docs/figures]

Without --model it uses tests.fixtures.pipelines.tiny_sd_pipeline(): random weights, so the figures show the layout,
not meaningful attributions (their titles say so). With a real model pass --size 512x512 --steps 30.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # daam_fast and tests.fixtures from this checkout

from daam_fast import analysis as A  # noqa: E402
from daam_fast import figures as Fg  # noqa: E402
from daam_fast import generation as G  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local diffusers folder or hub id (default: tiny random pipeline)")
    p.add_argument("--prompt", default="a red circle and a blue square")
    p.add_argument("--words", nargs="+", default=["red", "circle", "blue", "square"])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--size", default="64x64", help="WxH")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--out", default="docs/figures")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.model:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(args.model)
        pipe.set_progress_bar_config(disable=True)
        model = args.model
    else:
        from tests.fixtures.pipelines import tiny_sd_pipeline

        pipe = tiny_sd_pipeline()
        model = "tiny random-weight SD (layout demo)"
    w, h = (int(v) for v in args.size.lower().split("x"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kw = dict(num_inference_steps=args.steps, height=h, width=w)
    gens = G.run_seed_sweep(pipe, args.prompt, range(args.seeds), **kw)
    gen, gm = gens[0], gens[0].maps
    image = gen.image.resize((256, 256 * h // w))
    written = {
        "overlays.png": Fg.overlay_grid(image, gm, args.words, model=model),
        "overlap.png": Fg.overlap_figure(A.concept_overlap(gm, args.words), model=model),
        "dominance.png": Fg.dominance_figure(A.dominance_map(gm, args.words), image, model=model),
        "seed_sweep.png": Fg.seed_sweep_figure(A.seed_sweep([g.maps for g in gens], args.words), model=model),
    }
    _, profile = G.trace_time_profile(pipe, args.prompt, 0, args.words, **kw)
    written["time_profile.png"] = Fg.time_profile_figure(profile, model=model)
    for name, fig in written.items():
        size = Fg.save(fig, out / name)
        # 256-colour palette: the committed PNGs stay small; the pixel size is unchanged.
        with Image.open(out / name) as im:
            small = im.convert("RGB").quantize(256)
        small.save(out / name, optimize=True)
        print(f"{out / name}: {size[0]}x{size[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
