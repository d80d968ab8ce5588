"""Character offsets for tokenizers that give none: transformers 4.x's Python ("slow") tokenizers.

Under transformers 4.x every diffusers pipeline loaded with ``from_pretrained`` has the slow ``CLIPTokenizer``
(and SD3 / Flux may have a slow ``T5Tokenizer``). The pipeline feeds the model the ids the slow tokenizer gives,
so the positions must index those ids, even where a fast twin would tokenise differently (without ``ftfy`` the
slow CLIP tokenizer spaces out CJK ideographs: ``"猫が好き"`` is four words to it, one to the fast tokenizer).
So instead of switching tokenizers, the slow tokenizer's own tokens are aligned to the prompt:

1. Each token's text: byte-level BPE tokens (CLIP, GPT-2: a ``byte_decoder``) decode to bytes, ``</w>`` marking a
   word end; SentencePiece pieces (T5: an ``sp_model``) read ``▁`` as a space and ``<0xNN>`` as a byte. Special
   tokens have no text; an unknown-token id covers whatever run of prompt characters it replaced.
2. The tokens' text, whitespace dropped, is matched left to right against the prompt's characters (grouped as a
   starter and its combining marks), each of which may appear as written, NFC- or NFKC-normalised, lowercased or
   casefolded (what CLIP's and T5's normalisers do), curly quotes straightened (ftfy); control characters may
   be dropped. A token's span is the union of the characters its bytes came from, so a byte token of a
   multi-byte character gets the whole character, as with a fast tokenizer's ``offset_mapping``.

Where the two tokenizers give the same ids, the spans overlap the same words as the fast tokenizer's offsets, so
words get the same positions (tests/test_tokens_slow.py checks this on transformers 4.x).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

__all__ = ["SlowAlignmentError", "can_align", "nfc_with_spans", "slow_offsets", "window_offsets"]

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_UNCURL = str.maketrans({"‘": "'", "’": "'", "‚": "'", "‛": "'", "“": '"', "”": '"', "„": '"', "‟": '"'})
_WILD = object()  # an unknown-token id: stands for an unknown run of prompt characters


class SlowAlignmentError(ValueError):
    """A slow tokenizer's tokens could not be matched to the prompt's characters."""


def nfc_with_spans(text: str, start: int, end: int) -> tuple[str, list[tuple[int, int]]]:
    """NFC of ``text[start:end]`` and, per output character, the original span it came from.

    Composition only joins a starter with the characters after it, so normalising each starter + its
    followers on its own gives the same string; Hangul medial/final jamo compose with the syllable before
    them although they are starters, so they never begin a chunk.
    """
    out: list[str] = []
    spans: list[tuple[int, int]] = []
    for a, b in _clusters(text, start, end):
        chunk = unicodedata.normalize("NFC", text[a:b])
        out.append(chunk)
        spans.extend([(a, b)] * len(chunk))
    return "".join(out), spans


def _clusters(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """``text[start:end]`` cut into starters with their combining followers, as ``(a, b)`` spans."""
    cuts, a = [], start
    for b in range(start + 1, end + 1):
        if b < end and (unicodedata.combining(text[b]) or 0x1160 <= ord(text[b]) <= 0x11FF):
            continue
        cuts.append((a, b))
        a = b
    return cuts


def can_align(tokenizer) -> bool:
    """Whether :func:`slow_offsets` knows how to read ``tokenizer``'s tokens (byte-level BPE or SentencePiece)."""
    return getattr(tokenizer, "byte_decoder", None) is not None or getattr(tokenizer, "sp_model", None) is not None


def _wild_unk(tokenizer) -> int | None:
    """The unknown token's id when it stands for prompt text. CLIP's unknown token is its end token (byte-level
    BPE has no unknown text), so there it is only special."""
    unk = tokenizer.unk_token_id
    return None if unk in {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id} else unk


def _text_token_test(tokenizer):
    special, unk = set(tokenizer.all_special_ids), _wild_unk(tokenizer)
    return lambda i: i == unk or i not in special


def _token_texts(tokenizer, ids: Sequence[int]) -> list:
    """Per token: its bytes, ``None`` for a special token, or ``_WILD`` for an unknown token."""
    is_text, wild_unk = _text_token_test(tokenizer), _wild_unk(tokenizer)
    byte_decoder = getattr(tokenizer, "byte_decoder", None)
    out: list = []
    for i, tok in zip(ids, tokenizer.convert_ids_to_tokens(list(ids)), strict=True):
        if i == wild_unk:
            out.append(_WILD)
        elif not is_text(i):
            out.append(None)
        elif byte_decoder is not None:
            tok = tok[: -len("</w>")] if tok.endswith("</w>") else tok
            try:
                out.append(bytes(byte_decoder[c] for c in tok))
            except KeyError as e:
                raise SlowAlignmentError(f"token {tok!r} (id {i}) is not byte-level BPE text") from e
        else:
            m = _BYTE_PIECE.fullmatch(tok)
            out.append(bytes([int(m.group(1), 16)]) if m else tok.replace("▁", " ").encode("utf-8"))
    return out


def _stream(texts: list) -> list[tuple[str | None, list[int]]]:
    """The tokens' text as non-space characters, each with the tokens its bytes came from; ``(None, [t])`` is an
    unknown token ``t``."""
    out: list[tuple[str | None, list[int]]] = []
    buf, owners = b"", []

    def flush():
        nonlocal buf, owners
        text = buf.decode("utf-8", errors="replace")
        if len(text.encode("utf-8")) != len(buf):  # invalid bytes: give up attributing bytes per character
            per_char = [sorted(set(owners))] * len(text)
        else:
            per_char, k = [], 0
            for ch in text:
                n = len(ch.encode("utf-8"))
                per_char.append(sorted(set(owners[k : k + n])))
                k += n
        out.extend((ch, o) for ch, o in zip(text, per_char, strict=True) if not ch.isspace())
        buf, owners = b"", []

    for t, piece in enumerate(texts):
        if piece is None:
            continue
        if piece is _WILD:
            flush()
            out.append((None, [t]))
            continue
        buf += piece
        owners += [t] * len(piece)
    flush()
    return out


def _forms(raw: str) -> list[str]:
    """What a tokenizer's normaliser may turn the character cluster ``raw`` into (whitespace removed), longest
    first."""
    bases = set()
    for f in (raw, unicodedata.normalize("NFC", raw), unicodedata.normalize("NFKC", raw)):
        bases |= {f, f.translate(_UNCURL)}
    forms = set()
    for f in bases:
        lower = f.lower()
        forms |= {f, lower, f.casefold(), unicodedata.normalize("NFKC", lower), lower.replace("σ", "ς")}
    return sorted({"".join(f.split()) for f in forms}, key=len, reverse=True)


def _droppable(raw: str) -> bool:
    # What normalisers delete: control / format characters (zero-width joiners ...), the replacement character.
    return all(unicodedata.category(c)[0] == "C" or c == "\ufffd" for c in raw)


def slow_offsets(tokenizer, prompt: str, ids: Sequence[int]) -> list[tuple[int, int]]:
    """Character span in ``prompt`` of each token of ``ids`` (``prompt``'s complete, untruncated encoding by
    ``tokenizer``, special tokens included); ``(0, 0)`` for special tokens and tokens without characters.

    ``tokenizer``: a transformers slow tokenizer with a ``byte_decoder`` (CLIP) or an ``sp_model`` (T5). Raises
    :class:`SlowAlignmentError` (a ``ValueError``) when its tokens do not spell the prompt.
    """
    texts = _token_texts(tokenizer, ids)
    stream = _stream(texts)
    spans: list[list[int] | None] = [None] * len(ids)

    def give(owners: list[int], a: int, b: int) -> None:
        for t in owners:
            s = spans[t]
            spans[t] = [a, b] if s is None else [min(s[0], a), max(s[1], b)]

    # group: a run of unknown tokens absorbing prompt characters, ``absorbed`` of them so far. Each takes at least
    # one character; the last keeps taking them until a character matches the next known text.
    j, group, absorbed = 0, [], 0
    for a, b in _clusters(prompt, 0, len(prompt)):
        raw = prompt[a:b]
        if raw.isspace():
            continue
        form = next((f for f in _forms(raw) if f and _matches(stream, j, f)), None)
        if group:
            if absorbed < len(group) or form is None:
                give([group[min(absorbed, len(group) - 1)]], a, b)
                absorbed += 1
                continue
            group = []
        if j >= len(stream):
            break  # the rest of the prompt produced no more tokens (dropped characters)
        if stream[j][0] is None:  # unknown tokens start here
            while j < len(stream) and stream[j][0] is None:
                group += stream[j][1]
                j += 1
            give(group[:1], a, b)
            absorbed = 1
        elif form is not None:
            for k in range(j, j + len(form)):
                give(stream[k][1], a, b)
            j += len(form)
        elif not _droppable(raw):
            got = "".join(c or "<unk>" for c, _ in stream[j : j + 8])
            raise SlowAlignmentError(
                f"{type(tokenizer).__name__}'s tokens do not spell the prompt {prompt!r}: at character {a} "
                f"({raw!r}) the tokens continue with {got!r}; use a fast tokenizer (AutoTokenizer with use_fast=True)"
            )
    if j < len(stream):
        rest = "".join(c or "<unk>" for c, _ in stream[j : j + 8])
        raise SlowAlignmentError(
            f"{type(tokenizer).__name__}'s tokens {rest!r}... are not in the prompt {prompt!r}; use a fast tokenizer "
            "(AutoTokenizer with use_fast=True)"
        )
    # A lone word-boundary piece (SentencePiece's "▁" before an unknown or split word) belongs to the word after
    # it, as in a fast tokenizer's offsets: it gets that word's first character.
    for t, piece in enumerate(texts):
        if spans[t] is None and isinstance(piece, bytes) and piece and piece.isspace():
            after = next((s for s in spans[t + 1 :] if s is not None), None)
            if after is not None:
                spans[t] = [after[0], after[0] + 1]
    return [(0, 0) if s is None else (s[0], s[1]) for s in spans]


def _matches(stream, j: int, form: str) -> bool:
    if j + len(form) > len(stream):
        return False
    return all(stream[j + k][0] == c for k, c in enumerate(form))


def window_offsets(
    tokenizer, window_ids: Sequence[int], full_ids: Sequence[int], full_offsets: Sequence[tuple[int, int]]
) -> list[tuple[int, int]]:
    """Offsets of a truncated window from those of the full encoding: the window's text tokens are a run of the
    full encoding's (its head, or its tail when the tokenizer truncates on the left)."""
    is_text = _text_token_test(tokenizer)
    full = [p for p, i in enumerate(full_ids) if is_text(i)]
    win = [p for p, i in enumerate(window_ids) if is_text(i)]
    full_text, win_text, n = [full_ids[p] for p in full], [window_ids[p] for p in win], len(win)
    starts = [0, len(full) - n, *range(1, len(full) - n)]
    k = next((s for s in starts if s >= 0 and full_text[s : s + n] == win_text), None)
    if k is None:
        raise SlowAlignmentError("the truncated window's tokens are not a run of the prompt's full encoding")
    out = [(0, 0)] * len(window_ids)
    for idx, p in enumerate(win):
        out[p] = full_offsets[full[k + idx]]
    return out
