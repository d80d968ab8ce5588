"""Prompt words -> token positions (daam_fast.tokens), against the real CLIP BPE tokenizer built offline."""

from __future__ import annotations

import logging
import unicodedata

import pytest

from daam_fast.tokens import (
    PromptTokens,
    TruncatedWordError,
    Word,
    WordNotFoundError,
    strip_weighting,
    tokenize_prompt,
    tokenize_shared,
)
from tests.fixtures.pipelines import clip_tokenizer


@pytest.fixture(scope="module")
def tok():
    return clip_tokenizer()


@pytest.fixture(scope="module")
def tok2():
    # SDXL's second tokenizer: same vocabulary, pads with "!".
    return clip_tokenizer(pad_token="!")


def toks(pt: PromptTokens, positions) -> list[str]:
    return [pt.tokens[i] for i in positions]


def bpe_text(pt: PromptTokens, positions) -> str:
    """The ASCII text of the tokens at ``positions`` (CLIP marks word ends with </w>)."""
    return "".join(toks(pt, positions)).replace("</w>", "")


def decoded(tokenizer, pt: PromptTokens, positions) -> str:
    """The tokens at ``positions`` decoded through the byte-level table (for non-ASCII text)."""
    return tokenizer.convert_tokens_to_string([t.replace("</w>", "") for t in toks(pt, positions)])


# ------------------------------------------------------------------------------------------- basics
def test_window_matches_pipeline_encoding(tok):
    prompt = "A photo of a Hippopotamus, wearing (a red:1.2) hat!"
    pt = tokenize_prompt(tok, prompt)
    padded = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    assert pt.input_ids == padded[: pt.n_tokens()]
    assert all(i == tok.pad_token_id for i in padded[pt.n_tokens() :])
    assert pt.input_ids[0] == tok.bos_token_id and pt.input_ids[-1] == tok.eos_token_id
    assert pt.tokens == tok.convert_ids_to_tokens(pt.input_ids)
    assert len(pt.offsets) == pt.n_tokens()
    assert pt.max_length == 77
    assert pt.truncated_words == []


def test_words_slice_the_original_prompt(tok):
    # Offsets are in ORIGINAL characters although CLIP lowercases and squeezes whitespace.
    prompt = "A  BIG   Cat\tnaps"
    pt = tokenize_prompt(tok, prompt)
    assert [w.text for w in pt.words] == ["A", "BIG", "Cat", "naps"]
    for w in pt.words:
        assert prompt[w.start : w.end] == w.text
    assert pt.word_positions() == [("A", [1]), ("BIG", [2]), ("Cat", [3]), ("naps", [4])]


def test_multi_token_word(tok):
    pt = tokenize_prompt(tok, "a hippopotamus in a river")
    pos = pt.positions("hippopotamus")
    assert len(pos) == 3 and pos == [2, 3, 4]  # hippo / potam / us</w>
    assert bpe_text(pt, pos) == "hippopotamus"
    assert pt.positions("river") == [7]


def test_whole_word_not_substring(tok):
    pt = tokenize_prompt(tok, "a hippopotamus and cats")
    # daam's token search finds "us" inside hippopotamus (its last token is "us</w>"); whole words do not.
    with pytest.raises(WordNotFoundError, match="'us' is not in the prompt"):
        pt.positions("us")
    with pytest.raises(WordNotFoundError):
        pt.positions("cat")
    assert bpe_text(pt, pt.positions("cats")) == "cats"
    pt = tokenize_prompt(tok, "a cat")
    with pytest.raises(WordNotFoundError):
        pt.positions("cats")


def test_repeated_words_and_occurrence(tok):
    pt = tokenize_prompt(tok, "a cat next to another cat and a dog")
    assert pt.positions("cat", occurrence=0) == [2]
    assert pt.positions("cat", occurrence=1) == [6]
    assert pt.positions("cat") == [2, 6]  # all occurrences, as daam averages over them
    assert pt.positions("a") == [1, 8]
    with pytest.raises(ValueError, match=r"occurs 2 time\(s\).*occurrence=2 is out of range \(0\.\.1\)"):
        pt.positions("cat", occurrence=2)
    with pytest.raises(ValueError, match="out of range"):
        pt.positions("cat", occurrence=-1)


def test_case_insensitive(tok):
    pt = tokenize_prompt(tok, "A Cat and a DOG")
    assert pt.positions("cat") == pt.positions("Cat") == pt.positions("CAT") == [2]
    assert pt.positions("dog") == [5]
    pt = tokenize_prompt(tok, "a cat")
    assert pt.positions("Cat") == [2]


def test_punctuation_not_part_of_word(tok):
    pt = tokenize_prompt(tok, "cat, cat. (cat) cat's cat!")
    assert pt.positions("cat") == [1, 3, 6, 8, 10]
    assert toks(pt, pt.positions("cat")) == ["cat</w>"] * 5
    for p in pt.positions("cat"):
        assert pt.tokens[p] not in {",</w>", ".</w>", "(</w>", ")</w>", "'s</w>", "!</w>"}
    # the query may carry punctuation too
    assert pt.positions("(cat)") == pt.positions("cat,") == pt.positions("cat")
    # "cat's" is the words cat + s; the "'s" token belongs to s
    assert toks(pt, pt.positions("cat's", occurrence=0)) == ["cat</w>", "'s</w>"]


def test_multi_word_query(tok):
    pt = tokenize_prompt(tok, "a red circle, a blue square and a red, circle")
    assert pt.positions("red circle", occurrence=0) == [2, 3]
    assert pt.positions("red circle", occurrence=1) == [10, 12]  # separators between the words are not compared
    assert pt.positions("red circle") == [2, 3, 10, 12]
    assert pt.positions("blue square") == [6, 7]
    assert toks(pt, pt.positions("red circle")) == ["red</w>", "circle</w>"] * 2
    with pytest.raises(WordNotFoundError):
        pt.positions("circle red")
    with pytest.raises(WordNotFoundError):
        pt.positions("red square")


def test_query_without_words(tok):
    pt = tokenize_prompt(tok, "a cat")
    with pytest.raises(ValueError, match="no word characters") as err:
        pt.positions("!!")
    assert not isinstance(err.value, WordNotFoundError)


def test_tokenizer_without_start_token():
    # A T5-like fast tokenizer (no start token, "</s>" appended), built in memory: positions index input_ids
    # whatever the special-token layout, and truncation reads the tokenizer's own model_max_length.
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, "<pad>": 2, "a": 3, "cat": 4, "on": 5, "mat": 6, ",": 7}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.normalizer = normalizers.Lowercase()
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    t5ish = PreTrainedTokenizerFast(
        tokenizer_object=t, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", model_max_length=5
    )
    pt = tokenize_prompt(t5ish, "A cat, on a mat")
    assert pt.input_ids == [3, 4, 7, 5, 1]
    assert pt.word_positions() == [("A", [0]), ("cat", [1]), ("on", [3])]
    assert pt.truncated_words == ["a", "mat"]
    assert pt.positions("a") == [0]  # the second "a" was truncated away
    with pytest.raises(TruncatedWordError, match="5-token window"):
        pt.positions("mat")


# ------------------------------------------------------------------------------------------- scripts
@pytest.mark.parametrize(
    "prompt, query, expected_text",
    [
        ("猫が好き", "猫", "猫"),  # Japanese: Han + Hiragana, no spaces
        ("猫が好き", "好き", "好き"),
        ("黒い猫と白い犬", "白い犬", "白い犬"),
        ("고양이가 좋아", "고양이", "고양이"),  # Korean: particle attached to the noun
        ("แมวสีดำนั่ง", "แมว", "แมว"),  # Thai: no spaces
        ("一只黑色的猫", "猫", "猫"),  # Chinese
    ],
)
def test_unspaced_scripts_substring(tok, prompt, query, expected_text):
    pt = tokenize_prompt(tok, prompt)
    pos = pt.positions(query)
    start = prompt.index(query)
    end = start + len(query)
    # exactly the tokens whose character span overlaps the query's characters
    assert pos == [i for i, (a, b) in enumerate(pt.offsets) if a < end and b > start]
    assert decoded(tok, pt, pos) == expected_text


def test_unspaced_repeats_and_mixed_with_latin(tok):
    pt = tokenize_prompt(tok, "猫と猫, a cat")
    assert len(pt.positions("猫")) == 6  # two occurrences, three byte tokens each
    assert decoded(tok, pt, pt.positions("猫", occurrence=1)) == "猫"
    assert pt.positions("cat") == [pt.n_tokens() - 2]
    with pytest.raises(WordNotFoundError):
        pt.positions("犬")


def test_phrase_with_unspaced_edges(tok):
    # In a phrase, an unspaced first word may end a run and an unspaced last word may start one.
    prompt = "一只黑猫 sitting on 椅子上"
    pt = tokenize_prompt(tok, prompt)
    pos = pt.positions("黑猫 sitting on 椅子")
    assert decoded(tok, pt, pos) == "黑猫sittingon椅子"
    with pytest.raises(WordNotFoundError):
        pt.positions("只 sitting")  # "只" does not end the run "一只黑猫"


@pytest.mark.parametrize(
    "prompt, query, word",
    [
        ("un café noir", "CAFÉ", "café"),
        ("eine Straße", "straße", "straße"),
        ("чёрная кошка", "Кошка", "кошка"),
        ("μια γάτα", "ΓΆΤΑ", "γάτα"),
    ],
)
def test_space_delimited_non_latin_whole_word(tok, prompt, query, word):
    pt = tokenize_prompt(tok, prompt)
    pos = pt.positions(query)
    assert decoded(tok, pt, pos) == word
    with pytest.raises(WordNotFoundError):
        pt.positions(query[:-1])  # a prefix is not a whole word in space-delimited scripts


def test_decomposed_accents_match_composed_query(tok):
    # "cafe" + COMBINING ACUTE: CLIP's NFC normaliser composes it; the word keeps its 5 original characters.
    prompt = "un cafe\u0301 noir"
    pt = tokenize_prompt(tok, prompt)
    assert pt.words[1] == Word("cafe\u0301", 3, 8, (2,))
    assert pt.positions("café") == [2]
    assert decoded(tok, pt, [2]) == "café"


# ------------------------------------------------------------------------------------------- weighting syntax
def test_prompt_weighting_syntax(tok):
    prompt = "(red:1.3) ((dog)) [cat] (bird) (fish)1.2"
    pt = tokenize_prompt(tok, prompt)
    # the weight numbers are not words
    assert [w.text for w in pt.words] == ["red", "dog", "cat", "bird", "fish"]
    for w in ["red", "dog", "cat", "bird", "fish"]:
        assert toks(pt, pt.positions(w)) == [w + "</w>"]
    # a query may carry the syntax as well
    assert pt.positions("(red:1.3)") == pt.positions("red")
    assert pt.positions("((dog))") == pt.positions("[dog:0.5]") == pt.positions("dog")
    with pytest.raises(WordNotFoundError):
        pt.positions("1")


def test_strip_weighting_keeps_offsets():
    s = "(red:1.3) [cat: .5] (fish)1.2 photo 2019"
    out = strip_weighting(s)
    assert len(out) == len(s)
    assert out == "(red    ) [cat    ] (fish)    photo 2019"


# ------------------------------------------------------------------------------------------- truncation
def test_truncation_partial_and_dropped(tok, caplog):
    # 74 one-token words + hippopotamus (3 tokens) + zebra: 78 prompt tokens, the window holds 75.
    prompt = "cat " + "a " * 73 + "hippopotamus zebra cat"
    with caplog.at_level(logging.WARNING, logger="daam_fast.tokens"):
        pt = tokenize_prompt(tok, prompt)
    padded = tok(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    assert pt.input_ids == padded and pt.n_tokens() == 77
    assert pt.input_ids[-1] == tok.eos_token_id
    # hippopotamus keeps its surviving first token; zebra and the second cat are dropped
    assert pt.positions("hippopotamus") == [75] and pt.tokens[75] == "hippo"
    assert pt.truncated_words == ["hippopotamus", "zebra", "cat"]
    assert [w.text for w in pt.words][-1] == "hippopotamus"
    assert len(pt.words) == 75
    with pytest.raises(TruncatedWordError, match="beyond the 77-token window") as err:
        pt.positions("zebra")
    assert isinstance(err.value, ValueError)
    # a repeated word whose later occurrence fell out: all -> the surviving one; the dropped one -> error
    assert pt.positions("cat") == [1]
    with pytest.raises(TruncatedWordError, match="occurrence 1 of 'cat'"):
        pt.positions("cat", occurrence=1)
    records = [r for r in caplog.records if r.name == "daam_fast.tokens" and r.levelno == logging.WARNING]
    assert len(records) == 1
    msg = records[0].getMessage()
    assert "'zebra'" in msg and "'hippopotamus'" in msg and "partly cut" in msg and "81 tokens" in msg


def test_left_truncation_side():
    # Some pipelines' tokenizers truncate from the left; the window is whatever the tokenizer call returns.
    left = clip_tokenizer()
    left.truncation_side = "left"
    pt = tokenize_prompt(left, "zebra hippopotamus " + "a " * 73 + "cat")
    assert pt.n_tokens() == 77 and pt.tokens[-2] == "cat</w>"
    assert pt.truncated_words == ["zebra", "hippopotamus"]
    assert pt.positions("hippopotamus") == [1] and pt.tokens[1] == "us</w>"  # its last token survives
    with pytest.raises(TruncatedWordError):
        pt.positions("zebra")


def test_exactly_full_window_is_not_truncated(tok, caplog):
    prompt = " ".join(["a"] * 75)
    with caplog.at_level(logging.WARNING):
        pt = tokenize_prompt(tok, prompt)
    assert pt.n_tokens() == 77 and pt.truncated_words == [] and pt.untruncated_offsets is None
    assert len(pt.positions("a")) == 75
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_truncation_follows_max_length(tok):
    pt = tokenize_prompt(tok, "a cat on a mat", max_length=5)
    assert pt.n_tokens() == 5 and pt.truncated_words == ["a", "mat"]
    assert pt.positions("on") == [3]
    with pytest.raises(TruncatedWordError, match="5-token window"):
        pt.positions("mat")


# ------------------------------------------------------------------------------------------- empty prompt
@pytest.mark.parametrize("prompt", ["", "   ", "!!! , ."])
def test_prompt_without_words(tok, prompt):
    pt = tokenize_prompt(tok, prompt)
    assert pt.words == [] and pt.word_positions() == []
    assert pt.input_ids[0] == tok.bos_token_id and pt.input_ids[-1] == tok.eos_token_id
    with pytest.raises(WordNotFoundError, match="the prompt has no words"):
        pt.positions("cat")


def test_not_found_lists_words(tok):
    pt = tokenize_prompt(tok, "a cat and a dog")
    with pytest.raises(WordNotFoundError, match=r"'a', 'cat', 'and', 'dog'"):
        pt.positions("horse")


# ------------------------------------------------------------------------------------------- agreement
AGREEMENT_PROMPTS = [
    "A photograph of an astronaut riding a horse on Mars, highly detailed, 4k",
    "hippopotamus, rhinoceros; (giraffe:1.4) [zebra] ((elephant))",
    "un café à Paris, чёрная кошка, 猫が好き, 고양이",
    "dog-house 3.5 🐱 cat's toy",
]


@pytest.mark.parametrize("prompt", AGREEMENT_PROMPTS)
def test_positions_agree_with_tokenizer(tok, prompt):
    pt = tokenize_prompt(tok, prompt)
    seen: set[int] = set()
    for w in pt.words:
        pos = list(w.positions)
        assert pos == sorted(pos) and all(1 <= p <= pt.n_tokens() - 2 for p in pos)
        assert not seen & set(pos)  # no token belongs to two words
        seen |= set(pos)
        expected = unicodedata.normalize("NFC", w.text).lower()
        if w.start > 0 and prompt[w.start - 1] == "'":
            expected = "'" + expected  # CLIP's contraction tokens ('s 't 're ...) carry the apostrophe
        if w.text.isascii():
            assert bpe_text(pt, pos) == expected
        else:
            assert decoded(tok, pt, pos) == expected
        if w.text.isascii():
            occurrences = [x for x in pt.words if x.text.lower() == w.text.lower()]
            assert pt.positions(w.text, occurrence=occurrences.index(w)) == pos


# ------------------------------------------------------------------------------------------- SDXL
@pytest.mark.parametrize("prompt", AGREEMENT_PROMPTS + ["", "cat " + "a " * 73 + "hippopotamus zebra"])
def test_sdxl_tokenizers_share_positions(tok, tok2, prompt):
    a, b = tokenize_prompt(tok, prompt), tokenize_prompt(tok2, prompt)
    assert a.input_ids == b.input_ids
    assert a.words == b.words and a.truncated_words == b.truncated_words
    shared = tokenize_shared([tok, tok2, None], prompt)
    assert shared.words == a.words


def test_tokenize_shared_rejects_disagreeing_tokenizers(tok):
    short = clip_tokenizer(model_max_length=8)
    with pytest.raises(ValueError, match="cannot be shared"):
        tokenize_shared([tok, short], "a photograph of an astronaut riding a horse on mars")


# ------------------------------------------------------------------------------------------- slow tokenizers
class _SlowTokenizer:
    """Stands in for a transformers Python tokenizer: no offsets mapping."""

    is_fast = False
    model_max_length = 77

    def __call__(self, text, **kwargs):
        return {"input_ids": [0, 1, 2]}


class _RaisingTokenizer:
    model_max_length = 77

    def __call__(self, text, return_offsets_mapping=False, **kwargs):
        if return_offsets_mapping:
            raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers.")
        return {"input_ids": [0, 1, 2]}


class _NoOffsetsTokenizer:
    model_max_length = 77

    def __call__(self, text, **kwargs):
        return {"input_ids": [0, 1, 2]}


@pytest.mark.parametrize("cls", [_SlowTokenizer, _RaisingTokenizer, _NoOffsetsTokenizer])
def test_slow_tokenizer_rejected(cls):
    with pytest.raises(TypeError, match=rf"{cls.__name__} gives no offsets mapping.*fast tokenizer .*is required"):
        tokenize_prompt(cls(), "a cat")


def test_prompt_must_be_str(tok):
    with pytest.raises(TypeError, match="prompt must be a str"):
        tokenize_prompt(tok, ["a cat"])
