"""daam_fast.analysis: known answers on constructed maps, then the same functions on traced tiny pipelines."""

import math

import pytest
import torch

from daam_fast import GlobalHeatMap, trace
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


# -------------------------------------------------------------------------------------- traced pipelines
KW = dict(num_inference_steps=2, height=32, width=32)


def test_on_a_traced_pipeline(sd_pipe):
    gen = A.trace_generation(sd_pipe, PROMPT, seed=0, negative_prompt="ugly blurry", **KW)
    shares = A.word_influence(gen.maps)
    assert {r.word for r in shares} == {"a", "red", "circle", "and", "blue", "square"}
    assert sum(r.share for r in shares) == pytest.approx(1.0)  # no punctuation in this prompt
    o = A.concept_overlap(gen.maps, ["red", "square"])
    assert o.iou[0, 0] == pytest.approx(1.0) and 0 < o.iou[0, 1] < 1
    d = A.dominance_map(gen.maps, ["red", "square"])
    red, square = A.word_maps(gen.maps, ["red", "square"])[1]
    assert torch.equal(d.index == 1, square > red)
    # negative prompt: its own words, the same analysis
    assert gen.negative_maps is not None and gen.negative_maps.prompt == "ugly blurry"
    neg = A.word_influence(gen.negative_maps)
    assert {r.word for r in neg} == {"ugly", "blurry"} and sum(r.share for r in neg) == pytest.approx(1.0)


def test_seed_sweep_on_a_traced_pipeline(sd_pipe):
    gens = A.run_seed_sweep(sd_pipe, PROMPT, [0, 1], progress=False, **KW)
    assert [g.seed for g in gens] == [0, 1] and gens[0].image.size == (32, 32)
    sw = A.seed_sweep([g.maps for g in gens], ["red"])
    assert sw.seeds == [0, 1]
    assert torch.equal(sw.per_seed["red"][1], gens[1].maps.compute_word_heat_map("red").heatmap)
    assert sw.stability["red"] == pytest.approx(A.pearson(sw.per_seed["red"][0], sw.per_seed["red"][1]))
    assert not torch.equal(sw.per_seed["red"][0], sw.per_seed["red"][1])  # seeds differ


def test_time_profile_equals_step_restricted_traces(sd_pipe):
    kw = dict(num_inference_steps=3, height=32, width=32)
    gen, tp = A.trace_time_profile(sd_pipe, PROMPT, seed=0, words=["red", "square"], **kw)
    assert tp.step_maps.shape[:2] == (3, 2)
    whole = A.word_maps(gen.maps, ["red", "square"])[1]
    torch.testing.assert_close(tp.step_maps.sum(0), whole, rtol=1e-5, atol=1e-6)
    # the "middle" phase (step 1 of 0..2) equals a trace restricted to those steps
    assert tp.phases["middle"] == range(1, 2)
    with trace(sd_pipe, steps=[1]) as tc:
        sd_pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kw)
        mid = A.word_maps(tc.compute_global_heat_map(), ["red", "square"])[1]
    torch.testing.assert_close(tp.phase_maps["middle"], mid, rtol=1e-5, atol=1e-6)
    assert (tp.mass > 0).all() and ((tp.share > 0) & (tp.share < 1)).all()


def test_time_profile_run_also_gives_negative_maps(sd_pipe):
    kw = dict(KW, negative_prompt="ugly blurry")
    gen, tp = A.trace_time_profile(sd_pipe, PROMPT, seed=3, words=["red"], **kw)
    plain = A.trace_generation(sd_pipe, PROMPT, seed=3, **kw)
    assert gen.negative_maps.prompt == "ugly blurry" and gen.negative_maps.meta["seed"] == 3
    torch.testing.assert_close(gen.negative_maps.heat_maps, plain.negative_maps.heat_maps)
    torch.testing.assert_close(gen.maps.heat_maps, plain.maps.heat_maps)  # snapshots change nothing


def test_sdxl_pipeline(sdxl_pipe):
    gen = A.trace_generation(sdxl_pipe, PROMPT, seed=0, **KW)
    assert sum(r.share for r in A.word_influence(gen.maps)) == pytest.approx(1.0)
    d = A.dominance_map(gen.maps, ["circle", "square"])
    assert d.index.shape == gen.maps.heat_maps.shape[1:] and sum(d.area().values()) == pytest.approx(1.0)


def test_joint_attention_sd3_counts_both_encoders():
    from tests.fixtures.pipelines import tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline()
    gen = A.trace_generation(pipe, PROMPT, seed=0, max_sequence_length=32, **KW)
    gm = gen.maps
    clip, _ = gm.source_tokens("clip")
    t5, t5_off = gm.source_tokens("t5")
    assert gm.default_source == "both" and A.prompt_words(gm) == ["a", "red", "circle", "and", "blue", "square"]
    shares = {r.word: r for r in A.word_influence(gm)}
    red = set(clip.positions("red")) | {t5_off + p for p in t5.positions("red")}
    assert set(shares["red"].positions) == red
    assert shares["red"].mass == pytest.approx(sum(float(gm.token_heat_map(p).double().sum()) for p in red))
    content = [i for i, (a, b) in enumerate(clip.offsets) if b > a]
    content += [t5_off + i for i, (a, b) in enumerate(t5.offsets) if b > a]
    total = sum(float(gm.token_heat_map(p).double().sum()) for p in content)
    assert shares["red"].share == pytest.approx(shares["red"].mass / total)
    o = A.concept_overlap(gm, ["red", "square"])
    assert o.iou[0, 0] == pytest.approx(1.0)
