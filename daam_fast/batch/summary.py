"""The dataset summary of a batch folder: ``summary.json`` and figures under ``summary/``.

Built from the finished items of ``index.jsonl`` and their maps, with :mod:`daam_fast.analysis` doing every
analysis (:func:`~daam_fast.analysis.word_influence`, :func:`~daam_fast.analysis.concept_overlap`,
:func:`~daam_fast.analysis.seed_sweep`); what is new here is only how results are grouped over items:

- per word, over every item whose prompt has it: the mean, spread (population std, min, max) of its influence
  share, and its stability across seeds (the mean over prompts of :func:`seed_sweep`'s stability);
- per prompt: the same per word over its seeds, the mean concept-overlap matrices (soft IoU, Pearson) over its
  seeds, and for each word pair the items where the two words overlap most;
- over the whole dataset: the (item, word pair)s of highest soft IoU — where one word's map took over
  another's (say, a character name taking over another character's mask).

A word is matched across prompts without regard to case. Undefined numbers are ``null``. Works on a partial
batch: only finished items count, and ``items`` says how many there are of each kind.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .. import analysis as A
from ..heatmap import HeatMapFileError, load
from ..report import FigureSet
from ..session import UsageError
from ..version import __version__
from .store import BatchDir, atomic_write, dumps, read_index

__all__ = ["SUMMARY_FIELDS", "summarize"]

logger = logging.getLogger(__name__)

#: Top-level keys of summary.json.
SUMMARY_FIELDS = (
    "daam_fast_version",
    "command",
    "model",
    "words",
    "items",
    "failed",
    "word_stats",
    "prompts",
    "top_overlaps",
    "figures",
)
#: Items listed per word pair of a prompt, and (item, pair)s listed for the whole dataset.
TOP_PER_PAIR, TOP_OVERALL = 3, 10


def _stats(values: Sequence[float]) -> dict:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {
        "n": int(v.size),
        "mean": float(v.mean()),
        "std": float(v.std()),
        "min": float(v.min()),
        "max": float(v.max()),
    }


def _nanmean(mats: list) -> list:
    """Element-wise mean of equal-shape matrices, ignoring nan (nan where every one is nan)."""
    stack = np.stack([np.asarray(m, dtype=np.float64) for m in mats])
    finite = np.isfinite(stack)
    count = finite.sum(0)
    total = np.where(finite, stack, 0.0).sum(0)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan).tolist()


def _chosen_words(gm, words: Sequence[str] | None, record: dict) -> list[str]:
    if words is None:
        return A.prompt_words(gm)
    try:
        A.word_maps(gm, words)
    except (ValueError, IndexError) as exc:  # WordNotFoundError is a ValueError
        raise UsageError(f"--words: prompt {record['prompt_id']} ({record['prompt']!r}): {exc}") from None
    return list(words)


def _prompt_summary(root: Path, records: list[dict], words, word_shares: dict, word_stability: dict) -> dict | None:
    """The summary of one prompt's finished items (the words' shares and stability also go into the dataset-wide
    dicts, keyed by casefolded word); None when none of its maps can be read."""
    maps, recs = [], []
    for rec in records:
        try:
            maps.append(load(root / rec["maps"]))
            recs.append(rec)
        except (HeatMapFileError, OSError) as exc:
            logger.warning("item %s: cannot read its maps (%s); left out of the summary", rec["id"], exc)
    if not maps:
        return None
    chosen = _chosen_words(maps[0], words, recs[0])
    shares = {w: [] for w in chosen}
    overlaps = []
    for gm in maps:
        for r in A.word_influence(gm, chosen):
            shares[r.word].append(r.share)
        overlaps.append(A.concept_overlap(gm, chosen))
    stability = A.seed_sweep(maps, chosen).stability if len(maps) > 1 else {w: float("nan") for w in chosen}
    for w in chosen:
        key = w.casefold()
        word_shares.setdefault(key, (w, []))[1].extend(shares[w])
        if math.isfinite(stability[w]):
            word_stability.setdefault(key, []).append(stability[w])
    pairs = []
    for i in range(len(chosen)):
        for j in range(i + 1, len(chosen)):
            per_item = [
                {"id": rec["id"], "seed": rec["seed"], "iou": float(ov.iou[i, j]), "pearson": float(ov.pearson[i, j])}
                for rec, ov in zip(recs, overlaps, strict=True)
            ]
            ranked = sorted((p for p in per_item if math.isfinite(p["iou"])), key=lambda p: -p["iou"])
            pairs.append(
                {
                    "words": [chosen[i], chosen[j]],
                    "iou": _stats([p["iou"] for p in per_item]),
                    "items": ranked[:TOP_PER_PAIR],
                }
            )
    return {
        "prompt_id": recs[0]["prompt_id"],
        "prompt": recs[0]["prompt"],
        "negative_prompt": recs[0].get("negative_prompt"),
        "seeds": [r["seed"] for r in recs],
        "words": chosen,
        "share": {w: _stats(shares[w]) for w in chosen},
        "stability": stability,
        "overlap": {
            "words": chosen,
            "iou": _nanmean([ov.iou.numpy() for ov in overlaps]),
            "pearson": _nanmean([ov.pearson.numpy() for ov in overlaps]),
            "figure": None,
        },
        "pairs": pairs,
    }


def summarize(
    root: str | Path,
    out: str | Path | None = None,
    *,
    words: Sequence[str] | None = None,
    command: str = "analyze",
    max_prompt_figures: int = 50,
) -> dict:
    """Summarise the batch folder ``root`` into ``out`` (default ``root``): ``summary.json`` (fields
    :data:`SUMMARY_FIELDS`, paths relative to ``out``; items named by their id, their files under ``root``) and
    the figures ``summary/influence.png``, ``summary/top_overlaps.png`` and ``summary/prompts/<id>_overlap.png``
    (the first ``max_prompt_figures`` prompts; every prompt's numbers are in the JSON). ``words``: the words to
    summarise, each in every prompt (default the batch's ``--words``, else every prompt word). Returns the
    summary. Raises :class:`UsageError` when ``root`` is no batch folder or a word is not in a prompt."""
    from . import figures as BF

    root = Path(root)
    out = Path(out) if out is not None else root
    index = root / "index.jsonl"
    if not index.is_file():
        raise UsageError(f"{root}: no index.jsonl (not a daam-fast batch folder, or no item finished yet)")
    config = BatchDir(root).read_config() or {}
    words = words if words is not None else config.get("words")
    records = list(read_index(index).values())
    ok = [r for r in records if r.get("status") == "ok" and r.get("complete")]
    failed = [r for r in records if r not in ok]
    by_prompt: dict[str, list[dict]] = {}
    for rec in ok:
        by_prompt.setdefault(rec["prompt_id"], []).append(rec)
    word_shares: dict[str, tuple[str, list]] = {}
    word_stability: dict[str, list] = {}
    prompts = []
    for recs in by_prompt.values():
        entry = _prompt_summary(root, recs, words, word_shares, word_stability)
        if entry is not None:
            prompts.append(entry)
    top = sorted(
        (
            {**item, "prompt_id": p["prompt_id"], "prompt": p["prompt"], "words": pair["words"]}
            for p in prompts
            for pair in p["pairs"]
            for item in pair["items"]
        ),
        key=lambda t: -t["iou"],
    )[:TOP_OVERALL]
    word_stats = {
        name: {"share": _stats(values), "stability": _stats(word_stability.get(key, []))}
        for key, (name, values) in word_shares.items()
    }
    out.mkdir(parents=True, exist_ok=True)
    figs = FigureSet(out)
    model = config.get("model")
    if word_stats:
        figs.add("influence", "summary/influence.png", BF.influence_figure(word_stats, model=model))
    for p in prompts[:max_prompt_figures]:
        rel = f"summary/prompts/{p['prompt_id']}_overlap.png"
        p["overlap"]["figure"] = figs.add(f"prompts/{p['prompt_id']}", rel, BF.prompt_overlap_figure(p, model=model))
    if top:
        figs.add("top_overlaps", "summary/top_overlaps.png", BF.top_overlaps_figure(root, top, model=model))
    summary = {
        "daam_fast_version": __version__,
        "command": command,
        "model": model,
        "words": None if words is None else list(words),
        "items": {
            "planned": config.get("planned"),
            "indexed": len(records),
            "ok": len(ok),
            "failed": len(failed),
            "nonfinite": sum(bool(r.get("nonfinite")) for r in records),
        },
        "failed": [{"id": r["id"], "error": r.get("error")} for r in failed],
        "word_stats": word_stats,
        "prompts": prompts,
        "top_overlaps": top,
        "figures": figs.entries,
    }
    atomic_write(out / "summary.json", lambda tmp: tmp.write_text(dumps(summary, indent=1) + "\n", encoding="utf-8"))
    return summary
