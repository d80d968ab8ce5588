"""daam_fast.generation: traced generations on tiny pipelines, and the analysis functions on their maps."""

import pytest
import torch

from daam_fast import analysis as A
from daam_fast import generation as G
from daam_fast import trace

PROMPT = "a red circle and a blue square"

KW = dict(num_inference_steps=2, height=32, width=32)


def test_on_a_traced_pipeline(sd_pipe):
    gen = G.trace_generation(sd_pipe, PROMPT, seed=0, negative_prompt="ugly blurry", **KW)
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
    gens = G.run_seed_sweep(sd_pipe, PROMPT, [0, 1], progress=False, **KW)
    assert [g.seed for g in gens] == [0, 1] and gens[0].image.size == (32, 32)
    sw = A.seed_sweep([g.maps for g in gens], ["red"])
    assert sw.seeds == [0, 1]
    assert torch.equal(sw.per_seed["red"][1], gens[1].maps.compute_word_heat_map("red").heatmap)
    assert sw.stability["red"] == pytest.approx(A.pearson(sw.per_seed["red"][0], sw.per_seed["red"][1]))
    assert not torch.equal(sw.per_seed["red"][0], sw.per_seed["red"][1])  # seeds differ


def test_time_profile_equals_step_restricted_traces(sd_pipe):
    kw = dict(num_inference_steps=3, height=32, width=32)
    gen, tp = G.trace_time_profile(sd_pipe, PROMPT, seed=0, words=["red", "square"], **kw)
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
    gen, tp = G.trace_time_profile(sd_pipe, PROMPT, seed=3, words=["red"], **kw)
    plain = G.trace_generation(sd_pipe, PROMPT, seed=3, **kw)
    assert gen.negative_maps.prompt == "ugly blurry" and gen.negative_maps.meta["seed"] == 3
    torch.testing.assert_close(gen.negative_maps.heat_maps, plain.negative_maps.heat_maps)
    torch.testing.assert_close(gen.maps.heat_maps, plain.maps.heat_maps)  # snapshots change nothing


def test_sdxl_pipeline(sdxl_pipe):
    gen = G.trace_generation(sdxl_pipe, PROMPT, seed=0, **KW)
    assert sum(r.share for r in A.word_influence(gen.maps)) == pytest.approx(1.0)
    d = A.dominance_map(gen.maps, ["circle", "square"])
    assert d.index.shape == gen.maps.heat_maps.shape[1:] and sum(d.area().values()) == pytest.approx(1.0)


def test_joint_attention_sd3_counts_both_encoders():
    from tests.fixtures.pipelines import tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline()
    gen = G.trace_generation(pipe, PROMPT, seed=0, max_sequence_length=32, **KW)
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
