"""The heat-map file: safetensors (one fp32 tensor ``heat_maps``) with JSON metadata in its header, written
atomically and read back with every header field checked.

Header fields (all strings, as safetensors stores them): ``format`` (``"daam_fast.heatmap"``), ``format_version``,
``tokens`` (:meth:`PromptTokens.to_dict` as JSON), ``positions`` (JSON list: the token position of each map row),
``meta`` (JSON object: model, steps, sizes, seed, ...; for joint-attention models ``text_sources`` and
``default_source``). A file that is damaged, foreign, inconsistent or of a newer version raises
:class:`HeatMapFileError` naming the field, whatever the damage, so nothing loads that would fail later.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path

import torch

from .tokens import PromptTokens

__all__ = ["FORMAT", "FORMAT_VERSION", "HeatMapFileError", "atomic_write", "read", "write"]

#: Version of the saved-file layout; files from a newer version are refused.
FORMAT_VERSION = 1
FORMAT = "daam_fast.heatmap"


class HeatMapFileError(ValueError):
    """A saved heat-map file is corrupt, truncated, not ours, inconsistent, or from a newer format version."""


def write(path: str | os.PathLike, maps: torch.Tensor, tokens: PromptTokens, positions, meta: dict) -> Path:
    """Write ``maps`` (``[n_positions, H, W]``, saved as fp32) and the header to ``path`` atomically: a temporary
    file in the same folder, synced, renamed over ``path``; an interrupted write leaves no file behind and the
    previous ``path`` intact. The temporary name is short whatever ``path``'s name, so every name the file system
    allows (255 bytes) can be written."""
    from safetensors.torch import save_file

    path = Path(path)
    header = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "tokens": json.dumps(tokens.to_dict(), ensure_ascii=False),
        "positions": json.dumps(list(positions)),
        "meta": json.dumps(meta, ensure_ascii=False, default=str),
    }
    atomic_write(path, lambda tmp: save_file({"heat_maps": maps.detach().float().contiguous().cpu()}, str(tmp),
                                             metadata=header))  # fmt: skip
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> int:
    """``write(tmp)`` to a temporary file in ``path``'s folder, sync it, rename it over ``path``; returns the size in
    bytes. An interrupted write leaves no temporary behind and the previous ``path`` intact. The temporary's name
    is short whatever ``path``'s (every name the file system allows, 255 bytes, can be written), and the file
    gets the mode ``open()`` would give it (writers such as safetensors and mkstemp make 0600 files)."""
    path = Path(path)
    # A prefix of the name (at most 32 characters, 128 bytes) keeps the temporary recognisable and within NAME_MAX.
    tmp = (path.parent or Path(".")) / f".{path.name[:32]}.{secrets.token_hex(6)}.tmp"
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    # 0o666 minus the umask, read off the file just created without touching the process-wide umask.
    mode = tmp.stat().st_mode & 0o777
    try:
        write(tmp)
        os.chmod(tmp, mode)
        # The data must be on disk before the rename, or a crash could leave an empty file under the final name.
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path.stat().st_size


def read(path: str | os.PathLike) -> tuple[PromptTokens, torch.Tensor, list[int], dict]:
    """``(tokens, maps fp32 [n_positions, H, W], positions, meta)`` of a file written by :func:`write`, every header
    field checked. Raises :class:`HeatMapFileError` (naming the field) for anything else, ``FileNotFoundError``
    for a missing file."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            if header.get("format") != FORMAT:
                raise HeatMapFileError(f"{path} is not a daam_fast heat-map file (format={header.get('format')!r})")
            _check_version(path, header.get("format_version", "0"))
            maps = f.get_tensor("heat_maps")
    except (HeatMapFileError, FileNotFoundError):
        raise
    except Exception as exc:  # safetensors raises several types for damaged files
        raise HeatMapFileError(f"{path} is corrupt or truncated: {exc}") from exc
    check = _Checker(path)
    tokens = check.tokens(check.field(header, "tokens", dict), "tokens")
    positions = check.field(header, "positions", list)
    if not all(_is_int(p) and p >= 0 for p in positions) or len(set(positions)) != len(positions):
        check.fail(f"positions must be distinct integers >= 0, got {positions[:20]!r}")
    meta = check.meta(check.field(header, "meta", dict))
    if not maps.is_floating_point():
        check.fail(f"maps must be floating point, got {maps.dtype}")
    if maps.dim() != 3 or maps.shape[0] != len(positions):
        check.fail(f"maps {tuple(maps.shape)} do not match {len(positions)} positions")
    if min(maps.shape[1:]) < 1:
        check.fail(f"maps {tuple(maps.shape)} must be [positions, height, width] with height, width >= 1")
    return tokens, maps.float(), positions, meta


def _check_version(path: Path, raw: str) -> None:
    version = int(raw) if raw.isdigit() and len(raw) < 10 else 0
    if version < 1:
        raise HeatMapFileError(f"{path} has format version {raw!r}: expected an integer 1..{FORMAT_VERSION}")
    if version > FORMAT_VERSION:
        raise HeatMapFileError(
            f"{path} has format version {version}; this daam_fast reads up to {FORMAT_VERSION}: upgrade daam_fast"
        )


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_pair(x, lo: int, hi: int) -> bool:
    return isinstance(x, list) and len(x) == 2 and all(_is_int(v) for v in x) and lo <= x[0] <= x[1] <= hi


def _is_size(x) -> bool:
    return isinstance(x, list) and len(x) == 2 and all(_is_int(v) and v >= 1 for v in x)


#: Meta entries daam_fast itself writes and reads back, with a check and what it says is valid. Other entries
#: (``save(**extra_meta)``) are the user's and kept as they are.
_META = {
    "seed": (lambda v: v is None or _is_int(v), "an int or null"),
    "steps": (lambda v: v is None or (_is_int(v) and v >= 0), "an int >= 0 or null"),
    "step": (lambda v: _is_int(v) and v >= 0, "an int >= 0"),
    "model": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "model_name": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "complete": (lambda v: isinstance(v, bool), "true or false"),
    "negative": (lambda v: isinstance(v, bool), "true or false"),
    "nonfinite": (lambda v: isinstance(v, bool), "true or false"),
    **{k: (_is_size, "[height, width], integers >= 1") for k in ("image_size", "latent_size", "token_grid")},
}


class _Checker:
    """Checks of one file's header; :meth:`fail` raises :class:`HeatMapFileError` naming the file."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, what: str):
        raise HeatMapFileError(f"{self.path}: {what}")

    def field(self, header: dict, name: str, kind: type):
        if name not in header:
            self.fail(f"is corrupt or truncated: header field {name!r} is missing")
        try:
            value = json.loads(header[name])
        except (ValueError, RecursionError) as exc:
            self.fail(f"header field {name!r} is not JSON ({type(exc).__name__})")
        if not isinstance(value, kind):
            what = {dict: "object", list: "array"}[kind]
            self.fail(f"header field {name!r} must be a JSON {what}, got {type(value).__name__}")
        return value

    def tokens(self, d, where: str) -> PromptTokens:
        """A :class:`PromptTokens` from its ``to_dict`` form, every entry checked (``where`` names it)."""
        if not isinstance(d, dict):
            self.fail(f"{where!r} must be a JSON object, got {type(d).__name__}")
        for key in ("prompt", "input_ids", "tokens", "offsets", "words", "truncated_words", "max_length"):
            if key not in d:
                self.fail(f"{where} lacks {key!r}")
        prompt = d["prompt"]
        if not isinstance(prompt, str):
            self.fail(f"{where}['prompt'] must be a string")
        n = len(prompt)
        lists = {
            "input_ids": (_is_int, "a list of integers"),
            "tokens": (lambda t: isinstance(t, str), "a list of strings"),
            "truncated_words": (lambda t: isinstance(t, str), "a list of strings"),
            "offsets": (lambda o: _is_pair(o, 0, n), "[start, end] pairs within the prompt"),
        }
        for key, (ok, what) in lists.items():
            if not isinstance(d[key], list) or not all(ok(x) for x in d[key]):
                self.fail(f"{where}[{key!r}] must be {what}")
        if not len(d["input_ids"]) == len(d["tokens"]) == len(d["offsets"]):
            self.fail(f"{where}: input_ids, tokens and offsets differ in length")
        window = len(d["input_ids"])

        def word_ok(w):
            return (
                isinstance(w, list)
                and len(w) == 4
                and isinstance(w[0], str)
                and _is_pair(w[1:3], 0, n)
                and isinstance(w[3], list)
                and all(_is_int(p) and 0 <= p < window for p in w[3])
            )

        if not isinstance(d["words"], list) or not all(word_ok(w) for w in d["words"]):
            self.fail(f"{where}['words'] must be [text, start, end, [positions]] entries within the prompt and window")
        if not _is_int(d["max_length"]) or d["max_length"] < 1:
            self.fail(f"{where}['max_length'] must be an integer >= 1")
        full = d.get("untruncated_offsets")
        if full is not None and (not isinstance(full, list) or not all(_is_pair(o, 0, n) for o in full)):
            self.fail(f"{where}['untruncated_offsets'] must be null or [start, end] pairs within the prompt")
        return PromptTokens.from_dict(d)

    def meta(self, meta: dict) -> dict:
        for key, (ok, what) in _META.items():
            if key in meta and not ok(meta[key]):
                self.fail(f"meta[{key!r}] must be {what}, got {meta[key]!r}"[:300])
        if "text_sources" not in meta:
            return meta
        sources = meta["text_sources"]
        if not isinstance(sources, list) or not sources:
            self.fail("meta text_sources must be a non-empty list of {name, offset, tokens}")
        for i, s in enumerate(sources):
            where = f"text_sources[{i}]"
            if not isinstance(s, dict):
                self.fail(f"{where} must be a JSON object")
            for key in ("name", "offset", "tokens"):
                if key not in s:
                    self.fail(f"{where} lacks {key!r}")
            if not isinstance(s["name"], str) or not _is_int(s["offset"]) or s["offset"] < 0:
                self.fail(f"{where} must have a string name and an integer offset >= 0")
            self.tokens(s["tokens"], f"{where}.tokens")
        names = [s["name"] for s in sources]
        default = meta.get("default_source", "both")
        if len(set(names)) != len(names) or default not in {*names, "both"}:
            self.fail(f"meta default_source {default!r} is none of {names} or 'both' (names must be distinct)")
        return meta
