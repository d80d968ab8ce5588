"""Prompt words -> token positions, through the tokenizer's own character offsets.

daam (castorini/daam 0.2.0) finds a word by tokenising the word on its own and searching for that token
sequence in the tokenised prompt. That goes wrong in several ways: ``"us"`` matches the tail of
``"hippopotamus"``; a word BPE-merges differently inside the prompt than alone; casing, punctuation and
scripts without spaces have no defined answer. Here the prompt is encoded exactly as the pipeline encodes it,
with the fast tokenizer's ``offset_mapping`` (character spans in the ORIGINAL prompt, also when the
tokenizer's normaliser lowercases or NFC-composes), and a word's positions are the tokens whose span overlaps
the word's characters. A slow tokenizer (transformers 4.x) gives no offsets; its own tokens, the ones the
pipeline feeds the model, are aligned to the prompt instead (:mod:`daam_fast.tokens_slow`).

Words. A word is a maximal run of letters, combining marks and digits (Unicode categories L, M, N), so
punctuation and spaces separate words: ``"cat,"``, ``"(cat)"`` and ``"cat's"`` all contain the word ``cat``
(``"cat's"`` also the word ``s``, which owns CLIP's ``'s`` token); ``"dog-house"`` is ``dog`` and ``house``.
Scripts written without spaces (Han, Kana, Hangul, Thai, Lao, Khmer, Myanmar, Bopomofo) form runs of their own;
a query in those scripts matches any substring of such a run (``"猫"`` in ``"猫が好き"``), every other query
matches whole words only. Matching is case-insensitive (``str.casefold``) and Unicode-normalised (NFC), and a
query of several words (``"red circle"``) matches them as consecutive prompt words, whatever separates them.

Prompt-weighting syntax. ``(word:1.3)``, ``((word))``, ``[word]`` and compel's ``(word)1.3`` keep their
brackets as punctuation, so only the word's own tokens are its positions; the weight number (``:1.3`` before a
closing bracket, a number right after ``)``) is not a word. diffusers itself does not parse this syntax, so its
tokens stay in the encoded sequence, as the pipeline sees them. A query may carry the syntax too:
``"(word:1.3)"`` is looked up as ``"word"``.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import logging
import operator
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .tokens_slow import can_align, nfc_with_spans, slow_offsets, window_offsets

__all__ = [
    "PromptTokens",
    "TruncatedWordError",
    "Word",
    "WordNotFoundError",
    "find_in_text",
    "strip_weighting",
    "text_words",
    "tokenize_prompt",
    "tokenize_shared",
]

logger = logging.getLogger(__name__)


class WordNotFoundError(ValueError):
    """The queried word does not occur in the prompt (the message lists the prompt's words)."""


class TruncatedWordError(WordNotFoundError):
    """The queried word occurs in the prompt but beyond the tokenizer's window, so the model never saw it."""


@dataclass(frozen=True)
class Word:
    """One word occurrence in the prompt.

    ``text`` is the word as written, ``prompt[start:end]``. ``positions`` are its token positions in the encoded
    window (0 = start token for CLIP), ascending; for a word partly cut by truncation only the surviving ones.
    """

    text: str
    start: int
    end: int
    positions: tuple[int, ...]


# --------------------------------------------------------------------------------------------------- scripts
# Code point ranges (inclusive) of scripts written without spaces between words. Python's unicodedata has no
# Script property, so blocks stand in for it; only letters, marks and digits of these blocks count (CJK
# punctuation such as 、。「」 stays punctuation).
_UNSPACED_RANGES = (
    (0x0E00, 0x0EFF),  # Thai, Lao
    (0x1000, 0x109F),  # Myanmar
    (0x1100, 0x11FF),  # Hangul Jamo
    (0x1780, 0x17FF),  # Khmer
    (0x2E80, 0x2FDF),  # CJK radicals, Kangxi radicals
    (0x3005, 0x3007),  # 々 〆 〇
    (0x3021, 0x3029),  # Hangzhou numerals
    (0x3031, 0x3035),  # Kana repeat marks
    (0x303B, 0x303C),  # 〻 〼
    (0x3040, 0x31FF),  # Hiragana, Katakana, Bopomofo, Hangul compatibility Jamo, Kanbun, Katakana ext.
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xA960, 0xA97F),  # Hangul Jamo extended A
    (0xAC00, 0xD7FF),  # Hangul syllables, Jamo extended B
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0xFF65, 0xFFDC),  # half-width Katakana and Hangul
    (0x20000, 0x323AF),  # CJK extensions B-H, compatibility supplement
)
_UNSPACED_STARTS = [a for a, _ in _UNSPACED_RANGES]


def _is_unspaced(ch: str) -> bool:
    i = bisect.bisect_right(_UNSPACED_STARTS, ord(ch)) - 1
    return i >= 0 and ord(ch) <= _UNSPACED_RANGES[i][1]


# ------------------------------------------------------------------------------------------ weighting syntax
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
# ":1.3" right before a closing bracket (A1111 "(word:1.3)", "[word:0.5]"), or a number right after ")" (compel
# "(word)1.3"). A ratio such as "(16:9)" reads as a weight too; that is the price of a context-free rule.
_WEIGHT_RE = re.compile(rf":\s*{_NUMBER}\s*(?=[)\]])|(?<=\)){_NUMBER}")


def strip_weighting(text: str) -> str:
    """``text`` with prompt-weight numbers blanked out (same length, so character offsets stay valid).

    ``"(red:1.3) (cat)1.1"`` -> ``"(red    ) (cat)   "``; the brackets are punctuation and separate words anyway.
    """
    return _WEIGHT_RE.sub(lambda m: " " * len(m.group()), text)


# ------------------------------------------------------------------------------------------- segmentation
@dataclass(frozen=True)
class _Segment:
    start: int
    end: int
    unspaced: bool
    norm: str  # NFC form; for spaced words also casefolded
    spans: tuple[tuple[int, int], ...]  # original character span of each char of ``norm`` (only for unspaced)


def _segment(text: str) -> list[_Segment]:
    """Words of ``text`` (weight syntax blanked out first): maximal runs of L/M/N characters of one kind."""
    masked = strip_weighting(text)
    runs: list[list] = []  # [start, end, unspaced]
    for i, ch in enumerate(masked):
        cat = unicodedata.category(ch)[0]
        if cat not in "LMN":
            continue
        unspaced = _is_unspaced(ch)
        # A combining mark continues the run it follows, whatever block it comes from.
        if runs and runs[-1][1] == i and (runs[-1][2] == unspaced or cat == "M"):
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1, unspaced])
    segments = []
    for a, b, unspaced in runs:
        norm, spans = nfc_with_spans(text, a, b)
        if unspaced:
            segments.append(_Segment(a, b, True, norm, tuple(spans)))
        else:
            segments.append(_Segment(a, b, False, norm.casefold(), ()))
    return segments


def _find(query: list[_Segment], words: list[_Segment]) -> list[list[tuple[int, int]]]:
    """Non-overlapping occurrences of ``query`` in ``words``, in prompt order; each is one character span per
    query word."""
    found: list[list[tuple[int, int]]] = []
    if len(query) == 1 and query[0].unspaced:
        key = query[0].norm
        for w in words:
            if not w.unspaced:
                continue
            i = w.norm.find(key)
            while i >= 0:
                found.append([(w.spans[i][0], w.spans[i + len(key) - 1][1])])
                i = w.norm.find(key, i + len(key))
        return found
    n, i = len(query), 0
    while i + n <= len(words):
        spans = []
        for j, (q, w) in enumerate(zip(query, words[i : i + n], strict=True)):
            if q.unspaced != w.unspaced:
                break
            if not q.unspaced or (0 < j < n - 1):
                if q.norm != w.norm:
                    break
                spans.append((w.start, w.end))
            elif j == 0:  # an unspaced first word may be the tail of a run: "黒猫 on" matches "...の黒猫 on"
                if not w.norm.endswith(q.norm):
                    break
                spans.append((w.spans[len(w.norm) - len(q.norm)][0], w.end))
            else:  # an unspaced last word may be the head of a run
                if not w.norm.startswith(q.norm):
                    break
                spans.append((w.start, w.spans[len(q.norm) - 1][1]))
        if len(spans) == n:
            found.append(spans)
            i += n
        else:
            i += 1
    return found


class _SpanIndex:
    """Token positions whose span overlaps a query span in ``O(log n + k)``, so a long prompt's lookups stay linear.
    Spans come in text order (starts and ends non-decreasing): the tokens starting before the query's end are a
    prefix, and of those the ones ending after its start a suffix. Spans out of order are scanned instead."""

    def __init__(self, offsets: Sequence[tuple[int, int]]):
        self.offsets = offsets
        kept = [(a, b, i) for i, (a, b) in enumerate(offsets) if b > 0]  # special tokens' (0, 0) overlap nothing
        self.starts, self.ends, self.index = ([k[j] for k in kept] for j in range(3))
        self.ordered = all(x <= y for col in (self.starts, self.ends) for x, y in itertools.pairwise(col))

    def overlapping(self, start: int, end: int) -> list[int]:
        """Positions ``i`` (ascending) with ``offsets[i][0] < end`` and ``offsets[i][1] > start``."""
        if not self.ordered:
            return [i for i, (a, b) in enumerate(self.offsets) if a < end and b > start]
        hi = bisect.bisect_left(self.starts, end)
        lo = bisect.bisect_right(self.ends, start, 0, hi)
        return self.index[lo:hi]


def _dedup(xs: Iterable):
    # Order-preserving de-duplication.
    return list(dict.fromkeys(xs))


# ------------------------------------------------------------------------------------------------ prompt
@dataclass
class PromptTokens:
    """A prompt encoded as the pipeline encodes it, with its words' token positions.

    ``input_ids``/``tokens``/``offsets`` (length ``n_tokens()``) are the window the text encoder sees: start
    token, prompt tokens, end token, no padding; ``offsets[i]`` is token i's character span in ``prompt``
    ((0, 0) for special tokens). ``words`` are the prompt's words in order that have tokens in the window;
    ``truncated_words`` the words that lost tokens to truncation: dropped entirely, or partly cut (those keep
    their surviving tokens in ``words``). ``untruncated_offsets`` are the offsets of the whole prompt's encoding
    when it was longer than the window, else None. ``max_length`` is the window, ``tokenizer.model_max_length``
    (77 for CLIP).
    """

    prompt: str
    input_ids: list[int]
    tokens: list[str]
    offsets: list[tuple[int, int]]
    words: list[Word]
    truncated_words: list[str]
    max_length: int
    untruncated_offsets: list[tuple[int, int]] | None = field(default=None, repr=False)

    def n_tokens(self) -> int:
        """Length of the encoded window: start token + prompt tokens + end token."""
        return len(self.input_ids)

    def to_dict(self) -> dict:
        """JSON-ready fields (for saved heat maps); :meth:`from_dict` rebuilds the object without a tokenizer."""
        return {
            "prompt": self.prompt,
            "input_ids": list(self.input_ids),
            "tokens": list(self.tokens),
            "offsets": [list(o) for o in self.offsets],
            "words": [[w.text, w.start, w.end, list(w.positions)] for w in self.words],
            "truncated_words": list(self.truncated_words),
            "max_length": self.max_length,
            "untruncated_offsets": None
            if self.untruncated_offsets is None
            else [list(o) for o in self.untruncated_offsets],
        }

    @classmethod
    def from_dict(cls, d: dict) -> PromptTokens:
        """Inverse of :meth:`to_dict`."""
        return cls(
            prompt=d["prompt"],
            input_ids=[int(i) for i in d["input_ids"]],
            tokens=list(d["tokens"]),
            offsets=[(int(a), int(b)) for a, b in d["offsets"]],
            words=[Word(t, int(a), int(b), tuple(int(p) for p in ps)) for t, a, b, ps in d["words"]],
            truncated_words=list(d["truncated_words"]),
            max_length=int(d["max_length"]),
            untruncated_offsets=None
            if d.get("untruncated_offsets") is None
            else [(int(a), int(b)) for a, b in d["untruncated_offsets"]],
        )

    @functools.cached_property
    def _segments(self) -> list[_Segment]:
        return _segment(self.prompt)

    @functools.cached_property
    def _window_index(self) -> _SpanIndex:
        return _SpanIndex(self.offsets)

    @functools.cached_property
    def _untruncated_index(self) -> _SpanIndex | None:
        return _SpanIndex(self.untruncated_offsets) if self.untruncated_offsets else None

    def _span_positions(self, start: int, end: int) -> tuple[list[int], int]:
        """Window positions overlapping ``prompt[start:end]`` and how many tokens overlap it untruncated."""
        kept = self._window_index.overlapping(start, end)
        full = len(self._untruncated_index.overlapping(start, end)) if self._untruncated_index else len(kept)
        return kept, full

    def _word_list(self) -> str:
        texts = _dedup(self.prompt[s.start : s.end] for s in self._segments)
        if not texts:
            return "the prompt has no words"
        shown = ", ".join(repr(t) for t in texts[:60])
        return f"the prompt's words are: {shown}" + (f" ... ({len(texts)} in all)" if len(texts) > 60 else "")

    def positions(self, word: str, occurrence: int | None = None) -> list[int]:
        """Token positions (indices into ``input_ids``) of ``word`` in the prompt.

        ``word`` is matched case-insensitively against whole prompt words (substrings within runs of scripts
        written without spaces, see the module docstring); several words match consecutive prompt words and give
        the union of their tokens in order; prompt-weighting syntax in ``word`` is stripped. ``occurrence=None``
        concatenates all occurrences (duplicates removed), as daam averages over them; ``occurrence=n`` gives the
        n-th (0-based, counted over the whole prompt, truncated occurrences included). Occurrences that
        truncation cut partly give their surviving tokens; with ``occurrence=None`` fully dropped occurrences
        are skipped.

        Raises ``WordNotFoundError`` (a ``ValueError``) listing the prompt's words when ``word`` is not in the
        prompt, ``TruncatedWordError`` when it (or the requested occurrence) lies beyond the window, and
        ``ValueError`` for an out-of-range ``occurrence`` or a query with no word characters.
        """
        if occurrence is not None and (isinstance(occurrence, bool) or not hasattr(occurrence, "__index__")):
            raise TypeError(f"occurrence must be an int or None, got {occurrence!r} ({type(occurrence).__name__})")
        found = self._occurrences(word)
        per_occurrence = []
        for spans in found:
            kept = _dedup(p for s, e in spans for p in self._span_positions(s, e)[0])
            per_occurrence.append(kept)
        if occurrence is None:
            chosen = [p for kept in per_occurrence for p in kept]
            if not chosen:
                raise TruncatedWordError(self._truncated_message(word, len(found)))
            return _dedup(chosen)
        if isinstance(occurrence, bool) or not 0 <= operator.index(occurrence) < len(found):
            raise ValueError(
                f"{word!r} occurs {len(found)} time(s) in the prompt; occurrence={occurrence!r} is out of range "
                f"(0..{len(found) - 1})"
            )
        if not per_occurrence[occurrence]:
            raise TruncatedWordError(self._truncated_message(word, len(found), occurrence))
        return per_occurrence[occurrence]

    def _occurrences(self, word: str) -> list[list[tuple[int, int]]]:
        """Occurrences of ``word`` (one character span per query word), or the errors :meth:`positions` raises."""
        if not isinstance(word, str):
            raise TypeError(f"word must be a str, got {type(word).__name__}: {word!r}")
        query = _segment(word)
        if not query:
            raise ValueError(f"the query {word!r} has no word characters (letters or digits)")
        found = _find(query, self._segments)
        if not found:
            raise WordNotFoundError(f"{word!r} is not in the prompt {self.prompt!r}; {self._word_list()}")
        return found

    def _truncated_message(self, word: str, n_found: int, occurrence: int | None = None) -> str:
        which = f"occurrence {occurrence} of {word!r}" if occurrence is not None else repr(word)
        if occurrence is None and n_found > 1:
            which = f"all {n_found} occurrences of {word!r}"
        n_full = len(self.untruncated_offsets or self.offsets)
        return (
            f"{which} lie(s) beyond the {self.max_length}-token window of the tokenizer: the prompt encodes to "
            f"{n_full} tokens (special tokens included) and the pipeline truncates it to {self.max_length}, so the "
            f"model never saw it and it has no heat map"
        )

    def word_positions(self) -> list[tuple[str, list[int]]]:
        """Each word occurrence kept in the window, in prompt order, with its token positions."""
        return [(w.text, list(w.positions)) for w in self.words]


def text_words(text: str) -> list[str]:
    """The words of ``text`` in order, as word lookup splits it (weighting syntax is no word)."""
    return [text[s.start : s.end] for s in _segment(text)]


def find_in_text(text: str, word: str) -> int:
    """How often ``word`` occurs in ``text`` as :meth:`PromptTokens.positions` matches it, before any truncation
    (no tokenizer: front ends check requests before loading a model). Raises as :meth:`PromptTokens.positions`."""
    return len(PromptTokens(text, [], [], [], [], [], 0)._occurrences(word))


# ----------------------------------------------------------------------------------------------- encoding
def _encode(tokenizer, prompt: str, **kwargs) -> tuple[list[int], list[tuple[int, int]]]:
    """``input_ids`` of ``tokenizer(prompt, **kwargs)`` and each token's character span in ``prompt``: the fast
    tokenizer's ``offset_mapping``, or for a slow tokenizer its own tokens aligned to the prompt."""
    if getattr(tokenizer, "is_fast", True) is not False:
        try:
            enc = tokenizer(prompt, return_offsets_mapping=True, **kwargs)
        except NotImplementedError:  # what transformers' Python (slow) tokenizers raise for offsets
            enc = {}
        if "offset_mapping" in enc:
            return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    if not can_align(tokenizer):
        raise TypeError(
            f"{type(tokenizer).__name__} gives no offsets mapping and its tokens are neither byte-level BPE nor "
            f"SentencePiece pieces, so daam_fast cannot map words to tokens; a fast tokenizer (a transformers "
            f"PreTrainedTokenizerFast, e.g. AutoTokenizer with use_fast=True) is required"
        )
    # The ids the pipeline feeds the model are the slow tokenizer's own: align its tokens to the prompt.
    ids = list(tokenizer(prompt, **kwargs)["input_ids"])
    if not kwargs.get("truncation"):
        return ids, slow_offsets(tokenizer, prompt, ids)
    full = list(tokenizer(prompt, truncation=False, verbose=False)["input_ids"])
    return ids, window_offsets(tokenizer, ids, full, slow_offsets(tokenizer, prompt, full))


def tokenize_prompt(tokenizer, prompt: str, max_length: int | None = None) -> PromptTokens:
    """Encode ``prompt`` as a diffusers pipeline does and map its words to token positions.

    The window is ``tokenizer(prompt, truncation=True, max_length=max_length)`` with ``max_length`` defaulting
    to ``tokenizer.model_max_length`` (77 for CLIP: start + 75 prompt tokens + end), exactly the pipeline's
    call minus its padding. ``tokenizer`` is a Hugging Face fast tokenizer (offsets mapping) or a transformers
    4.x slow one with byte-level BPE or SentencePiece tokens (CLIP, T5), whose tokens are aligned to the prompt
    (:mod:`daam_fast.tokens_slow`); any other raises ``TypeError``.

    Truncation: a word with no token left in the window is dropped (not in ``words``, querying it raises
    ``TruncatedWordError``); a word whose tokens are partly cut keeps its surviving tokens in ``words``. Both
    count as truncated: they are listed in ``truncated_words`` and named in one logged warning.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    if max_length is None:
        max_length = int(tokenizer.model_max_length)
    input_ids, offsets = _encode(tokenizer, prompt, truncation=True, max_length=max_length)
    untruncated = None
    if len(input_ids) >= max_length:
        # verbose=False: transformers would warn that the untruncated sequence is too long for the model.
        full_ids, full_offsets = _encode(tokenizer, prompt, truncation=False, verbose=False)
        if len(full_ids) > len(input_ids):
            untruncated = full_offsets
    pt = PromptTokens(
        prompt=prompt,
        input_ids=input_ids,
        tokens=list(tokenizer.convert_ids_to_tokens(input_ids)),
        offsets=offsets,
        words=[],
        truncated_words=[],
        max_length=max_length,
        untruncated_offsets=untruncated,
    )
    dropped, partial = [], []
    for seg in pt._segments:
        text = prompt[seg.start : seg.end]
        kept, full = pt._span_positions(seg.start, seg.end)
        if kept:
            pt.words.append(Word(text, seg.start, seg.end, tuple(kept)))
        if len(kept) < full:
            pt.truncated_words.append(text)
            (partial if kept else dropped).append(text)
    if pt.truncated_words:
        parts = []
        if dropped:
            parts.append(f"dropped words: {', '.join(map(repr, dropped))}")
        if partial:
            parts.append(f"partly cut words (their surviving tokens are kept): {', '.join(map(repr, partial))}")
        logger.warning(
            "the prompt encodes to %d tokens but the tokenizer's window holds %d (special tokens included); the "
            "pipeline truncates it the same way, so these words get no or partial heat maps: %s",
            len(untruncated or offsets),
            max_length,
            "; ".join(parts),
        )
    return pt


def tokenize_shared(tokenizers: Sequence, prompt: str) -> PromptTokens:
    """Tokenise ``prompt`` with every tokenizer of a pipeline whose text encoders' outputs are joined along the
    feature axis (SDXL: ``tokenizer`` and ``tokenizer_2``), so all must give the same token positions.

    ``None`` entries are skipped. Returns the first tokenizer's ``PromptTokens``; raises ``ValueError`` naming
    the first difference when the tokenizers disagree on the window length or any word's positions.
    """
    tokenizers = [t for t in tokenizers if t is not None]
    if not tokenizers:
        raise ValueError("tokenize_shared needs at least one tokenizer")
    results = [tokenize_prompt(t, prompt) for t in tokenizers]
    first = results[0]
    for k, other in enumerate(results[1:], start=1):
        if other.n_tokens() != first.n_tokens():
            raise ValueError(
                f"tokenizers 0 and {k} encode {prompt!r} to {first.n_tokens()} and {other.n_tokens()} tokens; "
                "their token positions cannot be shared"
            )
        for a, b in itertools.zip_longest(first.words, other.words):
            if a != b:
                raise ValueError(
                    f"tokenizers 0 and {k} place the words of {prompt!r} differently: {a} vs {b}; their token "
                    "positions cannot be shared"
                )
    return first
