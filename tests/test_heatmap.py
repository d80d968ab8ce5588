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
