"""`daam-fast analyze` on any well-formed file: figures bounded in pixels whatever the maps' aspect ratio, and every
file kind read through the one loader (SD3's T5 maps kept, as the Python API sees them)."""

import pytest
import torch

from daam_fast import GlobalHeatMap, figures, load, session, trace
from daam_fast import analysis as A
from daam_fast.report import FIGURE_IMAGE_SIDE
from daam_fast.tokens import tokenize_prompt
from tests.fixtures.pipelines import clip_tokenizer, tiny_pipeline


@pytest.mark.parametrize("hw", [(300, 1), (1, 300), (2, 301)])  # tall, wide, odd: far from square
def test_figures_are_bounded_in_pixels_whatever_the_aspect(tmp_path, monkeypatch, hw):
    tokens = tokenize_prompt(clip_tokenizer(), "a red circle")
    maps = torch.rand(tokens.n_tokens(), *hw, generator=torch.Generator().manual_seed(0))
    path = GlobalHeatMap(tokens, maps, meta={"model": "test"}).save(tmp_path / "maps.safetensors")
    drawn = []  # every size a map is up-sampled to for a figure
    real = figures._upsample
    monkeypatch.setattr(figures, "_upsample", lambda m, size: drawn.append(tuple(size)) or real(m, size))
    report = session.analyze([path], tmp_path / "out")
    assert drawn and max(max(s) for s in drawn) <= FIGURE_IMAGE_SIDE  # was 256 x 76800 for a 300 x 1 map
    for fig in report["figures"].values():
        assert fig["width"] <= 2000 and fig["height"] <= 2000


def test_figures_draw_a_large_image_at_a_bounded_size(tmp_path, monkeypatch):
    from PIL import Image

    tokens = tokenize_prompt(clip_tokenizer(), "a red circle")
    path = GlobalHeatMap(tokens, torch.rand(tokens.n_tokens(), 4, 6)).save(tmp_path / "maps.safetensors")
    Image.new("RGB", (3000, 2000), (10, 20, 30)).save(tmp_path / "image.png")
    drawn = []
    real = figures._upsample
    monkeypatch.setattr(figures, "_upsample", lambda m, size: drawn.append(tuple(size)) or real(m, size))
    report = session.analyze([path], tmp_path / "out")
    large = [s for s in drawn if max(s) > FIGURE_IMAGE_SIDE]
    assert large == [(2000, 3000)] * 3  # only the 3 words' overlay files keep the image's size, no figure
    with Image.open(tmp_path / "out" / report["runs"][0]["overlays"]["red"]) as im:
        assert im.size == (3000, 2000)


@pytest.fixture(scope="module")
def sd3_maps(tmp_path_factory):
    """An SD3 maps file whose last words are past CLIP's 77-token window but inside T5's."""
    pipe = tiny_pipeline("sd3")
    prompt = "a red circle " * 26 + "and a blue square"
    with trace(pipe) as tc:
        pipe(prompt, num_inference_steps=1, height=32, width=32, output_type="latent",
             generator=torch.Generator().manual_seed(0))  # fmt: skip
        gm = tc.compute_global_heat_map()
    return gm.save(tmp_path_factory.mktemp("sd3") / "maps.safetensors")


def test_analyze_keeps_sd3_t5_maps_as_the_python_api_does(sd3_maps, tmp_path):
    api = load(sd3_maps)
    assert [s for s in api.sources] == ["clip", "t5"]
    report = session.analyze([sd3_maps], tmp_path / "out", words=["square", "red"])  # "square": T5 only
    influence = {r["word"]: r["share"] for r in report["runs"][0]["influence"]}
    expected = {r.word: r.share for r in A.word_influence(api)}
    assert influence.keys() == expected.keys() and "square" in influence
    for word, share in expected.items():
        assert influence[word] == pytest.approx(share, rel=1e-6)
    everything = session.analyze([sd3_maps], tmp_path / "all")
    assert "square" in everything["words"]  # every word of every text source
