"""GlobalHeatMap / WordHeatMap: word lookup, daam semantics, expansion, plotting, save/load."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from daam_fast import GlobalHeatMap, HeatMapFileError, load
from daam_fast.tokens import WordNotFoundError, tokenize_prompt
from tests.fixtures.pipelines import clip_tokenizer


@pytest.fixture(scope="module")
def gm():
    tokens = tokenize_prompt(clip_tokenizer(), "a red hippopotamus and a red cat")
    T = tokens.n_tokens()
    maps = torch.arange(T, dtype=torch.float32)[:, None, None].expand(T, 4, 6).clone()
    return GlobalHeatMap(tokens, maps, meta={"model": "test"})


def test_word_map_is_mean_of_its_tokens(gm):
    pos = gm.tokens.positions("hippopotamus")
    assert len(pos) > 1  # several BPE tokens
    wm = gm.compute_word_heat_map("Hippopotamus")
    assert torch.equal(wm.heatmap, torch.full((4, 6), float(np.mean(pos))))
    both = gm.compute_word_heat_map("red")  # all occurrences averaged, as daam
    assert both.heatmap[0, 0] == np.mean(gm.tokens.positions("red"))
    second = gm.compute_word_heat_map("red", occurrence=1)
    assert second.heatmap[0, 0] == gm.tokens.positions("red", 1)[0]
    with pytest.raises(ValueError, match="occurrence"):
        gm.compute_word_heat_map("red", occurrence=2)
    with pytest.raises(TypeError):  # occurrence is keyword-only: a positional third argument is daam's offset_idx
        gm.compute_word_heat_map("red", None, 0, 1)


def test_offset_idx_shifts_positions_as_daam(gm):
    red = gm.tokens.positions("red")
    shifted = gm.compute_word_heat_map("red", None, 1)  # daam's positional order: word, word_idx, offset_idx
    assert shifted.positions == [p + 1 for p in red]
    assert shifted.heatmap[0, 0] == np.mean(red) + 1  # row i holds the value i
    assert torch.equal(gm.compute_word_heat_map("red", offset_idx=1).heatmap, shifted.heatmap)
    assert torch.equal(gm.compute_word_heat_map("red", offset_idx=0).heatmap, gm.compute_word_heat_map("red").heatmap)
    assert gm.compute_word_heat_map("x", word_idx=1, offset_idx=3).heatmap[0, 0] == 2.0  # daam ignores it there
    with pytest.raises(IndexError, match="not all traced"):
        gm.compute_word_heat_map("cat", offset_idx=50)
    with pytest.raises(TypeError, match="offset_idx must be an int"):
        gm.compute_word_heat_map("cat", offset_idx=1.5)


def test_daams_constructor_looks_words_up_through_the_tokenizer():
    tok = clip_tokenizer()
    prompt = "a red hippopotamus and a red cat"
    maps = torch.arange(77, dtype=torch.float32)[:, None, None].expand(77, 4, 6).clone()  # more rows than tokens
    gm = GlobalHeatMap(tok, prompt, maps)  # daam 0.2.0's GlobalHeatMap(tokenizer, prompt, heat_maps)
    assert gm.prompt == prompt and gm.tokenizer is tok and gm.heat_maps is maps
    cat = tokenize_prompt(tok, prompt).positions("cat")
    assert gm.compute_word_heat_map("cat").heatmap[0, 0] == float(np.mean(cat))
    with pytest.raises(TypeError, match="heat_maps is missing"):
        GlobalHeatMap(tok, prompt)
    with pytest.raises(TypeError, match="PromptTokens"):
        GlobalHeatMap(tok, maps)


def test_compute_ioa_is_intersection_over_own_area():
    from daam_fast import WordHeatMap

    a = WordHeatMap(torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    b = WordHeatMap(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    assert a.compute_ioa(b) == pytest.approx(0.5)
    assert a.compute_ioa(a) == pytest.approx(1.0)
    # Different sizes: this mask is up-sampled to the other's size and binarised at 1; all ones stays all ones,
    # so the IoA is the other mask's share of the area.
    ones = WordHeatMap(torch.ones(2, 2))
    quarter = torch.zeros(4, 4)
    quarter[:2, :2] = 1
    assert ones.compute_ioa(WordHeatMap(quarter)) == pytest.approx(0.25)
    assert ones.compute_ioa(quarter) == pytest.approx(0.25)


def test_word_idx_keeps_daams_meaning(gm):
    wm = gm.compute_word_heat_map("ignored", word_idx=1)  # token 1 after the start token: "red"
    assert wm.heatmap[0, 0] == 2.0 and wm.word_idx == 1
    with pytest.raises(IndexError, match="word_idx 40 out of range"):
        gm.compute_word_heat_map("x", word_idx=40)


def test_unknown_word_lists_prompt_words(gm):
    with pytest.raises(WordNotFoundError, match="hippopotamus"):
        gm.compute_word_heat_map("dog")
    with pytest.raises(WordNotFoundError):
        gm.compute_word_heat_map("us")  # not inside "hippopotamus"


def test_expand_keeps_orientation_and_normalises(gm):
    wm = gm.compute_word_heat_map("cat")
    wm.heatmap = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    img = Image.new("RGB", (60, 40))  # PIL size is (width, height)
    e = wm.expand_as(img)
    assert e.shape == (40, 60) and e.dtype == torch.float32
    assert e.min() == 0 and abs(float(e.max()) - 1) < 1e-6
    assert wm.expand_as(np.zeros((40, 60, 3), np.uint8)).shape == (40, 60)
    mask = wm.expand((40, 60), threshold=0.4)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    absolute = wm.expand((8, 12), absolute=True)
    assert absolute.max() > 1  # not normalised


def test_plot_overlay_writes_png(gm, tmp_path):
    out = tmp_path / "cat.png"
    gm.compute_word_heat_map("cat").plot_overlay(Image.new("RGB", (48, 32), "white"), out_file=out)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 0


def _ramp_map():
    from daam_fast import WordHeatMap

    return WordHeatMap(torch.linspace(0.5, 3.0, 24).reshape(4, 6), word="ramp")


def test_plot_overlay_reuses_the_current_figure(pyplot):
    wm, image = _ramp_map(), Image.new("RGB", (60, 40), "white")
    fig = pyplot.figure()
    ax = wm.plot_overlay(image)
    assert ax.figure is fig and pyplot.get_fignums() == [fig.number]
    ax2 = wm.plot_overlay(image)  # daam clears and redraws the current figure instead of opening a new one
    assert ax2.figure is fig and pyplot.get_fignums() == [fig.number] and len(fig.axes) == 1
    assert ax2.get_title() == "ramp"


def test_plot_overlay_draws_into_the_given_axes(pyplot):
    from matplotlib.figure import Figure

    own = Figure()
    ax = own.add_subplot()
    assert _ramp_map().plot_overlay(Image.new("RGB", (60, 40)), ax=ax) is ax
    assert pyplot.get_fignums() == []  # no pyplot figure was opened
    assert len(ax.images) == 2


def test_plot_overlay_normalises_as_daam():
    from matplotlib.figure import Figure

    wm, image = _ramp_map(), Image.new("RGB", (60, 40), (255, 0, 0))
    normalised = wm.expand_as(image)
    for color_normalize in (True, False):
        ax = Figure().add_subplot()
        wm.plot_overlay(image, color_normalize=color_normalize, ax=ax)
        heat, overlay = ax.images
        # The map is min-max normalised either way (daam); color_normalize=False only fixes the scale at 0..1.
        assert np.allclose(heat.get_array(), normalised.numpy())
        if not color_normalize:
            assert heat.norm.vmin == 0.0 and heat.norm.vmax == 1.0
        rgba = np.asarray(overlay.get_array())
        assert np.allclose(rgba[..., :3], [1.0, 0.0, 0.0])  # uint8 image scaled to [0, 1]
        assert np.allclose(rgba[..., 3], 1 - normalised.numpy())  # the image is opaque where the map is low
    ax = Figure().add_subplot()
    wm.plot_overlay(image, color_normalize=False, ax=ax, absolute=True)  # raw values, clamped to 0..1
    assert np.allclose(ax.images[0].get_array(), wm.expand_as(image, absolute=True).clamp(0, 1).numpy())
    ax = Figure().add_subplot()
    wm.plot_overlay(np.full((40, 60, 3), 0.5, np.float32), ax=ax)  # a float image in [0, 1] is not divided by 255
    assert np.allclose(np.asarray(ax.images[1].get_array())[..., :3], 0.5)


def test_expand_as_plot_draws_what_it_returns(pyplot, tmp_path):
    wm, image = _ramp_map(), Image.new("RGB", (60, 40))
    out = tmp_path / "ramp.png"
    mask = wm.expand_as(image, threshold=0.5, plot=True, out_file=out, color_normalize=False)
    assert torch.equal(mask, wm.expand_as(image, threshold=0.5))
    assert out.exists()
    assert np.array_equal(pyplot.gcf().axes[0].images[0].get_array(), mask.numpy())


def test_save_load_roundtrip(gm, tmp_path):
    path = gm.save(tmp_path / "maps.safetensors", seed=3)
    back = load(path)
    assert torch.equal(back.heat_maps, gm.heat_maps)
    assert back.meta == {"model": "test", "seed": 3}
    assert back.tokens == gm.tokens
    assert torch.equal(back.compute_word_heat_map("cat").heatmap, gm.compute_word_heat_map("cat").heatmap)
    assert not list(tmp_path.glob(".*tmp"))  # no temporary left behind
    assert b"pickle" not in path.read_bytes()[:8]


def test_load_rejects_corrupt_truncated_foreign_and_newer(gm, tmp_path):
    path = gm.save(tmp_path / "maps.safetensors")
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(HeatMapFileError, match="corrupt or truncated"):
        load(tmp_path / "trunc.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(HeatMapFileError):
        load(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(HeatMapFileError, match="not a daam_fast heat-map file"):
        load(tmp_path / "foreign.safetensors")
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"]["format_version"] = "99"
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    (tmp_path / "newer.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])
    with pytest.raises(HeatMapFileError, match="format version 99"):
        load(tmp_path / "newer.safetensors")


def test_normalize_divides_by_prompt_token_sum(sd_pipe):
    from daam_fast import trace

    with trace(sd_pipe) as tc:
        sd_pipe("a red circle", num_inference_steps=1, height=64, width=64, generator=torch.Generator().manual_seed(0))
        raw = tc.compute_global_heat_map()
        norm = tc.compute_global_heat_map(normalize=True)
    inner = raw.heat_maps[1:-1].sum(0, keepdim=True) + 1e-6
    torch.testing.assert_close(norm.heat_maps, raw.heat_maps / inner)
    torch.testing.assert_close(norm.heat_maps[1:-1].sum(0), torch.ones(32, 32), atol=1e-4, rtol=0)
