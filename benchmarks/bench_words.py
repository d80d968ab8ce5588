"""Word lookup against prompt length: tokenising a prompt of 1k-8k words and looking words up stays linear.

A pipeline truncates the prompt to the tokenizer's window, but word lookup reads the whole prompt (to say which
words were cut), so a long prompt (a pasted text, a hostile web-UI request) must not cost quadratic time. Timed:
``tokenize_prompt`` (the real CLIP BPE, built offline) plus three lookups (a repeated word, a two-word query, one
occurrence). ``extra_info["ratio_vs_1000_words"]`` is each size's median over the 1000-word median (linear: about
the ratio of the sizes; 8000 words took ~50x the time of 1000 before the span index: 4.8 s). The non-timing guard is
``tests/test_tokens_scaling.py``.

    pytest benchmarks/bench_words.py --benchmark-only
"""

from __future__ import annotations

import logging

import pytest

from daam_fast import tokens as T
from tests.fixtures.pipelines import clip_tokenizer
from tests.fixtures.prompts import long_prompt

SIZES = [1000, 2000, 4000, 8000]
_MEDIANS: dict[int, float] = {}


@pytest.fixture(scope="module")
def tok():
    return clip_tokenizer()


@pytest.mark.parametrize("n_words", SIZES)
def test_word_lookup(benchmark, bench_info, tok, caplog, n_words):
    prompt = long_prompt(n_words)
    caplog.set_level(logging.ERROR, logger=T.__name__)  # the truncation warning lists thousands of words

    def lookup():
        pt = T.tokenize_prompt(tok, prompt)
        pt.positions("red")
        pt.positions("blue squares")
        pt.positions("cats", occurrence=0)

    benchmark.pedantic(lookup, rounds=5, warmup_rounds=1)
    _MEDIANS[n_words] = benchmark.stats.stats.median
    benchmark.extra_info.update(bench_info, n_words=n_words, prompt_chars=len(prompt))
    if SIZES[0] in _MEDIANS:
        benchmark.extra_info["ratio_vs_1000_words"] = round(_MEDIANS[n_words] / _MEDIANS[SIZES[0]], 2)
