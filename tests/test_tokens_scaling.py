"""Word lookup is linear in the prompt's length: counted in executed lines of daam_fast/tokens.py, not timed (the
timing is benchmarks/bench_words.py). A quadratic step (every word against every token) fails the ratio."""

import logging
import sys

import pytest

import daam_fast.tokens as T
from tests.fixtures.pipelines import clip_tokenizer
from tests.fixtures.prompts import long_prompt


def _lines_run(fn) -> int:
    """Lines of daam_fast/tokens.py executed while ``fn()`` runs (loop iterations included)."""
    count = 0

    def local(frame, event, arg):
        nonlocal count
        count += event == "line"
        return local

    def calls(frame, event, arg):
        return local if frame.f_code.co_filename == T.__file__ else None

    sys.settrace(calls)
    try:
        fn()
    finally:
        sys.settrace(None)
    return count


@pytest.fixture(scope="module")
def tok():
    return clip_tokenizer()


def test_lookup_work_grows_linearly_with_the_prompt(tok, caplog):
    def lookup(n_words):
        def run():
            pt = T.tokenize_prompt(tok, long_prompt(n_words))  # far past the 77-token window: all words counted
            pt.positions("red")  # one word, n_words / 8 occurrences
            pt.positions("blue squares")  # a two-word query
            pt.positions("cats", occurrence=0)  # the first (one word in 24 is "cats")

        return run

    with caplog.at_level(logging.ERROR, logger=T.__name__):  # the truncation warning names every dropped word
        small, large = _lines_run(lookup(250)), _lines_run(lookup(2000))
    # 8x the words: linear work is 8x (up to constant terms); every-word-against-every-token work would be ~64x.
    assert large <= 10 * small, f"{small} lines for 250 words, {large} for 2000: not linear"


def test_overlap_lookup_equals_a_scan_also_for_unordered_offsets(tok):
    # The index answers what a scan of every token would; offsets out of order (a foreign file) take the scan.
    pt = T.tokenize_prompt(tok, long_prompt(300))
    spans = [(s.start, s.end) for s in pt._segments] + [(0, 5), (3, 40), (7, 7), (10**6, 10**6 + 1)]
    for offsets in (pt.untruncated_offsets, pt.offsets, list(reversed(pt.offsets)), [(0, 4), (2, 3), (1, 9)]):
        index = T._SpanIndex(offsets)
        for start, end in spans:
            scan = [i for i, (a, b) in enumerate(offsets) if a < end and b > start]
            assert index.overlapping(start, end) == scan, (start, end)
