"""Write one figure of each kind into docs/figures/ (for the README), and a screenshot of the web UI.

    python scripts/make_readme_figures.py [--model demo|FOLDER|HUB_ID|FILE.safetensors] [--out docs/figures]

By default the figures come from the demo model shipped with daam_fast (32x32 images; its word maps are real,
see its model card), so a reader sees what the analyses show. With a real model pass --size 512x512 --steps 30.
The UI screenshot needs Chromium and chromedriver (scripts/install_browser.sh); without them it is skipped.
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
from daam_fast import loading  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=loading.DEMO, help="demo (default), a diffusers folder, hub id or single file")
    p.add_argument("--prompt", default="a red circle and a blue square")
    p.add_argument("--words", nargs="+", default=["red", "circle", "blue", "square"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", default=None, help="WxH (default: 32x32 for the demo model, else 512x512)")
    p.add_argument("--guidance-scale", type=float, default=None, help="default: 4.0 for the demo model (what "
                   "daam-fast demo uses), else the pipeline's own")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--out", default="docs/figures")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    demo = args.model == loading.DEMO
    pipe = loading.load_pipeline(args.model, "auto", quiet=True)
    model = "daam_fast demo model" if demo else args.model
    w, h = (int(v) for v in (args.size or ("32x32" if demo else "512x512")).lower().split("x"))
    guidance = args.guidance_scale if args.guidance_scale is not None else (4.0 if demo else None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kw = dict(num_inference_steps=args.steps, height=h, width=w)
    if guidance is not None:
        kw["guidance_scale"] = guidance
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
    _ui_screenshot(pipe, args.model, args.prompt, args.steps, f"{w}x{h}", out / "ui.png")
    return 0


def _ui_screenshot(pipe, model: str, prompt: str, steps: int, size: str, path: Path) -> None:
    """The web UI after generating ``prompt`` and clicking its second word, as a reader would see it."""
    import shutil
    import tempfile
    import threading

    from daam_fast.ui import make_server
    from tests.webdriver import Chrome

    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        print(f"{path}: skipped (chromium / chromedriver not installed: scripts/install_browser.sh)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        srv = make_server("127.0.0.1", 0, model=model, steps=steps, size=size, pipelines={model: pipe}, workdir=tmp)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        browser = Chrome(chromium, chromedriver, str(Path(tmp) / "profile"))
        try:
            host, port = srv.server_address[:2]
            browser.get(f"http://{host}:{port}/")
            browser.type(browser.find("#prompt"), prompt)
            browser.click(browser.find("#generate"))
            browser.wait_for("return document.querySelectorAll('#words button').length", what="the word list")
            word = browser.js("return document.querySelectorAll('#words button')[2].dataset.word")
            browser.click(browser.find(f'#words button[data-word="{word}"]'))
            browser.wait_for(
                "const o = document.getElementById('overlay'); return o.complete && o.naturalWidth > 0 && "
                f"o.dataset.word === '{word}'",
                what="the overlay",
            )
            browser.screenshot(path)
        finally:
            browser.quit()
            srv.shutdown()
            srv.server_close()
    print(f"{path}: the web UI ({word!r} clicked)")


if __name__ == "__main__":
    sys.exit(main())
