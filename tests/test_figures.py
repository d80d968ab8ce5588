"""daam_fast.figures: every figure renders to a PNG of the size it reports; overlays keep the image's size."""

import numpy as np
import pytest
import torch
from PIL import Image

from daam_fast import GlobalHeatMap
from daam_fast import analysis as A
from daam_fast import figures as Fg
from daam_fast.tokens import tokenize_prompt
from tests.fixtures.pipelines import clip_tokenizer

WORDS = ["red", "circle", "square"]


@pytest.fixture(scope="module")
def maps():
    tokens = tokenize_prompt(clip_tokenizer(), "a red circle and a blue square")
    g = torch.Generator().manual_seed(0)
    return [
        GlobalHeatMap(tokens, torch.rand(tokens.n_tokens(), 8, 12, generator=g), meta={"seed": s}) for s in range(3)
    ]


@pytest.fixture(scope="module")
def image():
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 72, 3), dtype=np.uint8))


def _check_png(fig, path):
    size = Fg.save(fig, path)
    w, h = fig.get_size_inches() * Fg.DPI
    assert size == (round(w), round(h))
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == size
    return size


def test_every_figure_renders(tmp_path, maps, image):
    gm = maps[0]
    _check_png(Fg.overlay_grid(image, gm, WORDS, model="m"), tmp_path / "grid.png")
    _check_png(Fg.overlap_figure(A.concept_overlap(gm, WORDS), model="m"), tmp_path / "overlap.png")
    _check_png(Fg.dominance_figure(A.dominance_map(gm, WORDS), image, model="m"), tmp_path / "dom.png")
    _check_png(Fg.dominance_figure(A.dominance_map(gm, WORDS)), tmp_path / "dom_noimage.png")
    _check_png(Fg.seed_sweep_figure(A.seed_sweep(maps, WORDS), model="m"), tmp_path / "seeds.png")
    _check_png(Fg.time_profile_figure(A.time_profile(maps, WORDS), model="m"), tmp_path / "time.png")


def test_titles_name_words_and_model(maps, image):
    fig = Fg.overlay_grid(image, maps[0], ["red"], model="my-model")
    titles = [ax.get_title() for ax in fig.axes]
    assert "'red'" in titles and "my-model" in fig._suptitle.get_text()


def test_overlay_image_keeps_size_and_leaves_cold_pixels_alone(image):
    heat = torch.zeros(6, 9)
    heat[0, 0] = 1.0
    out = Fg.overlay_image(image, heat)
    assert out.size == image.size and out.mode == "RGB"
    a, b = np.asarray(out).astype(int), np.asarray(image).astype(int)
    assert np.abs(a[-10:, -10:] - b[-10:, -10:]).max() <= 1  # far from the hot cell: the image unchanged
    assert np.abs(a[0, 0] - b[0, 0]).max() > 10  # on it: coloured
