"""A batch's items: prompts read from a text or JSONL file, each prompt crossed with its seeds.

Everything here is checked before a model is loaded: a malformed line, an unknown field, a bad seed range or size
and a duplicate id are :class:`~daam_fast.session.UsageError` naming the file and line number, so nothing is
generated from a file with a mistake in it.

Ids: a prompt's ``id`` (JSONL) or, by default, a slug of its text plus 8 hex digits of its hash
(``a_red_circle_and_a_blue_square-1f0c2a9b``): the same prompt gets the same id whatever its line, so a prompt
file can be reordered or extended and a rerun still finds the finished items. An item is ``<prompt id>_s<seed>``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import session
from ..report import safe_name
from ..session import Request, UsageError

__all__ = ["FIELDS", "Item", "PromptSpec", "plan_items", "read_prompts"]

#: Fields of a JSONL line; ``prompt`` is required.
FIELDS = ("prompt", "id", "negative_prompt", "seeds", "steps", "size")
#: Seeds one prompt may have (a seed study of many thousands is still one line).
MAX_SEEDS = 100_000
_ID = re.compile(r"[\w][\w.-]{0,119}")


@dataclass(frozen=True)
class PromptSpec:
    """One prompt of the file: its ``id``, the ``line`` it came from (1-based) and its checked :class:`Request`
    (seeds, steps, size, negative prompt, guidance scale, words)."""

    id: str
    line: int
    request: Request


@dataclass(frozen=True)
class Item:
    """One generation of a batch: prompt ``spec`` at ``seed``; written under ``items/<id>/``."""

    id: str
    spec: PromptSpec
    seed: int

    def key(self) -> dict:
        """What the item's outputs depend on (besides the model and guidance scale): a finished item is reused
        only when its index record has the same values."""
        r = self.spec.request
        return {
            "prompt": r.prompt,
            "negative_prompt": r.negative_prompt,
            "seed": self.seed,
            "steps": r.steps,
            "size": list(r.size),
        }


def default_id(prompt: str) -> str:
    """A prompt's id when the file gives none: a slug of its first words and 8 hex digits of its SHA-256."""
    digest = hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:8]
    return f"{safe_name(prompt)[:40].strip('_') or 'prompt'}-{digest}"


def _is_jsonl(path: Path) -> bool:
    return path.suffix.lower() in (".jsonl", ".ndjson")


def read_prompts(
    path: str | Path,
    *,
    seeds: str = "0",
    steps=30,
    size: str = "512x512",
    negative_prompt: str | None = None,
    guidance_scale: float | None = None,
    words: Sequence[str] | None = None,
) -> list[PromptSpec]:
    """The prompts of ``path``, each with its checked request.

    ``path`` is JSONL when it ends in ``.jsonl`` / ``.ndjson`` (one object a line, fields :data:`FIELDS`; a
    line's fields override the defaults given here), else a text file with one prompt a line. Blank lines are
    skipped. Raises :class:`UsageError` naming the file and line of the first problem (malformed JSON, an unknown
    field, a bad value, an id that is not a plain name or is repeated), or when the file has no prompt.
    """
    # The command line's own values first, so their errors name the option rather than a line.
    session.parse_seeds(seeds, what="--seeds", limit=MAX_SEEDS)
    session.parse_size(size, what="--size")
    session.parse_steps(steps, what="--steps")
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"PROMPTS {path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise UsageError(f"PROMPTS {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    defaults = dict(seeds=seeds, steps=steps, size=size, negative_prompt=negative_prompt, guidance_scale=guidance_scale)
    specs: list[PromptSpec] = []
    seen: dict[str, int] = {}
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        where = f"{path.name} line {number}"
        fields = _jsonl_fields(text, where) if _is_jsonl(path) else {"prompt": text.strip()}
        spec = _spec(fields, defaults, words, where, number)
        if spec.id in seen:
            raise UsageError(f"{where}: id {spec.id!r} is also on line {seen[spec.id]}; ids must be distinct")
        seen[spec.id] = number
        specs.append(spec)
    if not specs:
        raise UsageError(f"PROMPTS {path}: no prompts (the file is empty)")
    return specs


def _jsonl_fields(text: str, where: str) -> dict:
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(fields, dict):
        raise UsageError(f'{where}: expected a JSON object such as {{"prompt": "a cat"}}, got {text.strip()[:40]}')
    unknown = [k for k in fields if k not in FIELDS]
    if unknown:
        raise UsageError(f"{where}: unknown field {unknown[0]!r}; the fields are {', '.join(FIELDS)}")
    if not isinstance(fields.get("prompt"), str):
        raise UsageError(f'{where}: "prompt" (a string) is required')
    return fields


def _seeds_text(value, where: str) -> str:
    """A JSONL ``seeds`` value (``3``, ``"0-7"``, ``"1,4,9"`` or ``[1, 4, 9]``) as the text parse_seeds reads."""
    if isinstance(value, bool) or not isinstance(value, int | str | list):
        raise UsageError(f'{where}: seeds {value!r}: expected e.g. 3, "0-7" or [1, 4, 9]')
    if isinstance(value, list):
        if not value or not all(isinstance(s, int) and not isinstance(s, bool) for s in value):
            raise UsageError(f"{where}: seeds {value!r}: expected a list of integers such as [1, 4, 9]")
        return ",".join(str(s) for s in value)
    return str(value)


def _size_text(value, where: str) -> str:
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return f"{value[0]}x{value[1]}"
    if isinstance(value, str):
        return value
    raise UsageError(f'{where}: size {value!r}: expected "WIDTHxHEIGHT" or [width, height]')


def _spec(fields: dict, defaults: dict, words, where: str, number: int) -> PromptSpec:
    given = {k: v for k, v in fields.items() if k not in ("prompt", "id")}
    if "seeds" in given:
        given["seeds"] = _seeds_text(given["seeds"], where)
    if "size" in given:
        given["size"] = _size_text(given["size"], where)
    if "negative_prompt" in given and not isinstance(given["negative_prompt"], str | type(None)):
        raise UsageError(f"{where}: negative_prompt must be a string")
    options = {**defaults, **given}
    try:
        request = session.make_request(fields["prompt"], **options, words=words, option_prefix="", max_seeds=MAX_SEEDS)
    except UsageError as exc:
        raise UsageError(f"{where}: {exc}") from None
    pid = fields.get("id")
    if pid is None:
        pid = default_id(request.prompt)
    elif not isinstance(pid, str) or not _ID.fullmatch(pid):
        raise UsageError(
            f"{where}: id {pid!r}: expected a name of letters, digits, '_', '-' and '.' (up to 120, not starting "
            "with '.' or '-'), used as a folder name"
        )
    return PromptSpec(pid, number, request)


def plan_items(specs: Sequence[PromptSpec]) -> list[Item]:
    """Every prompt crossed with its seeds, in file order then seed order."""
    return [Item(f"{spec.id}_s{seed}", spec, seed) for spec in specs for seed in spec.request.seeds]
