"""daam_fast.analysis: known answers on constructed maps, then the same functions on traced tiny pipelines."""

import math

import pytest
import torch

from daam_fast import GlobalHeatMap
from daam_fast import analysis as A
from daam_fast.tokens import tokenize_prompt
from tests.fixtures.pipelines import clip_tokenizer

PROMPT = "a red circle and a blue square"


def _gm(prompt: str, maps_by_word: dict[str, torch.Tensor], seed=None) -> GlobalHeatMap:
    """A GlobalHeatMap whose word tokens carry the given maps and every other token zeros."""
    tokens = tokenize_prompt(clip_tokenizer(), prompt)
    hw = next(iter(maps_by_word.values())).shape
    maps = torch.zeros(tokens.n_tokens(), *hw)
    for word, m in maps_by_word.items():
        for p in tokens.positions(word):
            maps[p] = m
    return GlobalHeatMap(tokens, maps, meta={} if seed is None else {"seed": seed})


def _blob(hw, rows, cols, value=1.0):
    m = torch.zeros(hw)
    m[rows, cols] = value
    return m


# -------------------------------------------------------------------------------------- constructed maps
def test_word_influence_shares_and_ranking():
    hw = (4, 4)
    gm = _gm("a red circle", {"red": torch.full(hw, 3.0), "circle": torch.full(hw, 1.0)})
    gm.heat_maps[0] = 100.0  # start token: must not count
    gm.heat_maps[-1] = 100.0  # end token: must not count
    ranked = A.word_influence(gm)
    assert [r.word for r in ranked] == ["red", "circle", "a"]
    assert ranked[0].share == pytest.approx(0.75) and ranked[1].share == pytest.approx(0.25)
    assert ranked[2].share == 0.0 and ranked[0].mass == pytest.approx(48.0)


def test_word_influence_sums_repeated_words_and_keeps_punctuation_in_total():
    hw = (2, 2)
    gm = _gm("a cat, a dog", {"cat": torch.ones(hw)})
    gm.heat_maps[gm.tokens.positions("a")] = 1.0  # two occurrences of "a"
    comma = [i for i, t in enumerate(gm.tokens.tokens) if t.startswith(",")]
    gm.heat_maps[comma] = 1.0
    shares = {r.word: r.share for r in A.word_influence(gm)}
    # tokens a, cat, ",", a, dog with masses 4, 4, 4, 4, 0: "a" owns 2 of 4 units, the comma one.
    assert shares == pytest.approx({"a": 0.5, "cat": 0.25, "dog": 0.0})


def test_soft_iou_and_pearson_known_values():
    hw = (4, 4)
    a = _blob(hw, slice(0, 2), slice(None))
    assert A.soft_iou(a, a.clone()) == 1.0
    assert A.soft_iou(a, 5 * a) == 1.0  # normalised first: scale does not matter
    assert A.soft_iou(a, 1 - a) == 0.0  # disjoint
    half = _blob(hw, slice(0, 1), slice(None))  # half of a's support
    assert A.soft_iou(a, half) == pytest.approx(0.5)
    assert A.pearson(a, a * 2 + 1) == pytest.approx(1.0)
    assert A.pearson(a, 1 - a) == pytest.approx(-1.0)
    assert math.isnan(A.pearson(a, torch.ones(hw)))  # constant map: undefined
    assert math.isnan(A.soft_iou(torch.zeros(hw), torch.zeros(hw)))


def test_concept_overlap_matrix():
    hw = (4, 4)
    top, bottom = _blob(hw, slice(0, 2), slice(None)), _blob(hw, slice(2, 4), slice(None))
    gm = _gm("a red circle and a blue square", {"red": top, "circle": top * 3, "square": bottom})
    o = A.concept_overlap(gm, ["red", "circle", "square"])
    assert o.words == ["red", "circle", "square"]
    expect = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    assert torch.equal(o.iou, expect)
    assert torch.allclose(o.pearson, 2 * expect - 1)
    raw = A.concept_overlap(torch.stack([top, bottom]), ["t", "b"])  # plain [N, H, W] stacks work too
    assert raw.iou[0, 1] == 0.0 and raw.words == ["t", "b"]
    with pytest.raises(ValueError, match="2 maps"):
        A.concept_overlap(torch.stack([top, bottom]), ["only one"])


def test_dominance_picks_the_larger_map_with_margin():
    hw = (2, 3)
    small = torch.full(hw, 1.0)
    big = torch.full(hw, 1.0)
    big[0] = 4.0  # "big" owns row 0 by 3, "small" and "big" tie on row 1 (tie -> first word)
    d = A.dominance_map(torch.stack([small, big]), ["small", "big"])
    assert d.index.tolist() == [[1, 1, 1], [0, 0, 0]]
    assert torch.equal(d.margin, torch.tensor([[3.0, 3, 3], [0, 0, 0]]))
    assert d.area() == {"small": 0.5, "big": 0.5}
    third = torch.zeros(hw)
    third[1, 2] = 9.0
    d3 = A.dominance_map(torch.stack([small, big, third]), ["s", "b", "t"])
    assert d3.index[1, 2] == 2 and d3.margin[1, 2] == 8.0
    # normalised: each word's own peak is 1; "small" is constant -> 0 everywhere.
    dn = A.dominance_map(torch.stack([small, big]), ["small", "big"], normalize=True)
    assert dn.normalized and dn.index.tolist() == [[1, 1, 1], [0, 0, 0]]


def test_seed_sweep_mean_std_stability():
    hw = (4, 4)
    a = _blob(hw, slice(0, 2), slice(None), 2.0)
    b = _blob(hw, slice(2, 4), slice(None), 2.0)
    maps = [_gm("a red circle", {"red": a, "circle": a if s < 2 else b}, seed=s) for s in range(3)]
    sw = A.seed_sweep(maps, ["red", "circle"])
    assert sw.seeds == [0, 1, 2]
    assert sw.per_seed["red"].shape == (3, 4, 4)
    assert torch.equal(sw.mean["red"], a) and torch.equal(sw.std["red"], torch.zeros(hw))
    assert sw.stability["red"] == pytest.approx(1.0)
    # circle: seeds 0, 1 identical (corr 1), seed 2 the opposite half (corr -1 with both): mean (1 - 1 - 1) / 3
    assert sw.stability["circle"] == pytest.approx(-1 / 3)
    expect_std = torch.tensor([2.0, 2.0, 0.0]).std(correction=0)
    assert torch.allclose(sw.std["circle"], torch.full(hw, float(expect_std)))
    assert math.isnan(A.seed_sweep(maps[:1], ["red"]).stability["red"])


def test_time_profile_from_per_step_maps():
    hw = (2, 2)
    a, b = _blob(hw, 0, slice(None)), _blob(hw, 1, slice(None))
    steps = [
        _gm("a red circle", {"red": 3 * a, "circle": a}),
        _gm("a red circle", {"red": a, "circle": a}),
        _gm("a red circle", {"red": a, "circle": 3 * b}),
    ]
    tp = A.time_profile(steps, ["red", "circle"], phases=3)
    assert tp.step_maps.shape == (3, 2, 2, 2)
    assert tp.mass.tolist() == [[6.0, 2.0], [2.0, 2.0], [2.0, 6.0]]
    assert torch.allclose(tp.share, torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.25, 0.75]], dtype=torch.float64))
    assert tp.phases == {"early": range(0, 1), "middle": range(1, 2), "late": range(2, 3)}
    assert torch.equal(tp.phase_maps["late"][1], 3 * b)
    two = A.time_profile(steps, ["red"], phases=2)
    assert list(two.phases) == ["early", "late"] and torch.equal(two.phase_maps["early"][0], 4 * a)
