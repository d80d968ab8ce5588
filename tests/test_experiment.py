"""GenerationExperiment (daam 0.2.0's experiment folders, safetensors instead of pickle) and set_seed."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from daam_fast import GenerationExperiment, GlobalHeatMap, HeatMapFileError, set_seed
from daam_fast.experiment import GENERATION_FILE
from daam_fast.tokens import WordNotFoundError, tokenize_prompt
from tests.fixtures.pipelines import clip_tokenizer

PROMPT = "a red hippopotamus, a blue cat"


@pytest.fixture(scope="module")
def tok():
    return clip_tokenizer()


@pytest.fixture(scope="module")
def gm(tok):
    tokens = tokenize_prompt(tok, PROMPT)
    maps = torch.rand(tokens.n_tokens(), 4, 4, generator=torch.Generator().manual_seed(0))
    return GlobalHeatMap(tokens, maps, meta={"model": "test"})


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))


def test_set_seed_seeds_every_generator_and_returns_one():
    gen = set_seed(7, device="cpu")
    assert gen.initial_seed() == 7 and gen.device.type == "cpu"
    draws = (random.random(), np.random.rand(), torch.rand(1).item())
    set_seed(7)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == draws
    expected = "cuda" if torch.cuda.is_available() else "cpu"  # daam's default device
    assert set_seed(0).device.type == expected


def test_save_writes_daams_layout_without_pickle(gm, image, tmp_path):
    exp = GenerationExperiment.from_heat_map(gm, image, tmp_path, seed=3, id="p1")
    assert exp.path == tmp_path / "p1"
    root = exp.save()
    assert root == tmp_path / "p1"
    assert (root / "prompt.txt").read_text() == PROMPT
    assert (root / "seed.txt").read_text() == "3"
    words = {"a", "red", "hippopotamus,", "blue", "cat"}
    assert {p.name for p in root.iterdir()} == {"prompt.txt", "seed.txt", "output.png", GENERATION_FILE} | {
        f"{w}.heat_map.png" for w in words
    }
    assert (root / GENERATION_FILE).read_bytes()[8:9] == b"{"  # a safetensors JSON header, not a pickle
    assert GenerationExperiment.has_experiment(tmp_path, "p1")
    assert GenerationExperiment.read_prompt(tmp_path, "p1") == PROMPT
    assert GenerationExperiment.read_seed(root) == 3


def test_load_restores_everything_and_needs_no_tokenizer(gm, image, tmp_path):
    exp = GenerationExperiment.from_heat_map(gm, image, tmp_path, seed=11, id="x", subtype="run1")
    exp.truth_masks = {"Cat": torch.tensor([[1.0, 0.0], [0.0, 1.0]])}
    exp.annotate("note", "hi").save(heat_maps=False)
    back = GenerationExperiment.load(tmp_path / "x", subtype="run1")
    assert back.prompt == PROMPT and back.seed == 11 and back.id == "x" and back.subtype == "run1"
    assert back.path == tmp_path / "x" and back.tokenizer is None
    assert torch.equal(back.global_heat_map, gm.heat_maps)
    assert np.array_equal(np.asarray(back.image), np.asarray(image))
    assert torch.equal(back.heat_map().compute_word_heat_map("cat").heatmap, gm.compute_word_heat_map("cat").heatmap)
    assert back.heat_map().meta["model"] == "test"
    assert torch.equal(back.truth_masks["cat"], torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert back.annotations == {"note": "hi"}
    assert GenerationExperiment.contains_truth_mask(tmp_path / "x")
    assert [e.subtype for e in GenerationExperiment.load(tmp_path / "x", all_subtypes=True)] == ["run1"]
    back.clear_checkpoint()
    assert not (tmp_path / "x" / "run1" / GENERATION_FILE).exists()
    with pytest.raises(FileNotFoundError):
        GenerationExperiment.load(tmp_path / "x", subtype="run1")


def test_daams_pickle_is_not_read(tmp_path):
    (tmp_path / "generation.pt").write_bytes(b"\x80\x04not read")
    with pytest.raises(FileNotFoundError):
        GenerationExperiment.load(tmp_path)
    (tmp_path / GENERATION_FILE).write_bytes(b"\x80\x04" + b"\x00" * 30)
    with pytest.raises(HeatMapFileError):
        GenerationExperiment.load(tmp_path)


def test_experiment_built_from_raw_maps_needs_a_tokenizer(gm, image, tok, tmp_path):
    # daam's run/generate.py builds experiments from a bare [tokens, H, W] tensor (its --all-heads loop).
    exp = GenerationExperiment(image=image, global_heat_map=gm.heat_maps, prompt=PROMPT, seed=0, path=tmp_path, id="r")
    with pytest.raises(ValueError, match="tokenizer"):
        exp.save_heat_map("cat")
    path = exp.save_heat_map("cat", tok, output_prefix="l0-up-attn-0-h1-")
    assert path == tmp_path / "r" / "l0-up-attn-0-h1-cat.heat_map.png"
    with Image.open(path) as im:
        assert im.format == "PNG"
    with pytest.raises(WordNotFoundError):
        exp.save_heat_map("dog", tok)
    with pytest.raises(ValueError, match="crop"):
        exp.save_heat_map("cat", tok, crop=2)
    exp.tokenizer = tok
    assert set(exp.save_all_heat_maps()) == {"a", "red", "hippopotamus,", "blue", "cat"}


def test_saving_leaves_pyplot_alone(gm, image, tmp_path):
    import matplotlib.pyplot as plt

    plt.close("all")
    GenerationExperiment.from_heat_map(gm, image, tmp_path).save()
    assert plt.get_fignums() == []


def test_nsfw_means_an_all_black_image(gm):
    black = GenerationExperiment(Image.new("RGB", (4, 4)), gm.heat_maps, PROMPT)
    assert black.nsfw()
    assert not GenerationExperiment(Image.new("RGB", (4, 4), "white"), gm.heat_maps, PROMPT).nsfw()
