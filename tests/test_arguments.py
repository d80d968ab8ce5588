"""Arguments of the wrong type fail where they are given, with an error naming the argument, the value and what
is valid: ``trace(...)`` options at construction (before the pipeline is patched), words at lookup."""

import pytest
import torch

from daam_fast import trace
from daam_fast.tokens import tokenize_prompt
from tests.fixtures.pipelines import clip_tokenizer

BAD_OPTIONS = [
    # (options, error type, message): what each exercises
    (dict(keep_records="2"), TypeError, r"keep_records must be an int >= 1 or None, got '2' \(str\)"),
    (dict(keep_records=2.5), TypeError, r"keep_records must be an int >= 1 or None, got 2.5 \(float\)"),
    (dict(keep_records=True), TypeError, r"keep_records must be an int >= 1 or None, got True \(bool\)"),
    (dict(max_snapshot_bytes="9", snapshots="step"), TypeError, r"max_snapshot_bytes must be an int >= 1 or None"),
    (dict(max_snapshot_bytes=0, snapshots="step"), ValueError, r"max_snapshot_bytes must be an int >= 1 or None"),
    (dict(tokens="12"), TypeError, r"tokens must be a list of ints .*, got '12' \(str\)"),
    (dict(tokens=[1, 2.5]), TypeError, r"tokens must be a list of ints .*, got 2.5 \(float\) in it"),
    (dict(tokens=5), TypeError, r"tokens must be a list of ints .*, got 5 \(int\)"),
    (dict(steps=3), TypeError, r"steps must be a list of ints .*, got 3 \(int\)"),
    (dict(steps=["0"]), TypeError, r"steps must be a list of ints .*, got '0' \(str\) in it"),
    (dict(factors=[True]), TypeError, r"factors must be a list of ints .*, got True \(bool\) in it"),
    (dict(layers=5), TypeError, r"layers must be a list of layer indices or names, got 5 \(int\)"),
    (dict(layers="down"), TypeError, r"layers must be a list of layer indices or names, got 'down' \(str\)"),
    (dict(layers=[1.0]), TypeError, r"layers must be a list of layer indices or names, got 1.0 \(float\) in it"),
    (dict(negative="no"), TypeError, r"negative must be True or False, got 'no' \(str\)"),
    (dict(per_layer=1), TypeError, r"per_layer must be True or False, got 1 \(int\)"),
    (dict(daam_compat=None), TypeError, r"daam_compat must be True or False, got None"),
    (dict(fused="False"), TypeError, r"fused must be True or False, got 'False' \(str\)"),
    (dict(mid_block="yes"), TypeError, r"mid_block must be True or False, got 'yes' \(str\)"),
    (dict(backend=1), TypeError, r"backend must be a backend name .* or None, got 1 \(int\)"),
    (dict(snapshots=True), TypeError, r"snapshots must be 'step' or None, got True \(bool\)"),
]


@pytest.mark.parametrize("options,error,message", BAD_OPTIONS)
def test_trace_options_of_the_wrong_type_are_named_at_construction(sd_pipe, options, error, message):
    before = {n: m.processor for n, m in sd_pipe.unet.named_modules() if hasattr(m, "processor")}
    with pytest.raises(error, match=message):
        trace(sd_pipe, **options)
    after = {n: m.processor for n, m in sd_pipe.unet.named_modules() if hasattr(m, "processor")}
    assert after == before  # nothing was patched


def test_integer_likes_are_accepted(sd_pipe):
    import numpy as np

    tc = trace(sd_pipe, keep_records=np.int64(2), tokens=(np.int32(1), 2), steps=range(1), layers=[np.int64(0)])
    assert tc.options.keep_records == 2 and tc.options.tokens == (1, 2) and tc.options.steps == frozenset({0})


@pytest.fixture(scope="module")
def words():
    return tokenize_prompt(clip_tokenizer(), "a red circle")


@pytest.mark.parametrize("word", [5, None, b"red", ["red"]])
def test_a_word_that_is_no_string_is_named(words, word):
    with pytest.raises(TypeError, match=rf"word must be a str, got {type(word).__name__}"):
        words.positions(word)


def test_occurrence_of_the_wrong_type_is_named(words):
    with pytest.raises(TypeError, match=r"occurrence must be an int or None, got '0' \(str\)"):
        words.positions("red", occurrence="0")


def test_heat_map_word_lookup_names_a_non_string_word(sd_pipe):
    with trace(sd_pipe) as tc:
        sd_pipe("a red circle", num_inference_steps=1, height=32, width=32, output_type="latent",
                generator=torch.Generator().manual_seed(0))  # fmt: skip
        gm = tc.compute_global_heat_map()
    with pytest.raises(TypeError, match="word must be a str, got int"):
        gm.compute_word_heat_map(3)
    with pytest.raises(TypeError, match="prompt must be a str or None, got int"):
        tc.compute_global_heat_map(prompt=3)
