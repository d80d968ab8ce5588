"""Slow (transformers 4.x) tokenizers give words the same token positions as fast ones (daam_fast.tokens_slow).

On transformers 4.x the real slow ``CLIPTokenizer`` / ``T5Tokenizer`` are compared with fast twins built from the
same files; everywhere (transformers 5 has no slow classes) the alignment runs on a stand-in that hides a fast
tokenizer's offsets and exposes only what a slow one has: its tokens and their byte / piece tables.
"""

from __future__ import annotations

import unicodedata

import pytest
import transformers

from daam_fast.tokens import TruncatedWordError, tokenize_prompt, tokenize_shared
from daam_fast.tokens_slow import SlowAlignmentError, slow_offsets
from tests.fixtures.pipelines import clip_tokenizer, t5_tokenizer

TRANSFORMERS_4 = int(transformers.__version__.split(".")[0]) < 5
only_4x = pytest.mark.skipif(not TRANSFORMERS_4, reason="transformers >= 5 has no slow CLIPTokenizer / T5Tokenizer")

# Every kind of prompt tests/test_tokens.py covers.
PROMPTS = [
    "A photo of a Hippopotamus, wearing (a red:1.2) hat!",
    "A  BIG   Cat\tnaps",
    "a cat next to another cat and a dog",
    "cat, cat. (cat) cat's cat!",
    "a red circle, a blue square and a red, circle",
    "猫が好き",
    "黒い猫と白い犬",
    "고양이가 좋아",
    "แมวสีดำนั่ง",
    "一只黑色的猫",
    "猫と猫, a cat",
    "一只黑猫 sitting on 椅子上",
    "un café noir",
    "eine Straße",
    "чёрная кошка",
    "μια γάτα",
    "un cafe\u0301 noir",
    "(red:1.3) ((dog)) [cat] (bird) (fish)1.2",
    "hippopotamus, rhinoceros; (giraffe:1.4) [zebra] ((elephant))",
    "un café à Paris, чёрная кошка, 猫が好き, 고양이",
    "dog-house 3.5 🐱 cat's toy",
    "‘curly’ “quotes” ﬁsh Ｆｕｌｌ ΣΟΦΙΑΣ",
    "",
    "!!! , .",
    "cat " + "a " * 73 + "hippopotamus zebra cat",
]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable character table (what a slow CLIP tokenizer decodes with)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


class _HiddenOffsets:
    """A fast tokenizer seen as a slow one: same ids and tokens, no offsets, and the table a slow tokenizer of its
    kind has (CLIP: ``byte_decoder``; SentencePiece: ``sp_model``)."""

    is_fast = False

    def __init__(self, fast, kind: str):
        self._fast = fast
        if kind == "bpe":
            self.byte_decoder = {v: k for k, v in _bytes_to_unicode().items()}
        else:
            self.sp_model = object()

    def __getattr__(self, name):
        return getattr(self._fast, name)

    def __call__(self, text, return_offsets_mapping=False, **kwargs):
        if return_offsets_mapping:
            raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers.")
        return self._fast(text, **kwargs)


@pytest.fixture(scope="module")
def clip_pair():
    """(slow-like, fast) CLIP tokenizers with identical ids."""
    fast = clip_tokenizer()
    if TRANSFORMERS_4:
        from transformers import CLIPTokenizerFast

        from tests.fixtures.pipelines import _tokenizer_dir

        fast = CLIPTokenizerFast.from_pretrained(str(_tokenizer_dir()), model_max_length=77)
    return _HiddenOffsets(fast, "bpe"), fast


def _same_words(a, b, ignore: tuple[str, ...] = ()):
    """Same ids, words and truncation; ``ignore``: tokens whose placement is left out of the comparison."""
    assert a.input_ids == b.input_ids
    assert a.truncated_words == b.truncated_words

    def kept(pt):
        return [(w.text, w.start, [p for p in w.positions if pt.tokens[p] not in ignore]) for w in pt.words]

    assert kept(a) == kept(b)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_aligned_clip_positions_equal_fast_offsets(clip_pair, prompt):
    slow, fast = clip_pair
    _same_words(tokenize_prompt(slow, prompt), tokenize_prompt(fast, prompt))


@pytest.mark.parametrize("prompt", ["a " * 80 + "cat", "a red circle", ""])
def test_aligned_clip_offsets_equal_fast_offsets_token_by_token(clip_pair, prompt):
    slow, fast = clip_pair
    enc = fast(prompt, return_offsets_mapping=True)
    assert slow_offsets(slow, prompt, enc["input_ids"]) == [tuple(o) for o in enc["offset_mapping"]]


def test_aligned_left_truncation(clip_pair):
    slow, fast = clip_pair
    prompt = "zebra hippopotamus " + "a " * 73 + "cat"
    for t in (slow._fast,):
        t.truncation_side = "left"
    try:
        a, b = tokenize_prompt(slow, prompt), tokenize_prompt(fast, prompt)
    finally:
        slow._fast.truncation_side = "right"
    _same_words(a, b)
    assert a.positions("hippopotamus") == [1]
    with pytest.raises(TruncatedWordError):
        a.positions("zebra")


def test_aligned_sdxl_pair_shares_positions(clip_pair):
    slow, fast = clip_pair
    prompt = "a photograph of an astronaut riding a horse on mars"
    assert tokenize_shared([slow, fast], prompt).words == tokenize_prompt(fast, prompt).words


@pytest.fixture(scope="module")
def t5_pair():
    fast = t5_tokenizer()
    if TRANSFORMERS_4:
        pytest.importorskip("google.protobuf", reason="building the fast T5 twin on transformers 4.x needs protobuf")
        import tempfile
        from pathlib import Path

        from transformers import T5TokenizerFast

        from tests.fixtures.pipelines import _t5_model

        path = Path(tempfile.mkdtemp(prefix="daam_fast_t5_")) / "spiece.model"
        path.write_bytes(_t5_model())
        fast = T5TokenizerFast(vocab_file=str(path), extra_ids=0, model_max_length=512, legacy=True, from_slow=True)
    return _HiddenOffsets(fast, "sp"), fast


T5_PROMPTS = [
    "a red circle and a blue square",
    "A Photo of a CAT wearing a hat, on a sofa!",  # unknown characters (A, P, C, T): <unk> tokens
    "the dog-house is next to zebra-like kiwi",
    "ünïcödé  spaced   text 猫",
    "(red:1.3) [circle] (hat)1.2",
    "hippopotamus hippopotamus",
    "",
]


@pytest.mark.parametrize("prompt", T5_PROMPTS)
def test_aligned_t5_positions_equal_fast_offsets(t5_pair, prompt):
    slow, fast = t5_pair
    # A lone "▁" piece (before an unknown word) is placed on the next word's first character by transformers 5's
    # fast T5 and by the alignment, on the space itself by transformers 4.x's fast T5: that one token is compared
    # only on transformers 5.
    ignore = ("▁",) if TRANSFORMERS_4 else ()
    _same_words(tokenize_prompt(slow, prompt), tokenize_prompt(fast, prompt), ignore)
    a, b = tokenize_prompt(slow, prompt, max_length=6), tokenize_prompt(fast, prompt, max_length=6)
    _same_words(a, b, ignore)


# ------------------------------------------------------------------------------------------- the real slow classes
def _spelled(pt, positions, tokenizer) -> str:
    """What the tokens at ``positions`` spell (CLIP: bytes through the byte table; T5: pieces without ▁)."""
    toks = [pt.tokens[p] for p in positions]
    if hasattr(tokenizer, "byte_decoder"):
        raw = bytes(tokenizer.byte_decoder[c] for t in toks for c in t.replace("</w>", ""))
        return raw.decode("utf-8", errors="replace")
    return "".join(toks).replace("▁", "")


@only_4x
@pytest.mark.parametrize("prompt", PROMPTS)
def test_slow_clip_tokenizer_positions(prompt):
    slow = clip_tokenizer()
    assert not slow.is_fast
    from transformers import CLIPTokenizerFast

    from tests.fixtures.pipelines import _tokenizer_dir

    fast = CLIPTokenizerFast.from_pretrained(str(_tokenizer_dir()), model_max_length=77)
    a, b = tokenize_prompt(slow, prompt), tokenize_prompt(fast, prompt)
    # The positions index the ids the pipeline gives the model: the slow tokenizer's own.
    assert a.input_ids == slow(prompt, truncation=True, max_length=77).input_ids
    if a.input_ids == b.input_ids:
        _same_words(a, b)
    else:
        # Without ftfy the slow CLIP tokenizer spaces out CJK ideographs, so it tokenises them differently from the
        # fast one; each word's positions are then exactly the slow tokens that spell it.
        assert [w.text for w in a.words] == [w.text for w in b.words]
        for w in a.words:
            assert _spelled(a, w.positions, slow) == unicodedata.normalize("NFC", w.text).lower()


@only_4x
@pytest.mark.parametrize("prompt", T5_PROMPTS)
def test_slow_t5_tokenizer_positions(prompt):
    slow = t5_tokenizer()
    assert not slow.is_fast
    pt = tokenize_prompt(slow, prompt)
    assert pt.input_ids == slow(prompt, truncation=True, max_length=512).input_ids
    for w in pt.words:
        spelled = _spelled(pt, w.positions, slow)
        if "<unk>" not in spelled:  # an unknown token stands for characters the vocabulary lacks
            assert spelled == unicodedata.normalize("NFKC", w.text)


def test_alignment_error_names_the_mismatch(clip_pair):
    slow, fast = clip_pair
    ids = fast("a red circle").input_ids
    with pytest.raises(SlowAlignmentError, match=r"do not spell the prompt 'a blue circle'.*fast tokenizer"):
        slow_offsets(slow, "a blue circle", ids)
    assert isinstance(SlowAlignmentError("x"), ValueError)
